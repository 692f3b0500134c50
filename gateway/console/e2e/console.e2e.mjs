// End-to-end walk through the admin console in headless Chromium, against a running gateway.
// It signs in when a token is given (a wrong token first), reads the overview, applies a canary
// weight, explains a request and filters the audit records, and collects every console error,
// page error, failed request and Content-Security-Policy violation on the way. It prints one
// JSON report on stdout; the test that runs it makes the assertions.
//
// Environment:
//   ISTHMUS_ADMIN_URL     the admin listener, e.g. http://127.0.0.1:9090 (required)
//   ISTHMUS_ADMIN_TOKEN   the admin bearer token; empty when the API needs none
//   CHROMIUM              the browser to drive (default /usr/bin/chromium)
//   ISTHMUS_CANARY        pool/backend/weight to apply on the upstreams page, e.g. aks/v2/50
//   ISTHMUS_EXPLAIN_BODY  a request to explain (default: the page's sample)
//   ISTHMUS_EXPLAIN_PATH  the path it is explained as sent to (default: the page's first)
//   ISTHMUS_EXPLAIN_CLASSIFICATION  an x-data-classification value to send with it (optional)
//   ISTHMUS_CONFIG_EDIT   `FROM=>TO`: on the configuration page, replace FROM by TO, save it,
//                         and before that check that a broken file is refused (optional)
//
// Exit status 0 with the report, or 1 with {"failure": "<step>: <why>", ...partial report}.

import puppeteer from 'puppeteer-core';

/** How long one wait may take. */
const STEP_TIMEOUT_MS = 20_000;
/** How long the whole walk may take before the browser is killed. */
const RUN_TIMEOUT_MS = 180_000;
/** How long closing the browser may take before it is killed. */
const CLOSE_TIMEOUT_MS = 5_000;

const adminUrl = (process.env.ISTHMUS_ADMIN_URL ?? '').replace(/\/+$/, '');
const token = process.env.ISTHMUS_ADMIN_TOKEN ?? '';
const chromium = process.env.CHROMIUM || '/usr/bin/chromium';
const canary = process.env.ISTHMUS_CANARY ?? '';
const explainBody = process.env.ISTHMUS_EXPLAIN_BODY ?? '';
const explainPath = process.env.ISTHMUS_EXPLAIN_PATH ?? '';
const explainClassification = process.env.ISTHMUS_EXPLAIN_CLASSIFICATION ?? '';
const configEdit = process.env.ISTHMUS_CONFIG_EDIT ?? '';

const OVERVIEW_CARDS = [
  'ready',
  'requests-local',
  'requests-cloud',
  'requests-rejected',
  'waf-blocked',
  'sensitive-local',
  'sensitive-redacted',
  'sensitive-refused',
  'sensitive-left',
  'attachments-cloud',
  'local-share',
  'rps',
  'tokens-per-second',
  'ttft-p50',
  'ttft-p95',
  'tpot-p50',
  'latency-p99',
  'prefix-hit-rate',
  'kv-use',
  'queue-depth',
  'active-sequences',
  'open-connections',
];

const report = {
  login: { wrong_token_rejected: false, used: false },
  overview: {},
  callers: { rows: [], rate_limited: '' },
  upstreams: { rows: [], message: '', message_state: '', rows_after: [] },
  explain: { route: null, rule: null, entities: null, error: null },
  audit: { categories: [], filtered_categories: [], error: null },
  config: { file: null, broken_state: null, broken_message: null, valid_state: null, saved_state: null, saved_message: null },
  errors: [],
};

let step = 'start';
/** 401 answers are expected until the right token is in (the first calls and the wrong token). */
let signedIn = false;
/** A 400 is expected while the configuration page validates a file broken on purpose. */
let expectingInvalid = false;

const byTestId = (id) => `[data-testid="${id}"]`;

/** Sets a text field's value as typing would, in one go (long JSON bodies). */
async function setValue(page, selector, value) {
  await page.waitForSelector(selector, { visible: true, timeout: STEP_TIMEOUT_MS });
  await page.$eval(
    selector,
    (element, text) => {
      element.focus();
      element.value = text;
      element.dispatchEvent(new Event('input', { bubbles: true }));
      element.dispatchEvent(new Event('change', { bubbles: true }));
    },
    value,
  );
}

async function textOf(page, selector) {
  return page.$eval(selector, (element) => element.textContent ?? '');
}

async function navigate(page, view) {
  await page.click(byTestId(`nav-${view}`));
  await page.waitForFunction((name) => window.location.hash === `#/${name}`, { timeout: STEP_TIMEOUT_MS }, view);
}

