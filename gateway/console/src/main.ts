// The console's shell: navigation between pages (hash routes), the refresh loop that scrapes
// `/metrics` and `/readyz` every two seconds into the in-memory history, the token form when the
// admin API answers 401, and the banner when the API is unreachable.

import './style.css';
import * as api from './api';
import { Audit } from './audit';
import { Callers } from './callers';
import { el, setText } from './dom';
import { Configuration } from './config';
import { Explain } from './explain';
import * as format from './format';
import { Models } from './models';
import { Overview } from './overview';
import { parse } from './prometheus';
import { History } from './stats';
import { tokenForm } from './token';
import { Upstreams } from './upstreams';
import type { Context, Readiness, View, ViewName } from './view';

const REFRESH_INTERVAL_MS = 2000;

const PAGES: ReadonlyArray<{ name: ViewName; title: string; create: () => View }> = [
  { name: 'overview', title: 'Overview', create: () => new Overview() },
  { name: 'upstreams', title: 'Upstreams & canary', create: () => new Upstreams() },
  { name: 'models', title: 'Models', create: () => new Models() },
  { name: 'callers', title: 'Callers', create: () => new Callers() },
  { name: 'explain', title: 'Explain', create: () => new Explain() },
  { name: 'audit', title: 'Audit', create: () => new Audit() },
  { name: 'config', title: 'Configuration', create: () => new Configuration() },
];

