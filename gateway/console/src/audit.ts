// The audit page: the audit trail's state (`GET /admin/api/audit`) and its newest records
// (`GET /admin/api/audit/records`), filterable by category. Records carry client-supplied
// strings, so every value is shown as text; a row opens to the record's full JSON.

import * as api from './api';
import { cell, el, Latest, pill, setText, table } from './dom';
import * as format from './format';
import type { View } from './view';

export const CATEGORIES = ['IsthmusAudit', 'IsthmusWaf', 'IsthmusCheckpoint', 'IsthmusLifecycle'] as const;
const LIMITS = [50, 100, 200, 500] as const;
const DEFAULT_LIMIT = 100;
/** Ticks (of 2 s) between periodic reloads of a view filtered by category. */
const FILTERED_REFRESH_TICKS = 5;

type AuditRecord = Record<string, unknown>;

function text(value: unknown): string {
  if (value === undefined || value === null || value === '') {
    return format.NONE;
  }
  return typeof value === 'string' ? value : typeof value === 'number' || typeof value === 'boolean' ? String(value) : JSON.stringify(value);
}

/** A property of the record's `Properties`, under any of the spellings given. */
function property(record: AuditRecord, ...names: string[]): unknown {
  const properties = record['Properties'];
  if (!api.isObject(properties)) {
    return undefined;
  }
  for (const name of names) {
    if (properties[name] !== undefined && properties[name] !== null) {
      return properties[name];
    }
  }
  return undefined;
}

/** A stable key of a record, to keep it open across refreshes. */
function recordKey(record: AuditRecord, index: number): string {
  if (typeof record['RecordHash'] === 'string') {
    return record['RecordHash'];
  }
  return `${text(record['StreamId'])}:${text(record['Seq'])}:${index}`;
}

function resultTone(result: unknown): 'ok' | 'bad' | 'warn' | 'muted' {
  switch (result) {
    case 'Succeeded':
      return 'ok';
    case 'Failed':
      return 'bad';
    case 'Rejected':
      return 'warn';
    default:
      return 'muted';
  }
}

