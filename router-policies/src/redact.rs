//! Redaction with restore: sensitive values out of a request, back into its answer.
//!
//! [`redact`] replaces each finding with a typed placeholder (`<EMAIL_1>`, `<CREDIT_CARD_2>`)
//! and records it in a [`RedactionMap`] that one request shares across all its strings, so a
//! value seen twice gets the same placeholder and the model can refer to it. The answer comes
//! back with placeholders in it: [`RedactionMap::restore`] puts the values back in a whole
//! text, and a [`Restorer`] does it for a stream, holding back only a suffix that may be the
//! start of a placeholder cut across chunks (`<EMA` + `IL_1>`).
//!
//! Values live only inside the map: its `Debug` shows placeholders, never values.

use std::collections::HashMap;

use crate::sensitivity::Finding;

/// The values of one request and their placeholders.
#[derive(Clone, Default)]
pub struct RedactionMap {
    /// Placeholder to value.
    values: HashMap<String, String>,
    /// Value to placeholder.
    placeholders: HashMap<String, String>,
    /// How many placeholders each label has handed out.
    counters: HashMap<String, u32>,
    /// Placeholder-shaped text already in the request, never handed out.
    reserved: std::collections::HashSet<String>,
    /// The longest placeholder, in bytes: the most a [`Restorer`] holds back.
    placeholder_bytes_max: usize,
    /// The answer's text is JSON (the request asked for a JSON `response_format`).
    text_is_json: bool,
}

impl RedactionMap {
    pub fn new() -> RedactionMap {
        RedactionMap::default()
    }

    /// How many distinct values were redacted.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Says that the answer's text is JSON, so that [`RedactionMap::restore_text`] and
    /// [`Restorer::for_text`] put values back escaped, as they go inside its strings.
    pub fn set_text_is_json(&mut self, json: bool) {
        self.text_is_json = json;
    }

    /// Restores the answer's text: as [`RedactionMap::restore_in_json`] where it is JSON,
    /// else as [`RedactionMap::restore`].
    pub fn restore_text(&self, text: &str) -> String {
        if self.text_is_json {
            self.restore_in_json(text)
        } else {
            self.restore(text)
        }
    }

    /// The placeholders handed out, sorted.
    pub fn placeholders(&self) -> Vec<&str> {
        let mut placeholders: Vec<&str> = self.values.keys().map(String::as_str).collect();
        placeholders.sort_unstable();
        placeholders
    }

    /// Keeps every placeholder-shaped run of `text` from being handed out: `<`, a label as
    /// [`crate::sensitivity::EntityType::placeholder_label`] writes one (upper-case letters,
    /// digits and `_`: a custom entity's name may hold digits, `emp2`, `2fa`), `_`, digits,
    /// `>`. A request that already says `<EMAIL_1>` (a prompt about anonymisation) gets
    /// `<EMAIL_2>` for its first address, and its own `<EMAIL_1>` is not turned into that
    /// address in the answer.
    pub fn reserve_placeholders_in(&mut self, text: &str) {
        let bytes = text.as_bytes();
        let mut search = 0;
        while let Some(offset) = memchr::memchr(b'<', &bytes[search..]) {
            let open = search + offset;
            search = open + 1;
            let inside = &bytes[open + 1..];
            let length = inside
                .iter()
                .take_while(|byte| {
                    byte.is_ascii_uppercase() || byte.is_ascii_digit() || **byte == b'_'
                })
                .count();
            // The counter is what follows the last `_`; the label before it is not empty.
            let counter_at = inside[..length]
                .iter()
                .rposition(|byte| *byte == b'_')
                .map_or(0, |underscore| underscore + 1);
            if counter_at > 1
                && counter_at < length
                && inside[counter_at..length].iter().all(u8::is_ascii_digit)
                && inside.get(length) == Some(&b'>')
            {
                let close = open + 1 + length;
                self.reserved.insert(text[open..=close].to_owned());
                search = close + 1;
            }
        }
    }