function routeOf(hash: string): ViewName | undefined {
  const name = hash.replace(/^#\/?/, '');
  return PAGES.find((page) => page.name === name)?.name;
}

/** Logs what no view handled; failures the shell already shows are left out. */
function report(error: unknown): void {
  if (!(error instanceof api.AuthRequired) && !(error instanceof api.Unreachable)) {
    console.error('console refresh failed', error);
  }
}

class Shell {
  private readonly history = new History();
  private readiness: Readiness | undefined;
  private view: View | undefined;
  /** The page `view` shows. */
  private viewName: ViewName | undefined;
  private locked = false;
  private paused = false;
  private ticking = false;
  private timer: number | undefined;
  private unreachable: string | undefined;
  private metricsProblem: string | undefined;

  private readonly main = el('main', { id: 'main' });
  private readonly links = new Map<ViewName, HTMLAnchorElement>();
  private readonly toggle = el('button', { type: 'button', class: 'secondary', 'data-testid': 'auto-refresh', 'aria-pressed': 'false' });
  private readonly updated = el('span', { class: 'muted updated', 'data-testid': 'last-updated' });
  private readonly bannerSlot = el('div', { class: 'banner-slot' });

  constructor(root: HTMLElement) {
    const nav = el(
      'nav',
      { 'aria-label': 'Pages' },
      PAGES.map((page) => {
        const link = el('a', { href: `#/${page.name}`, 'data-testid': `nav-${page.name}`, text: page.title });
        this.links.set(page.name, link);
        return link;
      }),
    );
    this.toggle.addEventListener('click', () => this.setPaused(!this.paused));
    this.setPaused(false);
    root.replaceChildren(
      el('header', { class: 'topbar' }, [
        el('div', { class: 'brand' }, [el('strong', { text: 'Isthmus' }), el('span', { text: 'admin console' })]),
        nav,
        el('div', { class: 'spacer' }),
        this.updated,
        this.toggle,
      ]),
      this.bannerSlot,
      this.main,
    );
    api.setHooks({
      unauthorized: (error) => this.lock(error),
      reachability: (problem) => {
        this.unreachable = problem;
        this.showBanner();
      },
    });
    window.addEventListener('hashchange', () => this.navigate());
    this.navigate();
    void this.tick();
  }

  private context(): Context {
    return { history: this.history, readiness: this.readiness };
  }

  private navigate(): void {
    const name = routeOf(window.location.hash);
    if (name === undefined) {
      window.history.replaceState(null, '', '#/overview');
      this.navigate();
      return;
    }
    for (const [page, link] of this.links) {
      if (page === name) {
        link.setAttribute('aria-current', 'page');
      } else {
        link.removeAttribute('aria-current');
      }
    }
    const page = PAGES.find((candidate) => candidate.name === name);
    document.title = `${page?.title ?? name} · Isthmus`;
    if (this.locked || page === undefined) {
      return;
    }
    this.view?.destroy();
    this.view = page.create();
    this.viewName = name;
    this.main.replaceChildren(this.view.element);
    this.view.refresh(this.context()).catch(report);
  }

  private setPaused(paused: boolean): void {
    this.paused = paused;
    this.toggle.textContent = paused ? 'Resume auto-refresh' : 'Pause auto-refresh';
    this.toggle.setAttribute('aria-pressed', String(paused));
    this.toggle.title = paused ? 'Auto-refresh is paused' : `Refreshing every ${REFRESH_INTERVAL_MS / 1000} s`;
    if (paused) {
      window.clearTimeout(this.timer);
      this.timer = undefined;
    } else if (!this.ticking && this.timer === undefined && this.main.isConnected) {
      void this.tick();
    }
  }

  /** One refresh: scrape, then bring the current page up to date; then schedule the next. */
  private async tick(): Promise<void> {
    window.clearTimeout(this.timer);
    this.timer = undefined;
    this.ticking = true;
    try {
      if (!this.locked) {
        await this.sample();
      }
      if (!this.locked && this.view !== undefined) {
        await this.view.refresh(this.context());
      }
    } catch (error) {
      report(error);
    } finally {
      this.ticking = false;
    }
    if (!this.paused) {
      this.timer = window.setTimeout(() => void this.tick(), REFRESH_INTERVAL_MS);
    }
  }

  private async sample(): Promise<void> {
    const [metrics, readiness] = await Promise.allSettled([api.getText('/metrics'), api.getJson('/readyz', [200, 503])]);
    if (metrics.status === 'fulfilled') {
      this.history.push({ takenAtMs: Date.now(), scrape: parse(metrics.value) });
      this.metricsProblem = undefined;
      setText(this.updated, `Updated ${format.clock(new Date())}`);
    } else {
      this.metricsProblem = api.describeFailure(metrics.reason);
    }
    if (readiness.status === 'fulfilled') {
      const body = api.isObject(readiness.value.body) ? readiness.value.body : {};
      const { ready, ...checks } = body;
      this.readiness = { ready: ready === true && readiness.value.status === 200, checks };
    } else if (readiness.reason instanceof api.Unreachable) {
      this.readiness = { ready: false, checks: {} };
    }
    this.showBanner();
  }

  private showBanner(): void {
    const problems: string[] = [];
    if (this.unreachable !== undefined) {
      problems.push(`The admin API is unreachable (${this.unreachable}). Retrying every ${REFRESH_INTERVAL_MS / 1000} s.`);
    }
    if (this.metricsProblem !== undefined) {
      problems.push(`Could not read /metrics: ${this.metricsProblem}`);
    }
    const current = this.bannerSlot.firstElementChild;
    const text = problems.join(' ');
    if (text === '') {
      current?.remove();
    } else if (current === null) {
      this.bannerSlot.append(el('div', { class: 'banner', role: 'alert', 'data-testid': 'error-banner', text }));
    } else {
      setText(current, text);
    }
  }

  private lock(error: api.AuthRequired): void {
    if (this.locked) {
      return;
    }
    this.locked = true;
    // The page is kept as it is (an edit of the configuration's text, an explain body) and
    // comes back once a token is accepted: a token rotated under an open console must not
    // throw away what the operator was typing.
    const reason = error.refused
      ? 'The gateway refused the kept admin token. Enter the current one.'
      : 'The admin API of this gateway needs a token (Authorization: Bearer).';
    this.main.replaceChildren(tokenForm(reason, () => this.unlock()));
  }

  private unlock(): void {
    this.locked = false;
    if (this.view !== undefined && routeOf(window.location.hash) === this.viewName) {
      this.main.replaceChildren(this.view.element);
      this.view.refresh(this.context()).catch(report);
    } else {
      this.navigate();
    }
    if (!this.ticking) {
      void this.tick();
    }
  }
}

const root = document.getElementById('app');
if (root !== null) {
  new Shell(root);
}
