// Reads the gateway's `/metrics` answer (Prometheus text format) and computes what the console
// shows from it: sums over label sets, histogram buckets and their quantiles. Pure functions over
// plain data; the caller does the fetching and keeps the history.

export interface Sample {
  readonly name: string;
  readonly labels: Readonly<Record<string, string>>;
  readonly value: number;
}

/** One scrape: the samples of each metric name, in the order they were written. */
export type Scrape = ReadonlyMap<string, readonly Sample[]>;

/** Label values a sample must carry to count. */
export type Match = Readonly<Record<string, string>>;

const NAME_START = /[a-zA-Z_:]/;
const NAME_REST = /[a-zA-Z0-9_:]/;

/**
 * Parses the text format: `name{label="value",...} value [timestamp]` per line. Comment lines
 * (`# HELP`, `# TYPE`) and lines that do not parse are skipped, so that one odd line never hides
 * the rest.
 */
export function parse(text: string): Scrape {
  const scrape = new Map<string, Sample[]>();
  for (const line of text.split('\n')) {
    const sample = parseLine(line.trim());
    if (sample === undefined) {
      continue;
    }
    const samples = scrape.get(sample.name);
    if (samples === undefined) {
      scrape.set(sample.name, [sample]);
    } else {
      samples.push(sample);
    }
  }
  return scrape;
}

function parseLine(line: string): Sample | undefined {
  if (line === '' || line.startsWith('#')) {
    return undefined;
  }
  let position = 0;
  const at = (): string => line.charAt(position);
  const skipSpaces = (): void => {
    while (at() === ' ' || at() === '\t') {
      position += 1;
    }
  };
  const readName = (start: RegExp): string | undefined => {
    const begin = position;
    if (!start.test(at())) {
      return undefined;
    }
    position += 1;
    while (position < line.length && NAME_REST.test(at())) {
      position += 1;
    }
    return line.slice(begin, position);
  };

  const name = readName(NAME_START);
  if (name === undefined) {
    return undefined;
  }
  const labels: Record<string, string> = {};
  skipSpaces();
  if (at() === '{') {
    position += 1;
    for (;;) {
      skipSpaces();
      if (at() === '}') {
        position += 1;
        break;
      }
      const label = readName(/[a-zA-Z_]/);
      if (label === undefined) {
        return undefined;
      }
      skipSpaces();
      if (at() !== '=') {
        return undefined;
      }
      position += 1;
      skipSpaces();
      if (at() !== '"') {
        return undefined;
      }
      position += 1;
      let value = '';
      for (;;) {
        if (position >= line.length) {
          return undefined;
        }
        const character = at();
        position += 1;
        if (character === '"') {
          break;
        }
        if (character === '\\') {
          const escaped = at();
          position += 1;
          value += escaped === 'n' ? '\n' : escaped;
        } else {
          value += character;
        }
      }
      labels[label] = value;
      skipSpaces();
      if (at() === ',') {
        position += 1;
      } else if (at() !== '}') {
        return undefined;
      }
    }
  }
  skipSpaces();
  const rest = line.slice(position).split(/\s+/)[0] ?? '';
  const value = parseValue(rest);
  return value === undefined ? undefined : { name, labels, value };
}

function parseValue(token: string): number | undefined {
  switch (token) {
    case '+Inf':
    case 'Inf':
      return Infinity;
    case '-Inf':
      return -Infinity;
    case 'NaN':
      return NaN;
    case '':
      return undefined;
    default: {
      const value = Number(token);
      return Number.isNaN(value) ? undefined : value;
    }
  }
}

function matches(sample: Sample, match: Match | undefined): boolean {
  if (match === undefined) {
    return true;
  }
  return Object.entries(match).every(([label, value]) => sample.labels[label] === value);
}

export function samples(scrape: Scrape, name: string, match?: Match): readonly Sample[] {
  return (scrape.get(name) ?? []).filter((sample) => matches(sample, match));
}

/** The sum over every sample of `name` that matches; `undefined` when there is none. */
export function total(scrape: Scrape, name: string, match?: Match): number | undefined {
  const found = samples(scrape, name, match);
  return found.length === 0 ? undefined : found.reduce((sum, sample) => sum + sample.value, 0);
}

