//! Redact-then-cloud: the request's sensitive values become typed placeholders before it
//! leaves, and the answer gets the values back — in a JSON body, or chunk by chunk in a
//! stream where a placeholder may be split across chunks.

use std::collections::BTreeMap;

use bytes::Bytes;
use router_policies::redact::{RedactionMap, Restorer};
use serde_json::Value;

use crate::error::GatewayError;
use crate::sensitivity::SensitivityScanner;

/// The body with every prompt-bearing string redacted, and the map to restore the answer
/// with. Re-serialised, so only a redacted body changes shape. The scan reads more than this
/// replaces (every string of the body); `facts::evaluate` counts a request as redactable only
/// when this function's output scans clean.
pub fn redact_body(
    body: &[u8],
    scanner: &SensitivityScanner,
) -> Result<(Bytes, RedactionMap), GatewayError> {
    let mut value: Value =
        serde_json::from_slice(body).map_err(|error| GatewayError::InvalidJson {
            message: format!("the request body is not valid JSON: {error}"),
        })?;
    let mut map = RedactionMap::new();
    // Placeholder-shaped text the client wrote itself (`use tags like <EMAIL_1>`) is not
    // handed out, so the answer's copy of it stays as written: read in the strings as they
    // decode, since an encoder may have escaped it (Go writes `\u003cEMAIL_1\u003e`).
    reserve_placeholders(&value, &mut map);
    // A JSON answer gets values back inside its strings, escaped.
    map.set_text_is_json(matches!(
        value
            .pointer("/response_format/type")
            .and_then(Value::as_str),
        Some("json_object" | "json_schema")
    ));
    if let Some(fields) = value.as_object_mut() {
        for key in ["messages", "prompt", "tools"] {
            if let Some(field) = fields.get_mut(key) {
                redact_strings(field, scanner, &mut map);
            }
        }
    }
    let body = serde_json::to_vec(&value).map_err(|error| GatewayError::Internal {
        message: format!("serialising the redacted body: {error}"),
    })?;
    Ok((Bytes::from(body), map))
}

