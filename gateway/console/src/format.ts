// Number and time formatting for the console: milliseconds with one or two decimals,
// percentages, SI prefixes for token counts and binary units for sizes. Absent values are a dash.

export const NONE = '–';

function present(value: number | null | undefined): value is number {
  return value !== null && value !== undefined && Number.isFinite(value);
}

/** A count as plain digits (request counters are read by scripts too). */
export function count(value: number | null | undefined): string {
  return present(value) ? String(Math.round(value)) : NONE;
}

/** A value with an SI prefix: 950, 1.23 k, 45.6 M. */
export function si(value: number | null | undefined, unit = ''): string {
  if (!present(value)) {
    return NONE;
  }
  const suffix = unit === '' ? '' : ` ${unit}`;
  const magnitude = Math.abs(value);
  const prefixes: ReadonlyArray<[number, string]> = [
    [1e12, 'T'],
    [1e9, 'G'],
    [1e6, 'M'],
    [1e3, 'k'],
  ];
  for (const [scale, prefix] of prefixes) {
    if (magnitude >= scale) {
      return `${significant(value / scale)} ${prefix}${unit}`;
    }
  }
  return `${significant(value)}${suffix}`;
}

function significant(value: number): string {
  const magnitude = Math.abs(value);
  if (magnitude === 0) {
    return '0';
  }
  if (magnitude >= 100) {
    return value.toFixed(0);
  }
  if (magnitude >= 10) {
    return value.toFixed(1);
  }
  return value.toFixed(2);
}

/** A duration given in seconds: milliseconds below one second, seconds above. */
export function seconds(value: number | null | undefined): string {
  if (!present(value)) {
    return NONE;
  }
  const milliseconds = value * 1000;
  if (milliseconds < 10) {
    return `${milliseconds.toFixed(2)} ms`;
  }
  if (milliseconds < 1000) {
    return `${milliseconds.toFixed(1)} ms`;
  }
  return `${value.toFixed(2)} s`;
}

/** A short tick label: 0, 0.50, 12.5, 1.20 k. */
export function tick(value: number): string {
  return value === 0 ? '0' : si(value);
}

/** A short tick label for a duration in seconds. */
export function tickSeconds(value: number): string {
  if (value === 0) {
    return '0';
  }
  const milliseconds = value * 1000;
  if (milliseconds < 1000) {
    return `${Number(milliseconds.toPrecision(3))} ms`;
  }
  return `${Number(value.toPrecision(3))} s`;
}

/** A ratio (0..1) as a percentage. */
export function percent(ratio: number | null | undefined, decimals = 1): string {
  return present(ratio) ? `${(ratio * 100).toFixed(decimals)}%` : NONE;
}

export function rate(value: number | null | undefined, unit: string): string {
  if (!present(value)) {
    return NONE;
  }
  if (value >= 1000) {
    return si(value, unit);
  }
  return unit === '' ? significant(value) : `${significant(value)} ${unit}`;
}

export function bytes(value: number | null | undefined): string {
  if (!present(value)) {
    return NONE;
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let scaled = value;
  let unit = 0;
  while (scaled >= 1024 && unit < units.length - 1) {
    scaled /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${scaled} B` : `${scaled.toFixed(1)} ${units[unit]}`;
}

/** Digits grouped by thousands, for sizes such as context lengths. */
export function grouped(value: number | null | undefined): string {
  return present(value) ? Math.round(value).toLocaleString('en-US') : NONE;
}

/** An RFC 3339 time as `YYYY-MM-DD HH:MM:SS.mmm` (UTC, as the audit trail writes it). */
export function timestamp(value: unknown): string {
  if (typeof value !== 'string' || value === '') {
    return NONE;
  }
  return value.replace('T', ' ').replace(/Z$/, '');
}

export function clock(date: Date): string {
  return date.toLocaleTimeString('en-GB', { hour12: false });
}

export function yesNo(value: unknown): string {
  if (value === true) {
    return 'yes';
  }
  if (value === false) {
    return 'no';
  }
  return NONE;
}
