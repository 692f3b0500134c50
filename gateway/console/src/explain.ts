// The explain page: sends a request body to `POST /admin/api/explain?path=…`, which runs the
// routing policy and the firewall on it as if it came to that data-plane path, without
// answering it, and shows the decision, the verdict of each rule and the firewall's findings.

import * as api from './api';
import { cell, el, pill, table } from './dom';
import * as format from './format';
import type { View } from './view';

const SAMPLE_BODY = JSON.stringify(
  {
    model: 'gpt-4o-mini',
    messages: [
      { role: 'system', content: 'You are a concise assistant.' },
      { role: 'user', content: 'Summarise our refund policy in three bullet points.' },
    ],
    max_tokens: 256,
  },
  null,
  2,
);

/** The same request for the Responses API. */
const SAMPLE_RESPONSES_BODY = JSON.stringify(
  {
    model: 'gpt-4o-mini',
    instructions: 'You are a concise assistant.',
    input: 'Summarise our refund policy in three bullet points.',
    max_output_tokens: 256,
  },
  null,
  2,
);

/** The data-plane paths a body can be explained as sent to, and each one's sample body. */
const PATHS: Record<string, string> = {
  '/v1/chat/completions': SAMPLE_BODY,
  '/v1/responses': SAMPLE_RESPONSES_BODY,
};

const CLASSIFICATION_HEADER = 'x-data-classification';

function text(value: unknown): string {
  if (value === undefined || value === null) {
    return format.NONE;
  }
  return typeof value === 'string' ? value : JSON.stringify(value);
}

/** Parses `Name: value` lines; the error names the first line that is not one. */
export function parseHeaderLines(raw: string): Record<string, string> | string {
  const headers: Record<string, string> = {};
  for (const [index, line] of raw.split('\n').entries()) {
    if (line.trim() === '') {
      continue;
    }
    const colon = line.indexOf(':');
    const name = colon > 0 ? line.slice(0, colon).trim() : '';
    if (!/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(name)) {
      return `line ${index + 1} is not \`Name: value\``;
    }
    headers[name.toLowerCase()] = line.slice(colon + 1).trim();
  }
  return headers;
}

function tone(route: string): 'ok' | 'info' | 'bad' | 'muted' {
  switch (route) {
    case 'local':
      return 'ok';
    case 'cloud':
      return 'info';
    case 'rejected':
      return 'bad';
    default:
      return 'muted';
  }
}

function field(label: string, value: Node | string, testId?: string): HTMLElement[] {
  const holder = el('dd', testId === undefined ? {} : { 'data-testid': testId });
  holder.append(value);
  return [el('dt', { text: label }), holder];
}

export class Explain implements View {
  readonly element: HTMLElement;
  private readonly body: HTMLTextAreaElement;
  private readonly path: HTMLSelectElement;
  private readonly classification: HTMLInputElement;
  private readonly headers: HTMLTextAreaElement;
  private readonly submit: HTMLButtonElement;
  private readonly result: HTMLElement;

