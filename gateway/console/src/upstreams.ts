// The upstreams page: the cloud pools and their backends (`GET /admin/api/upstreams`), with the
// canary weight of each editable (`PUT /admin/api/upstreams/{pool}/backends/{backend}`, which
// rewrites the configuration file and reloads it) and a configuration reload
// (`POST /admin/api/reload`). Outcomes and the gateway's errors show verbatim in one message area.

import * as api from './api';
import { cell, el, Latest, pill, setText, table } from './dom';
import * as format from './format';
import type { View } from './view';

interface Backend {
  readonly pool: string;
  readonly backend: string;
  readonly url: string;
  readonly variant: string;
  readonly weight: number;
  readonly probedHealthy: boolean | undefined;
  readonly circuit: string;
  readonly inFlight: number | undefined;
  readonly requests: number | undefined;
  /** Connections the gateway opened to the backend (requests and probes): against the
   *  requests, how well connections are reused. */
  readonly connections: number | undefined;
}

/** The largest weight the gateway accepts. */
const WEIGHT_MAX = 1000;

function text(value: unknown): string {
  return typeof value === 'string' ? value : value === undefined || value === null ? '' : String(value);
}

function numeric(value: unknown): number | undefined {
  return typeof value === 'number' && Number.isFinite(value) ? value : undefined;
}

function readBackends(body: unknown): Backend[] {
  const list = api.isObject(body) ? body['backends'] : undefined;
  if (!Array.isArray(list)) {
    throw new Error('the answer has no `backends` list');
  }
  return list.filter(api.isObject).map((item) => ({
    pool: text(item['pool']),
    backend: text(item['backend']),
    url: text(item['url']),
    variant: text(item['variant']),
    weight: numeric(item['weight']) ?? 0,
    probedHealthy: typeof item['probed_healthy'] === 'boolean' ? item['probed_healthy'] : undefined,
    circuit: text(item['circuit']),
    inFlight: numeric(item['in_flight']),
    requests: numeric(item['requests']),
    connections: numeric(item['connections']),
  }));
}

function byPool(backends: readonly Backend[]): Map<string, Backend[]> {
  const pools = new Map<string, Backend[]>();
  for (const backend of backends) {
    const members = pools.get(backend.pool) ?? [];
    members.push(backend);
    pools.set(backend.pool, members);
  }
  return pools;
}

function share(weight: number, total: number): string {
  return total > 0 ? format.percent(weight / total) : format.NONE;
}

/** Parses a weight typed by the operator; `undefined` unless a whole number in 0..=1000. */
export function parseWeight(raw: string): number | undefined {
  const trimmed = raw.trim();
  if (!/^\d+$/.test(trimmed)) {
    return undefined;
  }
  const weight = Number(trimmed);
  return weight <= WEIGHT_MAX ? weight : undefined;
}

/** Keeps the nodes of one row so that a refresh updates them in place. */
interface Row {
  readonly element: HTMLTableRowElement;
  readonly health: HTMLTableCellElement;
  readonly inFlight: HTMLTableCellElement;
  readonly requests: HTMLTableCellElement;
  readonly connections: HTMLTableCellElement;
  readonly weight: HTMLTableCellElement;
  readonly share: HTMLTableCellElement;
  readonly input: HTMLInputElement;
  readonly preview: HTMLElement;
  dirty: boolean;
}

type Tone = 'idle' | 'pending' | 'success' | 'error';

export class Upstreams implements View {
  readonly element: HTMLElement;
  private readonly message: HTMLElement;
  private readonly pools: HTMLElement;
  private readonly reloadButton: HTMLButtonElement;
  private readonly latest = new Latest();
  private rows = new Map<string, Row>();
  private layout = '';
  private backends: Backend[] = [];

  constructor() {
    this.message = el('div', { class: 'message', 'data-testid': 'upstream-message', 'data-state': 'idle', role: 'status' });
    this.pools = el('div', { class: 'pools', 'data-testid': 'pools', 'data-state': 'loading' }, [
      el('p', { class: 'muted', text: 'Loading…' }),
    ]);
    this.reloadButton = el('button', { type: 'button', 'data-testid': 'reload', text: 'Reload configuration' });
    this.reloadButton.addEventListener('click', () => void this.reload());
    const refresh = el('button', { type: 'button', class: 'secondary', text: 'Refresh' });
    refresh.addEventListener('click', () => void this.load(true));
    this.element = el('div', { class: 'page upstreams' }, [
      el('div', { class: 'page-head' }, [
        el('h1', { text: 'Upstreams & canary' }),
        el('div', { class: 'spacer' }),
        refresh,
        this.reloadButton,
      ]),
      el('p', {
        class: 'muted intro',
        text:
          'A backend gets weight / (sum of the pool\u2019s weights) of the pool\u2019s traffic. Applying a weight ' +
          'rewrites the configuration file and reloads it.',
      }),
      this.message,
      this.pools,
    ]);
  }