/** Sums of `name` grouped by the value of `label` (samples without it are left out). */
export function totalsBy(scrape: Scrape, name: string, label: string, match?: Match): Map<string, number> {
  const totals = new Map<string, number>();
  for (const sample of samples(scrape, name, match)) {
    const key = sample.labels[label];
    if (key !== undefined) {
      totals.set(key, (totals.get(key) ?? 0) + sample.value);
    }
  }
  return totals;
}

/** A cumulative histogram bucket: `count` observations were at most `le`. */
export interface Bucket {
  readonly le: number;
  readonly count: number;
}

/**
 * The buckets of histogram `name` (without `_bucket`), summed over every label set that matches,
 * sorted by upper bound. Label sets must share bucket bounds, as one metric's do.
 */
export function buckets(scrape: Scrape, name: string, match?: Match): Bucket[] {
  const byBound = new Map<number, number>();
  for (const sample of samples(scrape, `${name}_bucket`, match)) {
    const bound = parseValue(sample.labels['le'] ?? '');
    if (bound !== undefined && !Number.isNaN(bound)) {
      byBound.set(bound, (byBound.get(bound) ?? 0) + sample.value);
    }
  }
  return [...byBound.entries()].map(([le, count]) => ({ le, count })).sort((a, b) => a.le - b.le);
}

/**
 * The observations between two scrapes of the same histogram: `newer - older` per bucket.
 * `undefined` when a count went down (the gateway restarted) or the bounds differ.
 */
export function bucketDelta(newer: readonly Bucket[], older: readonly Bucket[]): Bucket[] | undefined {
  if (older.length === 0) {
    return [...newer];
  }
  if (newer.length !== older.length) {
    return undefined;
  }
  const delta: Bucket[] = [];
  for (const [index, bucket] of newer.entries()) {
    const before = older[index];
    if (before === undefined || before.le !== bucket.le || bucket.count < before.count) {
      return undefined;
    }
    delta.push({ le: bucket.le, count: bucket.count - before.count });
  }
  return delta;
}

/** The number of observations in cumulative buckets (the `+Inf` bucket). */
export function observations(histogram: readonly Bucket[]): number {
  const last = histogram[histogram.length - 1];
  return last !== undefined && last.le === Infinity ? last.count : 0;
}

/**
 * Estimates quantile `q` (0..1) of cumulative buckets as Prometheus's `histogram_quantile` does:
 * find the bucket the rank falls in and interpolate linearly within it, assuming observations
 * spread evenly. A rank in the `+Inf` bucket answers the highest finite bound; the first bucket
 * starts at 0 unless its bound is negative. NaN when there is no observation or no `+Inf` bucket.
 */
export function histogramQuantile(q: number, histogram: readonly Bucket[]): number {
  if (Number.isNaN(q)) {
    return NaN;
  }
  if (q < 0) {
    return -Infinity;
  }
  if (q > 1) {
    return Infinity;
  }
  const sorted = [...histogram].sort((a, b) => a.le - b.le);
  const last = sorted[sorted.length - 1];
  if (sorted.length < 2 || last === undefined || last.le !== Infinity) {
    return NaN;
  }
  // Counts of a scrape taken while observations land can be off by one between buckets; make
  // them monotonic, as Prometheus does.
  const monotonic: Bucket[] = [];
  let highest = 0;
  for (const bucket of sorted) {
    highest = Math.max(highest, bucket.count);
    monotonic.push({ le: bucket.le, count: highest });
  }
  const total = highest;
  if (total === 0) {
    return NaN;
  }
  let rank = q * total;
  const index = monotonic.findIndex((bucket) => bucket.count >= rank);
  const found = monotonic[index];
  if (index === -1 || found === undefined) {
    return NaN;
  }
  if (index === monotonic.length - 1) {
    return monotonic[monotonic.length - 2]?.le ?? NaN;
  }
  if (index === 0 && found.le <= 0) {
    return found.le;
  }
  let start = 0;
  let count = found.count;
  const previous = monotonic[index - 1];
  if (previous !== undefined) {
    start = previous.le;
    count -= previous.count;
    rank -= previous.count;
  }
  if (count === 0) {
    return start;
  }
  return start + (found.le - start) * (rank / count);
}