  constructor() {
    this.body = el('textarea', {
      'data-testid': 'explain-body',
      rows: 16,
      spellcheck: 'false',
      'aria-label': 'Chat completion request body (JSON)',
    });
    this.body.value = SAMPLE_BODY;
    this.path = el(
      'select',
      { 'data-testid': 'explain-path', 'aria-label': 'Path the request is sent to' },
      Object.keys(PATHS).map((path) => el('option', { value: path, text: path })),
    );
    this.path.addEventListener('change', () => {
      // A sample body follows the path; a body the operator wrote stays.
      if (Object.values(PATHS).includes(this.body.value)) {
        this.body.value = PATHS[this.path.value] ?? SAMPLE_BODY;
      }
    });
    this.classification = el('input', {
      type: 'text',
      'data-testid': 'explain-classification',
      placeholder: 'e.g. confidential',
      list: 'classifications',
      autocomplete: 'off',
    });
    this.headers = el('textarea', {
      'data-testid': 'explain-headers',
      rows: 3,
      spellcheck: 'false',
      placeholder: 'x-isthmus-canary: v2',
      'aria-label': 'Other request headers, one `Name: value` per line',
    });
    this.submit = el('button', { type: 'submit', 'data-testid': 'explain-submit', text: 'Explain' });
    this.result = el('section', { class: 'explain-result', 'data-testid': 'explain-result', 'data-state': 'idle' });

    const form = el('form', { class: 'explain-form' }, [
      el('label', { class: 'stacked' }, ['Sent to', this.path]),
      el('label', { class: 'stacked' }, ['Request body (JSON)', this.body]),
      el('div', { class: 'header-fields' }, [
        el('label', { class: 'stacked' }, [`${CLASSIFICATION_HEADER} header`, this.classification]),
        el(
          'datalist',
          { id: 'classifications' },
          ['public', 'internal', 'confidential', 'restricted'].map((value) => el('option', { value })),
        ),
        el('label', { class: 'stacked' }, ['Other headers (one `Name: value` per line)', this.headers]),
      ]),
      el('div', { class: 'actions' }, [this.submit]),
    ]);
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      void this.explain();
    });

    this.element = el('div', { class: 'page explain' }, [
      el('div', { class: 'page-head' }, [el('h1', { text: 'Explain a routing decision' })]),
      el('p', {
        class: 'muted intro',
        text: 'Runs the routing policy and the firewall on a request as if it came to the chosen path (a Responses API body is translated as serving translates it); nothing is sent to a model.',
      }),
      el('div', { class: 'explain-layout' }, [form, this.result]),
    ]);
  }

  refresh(): Promise<void> {
    return Promise.resolve();
  }

  destroy(): void {}

  private fail(message: string, state: 'invalid' | 'error'): void {
    this.result.dataset['state'] = state;
    this.result.replaceChildren(el('p', { class: 'error', 'data-testid': 'explain-error', text: message }));
  }

  private async explain(): Promise<void> {
    const raw = this.body.value;
    let parsed: unknown;
    try {
      parsed = JSON.parse(raw);
    } catch (error) {
      this.fail(`The body is not valid JSON: ${error instanceof Error ? error.message : String(error)}`, 'invalid');
      return;
    }
    if (!api.isObject(parsed)) {
      this.fail('The body must be a JSON object: a request for the chosen path.', 'invalid');
      return;
    }
    const headers = parseHeaderLines(this.headers.value);
    if (typeof headers === 'string') {
      this.fail(`The other headers are not valid: ${headers}.`, 'invalid');
      return;
    }
    const classification = this.classification.value.trim();
    if (classification !== '') {
      headers[CLASSIFICATION_HEADER] = classification;
    }
    headers['content-type'] = 'application/json';

    this.submit.disabled = true;
    this.result.dataset['state'] = 'pending';
    this.result.replaceChildren(el('p', { class: 'muted', text: 'Explaining…' }));
    try {
      const target = `/admin/api/explain?path=${encodeURIComponent(this.path.value)}`;
      const answer = await api.call('POST', target, { body: raw, headers });
      if (answer.status === 200 && api.isObject(answer.body)) {
        this.render(answer.body);
      } else {
        this.fail(`The gateway could not explain this request (HTTP ${answer.status}): ${api.errorMessages(answer).join('; ')}`, 'error');
      }
    } catch (error) {
      const problem = error instanceof Error ? error.message : String(error);
      this.fail(`The request was not explained: ${problem}`, 'error');
    } finally {
      this.submit.disabled = false;
    }
  }

  private render(explanation: Record<string, unknown>): void {
    const decision = api.isObject(explanation['decision']) ? explanation['decision'] : {};
    const route = typeof decision['route'] === 'string' ? decision['route'] : 'unknown';
    const details = Object.entries(decision)
      .filter(([key]) => key !== 'route')
      .map(([key, value]) => `${key}: ${text(value)}`);
    const entities = Array.isArray(explanation['entities']) ? explanation['entities'].map((item) => text(item)) : [];
    const attachments = Array.isArray(explanation['attachments']) ? explanation['attachments'].map((item) => text(item)) : [];
    const complexity = explanation['complexity'];

    const summary = el('dl', { class: 'facts' }, [
      ...field('Route', pill(route, tone(route), { 'data-testid': 'explain-route' })),
      ...field('Decision', details.length === 0 ? format.NONE : details.join(' · '), 'explain-decision'),
      ...field('Rule', text(explanation['rule']), 'explain-rule'),
      ...field('Complexity', typeof complexity === 'number' ? complexity.toFixed(3) : format.NONE, 'explain-complexity'),
      ...field('Sensitive', format.yesNo(explanation['sensitive']), 'explain-sensitive'),
      ...field('Sensitive entity types', entities.length === 0 ? 'none' : entities.join(', '), 'explain-entities'),
      ...field('Attachments (not scanned)', attachments.length === 0 ? 'none' : attachments.join(', '), 'explain-attachments'),
      ...field('Spillover', format.yesNo(explanation['spillover']), 'explain-spillover'),
    ]);

    this.result.dataset['state'] = 'done';
    this.result.replaceChildren(
      el('h2', { text: 'Decision' }),
      summary,
      el('h2', { text: 'Rules' }),
      this.rules(explanation['rules']),
      el('h2', { text: 'Firewall' }),
      this.firewall(explanation['waf']),
    );
  }

  private rules(value: unknown): HTMLElement {
    const rules = Array.isArray(value) ? value.filter(api.isObject) : [];
    if (rules.length === 0) {
      return el('p', { class: 'muted', text: 'No rule was evaluated.' });
    }
    const { table: grid, body } = table(['Rule', 'Verdict'], { 'data-testid': 'explain-rules' });
    for (const rule of rules) {
      const verdict = text(rule['verdict']);
      const verdictTone = verdict === 'matched' ? 'ok' : verdict.startsWith('failed') ? 'bad' : 'muted';
      body.appendChild(el('tr', {}, [cell(el('code', { text: text(rule['rule']) })), cell(pill(verdict, verdictTone))]));
    }
    return grid;
  }

  private firewall(value: unknown): HTMLElement {
    if (!api.isObject(value)) {
      return el('p', { class: 'muted', 'data-testid': 'explain-waf', text: 'The firewall did not inspect this request.' });
    }
    const action = text(value['action']);
    const actionTone = action === 'Blocked' ? 'bad' : action === 'Matched' ? 'warn' : 'muted';
    const rules = Array.isArray(value['rules']) ? value['rules'].filter(api.isObject) : [];
    const holder = el('div', { 'data-testid': 'explain-waf' }, [
      el('dl', { class: 'facts' }, [
        ...field('Action', pill(action, actionTone, { 'data-testid': 'explain-waf-action' })),
        ...field('Anomaly score', text(value['score'])),
      ]),
    ]);
    if (rules.length === 0) {
      holder.append(el('p', { class: 'muted', text: 'No firewall rule matched.' }));
      return holder;
    }
    const { table: grid, body } = table(['Rule id', 'Severity', 'Message', 'Location', 'Detail'], { 'data-testid': 'explain-waf-rules' });
    for (const rule of rules) {
      body.appendChild(
        el('tr', {}, [
          cell(el('code', { text: text(rule['id']) })),
          cell(text(rule['severity'])),
          cell(text(rule['message'])),
          cell(el('code', { text: text(rule['location']) })),
          cell(text(rule['detail'])),
        ]),
      );
    }
    holder.append(grid);
    return holder;
  }
}
