//! Prompt and completion text in audit records: off unless `[audit.content]` turns it on for a
//! route or a policy rule, captured up to a byte cap, and kept off every copy that leaves the
//! appliance unless the request went to the cloud anyway.
//!
//! What is recorded (`Properties` members, all present together):
//!
//! - `Prompt`: the prompt-bearing part of the request body as JSON text — the `messages` array
//!   of a chat request (compact JSON), the `prompt` of a text completion (a string as itself).
//!   For a local route it is the body as received. For a cloud route it is what crossed the
//!   boundary: the redacted body when the rule redacted (`ContentRedacted: true`), so that a
//!   record never holds a sensitive value the redaction kept on the appliance.
//! - `Completion`: the answer's text — the generated text of a local model; for a cloud
//!   backend the upstream answer's `content` (JSON) or its concatenated deltas (SSE), as the
//!   backend sent them, placeholders and all.
//! - `PromptTruncated`, `CompletionTruncated`: whether the text was cut to the cap (or further,
//!   to keep the record within [`super::record::RECORD_BYTES_MAX`]).
//!
//! Copies that leave the appliance — the Logs Ingestion export, the stdout sink (it lands in
//! ContainerLogV2) and syslog — drop these members unless `Properties.Route` is `cloud` and the
//! pool was not on the premises (`Properties.OnPremises`: such a pool may be sent sensitive
//! text unredacted, which must stay on the premises) ([`strip_off_appliance`]). The store and the JSONL files keep them; the hash chain is
//! verified there, never on the stripped copies.

#[cfg(test)]
mod tests;

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::record::PROPERTIES;

/// `Properties` members holding content text or describing it.
pub const PROMPT: &str = "Prompt";
pub const COMPLETION: &str = "Completion";
pub const PROMPT_TRUNCATED: &str = "PromptTruncated";
pub const COMPLETION_TRUNCATED: &str = "CompletionTruncated";
pub const CONTENT_REDACTED: &str = "ContentRedacted";
/// Every member [`strip_off_appliance`] removes.
pub const CONTENT_PROPERTIES: [&str; 5] = [
    PROMPT,
    COMPLETION,
    PROMPT_TRUNCATED,
    COMPLETION_TRUNCATED,
    CONTENT_REDACTED,
];
/// The only route whose records may carry content text off the appliance: the text already
/// went to the cloud (unless to a pool marked `on_premises`).
pub const OFF_APPLIANCE_ROUTE: &str = "cloud";
/// The routes a request with content can take (`Properties.Route`); a browser's CORS
/// preflight, route `preflight`, carries none.
pub const ROUTES: [&str; 3] = ["local", "cloud", "rejected"];
/// `text_bytes_max` when not configured.
pub const TEXT_BYTES_MAX_DEFAULT: usize = 8 * 1024;
/// The largest `text_bytes_max`: two texts this long still fit a record.
pub const TEXT_BYTES_MAX_LIMIT: usize = 12 * 1024;
/// Room kept in a record for the content members' names and flags.
const MEMBERS_BYTES_RESERVED: usize = 160;

/// Which requests' text is recorded: `[audit.content]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentPolicy {
    /// `local`, `cloud`, `rejected`.
    pub routes: Vec<String>,
    /// Policy rule names as records name them (`Properties.Rule`).
    pub rules: Vec<String>,
    /// Each text is cut to this many bytes (UTF-8, at a character boundary).
    pub text_bytes_max: usize,
}

impl ContentPolicy {
    /// Whether a request that took `route` by `rule` has its text recorded: its route or its
    /// rule is listed.
    pub fn covers(&self, route: &str, rule: &str) -> bool {
        self.routes.iter().any(|listed| listed == route)
            || self.rules.iter().any(|listed| listed == rule)
    }
}

/// Text kept up to a byte cap, and whether some was cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CappedText {
    text: String,
    truncated: bool,
    bytes_max: usize,
}

impl CappedText {
    pub fn new(bytes_max: usize) -> CappedText {
        CappedText {
            text: String::new(),
            truncated: false,
            bytes_max,
        }
    }

    /// Appends `piece`, cutting at the cap.
    pub fn push(&mut self, piece: &str) {
        if self.truncated {
            return;
        }
        let room = self.bytes_max.saturating_sub(self.text.len());
        if piece.len() <= room {
            self.text.push_str(piece);
        } else {
            self.text
                .push_str(&piece[..floor_char_boundary(piece, room)]);
            self.truncated = true;
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }
}

/// The text captured for one request's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub prompt: CappedText,
    pub completion: CappedText,
    /// The prompt is the redacted body that went to the cloud.
    pub redacted: bool,
}

impl Captured {
    /// Captures the prompt of a request `body` (see the module documentation).
    pub fn new(body: &[u8], redacted: bool, text_bytes_max: usize) -> Captured {
        let mut prompt = CappedText::new(text_bytes_max);
        if let Some(text) = prompt_text(body) {
            prompt.push(&text);
        }
        Captured {
            prompt,
            completion: CappedText::new(text_bytes_max),
            redacted,
        }
    }