async function signIn(page) {
  step = 'login';
  if (token === '') {
    // Without a token the overview must come up without asking for one.
    await page.waitForSelector(`${byTestId('requests-local')}, ${byTestId('token-form')}`, { timeout: STEP_TIMEOUT_MS });
    if ((await page.$(byTestId('token-form'))) !== null) {
      throw new Error('the console asks for a token but ISTHMUS_ADMIN_TOKEN is empty');
    }
    signedIn = true;
    return;
  }
  step = 'login: waiting for the token form';
  await page.waitForSelector(byTestId('token-input'), { visible: true, timeout: STEP_TIMEOUT_MS });

  step = 'login: submitting a wrong token';
  const wrong = token === 'not-the-admin-token' ? 'still-not-the-admin-token' : 'not-the-admin-token';
  await page.locator(byTestId('token-input')).setTimeout(STEP_TIMEOUT_MS).fill(wrong);
  await page.click(byTestId('token-submit'));
  await page.waitForFunction(
    () => {
      const error = document.querySelector('[data-testid="token-error"]');
      const form = document.querySelector('[data-testid="token-form"]');
      return form === null || (error !== null && !error.hidden && (error.textContent ?? '') !== '');
    },
    { timeout: STEP_TIMEOUT_MS },
  );
  report.login.wrong_token_rejected = (await page.$(byTestId('token-form'))) !== null;
  if (!report.login.wrong_token_rejected) {
    throw new Error('the console accepted a wrong token');
  }

  step = 'login: submitting the token';
  await page.locator(byTestId('token-input')).setTimeout(STEP_TIMEOUT_MS).fill(token);
  await page.click(byTestId('token-submit'));
  await page.waitForFunction(() => document.querySelector('[data-testid="token-form"]') === null, {
    timeout: STEP_TIMEOUT_MS,
  });
  report.login.used = true;
  signedIn = true;
}

async function readOverview(page) {
  step = 'overview: waiting for the request counters';
  await navigate(page, 'overview');
  await page.waitForFunction(
    () => {
      const text = (id) => document.querySelector(`[data-testid="${id}"]`)?.textContent ?? '';
      const counted = ['requests-local', 'requests-cloud', 'requests-rejected'].every((id) => /^\d+$/.test(text(id)));
      return counted && ['ready', 'not ready'].includes(text('ready'));
    },
    { timeout: STEP_TIMEOUT_MS },
  );
  step = 'overview: reading the cards';
  for (const id of OVERVIEW_CARDS) {
    report.overview[id] = await textOf(page, byTestId(id));
  }
  report.overview.charts = await page.$$eval('.chart .uplot', (charts) => charts.length);
}

async function readCallers(page) {
  step = 'callers: waiting for the per-key table';
  await navigate(page, 'callers');
  await page.waitForSelector('[data-testid="callers"][data-state="loaded"] tr[data-key]', { timeout: STEP_TIMEOUT_MS });
  step = 'callers: reading the rows';
  report.callers.rows = await page.$$eval('tr[data-key]', (rows) =>
    rows.map((row) => {
      const text = (id) => row.querySelector(`[data-testid="${id}"]`)?.textContent ?? '';
      return {
        key: row.dataset.key,
        limits: text('limits'),
        left: text('left'),
        local: text('local'),
        cloud: text('cloud'),
        rejected: text('rejected'),
        prompt_tokens: text('prompt-tokens'),
        completion_tokens: text('completion-tokens'),
      };
    }),
  );
  report.callers.rate_limited = await textOf(page, byTestId('rate-limited'));
}

async function readUpstreamRows(page) {
  return page.$$eval('tr[data-pool][data-backend]', (rows) =>
    rows.map((row) => ({
      pool: row.dataset.pool,
      backend: row.dataset.backend,
      weight: Number(row.querySelector('[data-testid="weight-current"]')?.textContent ?? 'NaN'),
      connections: Number((row.querySelector('[data-testid="connections"]')?.textContent ?? 'NaN').replaceAll(',', '')),
    })),
  );
}

