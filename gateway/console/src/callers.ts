// The callers page: each API key with its rate limits and what is left of them now
// (`GET /admin/api/callers`), its requests (by route) and tokens since start and its token rate
// over the last interval (the `isthmus_caller_*` series of `/metrics`), and how many requests
// the rate limits refused.

import * as api from './api';
import { cell, el, Latest, table } from './dom';
import * as format from './format';
import { total } from './prometheus';
import { callerUses, type CallerUse } from './stats';
import type { Context, View } from './view';

interface Limits {
  readonly requestsPerMinute: number | undefined;
  readonly tokensPerMinute: number | undefined;
  readonly tokensPerDay: number | undefined;
  /** Anonymous limits that each client address has to itself. */
  readonly perClient: boolean;
  readonly requestsLeft: number | undefined;
  readonly tokensLeft: number | undefined;
  readonly tokensLeftToday: number | undefined;
}

function numeric(value: unknown): number | undefined {
  return typeof value === 'number' && Number.isFinite(value) ? value : undefined;
}

function readLimits(body: unknown): Map<string, Limits> {
  const list = api.isObject(body) ? body['callers'] : undefined;
  if (!Array.isArray(list)) {
    throw new Error('the answer has no `callers` list');
  }
  const limits = new Map<string, Limits>();
  for (const item of list.filter(api.isObject)) {
    const configured = api.isObject(item['limits']) ? item['limits'] : {};
    const remaining = api.isObject(item['remaining']) ? item['remaining'] : {};
    limits.set(typeof item['key'] === 'string' ? item['key'] : '', {
      requestsPerMinute: numeric(configured['requests_per_minute']),
      tokensPerMinute: numeric(configured['tokens_per_minute']),
      tokensPerDay: numeric(configured['tokens_per_day']),
      perClient: configured['per_client'] === true,
      requestsLeft: numeric(remaining['requests']),
      tokensLeft: numeric(remaining['tokens']),
      tokensLeftToday: numeric(remaining['tokens_today']),
    });
  }
  return limits;
}

const HEADERS = ['API key', 'Limits', 'Left now', 'Local', 'Cloud', 'Rejected', 'Prompt tokens', 'Completion tokens', 'Tokens/s'];

/** `600 requests/min · 200,000 tokens/min · 5,000,000 tokens/day`, or `none`. */
function limitText(requests: number | undefined, tokens: number | undefined, day: number | undefined, daySuffix: string): string {
  const parts = [
    requests === undefined ? undefined : `${format.grouped(requests)} requests/min`,
    tokens === undefined ? undefined : `${format.grouped(tokens)} tokens/min`,
    day === undefined ? undefined : `${format.grouped(day)} tokens ${daySuffix}`,
  ].filter((part) => part !== undefined);
  return parts.length === 0 ? 'none' : parts.join(' · ');
}

/** The cells after the key, each with the test id the end-to-end walk reads. */
function cells(use: CallerUse | undefined, limits: Limits | undefined): Array<[string, string]> {
  return [
    [
      'limits',
      limitText(limits?.requestsPerMinute, limits?.tokensPerMinute, limits?.tokensPerDay, 'a day') +
        (limits?.perClient === true ? ', each client address' : ''),
    ],
    [
      'left',
      limits?.perClient === true ? 'per client' : limitText(limits?.requestsLeft, limits?.tokensLeft, limits?.tokensLeftToday, 'today'),
    ],
    ['local', format.count(use?.requests.local ?? 0)],
    ['cloud', format.count(use?.requests.cloud ?? 0)],
    ['rejected', format.count(use?.requests.rejected ?? 0)],
    ['prompt-tokens', format.grouped(use?.promptTokens ?? 0)],
    ['completion-tokens', format.grouped(use?.completionTokens ?? 0)],
    ['tokens-per-second', format.rate(use?.tokensPerSecond, '')],
  ];
}

export class Callers implements View {
  readonly element: HTMLElement;
  private readonly content: HTMLElement;
  private readonly limited = el('span', { 'data-testid': 'rate-limited' });
  private readonly latest = new Latest();
  private shown = '';

  constructor() {
    this.content = el('div', { 'data-testid': 'callers', 'data-state': 'loading' }, [el('p', { class: 'muted', text: 'Loading…' })]);
    this.element = el('div', { class: 'page callers' }, [
      el('div', { class: 'page-head' }, [el('h1', { text: 'Callers' })]),
      el(
        'p',
        {
          class: 'muted intro',
          text: 'API keys as configured (ids, never keys) with their rate limits, and their requests and tokens since start from /metrics. Requests refused by rate limits: ',
        },
        [this.limited],
      ),
      this.content,
    ]);
  }

  async refresh(context: Context): Promise<void> {
    const current = this.latest.begin();
    let limits: Map<string, Limits>;
    try {
      limits = readLimits((await api.getJson('/admin/api/callers')).body);
    } catch (error) {
      const problem = api.describeFailure(error);
      if (problem !== undefined && current()) {
        this.shown = '';
        this.content.dataset['state'] = 'error';
        this.content.replaceChildren(el('p', { class: 'error', text: `Could not load the callers: ${problem}` }));
      }
      return;
    }
    if (!current()) {
      return;
    }
    const latest = context.history.latest();
    const uses = latest === undefined ? [] : callerUses(latest, context.history.previous());
    if (latest !== undefined) {
      const refused = (limit: string): string =>
        format.count(total(latest.scrape, 'isthmus_rate_limited_requests_total', { limit }) ?? 0);
      this.limited.textContent = `${refused('requests')} for requests per minute, ${refused('tokens')} for tokens per minute.`;
    }
    // The busiest first, then configured keys without traffic.
    const keys = [...uses.map((use) => use.key), ...[...limits.keys()].filter((key) => !uses.some((use) => use.key === key))];
    const rows = keys.map((key) => ({ key, texts: cells(uses.find((use) => use.key === key), limits.get(key)) }));
    const signature = JSON.stringify(rows);
    this.content.dataset['state'] = 'loaded';
    if (signature === this.shown) {
      return;
    }
    this.shown = signature;
    if (rows.length === 0) {
      this.content.replaceChildren(el('p', { class: 'empty', text: 'No API keys are configured and no requests came yet.' }));
      return;
    }
    const { table: grid, body } = table(HEADERS);
    for (const { key, texts } of rows) {
      body.appendChild(
        el('tr', { 'data-key': key }, [
          cell(el('code', { text: key })),
          ...texts.map(([testId, text]) => cell(text, { class: testId === 'limits' || testId === 'left' ? undefined : 'num', 'data-testid': testId })),
        ]),
      );
    }
    this.content.replaceChildren(grid);
  }

  destroy(): void {}
}