    /// The placeholder of `value`, handing out the next one for `label` if it is new.
    fn placeholder_for(&mut self, label: &str, value: &str) -> &str {
        if !self.placeholders.contains_key(value) {
            let counter = self.counters.entry(label.to_owned()).or_insert(0);
            let mut placeholder;
            loop {
                *counter += 1;
                placeholder = format!("<{label}_{counter}>");
                if !self.reserved.contains(&placeholder) {
                    break;
                }
            }
            self.placeholder_bytes_max = self.placeholder_bytes_max.max(placeholder.len());
            self.values.insert(placeholder.clone(), value.to_owned());
            self.placeholders.insert(value.to_owned(), placeholder);
        }
        self.placeholders.get(value).map_or("", String::as_str)
    }

    /// The value of a complete placeholder, if it is one of this map's.
    fn value(&self, placeholder: &str) -> Option<&str> {
        self.values.get(placeholder).map(String::as_str)
    }

    /// Whether `partial` (starting with `<`) is a proper prefix of one of the placeholders.
    fn may_complete(&self, partial: &str) -> bool {
        partial.len() < self.placeholder_bytes_max
            && self.values.keys().any(|placeholder| {
                placeholder.len() > partial.len() && placeholder.starts_with(partial)
            })
    }

    /// `text` with every placeholder of this map replaced by its value; other text,
    /// unknown placeholders included, is unchanged.
    pub fn restore(&self, text: &str) -> String {
        let mut output = String::with_capacity(text.len());
        let consumed = restore_into(self, text, false, Destination::Text, &mut output);
        debug_assert_eq!(consumed, text.len());
        output
    }

    /// Like [`RedactionMap::restore`], for text that is the inside of a JSON string (a tool
    /// call's `arguments`, which is JSON text in a string): values go back escaped, so a
    /// value with a quote or a backslash in it leaves the JSON intact.
    pub fn restore_in_json(&self, text: &str) -> String {
        let mut output = String::with_capacity(text.len());
        let consumed = restore_into(self, text, false, Destination::JsonString, &mut output);
        debug_assert_eq!(consumed, text.len());
        output
    }
}

/// Where restored values go: plain text, or the inside of a JSON string literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Destination {
    Text,
    JsonString,
}

impl Destination {
    fn push(self, value: &str, output: &mut String) {
        if self == Destination::Text {
            output.push_str(value);
            return;
        }
        for character in value.chars() {
            match character {
                '"' => output.push_str("\\\""),
                '\\' => output.push_str("\\\\"),
                '\n' => output.push_str("\\n"),
                '\r' => output.push_str("\\r"),
                '\t' => output.push_str("\\t"),
                control if u32::from(control) < 0x20 => {
                    output.push_str(&format!("\\u{:04x}", u32::from(control)));
                }
                other => output.push(other),
            }
        }
    }
}

impl std::fmt::Debug for RedactionMap {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RedactionMap")
            .field("placeholders", &self.placeholders())
            .finish()
    }
}

/// `text` with each finding replaced by its placeholder, recorded in `map`.
///
/// `findings` are those of [`crate::sensitivity::Recognizers::scan`] over `text`: sorted and
/// disjoint. Other findings are taken in order of start, skipping any that overlap one
/// already replaced, and a span that is out of range or not on character boundaries is
/// widened to the nearest ones, so that no more of a value is left in the text than asked.
pub fn redact(text: &str, findings: &[Finding], map: &mut RedactionMap) -> String {
    redact_with(text, findings, map, |span| std::borrow::Cow::Borrowed(span))
}

