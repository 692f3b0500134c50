// The contract between the shell (main.ts) and each page of the console.

import type { History } from './stats';

export interface Context {
  /** Scrapes of `/metrics` taken by the shell every refresh, with the derived figures. */
  readonly history: History;
  /** The latest `/readyz` answer, `undefined` before the first one. */
  readonly readiness: Readiness | undefined;
}

export interface Readiness {
  readonly ready: boolean;
  /** The other fields of the answer (`models_loaded`, `listeners_bound`, ...). */
  readonly checks: Readonly<Record<string, unknown>>;
}

export interface View {
  readonly element: HTMLElement;
  /** Brings the page up to date; called on mount and on every refresh tick. */
  refresh(context: Context): Promise<void>;
  /** Releases timers, observers and charts when the page is left. */
  destroy(): void;
}

export type ViewName = 'overview' | 'upstreams' | 'models' | 'callers' | 'explain' | 'audit' | 'config';
