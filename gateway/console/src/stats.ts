// What the overview shows, derived from scrapes of `/metrics`: counters, rates between the two
// latest scrapes, and latency quantiles over about the last minute (bucket deltas). The history
// of scrapes and of chart points lives in memory only and is bounded in time.

import {
  bucketDelta,
  buckets,
  histogramQuantile,
  observations,
  total,
  totalsBy,
  type Bucket,
  type Scrape,
} from './prometheus';

/** One scrape and when it was taken (milliseconds since 1970). */
export interface Snapshot {
  readonly takenAtMs: number;
  readonly scrape: Scrape;
}

export const ROUTES = ['local', 'cloud', 'rejected'] as const;
export type Route = (typeof ROUTES)[number];

/** Quantiles are estimated over this much history once it exists. */
export const QUANTILE_WINDOW_MS = 60_000;
/** Chart points are kept this long. */
export const CHART_HISTORY_MS = 10 * 60_000;

export interface Gpu {
  readonly gpu: string;
  readonly utilization: number | undefined;
  readonly memoryUsedBytes: number | undefined;
  readonly memoryTotalBytes: number | undefined;
}

export interface Summary {
  /** Requests answered since start, by route (summed over status). */
  readonly requests: Readonly<Record<Route, number>>;
  /** local / (local + cloud). */
  readonly localShare: number | undefined;
  /** Requests per second between the two latest scrapes. */
  readonly requestsPerSecond: number | undefined;
  readonly requestsPerSecondByRoute: Readonly<Record<Route, number | undefined>>;
  /** Completion tokens per second between the two latest scrapes. */
  readonly completionTokensPerSecond: number | undefined;
  /** True when the quantiles cover the last minute, false when they cover everything since start. */
  readonly windowed: boolean;
  readonly ttftP50Seconds: number | undefined;
  readonly ttftP95Seconds: number | undefined;
  readonly tpotP50Seconds: number | undefined;
  readonly tpotP95Seconds: number | undefined;
  readonly latencyP99Seconds: number | undefined;
  /** Prompt tokens served from the KV cache / prompt tokens of local requests, since start. */
  readonly prefixHitRate: number | undefined;
  readonly kvUse: number | undefined;
  readonly queueDepth: number | undefined;
  readonly activeSequences: number | undefined;
  /** Requests the firewall blocked (the requests `x-isthmus-rule: waf` answered). */
  readonly wafBlocked: number;
  /** Requests with sensitive content, by where they went (`isthmus_sensitive_requests_total`). */
  readonly sensitive: Readonly<Record<SensitiveDisposition, number>>;
  /** Requests with images, audio, video or files sent to a cloud pool unscanned
   * (`isthmus_attachment_requests_total{disposition="to_cloud"}`, counted per kind). */
  readonly attachmentsToCloud: number;
  readonly openConnections: number | undefined;
  readonly gpus: readonly Gpu[];
}

/** Where a request with sensitive content went; `left_unredacted` is never expected. */
export type SensitiveDisposition = 'kept_local' | 'redacted_to_cloud' | 'on_premises_pool' | 'rejected' | 'left_unredacted';

/** Per-model gauges and ratios, keyed by the `model` label. */
export interface ModelLoad {
  readonly kvUse: number | undefined;
  readonly prefixHitRate: number | undefined;
  readonly decodeTokensPerSecond: number | undefined;
}

function finite(value: number): number | undefined {
  return Number.isFinite(value) ? value : undefined;
}

function ratio(part: number | undefined, whole: number | undefined): number | undefined {
  return part === undefined || whole === undefined || whole <= 0 ? undefined : part / whole;
}

/** Per-second increase of a counter; a decrease means a restart, so the new value is the increase. */
function perSecond(newer: number | undefined, older: number | undefined, elapsedMs: number): number | undefined {
  if (newer === undefined || elapsedMs <= 0) {
    return undefined;
  }
  const before = older ?? 0;
  const increase = newer >= before ? newer - before : newer;
  return increase / (elapsedMs / 1000);
}

/** The buckets observed since `base` (or since start without one). */
function windowBuckets(latest: Scrape, base: Scrape | undefined, name: string): Bucket[] {
  const now = buckets(latest, name);
  if (base === undefined) {
    return now;
  }
  return bucketDelta(now, buckets(base, name)) ?? now;
}

