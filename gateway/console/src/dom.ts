// Small helpers that build DOM nodes. Text always goes in through `textContent`: API answers
// carry client-supplied strings (audit records above all), so nothing here parses HTML.

export type Child = Node | string | null | undefined | false;
export type Attributes = Record<string, string | number | boolean | null | undefined>;

/** An element with attributes and children; `text` sets the text, `class` the class list. */
export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attributes: Attributes = {},
  children: readonly Child[] = [],
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (name === 'text') {
      element.textContent = String(value);
    } else if (name === 'class') {
      element.className = String(value);
    } else {
      element.setAttribute(name, value === true ? '' : String(value));
    }
  }
  append(element, children);
  return element;
}

export function append(parent: Node, children: readonly Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    parent.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
}

/** Sets the text of a node only when it changed, so that selections survive a refresh. */
export function setText(node: Node, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

/** A table with a header row; the body is returned for the caller to fill. */
export function table(
  headers: readonly string[],
  attributes: Attributes = {},
): { table: HTMLTableElement; body: HTMLTableSectionElement } {
  const body = el('tbody');
  const head = el('thead', {}, [el('tr', {}, headers.map((header) => el('th', { scope: 'col', text: header })))]);
  return { table: el('table', { class: 'grid', ...attributes }, [head, body]), body };
}

/** A `<td>` holding text or nodes; numbers are right-aligned by the `num` class. */
export function cell(content: Child | readonly Child[], attributes: Attributes = {}): HTMLTableCellElement {
  const children = Array.isArray(content) ? (content as readonly Child[]) : [content as Child];
  return el('td', attributes, children);
}

export function pill(text: string, tone: 'ok' | 'warn' | 'bad' | 'muted' | 'info', attributes: Attributes = {}): HTMLSpanElement {
  return el('span', { class: `pill ${tone}`, text, ...attributes });
}

/**
 * Hands out tickets so that only the newest of overlapping requests renders: a slow answer to
 * an older request (a timer tick, a previous filter) must not overwrite a newer one.
 */
export class Latest {
  private issued = 0;

  begin(): () => boolean {
    const ticket = ++this.issued;
    return () => ticket === this.issued;
  }
}
