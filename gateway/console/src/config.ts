// The configuration page: the gateway's TOML file as it is on disk, editable. "Validate" runs
// the gateway's own validation on the text (every error with its key path, pools built) without
// writing; "Save and reload" writes it and reloads, and is refused when the file changed since it
// was loaded (someone else's edit is never overwritten). Sections that take effect only after a
// restart (listeners, models, engine) are named in the outcome.

import * as api from './api';
import { el } from './dom';
import type { View } from './view';

type Outcome = 'idle' | 'pending' | 'valid' | 'saved' | 'invalid' | 'error';

export class Configuration implements View {
  readonly element: HTMLElement;
  private readonly file: HTMLElement;
  private readonly text: HTMLTextAreaElement;
  private readonly validate: HTMLButtonElement;
  private readonly save: HTMLButtonElement;
  private readonly load: HTMLButtonElement;
  private readonly message: HTMLElement;
  /** SHA-256 of the file as loaded: the save names it, so a changed file is not overwritten. */
  private base: string | undefined;
  private loaded = false;

  constructor() {
    this.file = el('code', { 'data-testid': 'config-file', text: '…' });
    this.text = el('textarea', {
      class: 'config-text',
      'data-testid': 'config-text',
      rows: 28,
      spellcheck: 'false',
      'aria-label': 'Configuration file (TOML)',
    });
    this.load = el('button', { type: 'button', class: 'secondary', 'data-testid': 'config-load', text: 'Load from disk' });
    this.validate = el('button', { type: 'button', class: 'secondary', 'data-testid': 'config-validate', text: 'Validate' });
    this.save = el('button', { type: 'button', 'data-testid': 'config-save', text: 'Save and reload' });
    this.message = el('div', { class: 'message', 'data-testid': 'config-message', 'data-state': 'idle' });
    this.load.addEventListener('click', () => void this.read());
    this.validate.addEventListener('click', () => void this.submit(true));
    this.save.addEventListener('click', () => void this.submit(false));
    this.element = el('div', { class: 'page configuration' }, [
      el('div', { class: 'page-head' }, [
        el('h1', { text: 'Configuration' }),
        el('div', { class: 'spacer' }),
        this.load,
        this.validate,
        this.save,
      ]),
      el('p', { class: 'muted intro' }, [
        'The file ',
        this.file,
        ': routing rules, pools and weights, the firewall and the policy change on save without a restart; listeners, models and the engine need one.',
      ]),
      this.message,
      this.text,
    ]);
  }

  async refresh(): Promise<void> {
    // Loaded once: a refresh tick must never overwrite an edit in progress.
    if (!this.loaded) {
      await this.read();
    }
  }

  destroy(): void {}

  private show(state: Outcome, lines: readonly string[]): void {
    this.message.dataset['state'] = state;
    const tone = { idle: '', pending: 'pending', valid: 'success', saved: 'success', invalid: 'error', error: 'error' }[state];
    this.message.className = `message ${tone}`;
    const [first, ...rest] = lines;
    this.message.replaceChildren(el('p', { text: first ?? '' }));
    if (rest.length > 0) {
      this.message.append(el('ul', {}, rest.map((line) => el('li', { text: line }))));
    }
  }

  private async read(): Promise<void> {
    try {
      const answer = await api.getJson('/admin/api/config');
      const body = api.isObject(answer.body) ? answer.body : {};
      this.text.value = typeof body['text'] === 'string' ? body['text'] : '';
      this.base = typeof body['sha256'] === 'string' ? body['sha256'] : undefined;
      this.file.textContent = typeof body['file'] === 'string' ? body['file'] : '?';
      this.loaded = true;
      this.show('idle', ['Loaded from disk.']);
    } catch (error) {
      const problem = api.describeFailure(error);
      if (problem !== undefined) {
        this.show('error', [`The configuration could not be loaded: ${problem}`]);
      }
    }
  }

  private async submit(dryRun: boolean): Promise<void> {
    if (!this.loaded) {
      return;
    }
    const buttons = [this.load, this.validate, this.save];
    buttons.forEach((button) => (button.disabled = true));
    this.show('pending', [dryRun ? 'Validating…' : 'Saving…']);
    try {
      const answer = await api.call('PUT', '/admin/api/config', {
        body: JSON.stringify({ text: this.text.value, base_sha256: this.base, dry_run: dryRun }),
      });
      const body = api.isObject(answer.body) ? answer.body : {};
      if (answer.status !== 200) {
        const heading =
          answer.status === 400
            ? 'Not saved: the configuration has errors.'
            : `Not saved (HTTP ${answer.status}):`;
        this.show('invalid', [heading, ...api.errorMessages(answer)]);
        return;
      }
      const restart = Array.isArray(body['restart_required']) ? body['restart_required'].map(String) : [];
      const pools = Array.isArray(body['pools']) ? body['pools'].map(String) : [];
      const lines = [
        dryRun ? 'Valid: the gateway would accept this configuration.' : 'Saved and reloaded.',
        `Pools: ${pools.length === 0 ? 'none' : pools.join(', ')}.`,
      ];
      if (restart.length > 0) {
        lines.push(`Takes effect after a restart: ${restart.join(', ')}.`);
      }
      if (!dryRun && typeof body['sha256'] === 'string') {
        this.base = body['sha256'];
      }
      this.show(dryRun ? 'valid' : 'saved', lines);
    } catch (error) {
      const problem =
        error instanceof api.AuthRequired
          ? 'the admin token was refused; enter the current one, then save again'
          : (api.describeFailure(error) ?? 'the gateway could not be reached');
      this.show('error', [`Not saved: ${problem}`]);
    } finally {
      buttons.forEach((button) => (button.disabled = false));
    }
  }
}
