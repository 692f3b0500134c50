// The callers page: each API key's requests (by route) and tokens since start, and its token
// rate over the last interval, from the `isthmus_caller_*` series of `/metrics`; and how many
// requests the rate limits refused. It fetches nothing itself: the shell scrapes every refresh.

import { cell, el, table } from './dom';
import * as format from './format';
import { total } from './prometheus';
import { callerUses, type CallerUse } from './stats';
import type { Context, View } from './view';

const HEADERS = ['API key', 'Local', 'Cloud', 'Rejected', 'Prompt tokens', 'Completion tokens', 'Tokens/s'];

/** The cells after the key, each with the test id the end-to-end walk reads. */
function cells(use: CallerUse): Array<[string, string]> {
  return [
    ['local', format.count(use.requests.local)],
    ['cloud', format.count(use.requests.cloud)],
    ['rejected', format.count(use.requests.rejected)],
    ['prompt-tokens', format.grouped(use.promptTokens)],
    ['completion-tokens', format.grouped(use.completionTokens)],
    ['tokens-per-second', format.rate(use.tokensPerSecond, '')],
  ];
}

export class Callers implements View {
  readonly element: HTMLElement;
  private readonly content: HTMLElement;
  private readonly limited = el('span', { 'data-testid': 'rate-limited' });
  private shown = '';

  constructor() {
    this.content = el('div', { 'data-testid': 'callers', 'data-state': 'loading' }, [el('p', { class: 'muted', text: 'Waiting for metrics…' })]);
    this.element = el('div', { class: 'page callers' }, [
      el('div', { class: 'page-head' }, [el('h1', { text: 'Callers' })]),
      el('p', {
        class: 'muted intro',
        text: 'Requests and tokens per API key since start (key ids from the configuration), and the token rate of the last interval. Requests refused by rate limits: ',
      }, [this.limited]),
      this.content,
    ]);
  }

  async refresh(context: Context): Promise<void> {
    const latest = context.history.latest();
    if (latest === undefined) {
      return;
    }
    const refused = {
      requests: total(latest.scrape, 'isthmus_rate_limited_requests_total', { limit: 'requests' }),
      tokens: total(latest.scrape, 'isthmus_rate_limited_requests_total', { limit: 'tokens' }),
    };
    this.limited.textContent = `${format.count(refused.requests)} for requests per minute, ${format.count(refused.tokens)} for tokens per minute.`;
    const uses = callerUses(latest, context.history.previous());
    const rows = uses.map((use) => ({ key: use.key, texts: cells(use) }));
    const signature = JSON.stringify(rows);
    this.content.dataset['state'] = 'loaded';
    if (signature === this.shown) {
      return;
    }
    this.shown = signature;
    if (rows.length === 0) {
      this.content.replaceChildren(el('p', { class: 'empty', text: 'No requests yet.' }));
      return;
    }
    const { table: grid, body } = table(HEADERS);
    for (const { key, texts } of rows) {
      body.appendChild(
        el('tr', { 'data-key': key }, [
          cell(el('code', { text: key })),
          ...texts.map(([testId, text]) => cell(text, { class: 'num', 'data-testid': testId })),
        ]),
      );
    }
    this.content.replaceChildren(grid);
  }

  destroy(): void {}
}
