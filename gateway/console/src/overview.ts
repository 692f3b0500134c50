// The overview page: readiness, traffic and latency figures from `/metrics`, and charts of the
// last ten minutes. It fetches nothing itself: the shell scrapes every refresh and hands over the
// history.

import { TimeChart } from './charts';
import { el, pill, setText } from './dom';
import * as format from './format';
import type { ChartPoint, Summary } from './stats';
import type { Context, Readiness, View } from './view';

interface Card {
  readonly testId: string;
  readonly label: string;
  readonly hint?: string;
  readonly value: (summary: Summary) => string;
}

interface Group {
  readonly title: string;
  readonly cards: readonly Card[];
}

const GROUPS: readonly Group[] = [
  {
    title: 'Traffic',
    cards: [
      { testId: 'requests-local', label: 'Local requests', hint: 'since start', value: (s) => format.count(s.requests.local) },
      { testId: 'requests-cloud', label: 'Cloud requests', hint: 'since start', value: (s) => format.count(s.requests.cloud) },
      { testId: 'requests-rejected', label: 'Rejected requests', hint: 'since start', value: (s) => format.count(s.requests.rejected) },
      { testId: 'local-share', label: 'Local share', hint: 'local / (local + cloud)', value: (s) => format.percent(s.localShare) },
      { testId: 'rps', label: 'Requests/s', hint: 'last interval', value: (s) => format.rate(s.requestsPerSecond, 'req/s') },
      { testId: 'tokens-per-second', label: 'Output tokens/s', hint: 'completion tokens, last interval', value: (s) => format.rate(s.completionTokensPerSecond, 'tok/s') },
    ],
  },
  {
    title: 'Edge',
    cards: [
      { testId: 'waf-blocked', label: 'Firewall blocks', hint: 'since start', value: (s) => format.count(s.wafBlocked) },
      { testId: 'open-connections', label: 'Open connections', hint: 'data plane', value: (s) => format.count(s.openConnections) },
    ],
  },
  {
    title: 'Sensitive data',
    cards: [
      { testId: 'sensitive-local', label: 'Kept local', hint: 'sensitive requests answered here', value: (s) => format.count(s.sensitive.kept_local) },
      { testId: 'sensitive-redacted', label: 'Redacted to cloud', hint: 'values replaced before leaving', value: (s) => format.count(s.sensitive.redacted_to_cloud) },
      { testId: 'sensitive-on-premises', label: 'On-premises pools', hint: 'unredacted, pools marked on_premises', value: (s) => format.count(s.sensitive.on_premises_pool) },
      { testId: 'sensitive-refused', label: 'Refused', hint: 'could not stay local', value: (s) => format.count(s.sensitive.rejected) },
      { testId: 'sensitive-left', label: 'Left unredacted', hint: 'must stay 0', value: (s) => format.count(s.sensitive.left_unredacted) },
      { testId: 'attachments-cloud', label: 'Attachments to cloud', hint: 'images, audio, files sent unscanned', value: (s) => format.count(s.attachmentsToCloud) },
    ],
  },
  {
    title: 'Latency',
    cards: [
      { testId: 'ttft-p50', label: 'TTFT p50', value: (s) => format.seconds(s.ttftP50Seconds) },
      { testId: 'ttft-p95', label: 'TTFT p95', value: (s) => format.seconds(s.ttftP95Seconds) },
      { testId: 'tpot-p50', label: 'Time per output token p50', value: (s) => format.seconds(s.tpotP50Seconds) },
      { testId: 'latency-p99', label: 'Request latency p99', hint: 'all routes', value: (s) => format.seconds(s.latencyP99Seconds) },
    ],
  },
  {
    title: 'Local inference',
    cards: [
      { testId: 'prefix-hit-rate', label: 'Prefix hit rate', hint: 'cached / prompt tokens, since start', value: (s) => format.percent(s.prefixHitRate) },
      { testId: 'kv-use', label: 'KV cache use', hint: 'cells used / total', value: (s) => format.percent(s.kvUse) },
      { testId: 'queue-depth', label: 'Queue depth', hint: 'requests waiting', value: (s) => format.count(s.queueDepth) },
      { testId: 'active-sequences', label: 'Active sequences', value: (s) => format.count(s.activeSequences) },
    ],
  },
];