    /// The `Properties` members, both texts cut further where needed so that together they
    /// take at most `room_bytes` of JSON.
    pub fn members(&self, room_bytes: usize) -> Vec<(&'static str, Value)> {
        let room = room_bytes.saturating_sub(MEMBERS_BYTES_RESERVED);
        let prompt_len = escaped_len(self.prompt.as_str());
        let completion_len = escaped_len(self.completion.as_str());
        let (prompt_share, completion_share) = share(prompt_len, completion_len, room);
        let (prompt, prompt_cut) = cut_escaped(self.prompt.as_str(), prompt_share);
        let (completion, completion_cut) = cut_escaped(self.completion.as_str(), completion_share);
        let mut members = vec![
            (PROMPT, Value::String(prompt.to_owned())),
            (COMPLETION, Value::String(completion.to_owned())),
            (
                PROMPT_TRUNCATED,
                Value::Bool(self.prompt.truncated() || prompt_cut),
            ),
            (
                COMPLETION_TRUNCATED,
                Value::Bool(self.completion.truncated() || completion_cut),
            ),
        ];
        if self.redacted {
            members.push((CONTENT_REDACTED, Value::Bool(true)));
        }
        members
    }
}

/// Splits `room` between two texts of these lengths: both whole when they fit, else the
/// shorter whole (if within half) and the rest to the other.
fn share(first: usize, second: usize, room: usize) -> (usize, usize) {
    if first + second <= room {
        return (first, second);
    }
    let half = room / 2;
    if first <= half {
        (first, room - first)
    } else if second <= half {
        (room - second, second)
    } else {
        (half, room - half)
    }
}

/// The prompt-bearing part of a request body as JSON text: `messages`, else `prompt` (a
/// string as itself); `None` when the body is not a JSON object holding either.
pub fn prompt_text(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct PromptOnly {
        messages: Option<Value>,
        prompt: Option<Value>,
    }
    let parsed: PromptOnly = serde_json::from_slice(body).ok()?;
    if let Some(messages) = parsed.messages {
        return Some(messages.to_string());
    }
    match parsed.prompt? {
        Value::String(text) => Some(text),
        other => Some(other.to_string()),
    }
}

/// The text of a whole (non-streamed) answer: every choice's `message.content` or `text`, in
/// order.
pub fn answer_text(body: &[u8]) -> String {
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return String::new();
    };
    choices_text(&answer, "message")
}

/// The text of one server-sent event of a streamed answer: its choices' `delta.content` or
/// `text`; empty for `[DONE]`, usage chunks and anything else.
pub fn event_text(event: &[u8]) -> String {
    let Some(data) = event.strip_prefix(b"data:") else {
        return String::new();
    };
    let Ok(chunk) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
        return String::new();
    };
    choices_text(&chunk, "delta")
}

fn choices_text(answer: &Value, member: &str) -> String {
    let mut text = String::new();
    let Some(choices) = answer.get("choices").and_then(Value::as_array) else {
        return text;
    };
    for choice in choices {
        let piece = choice
            .get(member)
            .and_then(|message| message.get("content"))
            .or_else(|| choice.get("text"))
            .and_then(Value::as_str);
        if let Some(piece) = piece {
            text.push_str(piece);
        }
    }
    text
}

/// Removes the content members from a record's `Properties` unless its `Route` is `cloud` to
/// a pool off the premises; whether anything was removed.
pub fn strip_off_appliance(record: &mut Map<String, Value>) -> bool {
    let Some(Value::Object(properties)) = record.get_mut(PROPERTIES) else {
        return false;
    };
    let exportable = properties.get("Route").and_then(Value::as_str) == Some(OFF_APPLIANCE_ROUTE)
        && properties.get("OnPremises") != Some(&Value::Bool(true));
    if exportable {
        return false;
    }
    let mut removed = false;
    for name in CONTENT_PROPERTIES {
        removed |= properties.remove(name).is_some();
    }
    removed
}

/// A record's JSON line as it may leave the appliance: unchanged (borrowed) unless it holds
/// content text that must stay. A line that is not a JSON object is returned unchanged.
pub fn line_off_appliance(line: &[u8]) -> Cow<'_, [u8]> {
    // Member names are written unescaped; text inside strings cannot hold a bare `"Prompt"`.
    let may_hold = contains(line, b"\"Prompt\"") || contains(line, b"\"Completion\"");
    if !may_hold {
        return Cow::Borrowed(line);
    }
    let Ok(mut record) = serde_json::from_slice::<Map<String, Value>>(line) else {
        return Cow::Borrowed(line);
    };
    if !strip_off_appliance(&mut record) {
        return Cow::Borrowed(line);
    }
    match serde_json::to_vec(&record) {
        Ok(stripped) => Cow::Owned(stripped),
        Err(_) => Cow::Borrowed(line),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The length of `text` serialised as a JSON string, without the quotes.
fn escaped_len(text: &str) -> usize {
    text.chars().map(escaped_char_len).sum()
}

fn escaped_char_len(character: char) -> usize {
    match character {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        control if (control as u32) < 0x20 => 6,
        other => other.len_utf8(),
    }
}

/// The longest prefix of `text` whose JSON form takes at most `bytes_max`; whether it cut.
fn cut_escaped(text: &str, bytes_max: usize) -> (&str, bool) {
    let mut used = 0;
    for (index, character) in text.char_indices() {
        used += escaped_char_len(character);
        if used > bytes_max {
            return (&text[..index], true);
        }
    }
    (text, false)
}

/// The largest index at most `index` that is a character boundary of `text`.
fn floor_char_boundary(text: &str, index: usize) -> usize {
    let mut end = index.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}
