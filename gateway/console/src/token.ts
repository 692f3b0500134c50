// The form that asks for the admin token when the API answers 401. A token is kept only after
// the gateway accepted it; a refused one shows an error and the form again.

import * as api from './api';
import { el } from './dom';

export function tokenForm(reason: string, accepted: () => void): HTMLElement {
  const input = el('input', {
    type: 'password',
    id: 'admin-token',
    autocomplete: 'off',
    spellcheck: 'false',
    required: true,
    'data-testid': 'token-input',
  });
  const submit = el('button', { type: 'submit', 'data-testid': 'token-submit', text: 'Sign in' });
  const error = el('p', { class: 'error', role: 'alert', 'data-testid': 'token-error', hidden: true });
  const form = el('form', { class: 'token-form', 'data-testid': 'token-form' }, [
    el('h1', { text: 'Admin token' }),
    el('p', { class: 'muted', text: reason }),
    el('label', { for: 'admin-token', text: 'Bearer token' }),
    el('div', { class: 'row' }, [input, submit]),
    error,
    el('p', { class: 'hint', text: 'The token is kept for this browser tab only (session storage).' }),
  ]);
  const fail = (message: string): void => {
    error.textContent = message;
    error.hidden = false;
    input.select();
    input.focus();
  };
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (token === '') {
      fail('Enter the admin token.');
      return;
    }
    submit.disabled = true;
    error.hidden = true;
    api
      .tokenAccepted(token)
      .then((ok) => {
        if (ok) {
          api.storeToken(token);
          accepted();
        } else {
          fail('The gateway refused this token.');
        }
      })
      .catch((problem: unknown) => fail(`The token could not be checked: ${problem instanceof Error ? problem.message : String(problem)}`))
      .finally(() => {
        submit.disabled = false;
      });
  });
  queueMicrotask(() => input.focus());
  return form;
}