/** The width a card asks for; a group of n cards asks for n of them. */
const CARD_WIDTH_PX = 150;
/** The widest a card grows when its group is alone on a row. */
const CARD_WIDTH_MAX_PX = 260;

const COLORS = {
  local: '#1b7f5a',
  cloud: '#2f5fb3',
  rejected: '#c2372d',
  ttft: '#8a4fc7',
  tpot: '#d07a12',
  tokens: '#1b7f5a',
  kv: '#2f5fb3',
  queue: '#c2372d',
};

function column(points: readonly ChartPoint[], pick: (point: ChartPoint) => number | null): (number | null)[] {
  return points.map(pick);
}

export class Overview implements View {
  readonly element: HTMLElement;
  private readonly ready: HTMLElement;
  private readonly readyDetail: HTMLElement;
  private readonly windowNote: HTMLElement;
  private readonly values = new Map<string, { card: Card; node: HTMLElement }>();
  private readonly gpuSection: HTMLElement;
  private gpusShown = '';
  private readonly charts: { requests: TimeChart; latency: TimeChart; tokens: TimeChart; kv: TimeChart };

  constructor() {
    this.ready = pill('checking', 'muted', { 'data-testid': 'ready' });
    this.readyDetail = el('span', { class: 'muted' });
    this.windowNote = el('span', { class: 'muted' });
    const groups = GROUPS.map((group) => {
      const section = el('section', { class: 'card-group' }, [
        el('h2', { text: group.title }),
        el(
          'div',
          { class: 'cards' },
          group.cards.map((card) => {
            const node = el('div', { class: 'value', 'data-testid': card.testId, text: format.NONE });
            this.values.set(card.testId, { card, node });
            return el('div', { class: 'card' }, [
              el('div', { class: 'label', text: card.label }),
              node,
              card.hint === undefined ? null : el('div', { class: 'hint', text: card.hint }),
            ]);
          }),
        ),
      ]);
      // Groups share a row in proportion to their number of cards.
      section.style.flexGrow = String(group.cards.length);
      section.style.flexBasis = `${group.cards.length * CARD_WIDTH_PX}px`;
      section.style.maxWidth = `${group.cards.length * CARD_WIDTH_MAX_PX}px`;
      return section;
    });
    this.gpuSection = el('section', { class: 'card-group', hidden: true });

    const seconds = (value: number): string => format.seconds(value);
    this.charts = {
      requests: new TimeChart({
        title: 'Requests/s by route',
        testId: 'chart-requests',
        leftAxis: { format: format.tick },
        lines: [
          { label: 'local', color: COLORS.local, scale: 'left', format: (v) => format.rate(v, 'req/s') },
          { label: 'cloud', color: COLORS.cloud, scale: 'left', format: (v) => format.rate(v, 'req/s') },
          { label: 'rejected', color: COLORS.rejected, scale: 'left', format: (v) => format.rate(v, 'req/s') },
        ],
      }),
      latency: new TimeChart({
        title: 'TTFT and time per output token, p95',
        testId: 'chart-latency',
        leftAxis: { format: format.tickSeconds },
        rightAxis: { format: format.tickSeconds },
        lines: [
          { label: 'TTFT p95', color: COLORS.ttft, scale: 'left', format: seconds },
          { label: 'TPOT p95', color: COLORS.tpot, scale: 'right', format: seconds },
        ],
      }),
      tokens: new TimeChart({
        title: 'Output tokens/s',
        testId: 'chart-tokens',
        leftAxis: { format: format.tick },
        lines: [{ label: 'completion tokens', color: COLORS.tokens, scale: 'left', format: (v) => format.rate(v, 'tok/s') }],
      }),
      kv: new TimeChart({
        title: 'KV cache use and queue depth',
        testId: 'chart-kv',
        leftRange: [0, 100],
        leftAxis: { format: (v) => `${v}%` },
        rightAxis: { format: (v) => v.toFixed(0), integer: true },
        lines: [
          { label: 'KV use', color: COLORS.kv, scale: 'left', format: (v) => `${v.toFixed(0)}%` },
          { label: 'queue depth', color: COLORS.queue, scale: 'right', format: (v) => v.toFixed(0) },
        ],
      }),
    };

    this.element = el('div', { class: 'page overview' }, [
      el('div', { class: 'page-head' }, [
        el('h1', { text: 'Overview' }),
        el('div', { class: 'readiness' }, [this.ready, this.readyDetail]),
        el('div', { class: 'spacer' }),
        this.windowNote,
      ]),
      el('div', { class: 'card-groups' }, [...groups, this.gpuSection]),
      el('section', { class: 'charts' }, [
        this.charts.requests.element,
        this.charts.latency.element,
        this.charts.tokens.element,
        this.charts.kv.element,
      ]),
    ]);
  }