  refresh(): Promise<void> {
    return this.load(false);
  }

  destroy(): void {}

  /** Fetches the backends; `rebuild` redraws the tables even when the layout is unchanged. */
  private async load(rebuild: boolean): Promise<void> {
    const current = this.latest.begin();
    let backends: Backend[];
    try {
      backends = readBackends((await api.getJson('/admin/api/upstreams')).body);
    } catch (error) {
      const problem = api.describeFailure(error);
      if (problem !== undefined && current()) {
        this.pools.dataset['state'] = 'error';
        this.pools.replaceChildren(el('p', { class: 'error', text: `Could not load the upstreams: ${problem}` }));
        this.layout = '';
      }
      return;
    }
    if (!current()) {
      return;
    }
    this.backends = backends;
    const layout = JSON.stringify(backends.map((backend) => [backend.pool, backend.backend]));
    if (rebuild || layout !== this.layout) {
      this.build(backends);
      this.layout = layout;
    } else {
      this.update(backends);
    }
    this.pools.dataset['state'] = 'loaded';
  }

  private build(backends: readonly Backend[]): void {
    this.rows = new Map();
    const pools = byPool(backends);
    if (pools.size === 0) {
      this.pools.replaceChildren(
        el('p', { class: 'empty', 'data-testid': 'no-pools', text: 'No cloud pools are configured: every request is answered locally or rejected.' }),
      );
      return;
    }
    const sections = [...pools.entries()].map(([pool, members]) => {
      const { table: grid, body } = table(
        ['Backend', 'URL', 'Variant', 'Health', 'In flight', 'Requests', 'Connections', 'Weight', 'Share', 'New weight'],
        { 'data-pool': pool },
      );
      for (const backend of members) {
        const row = this.buildRow(backend);
        this.rows.set(`${backend.pool}\u0000${backend.backend}`, row);
        body.appendChild(row.element);
      }
      return el('section', { class: 'pool' }, [el('h2', {}, ['Pool ', el('code', { text: pool })]), grid]);
    });
    this.pools.replaceChildren(...sections);
    this.update(backends);
  }

  private buildRow(backend: Backend): Row {
    const key = `${backend.pool}-${backend.backend}`;
    const input = el('input', {
      type: 'number',
      min: 0,
      max: WEIGHT_MAX,
      step: 1,
      inputmode: 'numeric',
      'aria-label': `New weight of ${backend.pool}/${backend.backend}`,
      'data-testid': `weight-${key}`,
    });
    input.value = String(backend.weight);
    const preview = el('span', { class: 'preview muted' });
    const apply = el('button', { type: 'button', 'data-testid': `apply-${key}`, text: 'Apply' });
    const row: Row = {
      element: el('tr', { 'data-pool': backend.pool, 'data-backend': backend.backend }),
      health: cell(''),
      inFlight: cell('', { class: 'num' }),
      requests: cell('', { class: 'num' }),
      connections: cell('', { class: 'num', 'data-testid': 'connections' }),
      weight: cell('', { class: 'num', 'data-testid': 'weight-current' }),
      share: cell('', { class: 'num' }),
      input,
      preview,
      dirty: false,
    };
    input.addEventListener('input', () => {
      row.dirty = true;
      this.showPreview(backend.pool, backend.backend, row);
    });
    input.addEventListener('keydown', (event) => {
      if (event.key === 'Enter') {
        void this.applyWeight(backend.pool, backend.backend, row);
      }
    });
    apply.addEventListener('click', () => void this.applyWeight(backend.pool, backend.backend, row));
    row.element.append(
      cell(el('code', { text: backend.backend })),
      cell(backend.url, { class: 'url' }),
      cell(backend.variant === '' ? format.NONE : backend.variant),
      row.health,
      row.inFlight,
      row.requests,
      row.connections,
      row.weight,
      row.share,
      cell(el('div', { class: 'weight-edit' }, [input, apply, preview])),
    );
    return row;
  }