async function applyCanary(page) {
  step = 'upstreams: waiting for the pools';
  await navigate(page, 'upstreams');
  await page.waitForSelector('[data-testid="pools"]:is([data-state="loaded"], [data-state="error"])', {
    timeout: STEP_TIMEOUT_MS,
  });
  if ((await page.$('[data-testid="pools"][data-state="error"]')) !== null) {
    throw new Error(`the upstreams did not load: ${await textOf(page, byTestId('pools'))}`);
  }
  report.upstreams.rows = await readUpstreamRows(page);
  if (canary === '') {
    return;
  }
  const parts = canary.split('/');
  if (parts.length < 3) {
    throw new Error(`ISTHMUS_CANARY is not pool/backend/weight: ${canary}`);
  }
  const pool = parts[0];
  const weight = parts[parts.length - 1];
  const backend = parts.slice(1, -1).join('/');

  step = `upstreams: setting the weight of ${pool}/${backend} to ${weight}`;
  await page.locator(byTestId(`weight-${pool}-${backend}`)).setTimeout(STEP_TIMEOUT_MS).fill(weight);
  await page.click(byTestId(`apply-${pool}-${backend}`));
  step = 'upstreams: waiting for the outcome';
  await page.waitForSelector(`${byTestId('upstream-message')}:is([data-state="success"], [data-state="error"])`, {
    timeout: STEP_TIMEOUT_MS,
  });
  report.upstreams.message = await page.$eval(byTestId('upstream-message'), (element) => element.innerText.trim());
  report.upstreams.message_state = await page.$eval(byTestId('upstream-message'), (element) => element.dataset.state);
  report.upstreams.rows_after = await readUpstreamRows(page);
}

async function explain(page) {
  step = 'explain: filling the form';
  await navigate(page, 'explain');
  if (explainPath !== '') {
    // The view renders after navigation: wait for the control before choosing.
    await page.waitForSelector(byTestId('explain-path'), { visible: true, timeout: STEP_TIMEOUT_MS });
    await page.select(byTestId('explain-path'), explainPath);
  }
  if (explainBody !== '') {
    await setValue(page, byTestId('explain-body'), explainBody);
  }
  if (explainClassification !== '') {
    await setValue(page, byTestId('explain-classification'), explainClassification);
  }
  await page.click(byTestId('explain-submit'));
  step = 'explain: waiting for the result';
  await page.waitForSelector(`${byTestId('explain-result')}:is([data-state="done"], [data-state="error"], [data-state="invalid"])`, {
    timeout: STEP_TIMEOUT_MS,
  });
  const state = await page.$eval(byTestId('explain-result'), (element) => element.dataset.state);
  if (state !== 'done') {
    report.explain.error = await textOf(page, byTestId('explain-result'));
    return;
  }
  report.explain.route = await textOf(page, byTestId('explain-route'));
  report.explain.rule = await textOf(page, byTestId('explain-rule'));
  report.explain.entities = await textOf(page, byTestId('explain-entities'));
  report.explain.attachments = await textOf(page, byTestId('explain-attachments'));
  report.explain.complexity = await textOf(page, byTestId('explain-complexity'));
  report.explain.waf_action = (await page.$(byTestId('explain-waf-action'))) === null ? null : await textOf(page, byTestId('explain-waf-action'));
}

/** Waits until the records table shows `filter`: rows, an error, or the trail being off. */
async function waitForRecords(page, filter, needRows) {
  await page.waitForFunction(
    (category, rowsNeeded) => {
      const records = document.querySelector('[data-testid="audit-records"]');
      if (records === null || records.dataset.filter !== category) {
        return false;
      }
      const state = records.dataset.state;
      if (state === 'error' || state === 'disabled') {
        return true;
      }
      return state === 'loaded' && (!rowsNeeded || records.querySelectorAll('tr[data-category]').length > 0);
    },
    { timeout: STEP_TIMEOUT_MS },
    filter,
    needRows,
  );
  const state = await page.$eval(byTestId('audit-records'), (element) => element.dataset.state);
  if (state !== 'loaded') {
    report.audit.error = (await textOf(page, byTestId('audit-notice'))) || state;
    return undefined;
  }
  return page.$$eval('[data-testid="audit-records"] tr[data-category]', (rows) => rows.map((row) => row.dataset.category));
}

async function readAudit(page) {
  step = 'audit: waiting for records';
  await navigate(page, 'audit');
  const categories = await waitForRecords(page, '', true);
  if (categories === undefined) {
    return;
  }
  report.audit.categories = categories;

  step = 'audit: opening a record';
  await page.click('[data-testid="audit-records"] tr[data-category]');
  await page.waitForSelector('[data-testid="audit-records"] tr.record-detail:not([hidden]) pre', { visible: true, timeout: STEP_TIMEOUT_MS });
  const json = await textOf(page, '[data-testid="audit-records"] tr.record-detail:not([hidden]) pre');
  report.audit.expanded_record_is_json = (() => {
    try {
      return typeof JSON.parse(json) === 'object';
    } catch {
      return false;
    }
  })();

  step = 'audit: filtering by IsthmusWaf';
  await page.select(byTestId('audit-category'), 'IsthmusWaf');
  report.audit.filtered_categories = (await waitForRecords(page, 'IsthmusWaf', false)) ?? [];
}