  refresh(context: Context): Promise<void> {
    this.showReadiness(context.readiness);
    const summary = context.history.summary();
    if (summary !== undefined) {
      for (const { card, node } of this.values.values()) {
        setText(node, card.value(summary));
      }
      setText(
        this.windowNote,
        summary.windowed ? 'Quantiles over the last minute' : 'Quantiles since start (less than a minute of history)',
      );
      this.showGpus(summary);
    }
    this.drawCharts(context.history.points());
    return Promise.resolve();
  }

  destroy(): void {
    for (const chart of Object.values(this.charts)) {
      chart.destroy();
    }
  }

  private showReadiness(readiness: Readiness | undefined): void {
    if (readiness === undefined) {
      return;
    }
    setText(this.ready, readiness.ready ? 'ready' : 'not ready');
    this.ready.className = `pill ${readiness.ready ? 'ok' : 'bad'}`;
    const checks = Object.entries(readiness.checks)
      .filter(([, value]) => typeof value === 'boolean')
      .map(([name, value]) => `${name.replaceAll('_', ' ')}: ${value === true ? 'yes' : 'no'}`);
    setText(this.readyDetail, checks.join(' · '));
  }

  private showGpus(summary: Summary): void {
    const cards = summary.gpus.map((gpu) => ({
      gpu: gpu.gpu,
      utilization: format.percent(gpu.utilization, 0),
      memory: `memory ${format.bytes(gpu.memoryUsedBytes)} of ${format.bytes(gpu.memoryTotalBytes)}`,
    }));
    const signature = JSON.stringify(cards);
    if (signature === this.gpusShown) {
      return;
    }
    this.gpusShown = signature;
    this.gpuSection.hidden = cards.length === 0;
    this.gpuSection.style.flexGrow = String(cards.length);
    this.gpuSection.style.flexBasis = `${cards.length * CARD_WIDTH_PX}px`;
    this.gpuSection.style.maxWidth = `${cards.length * CARD_WIDTH_MAX_PX}px`;
    this.gpuSection.replaceChildren(
      el('h2', { text: 'GPUs' }),
      el(
        'div',
        { class: 'cards' },
        cards.map((card) =>
          el('div', { class: 'card' }, [
            el('div', { class: 'label', text: `GPU ${card.gpu} utilization` }),
            el('div', { class: 'value', 'data-testid': `gpu-${card.gpu}-utilization`, text: card.utilization }),
            el('div', { class: 'hint', text: card.memory }),
          ]),
        ),
      ),
    );
  }

  private drawCharts(points: readonly ChartPoint[]): void {
    const times = points.map((point) => point.time);
    this.charts.requests.update(times, [
      column(points, (point) => point.requestsPerSecond.local),
      column(points, (point) => point.requestsPerSecond.cloud),
      column(points, (point) => point.requestsPerSecond.rejected),
    ]);
    this.charts.latency.update(times, [
      column(points, (point) => point.ttftP95Seconds),
      column(points, (point) => point.tpotP95Seconds),
    ]);
    this.charts.tokens.update(times, [column(points, (point) => point.completionTokensPerSecond)]);
    this.charts.kv.update(times, [
      column(points, (point) => point.kvUsePercent),
      column(points, (point) => point.queueDepth),
    ]);
  }
}