function quantile(q: number, histogram: readonly Bucket[]): number | undefined {
  return observations(histogram) > 0 ? finite(histogramQuantile(q, histogram)) : undefined;
}

/**
 * Everything the overview cards show. `previous` is the scrape before `latest` (for rates);
 * `base` the one about a minute before it (for windowed quantiles), absent early on.
 */
export function summarize(latest: Snapshot, previous: Snapshot | undefined, base: Snapshot | undefined): Summary {
  const scrape = latest.scrape;
  const elapsedMs = previous === undefined ? 0 : latest.takenAtMs - previous.takenAtMs;
  const requestsNow = totalsBy(scrape, 'isthmus_requests_total', 'route');
  const requestsBefore = previous === undefined ? undefined : totalsBy(previous.scrape, 'isthmus_requests_total', 'route');
  const requests = { local: 0, cloud: 0, rejected: 0 };
  const requestsPerSecondByRoute: Record<Route, number | undefined> = { local: undefined, cloud: undefined, rejected: undefined };
  for (const route of ROUTES) {
    requests[route] = requestsNow.get(route) ?? 0;
    if (requestsBefore !== undefined) {
      requestsPerSecondByRoute[route] = perSecond(requests[route], requestsBefore.get(route) ?? 0, elapsedMs);
    }
  }
  const allNow = [...requestsNow.values()].reduce((sum, value) => sum + value, 0);
  const allBefore = requestsBefore === undefined ? undefined : [...requestsBefore.values()].reduce((sum, value) => sum + value, 0);

  const windowScrape = base?.scrape;
  const ttft = windowBuckets(scrape, windowScrape, 'gen_ai_server_time_to_first_token_seconds');
  const tpot = windowBuckets(scrape, windowScrape, 'gen_ai_server_time_per_output_token_seconds');
  const latency = windowBuckets(scrape, windowScrape, 'isthmus_request_duration_seconds');

  const completionNow = total(scrape, 'isthmus_completion_tokens_total') ?? 0;
  const completionBefore = previous === undefined ? undefined : (total(previous.scrape, 'isthmus_completion_tokens_total') ?? 0);

  return {
    requests,
    localShare: ratio(requests.local, requests.local + requests.cloud),
    requestsPerSecond: allBefore === undefined ? undefined : perSecond(allNow, allBefore, elapsedMs),
    requestsPerSecondByRoute,
    completionTokensPerSecond: completionBefore === undefined ? undefined : perSecond(completionNow, completionBefore, elapsedMs),
    windowed: base !== undefined,
    ttftP50Seconds: quantile(0.5, ttft),
    ttftP95Seconds: quantile(0.95, ttft),
    tpotP50Seconds: quantile(0.5, tpot),
    tpotP95Seconds: quantile(0.95, tpot),
    latencyP99Seconds: quantile(0.99, latency),
    prefixHitRate: ratio(total(scrape, 'isthmus_local_prefix_hit_tokens_total'), total(scrape, 'isthmus_local_prompt_tokens_total')),
    kvUse: ratio(total(scrape, 'isthmus_local_kv_cells_used'), total(scrape, 'isthmus_local_kv_cells_total')),
    queueDepth: total(scrape, 'isthmus_local_queue_depth'),
    activeSequences: total(scrape, 'isthmus_local_active_sequences'),
    wafBlocked: total(scrape, 'isthmus_rule_requests_total', { rule: 'waf' }) ?? 0,
    sensitive: sensitiveCounts(scrape),
    attachmentsToCloud: total(scrape, 'isthmus_attachment_requests_total', { disposition: 'to_cloud' }) ?? 0,
    openConnections: total(scrape, 'isthmus_open_connections'),
    gpus: gpus(scrape),
  };
}

function sensitiveCounts(scrape: Scrape): Record<SensitiveDisposition, number> {
  const by = totalsBy(scrape, 'isthmus_sensitive_requests_total', 'disposition');
  return {
    kept_local: by.get('kept_local') ?? 0,
    redacted_to_cloud: by.get('redacted_to_cloud') ?? 0,
    on_premises_pool: by.get('on_premises_pool') ?? 0,
    rejected: by.get('rejected') ?? 0,
    left_unredacted: by.get('left_unredacted') ?? 0,
  };
}