function watch(page) {
  page.on('console', (message) => {
    if (message.type() !== 'error') {
      return;
    }
    const text = message.text();
    // Chromium logs every answer >= 400 as a console error; the response listener reports
    // those with their URL (and knows which 401s were expected).
    if (text.startsWith('Failed to load resource: the server responded with a status of')) {
      return;
    }
    report.errors.push(`console: ${text}`);
  });
  page.on('pageerror', (error) => report.errors.push(`page error: ${error.message}`));
  page.on('requestfailed', (request) =>
    report.errors.push(`request failed: ${request.method()} ${request.url()}: ${request.failure()?.errorText ?? 'unknown'}`),
  );
  page.on('response', (response) => {
    const status = response.status();
    if (status < 400 || (status === 401 && !signedIn) || (status === 400 && expectingInvalid)) {
      return;
    }
    report.errors.push(`HTTP ${status}: ${response.request().method()} ${response.url()}`);
  });
}

/** Clicks `button` on the configuration page and waits for the outcome's state. */
async function configOutcome(page, button) {
  await page.click(byTestId(button));
  await page.waitForSelector(`${byTestId('config-message')}:not([data-state="pending"]):not([data-state="idle"])`, {
    timeout: STEP_TIMEOUT_MS,
  });
  return page.$eval(byTestId('config-message'), (element) => [element.dataset.state, element.innerText.trim()]);
}

async function editConfiguration(page) {
  if (configEdit === '') {
    return;
  }
  const [from, to] = configEdit.split('=>');
  step = 'config: loading the file';
  await navigate(page, 'config');
  await page.waitForFunction(() => document.querySelector('[data-testid="config-text"]')?.value.length > 0, {
    timeout: STEP_TIMEOUT_MS,
  });
  report.config.file = await textOf(page, byTestId('config-file'));
  const original = await page.$eval(byTestId('config-text'), (element) => element.value);
  if (!original.includes(from)) {
    throw new Error(`the configuration text has no \`${from}\``);
  }
  step = 'config: validating a broken file';
  await setValue(page, byTestId('config-text'), `${original}\n[firewall_typo]\nmode = "block"\n`);
  expectingInvalid = true;
  [report.config.broken_state, report.config.broken_message] = await configOutcome(page, 'config-validate');
  expectingInvalid = false;
  step = 'config: validating the edit';
  await setValue(page, byTestId('config-text'), original.replace(from, to));
  [report.config.valid_state] = await configOutcome(page, 'config-validate');
  step = 'config: saving the edit';
  [report.config.saved_state, report.config.saved_message] = await configOutcome(page, 'config-save');
}

async function walk(browser) {
  const page = await browser.newPage();
  await page.setViewport({ width: 1366, height: 900 });
  watch(page);
  await page.exposeFunction('__isthmusReportCsp', (violation) => report.errors.push(`csp: ${violation}`));
  await page.evaluateOnNewDocument(() => {
    document.addEventListener('securitypolicyviolation', (event) => {
      window.__isthmusReportCsp(`${event.violatedDirective} blocked ${event.blockedURI || 'inline'} at ${event.sourceFile}:${event.lineNumber}`);
    });
  });
  step = 'opening the console';
  const response = await page.goto(`${adminUrl}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
  if (response === null || response.status() !== 200) {
    throw new Error(`GET / answered ${response === null ? 'nothing' : response.status()}`);
  }
  await signIn(page);
  await readOverview(page);
  await readCallers(page);
  await applyCanary(page);
  await explain(page);
  await readAudit(page);
  await editConfiguration(page);
  step = 'done';
}

async function main() {
  if (adminUrl === '') {
    throw new Error('ISTHMUS_ADMIN_URL is not set');
  }
  step = 'launching Chromium';
  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--no-default-browser-check'],
  });
  let watchdog;
  try {
    await Promise.race([
      walk(browser),
      new Promise((_, reject) => {
        watchdog = setTimeout(() => reject(new Error(`the walk took longer than ${RUN_TIMEOUT_MS} ms`)), RUN_TIMEOUT_MS);
      }),
    ]);
  } finally {
    clearTimeout(watchdog);
    await close(browser);
  }
}

async function close(browser) {
  let timer;
  try {
    await Promise.race([
      browser.close(),
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error('close timed out')), CLOSE_TIMEOUT_MS);
      }),
    ]);
  } catch {
    browser.process()?.kill('SIGKILL');
  } finally {
    clearTimeout(timer);
  }
}

main().then(
  () => {
    process.stdout.write(`${JSON.stringify(report)}\n`);
    process.exit(0);
  },
  (error) => {
    const why = error instanceof Error ? error.message : String(error);
    process.stdout.write(`${JSON.stringify({ failure: `${step}: ${why}`, ...report })}\n`);
    process.exit(1);
  },
);