/// [`redact`] for text that encodes its values (JSON text, where `\"` is a quote): each span
/// is replaced as written, and `value_of` gives the value the map records and restores.
pub fn redact_with(
    text: &str,
    findings: &[Finding],
    map: &mut RedactionMap,
    value_of: impl for<'t> Fn(&'t str) -> std::borrow::Cow<'t, str>,
) -> String {
    let mut spans: Vec<(usize, usize, &Finding)> = findings
        .iter()
        .map(|finding| {
            let start = floor_char_boundary(text, finding.span.start);
            let end = ceil_char_boundary(text, finding.span.end);
            (start, end, finding)
        })
        .filter(|(start, end, _)| start < end)
        .collect();
    spans.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
    let mut output = String::with_capacity(text.len());
    let mut copied = 0;
    for (start, end, finding) in spans {
        if start < copied {
            continue;
        }
        output.push_str(&text[copied..start]);
        let label = finding.entity.placeholder_label();
        output.push_str(map.placeholder_for(&label, &value_of(&text[start..end])));
        copied = end;
    }
    output.push_str(&text[copied..]);
    output
}

fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn ceil_char_boundary(text: &str, index: usize) -> usize {
    let mut index = index.min(text.len());
    while !text.is_char_boundary(index) {
        index += 1;
    }
    index
}

/// Restores placeholders in `text` into `output`. With `hold`, stops at a `<` that may
/// begin a placeholder the text cuts off; returns how many bytes of `text` were consumed.
fn restore_into(
    map: &RedactionMap,
    text: &str,
    hold: bool,
    into: Destination,
    output: &mut String,
) -> usize {
    let mut copied = 0;
    let mut search = 0;
    while let Some(offset) = text[search..].find('<') {
        let open = search + offset;
        let rest = &text[open..];
        let window = &rest[..floor_char_boundary(rest, map.placeholder_bytes_max)];
        if let Some(close) = window.find('>') {
            if let Some(value) = map.value(&rest[..=close]) {
                output.push_str(&text[copied..open]);
                into.push(value, output);
                copied = open + close + 1;
                search = copied;
                continue;
            }
        } else if hold && map.may_complete(rest) {
            output.push_str(&text[copied..open]);
            return open;
        }
        search = open + 1;
    }
    output.push_str(&text[copied..]);
    text.len()
}

/// Restores placeholders in a streamed answer, chunk by chunk.
#[derive(Clone)]
pub struct Restorer {
    map: RedactionMap,
    /// Text held back: a possible placeholder start, at most the longest placeholder.
    held: String,
    into: Destination,
}

impl Restorer {
    pub fn new(map: RedactionMap) -> Restorer {
        Restorer {
            map,
            held: String::new(),
            into: Destination::Text,
        }
    }

    /// A restorer for the answer's streamed text: escaped where the map says the text is
    /// JSON ([`RedactionMap::set_text_is_json`]).
    pub fn for_text(map: RedactionMap) -> Restorer {
        if map.text_is_json {
            Restorer::in_json(map)
        } else {
            Restorer::new(map)
        }
    }

    /// A restorer for a stream of pieces of one JSON string's inside (a streamed tool call's
    /// `arguments`): values go back escaped, as [`RedactionMap::restore_in_json`] does.
    pub fn in_json(map: RedactionMap) -> Restorer {
        Restorer {
            into: Destination::JsonString,
            ..Restorer::new(map)
        }
    }

    /// The text of `chunk` (after what was held) that can be released now, values restored.
    pub fn push(&mut self, chunk: &str) -> String {
        self.held.push_str(chunk);
        let mut output = String::with_capacity(self.held.len());
        let consumed = restore_into(&self.map, &self.held, true, self.into, &mut output);
        self.held.drain(..consumed);
        output
    }

    /// Whatever is still held, released as it is (an unfinished placeholder is text).
    pub fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.held);
        let mut output = String::with_capacity(held.len());
        restore_into(&self.map, &held, false, self.into, &mut output);
        output
    }

    /// The map this restorer uses.
    pub fn map(&self) -> &RedactionMap {
        &self.map
    }
}

impl std::fmt::Debug for Restorer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Restorer")
            .field("map", &self.map)
            .field("held_bytes", &self.held.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