/// Reserves the placeholder-shaped text of every string and key of `value`, and of the
/// strings inside a string that is JSON with escapes (a call's `arguments`).
fn reserve_placeholders(value: &Value, map: &mut RedactionMap) {
    match value {
        Value::String(text) => {
            map.reserve_placeholders_in(text);
            if text.contains("\\u")
                && let Ok(inner) = serde_json::from_str::<Value>(text)
            {
                reserve_placeholders(&inner, map);
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| reserve_placeholders(item, map)),
        Value::Object(fields) => {
            for (key, item) in fields {
                map.reserve_placeholders_in(key);
                reserve_placeholders(item, map);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Every string inside `value` (message content and parts, tool-call arguments, prompts),
/// except the structural ones a backend needs verbatim (roles, names, ids, types).
fn redact_strings(value: &mut Value, scanner: &SensitivityScanner, map: &mut RedactionMap) {
    match value {
        Value::String(text) => redact_strings_in_text(text, scanner, map),
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| redact_strings(item, scanner, map)),
        Value::Object(fields) => {
            for (key, item) in fields.iter_mut() {
                match (key.as_str(), item) {
                    // Structural strings a backend needs verbatim; under such a key anything
                    // else (a tool schema's property called `name`) is read like the rest.
                    (
                        "role" | "name" | "type" | "id" | "tool_call_id" | "url",
                        Value::String(_),
                    ) => {}
                    ("arguments", Value::String(arguments)) => {
                        redact_arguments(arguments, scanner, map);
                    }
                    (_, item) => redact_strings(item, scanner, map),
                }
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// A call's arguments, JSON text in a string. Where the text escapes characters
/// (`\u00a0`), the strings it decodes to are scanned and redacted first, so that a value
/// written with escapes is found whole; then the text as written, where a key names what its
/// value is (`"password": "..."`). The map records each value as it decodes (`\"` a quote),
/// so it is restored escaped once, and the same value in a message gets the same placeholder.
fn redact_arguments(arguments: &mut String, scanner: &SensitivityScanner, map: &mut RedactionMap) {
    if arguments.contains('\\')
        && let Ok(mut decoded) = serde_json::from_str::<Value>(arguments)
        && redact_every_string(&mut decoded, scanner, map)
        && let Ok(text) = serde_json::to_string(&decoded)
    {
        *arguments = text;
    }
    let findings = scanner.findings(arguments);
    if !findings.is_empty() {
        *arguments =
            router_policies::redact::redact_with(arguments, &findings, map, json_string_value);
    }
}

/// The value a span of JSON text stands for, where it lies inside one string; else the span.
fn json_string_value(span: &str) -> std::borrow::Cow<'_, str> {
    if !span.contains('\\') {
        return std::borrow::Cow::Borrowed(span);
    }
    serde_json::from_str::<String>(&format!("\"{span}\""))
        .map_or(std::borrow::Cow::Borrowed(span), std::borrow::Cow::Owned)
}

fn redact_strings_in_text(text: &mut String, scanner: &SensitivityScanner, map: &mut RedactionMap) {
    let findings = scanner.findings(text);
    if !findings.is_empty() {
        *text = router_policies::redact::redact(text, &findings, map);
    }
}

/// Every string value inside `value` (keys are the function's parameter names); whether any
/// changed.
fn redact_every_string(
    value: &mut Value,
    scanner: &SensitivityScanner,
    map: &mut RedactionMap,
) -> bool {
    match value {
        Value::String(text) => {
            let findings = scanner.findings(text);
            if findings.is_empty() {
                return false;
            }
            *text = router_policies::redact::redact(text, &findings, map);
            true
        }
        Value::Array(items) => items.iter_mut().fold(false, |changed, item| {
            redact_every_string(item, scanner, map) | changed
        }),
        Value::Object(fields) => fields.values_mut().fold(false, |changed, item| {
            redact_every_string(item, scanner, map) | changed
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// A whole JSON answer with the placeholders in its choices restored.
pub fn restore_answer(body: &[u8], map: &RedactionMap) -> Bytes {
    let Ok(mut answer) = serde_json::from_slice::<Value>(body) else {
        return Bytes::copy_from_slice(body);
    };
    if let Some(choices) = answer.get_mut("choices").and_then(Value::as_array_mut) {
        for choice in choices {
            for pointer in ["/message/content", "/text"] {
                if let Some(Value::String(content)) = choice.pointer_mut(pointer) {
                    *content = map.restore_text(content);
                }
            }
            // A reasoning model's thoughts and a refusal are prose, whatever the format.
            for pointer in ["/message/reasoning_content", "/message/refusal"] {
                if let Some(Value::String(text)) = choice.pointer_mut(pointer) {
                    *text = map.restore(text);
                }
            }
            // A call's arguments are JSON in a string: values go back escaped.
            for arguments in call_arguments(choice.get_mut("message")) {
                *arguments = map.restore_in_json(arguments);
            }
        }
    }
    Bytes::from(serde_json::to_vec(&answer).unwrap_or_else(|_| body.to_vec()))
}

/// The `function.arguments` strings of a message's or a delta's `tool_calls` and of a
/// legacy `function_call`.
fn call_arguments(message: Option<&mut Value>) -> Vec<&mut String> {
    let Some(Value::Object(message)) = message else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (key, value) in message.iter_mut() {
        match (key.as_str(), value) {
            ("tool_calls", Value::Array(calls)) => {
                found.extend(calls.iter_mut().filter_map(|call| {
                    match call.pointer_mut("/function/arguments") {
                        Some(Value::String(arguments)) => Some(arguments),
                        _ => None,
                    }
                }));
            }
            ("function_call", call) => {
                if let Some(Value::String(arguments)) = call.get_mut("arguments") {
                    found.push(arguments);
                }
            }
            _ => {}
        }
    }
    found
}

/// Restores a stream's chunks: one restorer per choice index and part (its text, each tool
/// call's arguments), so text held back because it might be the start of a placeholder is
/// released in a later chunk of the same part.
#[derive(Debug)]
pub struct StreamRestorer {
    map: RedactionMap,
    parts: BTreeMap<(u64, Part), Restorer>,
    /// The last chunk seen, as the template of the chunk that releases held text.
    template: Option<Value>,
}

/// What of a choice a restorer restores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    /// `delta.content`, or a completion's `text`.
    Text,
    /// `delta.reasoning_content` (a reasoning model's thoughts, as vLLM streams them).
    Reasoning,
    /// `delta.refusal`.
    Refusal,
    /// `delta.tool_calls[].function.arguments` of the call with this `index`.
    ToolCall(u64),
    /// A legacy `delta.function_call.arguments`.
    FunctionCall,
}

impl StreamRestorer {
    pub fn new(map: RedactionMap) -> Self {
        StreamRestorer {
            map,
            parts: BTreeMap::new(),
            template: None,
        }
    }

    /// One event (`data: {...}`, blank line trimmed) restored, as bytes to send (with the
    /// blank line), or the event unchanged when it carries no text.
    pub fn event(&mut self, event: &[u8]) -> Bytes {
        let mut out = Vec::new();
        if event.trim_ascii() == b"data: [DONE]" {
            out.extend_from_slice(&self.release());
            out.extend_from_slice(b"data: [DONE]\n\n");
            return Bytes::from(out);
        }
        let Some(data) = event.strip_prefix(b"data:") else {
            return Bytes::from([event, b"\n\n"].concat());
        };
        let Ok(mut chunk) = serde_json::from_slice::<Value>(data.trim_ascii()) else {
            return Bytes::from([event, b"\n\n"].concat());
        };
        let mut finishing = Vec::new();
        if let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) {
            for choice in choices.iter_mut() {
                let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
                let finishes = choice
                    .get("finish_reason")
                    .is_some_and(|reason| !reason.is_null());
                if finishes {
                    finishing.push(index);
                }
                for (pointer, part) in [
                    ("/delta/content", Part::Text),
                    ("/text", Part::Text),
                    ("/delta/reasoning_content", Part::Reasoning),
                    ("/delta/refusal", Part::Refusal),
                ] {
                    if let Some(Value::String(text)) = choice.pointer_mut(pointer) {
                        *text = self.pass(index, part, text, finishes);
                    }
                }
                let Some(Value::Object(delta)) = choice.get_mut("delta") else {
                    continue;
                };
                if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                    for (position, call) in calls.iter_mut().enumerate() {
                        let call_index = call
                            .get("index")
                            .and_then(Value::as_u64)
                            .unwrap_or(position as u64);
                        if let Some(Value::String(arguments)) =
                            call.pointer_mut("/function/arguments")
                        {
                            *arguments =
                                self.pass(index, Part::ToolCall(call_index), arguments, finishes);
                        }
                    }
                }
                if let Some(Value::String(arguments)) = delta
                    .get_mut("function_call")
                    .and_then(|call| call.get_mut("arguments"))
                {
                    *arguments = self.pass(index, Part::FunctionCall, arguments, finishes);
                }
            }
        }
        // What a finishing choice's other parts still hold goes out before its finish chunk
        // (the parts this chunk carries were released in it, in order).
        for index in finishing {
            out.extend_from_slice(&self.release_where(&chunk, |choice| choice == index));
        }
        // A chunk that is not an object (`data: 1`) passes, but is no template for one.
        if chunk.is_object() {
            self.template = Some(chunk.clone());
        }
        out.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
        Bytes::from(out)
    }

    /// Text still held when the stream ends, as chunks.
    pub fn release(&mut self) -> Bytes {
        let Some(template) = self.template.clone() else {
            return Bytes::new();
        };
        Bytes::from(self.release_where(&template, |_| true))
    }

    /// `text` of one part, restored: what can go out now, and with `finishes` (the choice's
    /// last chunk) whatever that part still holds, after it.
    fn pass(&mut self, index: u64, part: Part, text: &str, finishes: bool) -> String {
        let mut out = self.restorer(index, part).push(text);
        if finishes && let Some(mut restorer) = self.parts.remove(&(index, part)) {
            out.push_str(&restorer.finish());
        }
        out
    }

    fn restorer(&mut self, index: u64, part: Part) -> &mut Restorer {
        let map = &self.map;
        self.parts
            .entry((index, part))
            .or_insert_with(|| match part {
                Part::Text => Restorer::for_text(map.clone()),
                Part::Reasoning | Part::Refusal => Restorer::new(map.clone()),
                Part::ToolCall(_) | Part::FunctionCall => Restorer::in_json(map.clone()),
            })
    }

    /// Chunks like `template` carrying what the restorers of the chosen choices still hold,
    /// those restorers done.
    fn release_where(&mut self, template: &Value, chosen: impl Fn(u64) -> bool) -> Vec<u8> {
        let keys: Vec<(u64, Part)> = self
            .parts
            .keys()
            .filter(|(index, _)| chosen(*index))
            .copied()
            .collect();
        let mut out = Vec::new();
        for key in keys {
            let Some(mut restorer) = self.parts.remove(&key) else {
                continue;
            };
            let rest = restorer.finish();
            if !rest.is_empty() {
                out.extend_from_slice(&release_chunk(template, key, rest));
            }
        }
        out
    }
}

/// A chunk like `template` carrying only `text` for one part of choice `index`.
fn release_chunk(template: &Value, (index, part): (u64, Part), text: String) -> Vec<u8> {
    let mut chunk = template.clone();
    let text_completion = template.pointer("/choices/0/text").is_some();
    let choice = match part {
        Part::Text if text_completion => {
            serde_json::json!({"index": index, "text": text, "finish_reason": null})
        }
        Part::Text => {
            serde_json::json!({"index": index, "delta": {"content": text}, "finish_reason": null})
        }
        Part::Reasoning => serde_json::json!({"index": index, "delta": {"reasoning_content": text},
            "finish_reason": null}),
        Part::Refusal => {
            serde_json::json!({"index": index, "delta": {"refusal": text}, "finish_reason": null})
        }
        Part::ToolCall(call) => serde_json::json!({"index": index, "delta": {
            "tool_calls": [{"index": call, "function": {"arguments": text}}]}, "finish_reason": null}),
        Part::FunctionCall => serde_json::json!({"index": index, "delta": {
            "function_call": {"arguments": text}}, "finish_reason": null}),
    };
    chunk["choices"] = Value::Array(vec![choice]);
    if chunk.get("usage").is_some() {
        chunk["usage"] = Value::Null;
    }
    format!("data: {chunk}\n\n").into_bytes()
}

#[cfg(test)]
mod tests;
