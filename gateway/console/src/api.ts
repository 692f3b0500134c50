// Calls to the gateway's admin API, same origin. Every call carries the admin token when one is
// kept (sessionStorage, for this tab only). A 401 tells the shell to ask for a token; a network
// failure tells it the API is unreachable. Other statuses are the caller's to interpret.

const TOKEN_KEY = 'isthmus.admin.token';

/** The admin API wants a token (none was kept, or the kept one was refused). */
export class AuthRequired extends Error {
  constructor(readonly refused: boolean) {
    super(refused ? 'the admin token was refused' : 'the admin API needs a token');
  }
}

/** The request did not reach the gateway (network error, gateway down). */
export class Unreachable extends Error {}

/** The gateway answered with a status the caller did not expect. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly messages: readonly string[],
  ) {
    super(messages.join('; '));
  }
}

export interface Answer {
  readonly status: number;
  /** The JSON body, or the text when the body is not JSON. */
  readonly body: unknown;
}

export interface Hooks {
  /** A call was answered 401. */
  unauthorized(error: AuthRequired): void;
  /** A call reached the gateway (`undefined`) or failed to (the reason). */
  reachability(problem: string | undefined): void;
}

let hooks: Hooks = { unauthorized: () => {}, reachability: () => {} };

export function setHooks(next: Hooks): void {
  hooks = next;
}

export function storedToken(): string | undefined {
  try {
    return sessionStorage.getItem(TOKEN_KEY) ?? undefined;
  } catch {
    return undefined;
  }
}

export function storeToken(token: string | undefined): void {
  try {
    if (token === undefined) {
      sessionStorage.removeItem(TOKEN_KEY);
    } else {
      sessionStorage.setItem(TOKEN_KEY, token);
    }
  } catch {
    // Storage can be off (private modes); the token then lasts until the next 401.
  }
}

export interface CallOptions {
  /** A body sent as is with `content-type: application/json`. */
  readonly body?: string;
  /** Extra request headers (the explain view passes the request's own headers). */
  readonly headers?: Readonly<Record<string, string>>;
  /** Use this token instead of the kept one (checking a token before keeping it). */
  readonly token?: string;
}

async function send(method: string, path: string, options: CallOptions): Promise<Response> {
  const headers = new Headers(options.headers);
  const token = options.token ?? storedToken();
  if (token !== undefined && token !== '') {
    headers.set('authorization', `Bearer ${token}`);
  }
  if (options.body !== undefined && !headers.has('content-type')) {
    headers.set('content-type', 'application/json');
  }
  let response: Response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: options.body,
      cache: 'no-store',
      credentials: 'same-origin',
      redirect: 'error',
    });
  } catch (error) {
    const problem = error instanceof Error ? error.message : String(error);
    hooks.reachability(problem);
    throw new Unreachable(`${method} ${path}: ${problem}`);
  }
  hooks.reachability(undefined);
  if (response.status === 401 && options.token === undefined) {
    const refused = token !== undefined && token !== '';
    if (refused) {
      storeToken(undefined);
    }
    const error = new AuthRequired(refused);
    hooks.unauthorized(error);
    throw error;
  }
  return response;
}

async function readBody(response: Response): Promise<unknown> {
  const text = await response.text();
  if (text === '') {
    return undefined;
  }
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return text;
  }
}

/** Any answer but 401 (which raises `AuthRequired`). */
export async function call(method: string, path: string, options: CallOptions = {}): Promise<Answer> {
  const response = await send(method, path, options);
  return { status: response.status, body: await readBody(response) };
}

/** A JSON answer with one of the `expected` statuses, else `ApiError` with the gateway's messages. */
export async function getJson(path: string, expected: readonly number[] = [200]): Promise<Answer> {
  const answer = await call('GET', path);
  if (!expected.includes(answer.status)) {
    throw new ApiError(answer.status, errorMessages(answer));
  }
  return answer;
}

/** A text answer (`/metrics`), 200 only. */
export async function getText(path: string): Promise<string> {
  const response = await send('GET', path, {});
  const text = await response.text();
  if (response.status !== 200) {
    throw new ApiError(response.status, [`HTTP ${response.status}: ${text.slice(0, 200)}`]);
  }
  return text;
}

/** Whether the gateway accepts `token` (any answer but 401 to `/readyz`). */
export async function tokenAccepted(token: string): Promise<boolean> {
  const response = await send('GET', '/readyz', { token });
  await response.text();
  return response.status !== 401;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

/**
 * The messages of an error answer, verbatim: the OpenAI-style `error.message`, the reload
 * report's `errors`, or the body text; the status alone when there is nothing else.
 */
export function errorMessages(answer: Answer): string[] {
  const body = answer.body;
  if (isObject(body)) {
    const error = body['error'];
    if (isObject(error) && typeof error['message'] === 'string') {
      return [error['message']];
    }
    if (typeof error === 'string') {
      return [error];
    }
    const errors = body['errors'];
    if (Array.isArray(errors) && errors.length > 0) {
      return errors.map((item) => (typeof item === 'string' ? item : JSON.stringify(item)));
    }
  }
  if (typeof body === 'string' && body.trim() !== '') {
    return [body.trim().slice(0, 500)];
  }
  return [`HTTP ${answer.status}`];
}

/** What a view shows for a failed load; `undefined` for failures the shell already shows. */
export function describeFailure(error: unknown): string | undefined {
  if (error instanceof AuthRequired || error instanceof Unreachable) {
    return undefined;
  }
  if (error instanceof ApiError) {
    return `HTTP ${error.status}: ${error.message}`;
  }
  return error instanceof Error ? error.message : String(error);
}