  private update(backends: readonly Backend[]): void {
    const totals = new Map<string, number>();
    for (const backend of backends) {
      totals.set(backend.pool, (totals.get(backend.pool) ?? 0) + backend.weight);
    }
    for (const backend of backends) {
      const row = this.rows.get(`${backend.pool}\u0000${backend.backend}`);
      if (row === undefined) {
        continue;
      }
      const up = backend.probedHealthy !== false && backend.circuit !== 'open';
      const circuit = backend.circuit === '' ? '' : `circuit ${backend.circuit.replaceAll('_', '-')}`;
      const healthKey = `${up}|${circuit}`;
      if (row.health.dataset['key'] !== healthKey) {
        row.health.dataset['key'] = healthKey;
        row.health.replaceChildren(
          pill(up ? 'up' : 'down', up ? 'ok' : 'bad'),
          ' ',
          el('span', { class: backend.circuit === 'closed' ? 'muted' : 'warn-text', text: circuit }),
        );
      }
      setText(row.inFlight, format.count(backend.inFlight));
      setText(row.requests, format.count(backend.requests));
      setText(row.connections, format.count(backend.connections));
      setText(row.weight, String(backend.weight));
      setText(row.share, share(backend.weight, totals.get(backend.pool) ?? 0));
      if (!row.dirty && document.activeElement !== row.input) {
        row.input.value = String(backend.weight);
      }
      this.showPreview(backend.pool, backend.backend, row);
    }
  }

  /** The share the backend would get with the weight being typed. */
  private showPreview(pool: string, name: string, row: Row): void {
    const typed = parseWeight(row.input.value);
    const current = this.backends.find((backend) => backend.pool === pool && backend.backend === name);
    if (typed === undefined || current === undefined || typed === current.weight) {
      setText(row.preview, '');
      return;
    }
    const others = this.backends
      .filter((backend) => backend.pool === pool && backend.backend !== name)
      .reduce((sum, backend) => sum + backend.weight, 0);
    setText(row.preview, `\u2192 ${share(typed, typed + others)}`);
  }

  private say(tone: Tone, lines: readonly string[]): void {
    this.message.dataset['state'] = tone;
    this.message.className = `message ${tone}`;
    const [first, ...rest] = lines;
    this.message.replaceChildren(el('span', { text: first ?? '' }));
    if (rest.length > 0) {
      this.message.append(el('ul', {}, rest.map((line) => el('li', { text: line }))));
    }
  }

  private async applyWeight(pool: string, backend: string, row: Row): Promise<void> {
    const weight = parseWeight(row.input.value);
    if (weight === undefined) {
      this.say('error', [`Weight not applied to ${pool}/${backend}: a weight is a whole number from 0 to ${WEIGHT_MAX}.`]);
      return;
    }
    this.say('pending', [`Applying weight ${weight} to ${pool}/${backend}…`]);
    let answer: api.Answer;
    try {
      answer = await api.call(
        'PUT',
        `/admin/api/upstreams/${encodeURIComponent(pool)}/backends/${encodeURIComponent(backend)}`,
        { body: JSON.stringify({ weight }) },
      );
    } catch (error) {
      this.say('error', [`Weight not applied to ${pool}/${backend}: ${error instanceof Error ? error.message : String(error)}`]);
      return;
    }
    const body = api.isObject(answer.body) ? answer.body : {};
    if (answer.status === 200 && body['reloaded'] === true) {
      row.dirty = false;
      await this.load(true);
      this.say('success', [`Weight ${weight} for ${pool}/${backend} applied.`, ...reloadDetails(body)]);
    } else {
      this.say('error', [`Weight not applied to ${pool}/${backend} (HTTP ${answer.status}):`, ...api.errorMessages(answer)]);
    }
  }

  private async reload(): Promise<void> {
    this.reloadButton.disabled = true;
    this.say('pending', ['Reloading the configuration…']);
    try {
      const answer = await api.call('POST', '/admin/api/reload');
      const body = api.isObject(answer.body) ? answer.body : {};
      if (answer.status === 200 && body['reloaded'] === true) {
        await this.load(true);
        this.say('success', ['Configuration reloaded.', ...reloadDetails(body)]);
      } else {
        this.say('error', [`Configuration not reloaded (HTTP ${answer.status}):`, ...api.errorMessages(answer)]);
      }
    } catch (error) {
      this.say('error', [`Configuration not reloaded: ${error instanceof Error ? error.message : String(error)}`]);
    } finally {
      this.reloadButton.disabled = false;
    }
  }
}

/** The lines of a reload report: pools rebuilt, sections that need a restart, the file written. */
function reloadDetails(body: Record<string, unknown>): string[] {
  const list = (value: unknown): string[] => (Array.isArray(value) ? value.map((item) => text(item)) : []);
  const lines: string[] = [];
  const pools = list(body['pools']);
  lines.push(pools.length === 0 ? 'No pool was rebuilt.' : `Pools rebuilt: ${pools.join(', ')}.`);
  const restart = list(body['restart_required']);
  if (restart.length > 0) {
    lines.push(`Changes that take effect only after a restart: ${restart.join(', ')}.`);
  }
  if (typeof body['file'] === 'string') {
    lines.push(`Written to ${body['file']}.`);
  }
  return lines;
}