function gpus(scrape: Scrape): Gpu[] {
  const utilization = totalsBy(scrape, 'isthmus_gpu_utilization_ratio', 'gpu');
  const used = totalsBy(scrape, 'isthmus_gpu_memory_used_bytes', 'gpu');
  const capacity = totalsBy(scrape, 'isthmus_gpu_memory_total_bytes', 'gpu');
  const names = [...new Set([...utilization.keys(), ...used.keys(), ...capacity.keys()])];
  return names
    .sort((a, b) => Number(a) - Number(b) || a.localeCompare(b))
    .map((gpu) => ({
      gpu,
      utilization: utilization.get(gpu),
      memoryUsedBytes: used.get(gpu),
      memoryTotalBytes: capacity.get(gpu),
    }));
}

/** Live figures of each local model, from the `model` label of the `isthmus_local_*` series. */
export function modelLoads(latest: Snapshot, previous: Snapshot | undefined): Map<string, ModelLoad> {
  const scrape = latest.scrape;
  const used = totalsBy(scrape, 'isthmus_local_kv_cells_used', 'model');
  const cells = totalsBy(scrape, 'isthmus_local_kv_cells_total', 'model');
  const hits = totalsBy(scrape, 'isthmus_local_prefix_hit_tokens_total', 'model');
  const prompts = totalsBy(scrape, 'isthmus_local_prompt_tokens_total', 'model');
  const decoded = totalsBy(scrape, 'isthmus_local_decode_tokens_total', 'model');
  const decodedBefore = previous === undefined ? undefined : totalsBy(previous.scrape, 'isthmus_local_decode_tokens_total', 'model');
  const elapsedMs = previous === undefined ? 0 : latest.takenAtMs - previous.takenAtMs;
  const loads = new Map<string, ModelLoad>();
  for (const model of new Set([...used.keys(), ...cells.keys(), ...hits.keys(), ...prompts.keys(), ...decoded.keys()])) {
    loads.set(model, {
      kvUse: ratio(used.get(model), cells.get(model)),
      prefixHitRate: ratio(hits.get(model), prompts.get(model)),
      decodeTokensPerSecond: decodedBefore === undefined ? undefined : perSecond(decoded.get(model), decodedBefore.get(model), elapsedMs),
    });
  }
  return loads;
}

/** One point of the overview charts; `null` leaves a gap. */
export interface ChartPoint {
  /** Seconds since 1970, as uPlot's time axis wants. */
  readonly time: number;
  readonly requestsPerSecond: Readonly<Record<Route, number | null>>;
  readonly ttftP95Seconds: number | null;
  readonly tpotP95Seconds: number | null;
  readonly completionTokensPerSecond: number | null;
  readonly kvUsePercent: number | null;
  readonly queueDepth: number | null;
}

function point(snapshot: Snapshot, summary: Summary): ChartPoint {
  const orNull = (value: number | undefined): number | null => value ?? null;
  return {
    time: snapshot.takenAtMs / 1000,
    requestsPerSecond: {
      local: orNull(summary.requestsPerSecondByRoute.local),
      cloud: orNull(summary.requestsPerSecondByRoute.cloud),
      rejected: orNull(summary.requestsPerSecondByRoute.rejected),
    },
    ttftP95Seconds: orNull(summary.ttftP95Seconds),
    tpotP95Seconds: orNull(summary.tpotP95Seconds),
    completionTokensPerSecond: orNull(summary.completionTokensPerSecond),
    kvUsePercent: summary.kvUse === undefined ? null : summary.kvUse * 100,
    queueDepth: orNull(summary.queueDepth),
  };
}

/**
 * The scrapes of about the last minute and the chart points of the last ten, both trimmed by
 * time as new scrapes arrive.
 */
export class History {
  private readonly snapshots: Snapshot[] = [];
  private readonly chartPoints: ChartPoint[] = [];
  private latestSummary: Summary | undefined;