/** The operation without the product prefix, with the phase of two-phase records (`intent`). */
function operation(record: AuditRecord): string {
  const name = record['OperationName'];
  const shown = typeof name === 'string' ? name.replace(/^Isthmus\//, '') : text(name);
  const phase = property(record, 'Phase');
  return typeof phase === 'string' && phase !== '' ? `${shown} (${phase})` : shown;
}

function duration(value: unknown): string {
  return typeof value === 'number' && Number.isFinite(value) ? `${value} ms` : format.NONE;
}

/** The WAF outcome of a record: `Action` on firewall records, `WafAction` on request records. */
function wafAction(record: AuditRecord): string {
  return text(record['Category'] === 'IsthmusWaf' ? property(record, 'Action', 'WafAction') : property(record, 'WafAction', 'waf_action'));
}

function rule(record: AuditRecord): string {
  const routing = property(record, 'Rule', 'rule');
  if (routing !== undefined) {
    return text(routing);
  }
  const firewall = property(record, 'RuleId', 'rule_id');
  return firewall === undefined ? format.NONE : `firewall ${text(firewall)}`;
}

const COLUMNS = ['Time (UTC)', 'Category', 'Operation', 'Result', 'Status', 'Route', 'Rule', 'Duration', 'WAF action'];

export class Audit implements View {
  readonly element: HTMLElement;
  private readonly status: HTMLElement;
  private readonly category: HTMLSelectElement;
  private readonly limit: HTMLSelectElement;
  private readonly records: HTMLTableElement;
  private readonly body: HTMLTableSectionElement;
  private readonly notice: HTMLElement;
  private readonly latestStatus = new Latest();
  private readonly latestRecords = new Latest();
  private readonly open = new Set<string>();
  private shown = '';
  private ticks = 0;

  constructor() {
    this.status = el('dl', { class: 'facts audit-status', 'data-testid': 'audit-status' }, [
      el('dt', { text: 'Audit trail' }),
      el('dd', { text: 'Loading…' }),
    ]);
    this.category = el(
      'select',
      { 'data-testid': 'audit-category', 'aria-label': 'Category' },
      [el('option', { value: '', text: 'All categories' }), ...CATEGORIES.map((category) => el('option', { value: category, text: category }))],
    );
    this.limit = el(
      'select',
      { 'data-testid': 'audit-limit', 'aria-label': 'Number of records' },
      LIMITS.map((limit) => el('option', { value: limit, text: `newest ${limit}`, selected: limit === DEFAULT_LIMIT })),
    );
    const refresh = el('button', { type: 'button', class: 'secondary', 'data-testid': 'audit-refresh', text: 'Refresh' });
    this.category.addEventListener('change', () => void this.loadRecords(true));
    this.limit.addEventListener('change', () => void this.loadRecords(true));
    refresh.addEventListener('click', () => {
      void this.loadStatus();
      void this.loadRecords(true);
    });
    const built = table(COLUMNS, { 'data-testid': 'audit-records', 'data-state': 'loading', 'data-filter': '' });
    this.records = built.table;
    this.records.classList.add('audit-records');
    this.body = built.body;
    this.notice = el('p', { class: 'muted', 'data-testid': 'audit-notice' });
    this.body.addEventListener('click', (event) => this.toggle(event));

    this.element = el('div', { class: 'page audit' }, [
      el('div', { class: 'page-head' }, [
        el('h1', { text: 'Audit' }),
        el('div', { class: 'spacer' }),
        this.category,
        this.limit,
        refresh,
      ]),
      this.status,
      this.notice,
      el('div', { class: 'table-scroll' }, [this.records]),
    ]);
  }

  async refresh(): Promise<void> {
    // A filtered view makes the gateway read back through up to 20,000 records, on the
    // thread that also commits the records answers wait for: the periodic refresh reloads
    // it every FILTERED_REFRESH_TICKS ticks only (the Refresh button and a new filter load
    // at once).
    this.ticks += 1;
    const due = this.category.value === '' || this.ticks % FILTERED_REFRESH_TICKS === 1;
    await Promise.all([this.loadStatus(), due ? this.loadRecords(false) : Promise.resolve()]);
  }

  destroy(): void {}

  private async loadStatus(): Promise<void> {
    const current = this.latestStatus.begin();
    let body: unknown;
    try {
      body = (await api.getJson('/admin/api/audit')).body;
    } catch (error) {
      const problem = api.describeFailure(error);
      if (problem !== undefined && current()) {
        this.status.replaceChildren(el('dt', { text: 'Audit trail' }), el('dd', { class: 'error', text: `Could not load the state: ${problem}` }));
      }
      return;
    }
    if (!current()) {
      return;
    }
    const state = api.isObject(body) ? body : {};
    if (state['enabled'] !== true) {
      this.status.replaceChildren(el('dt', { text: 'Audit trail' }), el('dd', {}, [pill('off', 'muted', { 'data-testid': 'audit-enabled' })]));
      return;
    }
    const flag = (value: unknown, good: string, bad: string, testId: string): HTMLElement =>
      pill(value === true ? good : value === false ? bad : format.NONE, value === true ? 'ok' : value === false ? 'bad' : 'muted', { 'data-testid': testId });
    const syslog = state['syslog'];
    this.status.replaceChildren(
      el('dt', { text: 'Audit trail' }),
      el('dd', {}, [pill('on', 'ok', { 'data-testid': 'audit-enabled' })]),
      el('dt', { text: 'Healthy' }),
      el('dd', {}, [flag(state['healthy'], 'healthy', 'unhealthy', 'audit-healthy')]),
      el('dt', { text: 'Fail-closed' }),
      el('dd', {}, [flag(state['fail_closed'], 'yes', 'no', 'audit-fail-closed')]),
      el('dt', { text: 'Stream id' }),
      el('dd', {}, [el('code', { 'data-testid': 'audit-stream-id', text: text(state['stream_id']) })]),
      el('dt', { text: 'Exported up to' }),
      el('dd', { 'data-testid': 'audit-exported-up-to', text: text(state['exported_up_to']) }),
      el('dt', { text: 'Syslog' }),
      el('dd', {}, [syslog === null || syslog === undefined ? 'off' : el('code', { text: JSON.stringify(syslog) })]),
    );
  }

  private async loadRecords(userAction: boolean): Promise<void> {
    const current = this.latestRecords.begin();
    const category = this.category.value;
    const query = new URLSearchParams({ limit: this.limit.value });
    if (category !== '') {
      query.set('category', category);
    }
    if (userAction) {
      this.records.dataset['state'] = 'loading';
    }
    let answer: api.Answer;
    try {
      answer = await api.getJson(`/admin/api/audit/records?${query.toString()}`);
    } catch (error) {
      const problem = api.describeFailure(error);
      if (problem !== undefined && current()) {
        this.show(category, 'error', [], `Could not load the audit records: ${problem}`);
      }
      return;
    }
    if (!current()) {
      return;
    }
    const body = api.isObject(answer.body) ? answer.body : {};
    const records = Array.isArray(body['records']) ? body['records'].filter(api.isObject) : [];
    if (body['enabled'] === false) {
      this.show(category, 'disabled', [], 'The audit trail is off in this gateway\u2019s configuration.');
    } else if (records.length === 0) {
      this.show(category, 'loaded', [], category === '' ? 'No audit record yet.' : `No ${category} record among the newest.`);
    } else {
      this.show(category, 'loaded', records, '');
    }
  }

  private show(category: string, state: string, records: readonly AuditRecord[], notice: string): void {
    setText(this.notice, notice);
    this.notice.className = state === 'error' ? 'error' : 'muted';
    this.notice.hidden = notice === '';
    const signature = JSON.stringify([category, records.map(recordKey)]);
    if (signature !== this.shown) {
      this.shown = signature;
      const keys = new Set(records.map(recordKey));
      for (const key of this.open) {
        if (!keys.has(key)) {
          this.open.delete(key);
        }
      }
      this.body.replaceChildren(...records.flatMap((record, index) => this.rows(record, index)));
    }
    this.records.dataset['filter'] = category;
    this.records.dataset['state'] = state;
  }

  private rows(record: AuditRecord, index: number): HTMLTableRowElement[] {
    const key = recordKey(record, index);
    const category = typeof record['Category'] === 'string' ? record['Category'] : '';
    const row = el(
      'tr',
      { class: 'record', 'data-category': category, 'data-key': key, tabindex: 0, 'aria-expanded': String(this.open.has(key)) },
      [
        cell(format.timestamp(record['TimeGenerated']), { class: 'nowrap' }),
        cell(text(record['Category'])),
        cell(operation(record), { title: text(record['OperationName']) }),
        cell(pill(text(record['ResultType']), resultTone(record['ResultType']))),
        cell(text(record['ResultSignature']), { class: 'num' }),
        cell(text(property(record, 'Route', 'route'))),
        cell(rule(record)),
        cell(duration(record['DurationMs']), { class: 'num nowrap' }),
        cell(wafAction(record)),
      ],
    );
    row.addEventListener('keydown', (event) => {
      if (event.key === 'Enter' || event.key === ' ') {
        event.preventDefault();
        row.click();
      }
    });
    const detail = el('tr', { class: 'record-detail', hidden: !this.open.has(key) }, [
      el('td', { colspan: COLUMNS.length }, [el('pre', { 'data-testid': 'audit-record-json', text: JSON.stringify(record, null, 2) })]),
    ]);
    return [row, detail];
  }

  private toggle(event: Event): void {
    const target = event.target;
    if (!(target instanceof Element)) {
      return;
    }
    const row = target.closest('tr.record');
    if (!(row instanceof HTMLTableRowElement)) {
      return;
    }
    const key = row.dataset['key'] ?? '';
    const detail = row.nextElementSibling;
    if (!(detail instanceof HTMLTableRowElement)) {
      return;
    }
    const opening = !this.open.has(key);
    if (opening) {
      this.open.add(key);
    } else {
      this.open.delete(key);
    }
    detail.hidden = !opening;
    row.setAttribute('aria-expanded', String(opening));
  }
}
