// The models page: the local models (`GET /admin/api/models`) with their live load from
// `/metrics` (KV cache use, prefix hit rate and decode rate, by the `model` label).

import * as api from './api';
import { cell, el, Latest, table } from './dom';
import * as format from './format';
import { modelLoads, type ModelLoad } from './stats';
import type { Context, View } from './view';

interface Model {
  readonly name: string;
  readonly path: string;
  readonly parameters: number | undefined;
  readonly sizeBytes: number | undefined;
  readonly contextTokens: number | undefined;
  readonly trainedContextTokens: number | undefined;
  readonly parallelSequences: number | undefined;
  readonly lanes: number | undefined;
  readonly queueDepth: number | undefined;
  readonly activeSequences: number | undefined;
}

function numeric(value: unknown): number | undefined {
  return typeof value === 'number' && Number.isFinite(value) ? value : undefined;
}

function readModels(body: unknown): Model[] {
  const list = api.isObject(body) ? body['models'] : undefined;
  if (!Array.isArray(list)) {
    throw new Error('the answer has no `models` list');
  }
  return list.filter(api.isObject).map((item) => ({
    name: typeof item['name'] === 'string' ? item['name'] : '',
    path: typeof item['path'] === 'string' ? item['path'] : '',
    parameters: numeric(item['parameters']),
    sizeBytes: numeric(item['size_bytes']),
    contextTokens: numeric(item['context_tokens']),
    trainedContextTokens: numeric(item['trained_context_tokens']),
    parallelSequences: numeric(item['parallel_sequences']),
    lanes: numeric(item['lanes']),
    queueDepth: numeric(item['queue_depth']),
    activeSequences: numeric(item['active_sequences']),
  }));
}

const HEADERS = [
  'Model',
  'Parameters',
  'Size',
  'Context',
  'Parallel sequences',
  'Lanes',
  'Queue depth',
  'Active sequences',
  'KV use',
  'Prefix hit rate',
  'Decode tok/s',
];

function rowTexts(model: Model, load: ModelLoad | undefined): string[] {
  const trained =
    model.trainedContextTokens !== undefined && model.trainedContextTokens !== model.contextTokens
      ? ` (trained ${format.grouped(model.trainedContextTokens)})`
      : '';
  return [
    model.name,
    format.si(model.parameters),
    format.bytes(model.sizeBytes),
    `${format.grouped(model.contextTokens)}${trained}`,
    format.count(model.parallelSequences),
    format.count(model.lanes),
    format.count(model.queueDepth),
    format.count(model.activeSequences),
    format.percent(load?.kvUse),
    format.percent(load?.prefixHitRate),
    format.rate(load?.decodeTokensPerSecond, ''),
  ];
}

export class Models implements View {
  readonly element: HTMLElement;
  private readonly content: HTMLElement;
  private readonly latest = new Latest();
  private shown = '';

  constructor() {
    this.content = el('div', { 'data-testid': 'models', 'data-state': 'loading' }, [el('p', { class: 'muted', text: 'Loading…' })]);
    this.element = el('div', { class: 'page models' }, [
      el('div', { class: 'page-head' }, [el('h1', { text: 'Models' })]),
      el('p', {
        class: 'muted intro',
        text: 'Local models as loaded. KV use, prefix hit rate (since start) and decode rate come from /metrics.',
      }),
      this.content,
    ]);
  }

  async refresh(context: Context): Promise<void> {
    const current = this.latest.begin();
    let models: Model[];
    try {
      models = readModels((await api.getJson('/admin/api/models')).body);
    } catch (error) {
      const problem = api.describeFailure(error);
      if (problem !== undefined && current()) {
        this.shown = '';
        this.content.dataset['state'] = 'error';
        this.content.replaceChildren(el('p', { class: 'error', text: `Could not load the models: ${problem}` }));
      }
      return;
    }
    if (!current()) {
      return;
    }
    const latest = context.history.latest();
    const loads = latest === undefined ? new Map<string, ModelLoad>() : modelLoads(latest, context.history.previous());
    const rows = models.map((model) => ({ model, texts: rowTexts(model, loads.get(model.name)) }));
    const signature = JSON.stringify(rows.map((row) => [row.model.path, row.texts]));
    this.content.dataset['state'] = 'loaded';
    if (signature === this.shown) {
      return;
    }
    this.shown = signature;
    if (rows.length === 0) {
      this.content.replaceChildren(el('p', { class: 'empty', text: 'No local model is loaded.' }));
      return;
    }
    const { table: grid, body } = table(HEADERS);
    for (const { model, texts } of rows) {
      const [name, ...rest] = texts;
      body.appendChild(
        el('tr', { 'data-model': model.name }, [
          cell([el('code', { text: name ?? '' }), el('div', { class: 'hint', text: model.path })]),
          ...rest.map((text) => cell(text, { class: 'num' })),
        ]),
      );
    }
    this.content.replaceChildren(grid);
  }

  destroy(): void {}
}