  push(snapshot: Snapshot): void {
    const previous = this.snapshots[this.snapshots.length - 1];
    if (previous !== undefined && snapshot.takenAtMs <= previous.takenAtMs) {
      return;
    }
    this.snapshots.push(snapshot);
    // Keep the newest scrape at least a window old (the base) and everything after it.
    const cutoff = snapshot.takenAtMs - QUANTILE_WINDOW_MS;
    while (this.snapshots.length > 2 && (this.snapshots[1]?.takenAtMs ?? Infinity) <= cutoff) {
      this.snapshots.shift();
    }
    const summary = summarize(snapshot, previous, this.base());
    this.latestSummary = summary;
    this.chartPoints.push(point(snapshot, summary));
    const oldest = snapshot.takenAtMs / 1000 - CHART_HISTORY_MS / 1000;
    while ((this.chartPoints[0]?.time ?? Infinity) < oldest) {
      this.chartPoints.shift();
    }
  }

  latest(): Snapshot | undefined {
    return this.snapshots[this.snapshots.length - 1];
  }

  previous(): Snapshot | undefined {
    return this.snapshots[this.snapshots.length - 2];
  }

  summary(): Summary | undefined {
    return this.latestSummary;
  }

  points(): readonly ChartPoint[] {
    return this.chartPoints;
  }

  /** The newest scrape taken at least a window before the latest, if history reaches that far. */
  private base(): Snapshot | undefined {
    const latest = this.latest();
    const first = this.snapshots[0];
    if (latest === undefined || first === undefined || first === latest) {
      return undefined;
    }
    return first.takenAtMs <= latest.takenAtMs - QUANTILE_WINDOW_MS ? first : undefined;
  }
}

/** One caller's use since start, from the `isthmus_caller_*` series (by API key id). */
export interface CallerUse {
  /** The API key's id, or `(anonymous)`. */
  readonly key: string;
  readonly requests: Readonly<Record<Route, number>>;
  readonly promptTokens: number;
  readonly completionTokens: number;
  /** Prompt plus completion tokens per second over the last interval. */
  readonly tokensPerSecond: number | undefined;
}

function callerTokens(scrape: Scrape): Map<string, { prompt: number; completion: number }> {
  const tokens = new Map<string, { prompt: number; completion: number }>();
  for (const kind of ['prompt', 'completion'] as const) {
    for (const [key, count] of totalsBy(scrape, 'isthmus_caller_tokens_total', 'key', { kind })) {
      const entry = tokens.get(key) ?? { prompt: 0, completion: 0 };
      entry[kind] += count;
      tokens.set(key, entry);
    }
  }
  return tokens;
}

/** Every caller's use, the heaviest (by tokens, then requests) first. */
export function callerUses(latest: Snapshot, previous: Snapshot | undefined): CallerUse[] {
  const scrape = latest.scrape;
  const tokens = callerTokens(scrape);
  const before = previous === undefined ? undefined : callerTokens(previous.scrape);
  const elapsedMs = previous === undefined ? 0 : latest.takenAtMs - previous.takenAtMs;
  const byRoute = new Map(ROUTES.map((route) => [route, totalsBy(scrape, 'isthmus_caller_requests_total', 'key', { route })]));
  const keys = new Set([...tokens.keys(), ...[...byRoute.values()].flatMap((totals) => [...totals.keys()])]);
  const sum = (use: { prompt: number; completion: number } | undefined): number | undefined =>
    use === undefined ? undefined : use.prompt + use.completion;
  const uses = [...keys].map((key): CallerUse => {
    const requests = { local: 0, cloud: 0, rejected: 0 };
    for (const route of ROUTES) {
      requests[route] = byRoute.get(route)?.get(key) ?? 0;
    }
    return {
      key,
      requests,
      promptTokens: tokens.get(key)?.prompt ?? 0,
      completionTokens: tokens.get(key)?.completion ?? 0,
      tokensPerSecond: before === undefined ? undefined : perSecond(sum(tokens.get(key)), sum(before.get(key)) ?? 0, elapsedMs),
    };
  });
  const weight = (use: CallerUse): [number, number] => [
    use.promptTokens + use.completionTokens,
    use.requests.local + use.requests.cloud + use.requests.rejected,
  ];
  return uses.sort((a, b) => {
    const [tokensA, requestsA] = weight(a);
    const [tokensB, requestsB] = weight(b);
    return tokensB - tokensA || requestsB - requestsA || a.key.localeCompare(b.key);
  });
}
