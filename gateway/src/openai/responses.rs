//! OpenAI's Responses API (`POST /v1/responses`) as a dialect of chat completions.
//!
//! A Responses request is translated into the chat completions request that means the same
//! (`instructions` become the system message, `input` items become messages, function tools
//! become chat tools, `text.format` becomes `response_format`), and from then on it is a chat
//! request: the same policy scan, firewall, redaction, local engine or cloud forwarder, audit
//! record. What the chat path writes back, a chat completion or a stream of chunks, is
//! transcoded on its way out into a Response object or the Responses stream events. So every
//! guarantee of the chat path — sensitive text stays local, redaction is restored, the last
//! bytes wait for the audit record — holds for this API without a second implementation.
//!
//! Stored responses (`[responses] store = true`, `crate::response_store`): a request that
//! continues one (`previous_response_id`) is translated with the stored conversation — the
//! input items the earlier response read, then its output — before its own input; the
//! earlier `instructions` are not carried over, as OpenAI does. The transcoder hands the
//! finished Response object to a keeper the data plane gives it ([`Transcoder::keep_as`])
//! before the answer's last bytes are written, so a client can continue as soon as it has
//! the answer. With the store off, every answer says `"store": false` and
//! `previous_response_id` is refused. `conversation`, `background`, stored prompts and item
//! references are refused with `unsupported_parameter`. Built-in tools (web search, file
//! search, ...) are refused; functions are served.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::error::GatewayError;

/// The Responses API's request fields: translated below, or refused, or without effect here.
const RESPONSES_FIELDS: &[&str] = &[
    "model",
    "input",
    "instructions",
    "stream",
    "stream_options",
    "max_output_tokens",
    "max_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "parallel_tool_calls",
    "metadata",
    "reasoning",
    "tools",
    "tool_choice",
    "text",
    "store",
    "truncation",
    "include",
    "previous_response_id",
    "conversation",
    "prompt",
    "background",
];

/// Chat completions fields that a Responses request may not smuggle in: they would change
/// what the answer is made of, which the transcoding back could not express.
const CHAT_SHAPE_FIELDS: &[&str] = &[
    "messages",
    "n",
    "functions",
    "function_call",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "prediction",
    "audio",
    "modalities",
    "reasoning_effort",
];

/// A Responses request translated: the chat completions body to run, and what the answer's
/// transcoding needs.
#[derive(Debug)]
pub struct Translated {
    pub chat_body: Vec<u8>,
    pub transcoder: Transcoder,
    /// Whether the request lets its response be kept (`store`, true unless it says false).
    pub store: bool,
    /// What the model reads before it answers, instructions aside, as Responses input items:
    /// the continued conversation (its input items, then its output), then this request's
    /// own input (a string input as one user message). What a stored response keeps.
    pub input_items: Vec<Value>,
}

/// A chat validation message in the Responses API's names.
fn responses_text(message: &str) -> String {
    let mut text = message.to_owned();
    for (chat, responses) in [
        ("`max_completion_tokens`", "`max_output_tokens`"),
        ("`max_tokens`", "`max_output_tokens`"),
        ("`reasoning_effort`", "`reasoning.effort`"),
        ("`response_format`", "`text.format`"),
        ("`image_url` content parts", "`input_image` content parts"),
        (
            "messages must contain at least one message",
            "input must contain at least one item",
        ),
        ("drop response_format", "drop text.format"),
    ] {
        text = text.replace(chat, responses);
    }
    text
}

/// A stored response that a request continues (`previous_response_id`).
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    pub id: &'a str,
    /// The input items the stored response read.
    pub input_items: &'a [Value],
    /// The stored Response object's `output`.
    pub output: &'a [Value],
}

/// The `previous_response_id` of a Responses request body, when it names one: the data
/// plane looks it up before translating. A body that is not JSON says nothing here; the
/// translation reports it.
pub fn previous_response_id(body: &[u8]) -> Result<Option<String>, GatewayError> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        previous_response_id: Option<Value>,
    }
    let peek = match serde_json::from_slice::<Peek>(body) {
        Ok(peek) => peek,
        // The key twice: which one a parser keeps is a guess, so neither is.
        Err(error)
            if error
                .to_string()
                .contains("duplicate field `previous_response_id`") =>
        {
            return Err(GatewayError::invalid_value(
                "previous_response_id",
                "previous_response_id is given more than once",
            ));
        }
        Err(_) => return Ok(None),
    };
    match peek.previous_response_id {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if !id.is_empty() => Ok(Some(id)),
        Some(_) => Err(GatewayError::invalid_value(
            "previous_response_id",
            "must be the id of a response (a non-empty string)",
        )),
    }
}

/// Translates a Responses request body into a chat completions body; `previous` is the
/// stored response it continues, when its `previous_response_id` names one.
pub fn to_chat(
    body: &[u8],
    request_id: &str,
    created_at: u64,
    previous: Option<Previous<'_>>,
) -> Result<Translated, GatewayError> {
    let request: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(request)) => request,
        Ok(_) => {
            return Err(GatewayError::InvalidJson {
                message: "the request body must be a JSON object".into(),
            });
        }
        Err(error) => {
            return Err(GatewayError::InvalidJson {
                message: format!("the request body is not valid JSON: {error}"),
            });
        }
    };
    let present = |key: &str| request.get(key).filter(|value| !value.is_null());
    if previous.is_none() && present("previous_response_id").is_some() {
        return Err(GatewayError::unsupported(
            "previous_response_id",
            "this gateway keeps no responses ([responses] store is off): send the whole conversation in `input`",
        ));
    }
    let store = match present("store") {
        None => true,
        Some(Value::Bool(store)) => *store,
        Some(_) => return Err(GatewayError::invalid_value("store", "must be a boolean")),
    };
    for (key, why) in [
        (
            "conversation",
            "the gateway keeps no conversations: send the whole conversation in `input`",
        ),
        (
            "prompt",
            "stored prompt templates are not available: send `instructions` and `input`",
        ),
    ] {
        if present(key).is_some() {
            return Err(GatewayError::unsupported(key, why));
        }
    }
    if present("background").is_some_and(|value| value != &Value::Bool(false)) {
        return Err(GatewayError::unsupported(
            "background",
            "background responses are not available: the gateway keeps no responses",
        ));
    }
    if let Some(include) = present("include") {
        match include.as_array() {
            Some(items) if items.is_empty() => {}
            Some(_) => {
                return Err(GatewayError::unsupported(
                    "include",
                    "no additional output data is available through the gateway",
                ));
            }
            None => return Err(GatewayError::invalid_value("include", "must be an array")),
        }
    }

    // Fields of neither API (engine extensions such as `ignore_eos` or `top_k`) go on as
    // they would in a chat request; the translated fields below replace any chat field of
    // the same name, and chat fields that would change the answer's shape are dropped.
    let mut chat: Map<String, Value> = request
        .iter()
        .filter(|(key, _)| !RESPONSES_FIELDS.contains(&key.as_str()))
        .filter(|(key, _)| !CHAT_SHAPE_FIELDS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let mut echo = Echo::default();
    if let Some(model) = present("model") {
        chat.insert("model".into(), model.clone());
    }
    let stream = match present("stream") {
        None => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(GatewayError::invalid_value("stream", "must be a boolean")),
    };
    chat.insert("stream".into(), Value::Bool(stream));
    if stream {
        // The closing `response.completed` event carries the usage.
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }

    let mut messages = Vec::new();
    // Which part of the request each chat message came from, for errors about it.
    let mut origins: Vec<String> = Vec::new();
    match present("instructions") {
        None => {}
        Some(Value::String(instructions)) => {
            messages.push(json!({"role": "system", "content": instructions}));
            origins.push("instructions".into());
            echo.fields
                .insert("instructions".into(), Value::String(instructions.clone()));
        }
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "instructions",
                "must be a string",
            ));
        }
    }
    let mut input_items = Vec::new();
    if let Some(previous) = previous {
        // Validated when that response was made; translated again the same way.
        for item in previous.input_items.iter().chain(previous.output) {
            input_item(item, "previous_response_id", &mut messages)?;
            input_items.push(item.clone());
        }
        origins.resize(messages.len(), "previous_response_id".into());
    }
    match present("input") {
        Some(Value::String(text)) => {
            messages.push(json!({"role": "user", "content": text}));
            origins.push("input".into());
            input_items.push(json!({"type": "message", "role": "user",
                                    "content": [{"type": "input_text", "text": text}]}));
        }
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                input_item(item, &format!("input[{index}]"), &mut messages)?;
                input_items.push(normalized_item(item));
                // A call joins the assistant turn before it: that keeps its first origin.
                origins.resize(messages.len(), format!("input[{index}]"));
            }
        }
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "input",
                "must be a string or an array of input items",
            ));
        }
        None => {
            return Err(GatewayError::invalid_value(
                "input",
                "missing required parameter `input`",
            ));
        }
    }
    chat.insert("messages".into(), Value::Array(messages));

    if let Some(max) = present("max_output_tokens") {
        chat.insert("max_completion_tokens".into(), max.clone());
        echo.fields.insert("max_output_tokens".into(), max.clone());
    }
    for key in [
        "temperature",
        "top_p",
        "user",
        "parallel_tool_calls",
        "seed",
    ] {
        if let Some(value) = present(key) {
            chat.insert(key.into(), value.clone());
            echo.fields.insert(key.into(), value.clone());
        }
    }
    if let Some(metadata) = present("metadata") {
        if !metadata.is_object() {
            return Err(GatewayError::invalid_value("metadata", "must be an object"));
        }
        echo.fields.insert("metadata".into(), metadata.clone());
    }
    if let Some(reasoning) = present("reasoning") {
        match reasoning.get("effort") {
            None | Some(Value::Null) => {}
            Some(effort @ Value::String(_)) => {
                chat.insert("reasoning_effort".into(), effort.clone());
            }
            Some(_) => {
                return Err(GatewayError::invalid_value(
                    "reasoning.effort",
                    "must be a string",
                ));
            }
        }
        echo.fields.insert("reasoning".into(), reasoning.clone());
    }
    if let Some(tools) = present("tools") {
        let Some(tools) = tools.as_array() else {
            return Err(GatewayError::invalid_value("tools", "must be an array"));
        };
        let translated = tools
            .iter()
            .enumerate()
            .map(|(index, tool)| function_tool(tool, &format!("tools[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if !translated.is_empty() {
            chat.insert("tools".into(), Value::Array(translated));
        }
        echo.fields
            .insert("tools".into(), Value::Array(tools.clone()));
    }
    if let Some(choice) = present("tool_choice") {
        let translated = match choice {
            Value::String(mode) if matches!(mode.as_str(), "auto" | "none" | "required") => {
                choice.clone()
            }
            Value::Object(object)
                if object.get("type").and_then(Value::as_str) == Some("function") =>
            {
                let Some(name) = object.get("name").and_then(Value::as_str) else {
                    return Err(GatewayError::invalid_value(
                        "tool_choice.name",
                        "a function tool choice needs a `name`",
                    ));
                };
                json!({"type": "function", "function": {"name": name}})
            }
            Value::Object(object) => {
                let kind = object.get("type").and_then(Value::as_str).unwrap_or("");
                return Err(GatewayError::unsupported(
                    "tool_choice.type",
                    format!("`{kind}` tools are not available through the gateway"),
                ));
            }
            _ => {
                return Err(GatewayError::invalid_value(
                    "tool_choice",
                    "must be `auto`, `none`, `required` or a function choice",
                ));
            }
        };
        chat.insert("tool_choice".into(), translated);
        echo.fields.insert("tool_choice".into(), choice.clone());
    }
    if let Some(text) = present("text") {
        if let Some(format) = text.get("format").filter(|format| !format.is_null())
            && let Some(response_format) = text_format(format)?
        {
            chat.insert("response_format".into(), response_format);
        }
        echo.fields.insert("text".into(), text.clone());
    }

    let chat_body = as_written(chat, body)?;
    let model = present("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut transcoder = Transcoder::new(request_id, created_at, model, echo);
    transcoder.previous_response_id = previous.map(|previous| previous.id.to_owned());
    transcoder.message_origins = origins;
    Ok(Translated {
        chat_body,
        transcoder,
        store,
        input_items,
    })
}

/// An input item as a stored response lists it: a message always with its `type` and its
/// content as parts (`input_text`, or `output_text` for the assistant).
fn normalized_item(item: &Value) -> Value {
    let mut item = item.clone();
    let Some(object) = item.as_object_mut() else {
        return item;
    };
    let role = object
        .get("role")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let is_message = match object.get("type").and_then(Value::as_str) {
        None => role.is_some(),
        Some(kind) => kind == "message",
    };
    if !is_message {
        return item;
    }
    object.insert("type".into(), Value::String("message".into()));
    if let Some(Value::String(text)) = object.get("content") {
        let kind = if role.as_deref() == Some("assistant") {
            "output_text"
        } else {
            "input_text"
        };
        let parts = json!([{"type": kind, "text": text}]);
        object.insert("content".into(), parts);
    }
    item
}

/// A page of a stored response's input items (`GET /v1/responses/{id}/input_items`):
/// `limit` (1 to 100, default 20), `order` (`desc`, the default, or `asc`) and `after` (an
/// item id), as OpenAI's list endpoints take them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemsPage {
    limit: usize,
    ascending: bool,
    after: Option<String>,
}

impl ItemsPage {
    /// Reads the query string; other parameters (`include`, `api-version`) are ignored.
    pub fn parse(query: Option<&str>) -> Result<ItemsPage, GatewayError> {
        let mut page = ItemsPage {
            limit: 20,
            ascending: false,
            after: None,
        };
        for pair in query
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "limit" => {
                    page.limit = value
                        .parse()
                        .ok()
                        .filter(|limit| (1..=100).contains(limit))
                        .ok_or_else(|| {
                            GatewayError::invalid_value(
                                "limit",
                                format!("must be an integer from 1 to 100, not `{value}`"),
                            )
                        })?;
                }
                "order" => {
                    page.ascending = match value {
                        "asc" => true,
                        "desc" => false,
                        _ => {
                            return Err(GatewayError::invalid_value(
                                "order",
                                format!("must be `asc` or `desc`, not `{value}`"),
                            ));
                        }
                    };
                }
                "after" if !value.is_empty() => page.after = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(page)
    }

    /// The page of `items` (in the order they were read) as an OpenAI list object.
    pub fn list(&self, items: &[Value]) -> Value {
        let ordered: Vec<&Value> = if self.ascending {
            items.iter().collect()
        } else {
            items.iter().rev().collect()
        };
        let start = match &self.after {
            Some(after) => ordered
                .iter()
                .position(|item| item.get("id").and_then(Value::as_str) == Some(after))
                .map_or(ordered.len(), |at| at + 1),
            None => 0,
        };
        let data: Vec<Value> = ordered[start..]
            .iter()
            .take(self.limit)
            .map(|item| (*item).clone())
            .collect();
        let id = |item: Option<&Value>| item.and_then(|item| item.get("id")).cloned();
        json!({
            "object": "list",
            "first_id": id(data.first()),
            "last_id": id(data.last()),
            "has_more": start + data.len() < ordered.len(),
            "data": data,
        })
    }
}

/// One `input` item as chat messages.
fn input_item(item: &Value, param: &str, messages: &mut Vec<Value>) -> Result<(), GatewayError> {
    let Some(object) = item.as_object() else {
        return Err(GatewayError::invalid_value(
            param,
            "each input item must be an object",
        ));
    };
    let kind = object.get("type").and_then(Value::as_str);
    match kind {
        // A message; `type` may be left out when `role` is given.
        Some("message") | None => {
            let role = match object.get("role").and_then(Value::as_str) {
                Some(role @ ("user" | "assistant" | "system" | "developer")) => role,
                Some(other) => {
                    return Err(GatewayError::invalid_value(
                        format!("{param}.role"),
                        format!(
                            "`{other}` is not a role (expected user, assistant, system or developer)"
                        ),
                    ));
                }
                None => {
                    return Err(GatewayError::invalid_value(
                        format!("{param}.role"),
                        "each message needs a role",
                    ));
                }
            };
            let content = content(
                object.get("content"),
                &format!("{param}.content"),
                "content must be a string or an array of content parts",
            )?;
            messages.push(json!({"role": role, "content": content}));
        }
        Some("function_call") => {
            let field = |name: &str| {
                object.get(name).and_then(Value::as_str).ok_or_else(|| {
                    GatewayError::invalid_value(
                        format!("{param}.{name}"),
                        format!("a function call item needs a string `{name}`"),
                    )
                })
            };
            let call = json!({
                "id": field("call_id")?,
                "type": "function",
                "function": {"name": field("name")?, "arguments": field("arguments")?},
            });
            // Consecutive calls, and calls right after the assistant's text, are one
            // assistant turn, as chat completions write them.
            let turn = messages
                .last_mut()
                .and_then(Value::as_object_mut)
                .filter(|last| last.get("role").and_then(Value::as_str) == Some("assistant"));
            match turn {
                Some(turn) => match turn.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    Some(calls) => calls.push(call),
                    None => {
                        turn.insert("tool_calls".into(), json!([call]));
                    }
                },
                None => messages.push(json!({
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [call],
                })),
            }
        }
        Some("function_call_output") => {
            let Some(call_id) = object.get("call_id").and_then(Value::as_str) else {
                return Err(GatewayError::invalid_value(
                    format!("{param}.call_id"),
                    "a function call output needs a string `call_id`",
                ));
            };
            let output = content(
                object.get("output"),
                &format!("{param}.output"),
                "a function call output needs `output`, a string or content parts",
            )?;
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // A reasoning model's earlier thoughts: nothing a chat model reads.
        Some("reasoning") => {}
        Some("item_reference") => {
            return Err(GatewayError::unsupported(
                format!("{param}.type"),
                "item references are not available: send the items, or continue a stored response with `previous_response_id`",
            ));
        }
        Some(other) => {
            return Err(GatewayError::unsupported(
                format!("{param}.type"),
                format!("`{other}` input items are not available through the gateway"),
            ));
        }
    }
    Ok(())
}

/// Message content (or a function's output) as chat content: a string as it is, parts one
/// by one; anything else is refused with `problem`.
fn content(value: Option<&Value>, param: &str, problem: &str) -> Result<Value, GatewayError> {
    match value {
        Some(Value::String(text)) => Ok(Value::String(text.clone())),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(index, part)| content_part(part, &format!("{param}[{index}]")))
            .collect::<Result<_, _>>()
            .map(Value::Array),
        _ => Err(GatewayError::invalid_value(param, problem)),
    }
}

/// A message content part as a chat content part.
fn content_part(part: &Value, param: &str) -> Result<Value, GatewayError> {
    let Some(object) = part.as_object() else {
        return Err(GatewayError::invalid_value(
            param,
            "each content part must be an object",
        ));
    };
    let text = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_str)
            .map(|text| json!({"type": "text", "text": text}))
            .ok_or_else(|| {
                GatewayError::invalid_value(
                    format!("{param}.{key}"),
                    format!("this part needs a string `{key}`"),
                )
            })
    };
    match object.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => text("text"),
        Some("refusal") => text("refusal"),
        Some("input_image") => match object.get("image_url").and_then(Value::as_str) {
            Some(url) => {
                let mut image = json!({"url": url});
                if let Some(detail) = object.get("detail").filter(|detail| !detail.is_null()) {
                    image["detail"] = detail.clone();
                }
                Ok(json!({"type": "image_url", "image_url": image}))
            }
            None => Err(GatewayError::unsupported(
                format!("{param}.file_id"),
                "images by file id need stored files; send `image_url`",
            )),
        },
        Some(other) => Err(GatewayError::unsupported(
            format!("{param}.type"),
            format!("`{other}` content parts are not available through the gateway"),
        )),
        None => Err(GatewayError::invalid_value(
            format!("{param}.type"),
            "each content part needs a type",
        )),
    }
}

/// A Responses function tool as a chat tool; built-in tools are refused.
fn function_tool(tool: &Value, param: &str) -> Result<Value, GatewayError> {
    let kind = tool.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(GatewayError::unsupported(
            format!("{param}.type"),
            format!(
                "`{}` tools are not available through the gateway; offer functions",
                kind.unwrap_or("untyped")
            ),
        ));
    }
    let Some(name) = tool.get("name").and_then(Value::as_str) else {
        return Err(GatewayError::invalid_value(
            format!("{param}.name"),
            "a function tool needs a string `name`",
        ));
    };
    let mut function = Map::new();
    function.insert("name".into(), Value::String(name.to_owned()));
    for key in ["description", "parameters", "strict"] {
        if let Some(value) = tool.get(key).filter(|value| !value.is_null()) {
            function.insert(key.into(), value.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// Marks a JSON value to be put back as the client wrote it (see [`as_written`]).
const WRITTEN_MARKER: &str = "\u{0}isthmus-as-written:";

/// The chat translation serialised, with `text.format.schema` and each function tool's
/// `parameters` in the text the client wrote: a parsed value sorts its keys, and a grammar
/// writes an answer's keys in its schema's order ("reasoning" before "answer").
fn as_written(mut chat: Map<String, Value>, body: &[u8]) -> Result<Vec<u8>, GatewayError> {
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow, default)]
        text: Option<Text<'a>>,
        #[serde(borrow, default)]
        tools: Option<Vec<Tool<'a>>>,
    }
    #[derive(Deserialize)]
    struct Text<'a> {
        #[serde(borrow, default)]
        format: Option<Format<'a>>,
    }
    #[derive(Deserialize)]
    struct Format<'a> {
        #[serde(borrow, default)]
        schema: Option<&'a RawValue>,
    }
    #[derive(Deserialize)]
    struct Tool<'a> {
        #[serde(borrow, default)]
        parameters: Option<&'a RawValue>,
    }
    let write = |chat: &Map<String, Value>| {
        serde_json::to_vec(chat).map_err(|error| GatewayError::Internal {
            message: format!("writing the translated request: {error}"),
        })
    };
    let Ok(written) = serde_json::from_slice::<Body<'_>>(body) else {
        return write(&chat);
    };
    // The places to keep as written, then each marked: its path, the parsed value it held,
    // and the text as written.
    let mut places: Vec<(String, &RawValue)> = Vec::new();
    if let Some(schema) = written.text.and_then(|text| text.format?.schema) {
        places.push(("/response_format/json_schema/schema".to_owned(), schema));
    }
    let tools_count = chat.get("tools").and_then(Value::as_array).map(Vec::len);
    if let Some(raws) = written.tools
        && tools_count == Some(raws.len())
    {
        for (index, raw) in raws.iter().enumerate() {
            if let Some(parameters) = raw.parameters {
                places.push((format!("/tools/{index}/function/parameters"), parameters));
            }
        }
    }
    let mut marked: Vec<(String, Value, &str)> = Vec::new();
    for (path, raw) in places {
        if let Some(slot @ Value::Object(_)) = root_pointer(&mut chat, &path) {
            let marker = Value::String(format!("{WRITTEN_MARKER}{}", marked.len()));
            let parsed = std::mem::replace(slot, marker);
            marked.push((path, parsed, raw.get()));
        }
    }
    let out = write(&chat)?;
    // Each marker once, else (a client's own string equal to one) the parsed values.
    let mut spans = Vec::with_capacity(marked.len());
    for index in 0..marked.len() {
        let marker = serde_json::to_vec(&format!("{WRITTEN_MARKER}{index}")).unwrap_or_default();
        match memchr::memmem::find_iter(&out, &marker)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [at] => spans.push((*at, marker.len())),
            _ => {
                for (path, value, _) in marked {
                    if let Some(slot) = root_pointer(&mut chat, &path) {
                        *slot = value;
                    }
                }
                return write(&chat);
            }
        }
    }
    let mut patched = Vec::with_capacity(out.len() + 256);
    let mut copied = 0;
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&index| spans[index].0);
    for index in order {
        let (at, length) = spans[index];
        patched.extend_from_slice(&out[copied..at]);
        patched.extend_from_slice(marked[index].2.as_bytes());
        copied = at + length;
    }
    patched.extend_from_slice(&out[copied..]);
    Ok(patched)
}

/// The value at a JSON pointer (`/a/b/0`) inside an object.
fn root_pointer<'a>(root: &'a mut Map<String, Value>, path: &str) -> Option<&'a mut Value> {
    let path = path.strip_prefix('/')?;
    let (first, rest) = path
        .split_once('/')
        .map_or((path, None), |(first, rest)| (first, Some(rest)));
    let value = root.get_mut(first)?;
    match rest {
        None => Some(value),
        Some(rest) => value.pointer_mut(&format!("/{rest}")),
    }
}

/// `text.format` as a chat `response_format`; `None` for plain text.
fn text_format(format: &Value) -> Result<Option<Value>, GatewayError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut schema = Map::new();
            for key in ["name", "schema", "description", "strict"] {
                if let Some(value) = format.get(key).filter(|value| !value.is_null()) {
                    schema.insert(key.into(), value.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        Some(other) => Err(GatewayError::invalid_value(
            "text.format.type",
            format!("`{other}` is not a text format (expected text, json_object or json_schema)"),
        )),
        None => Err(GatewayError::invalid_value(
            "text.format.type",
            "the text format needs a type",
        )),
    }
}
/// Request fields a Response object repeats back.
#[derive(Debug, Default)]
struct Echo {
    fields: Map<String, Value>,
}

/// The repeated request fields with OpenAI's defaults filled in, made once per request.
#[derive(Debug)]
struct Echoed {
    instructions: Value,
    max_output_tokens: Value,
    metadata: Value,
    parallel_tool_calls: Value,
    reasoning: Value,
    temperature: Value,
    text: Value,
    tool_choice: Value,
    tools: Value,
    top_p: Value,
    user: Value,
}

impl Echoed {
    fn new(mut echo: Echo) -> Self {
        let mut take = |key: &str, default: Value| echo.fields.remove(key).unwrap_or(default);
        Echoed {
            instructions: take("instructions", Value::Null),
            max_output_tokens: take("max_output_tokens", Value::Null),
            metadata: take("metadata", json!({})),
            // The local engine's default: one call unless asked for several (README).
            parallel_tool_calls: take("parallel_tool_calls", Value::Bool(false)),
            reasoning: take("reasoning", json!({"effort": null, "summary": null})),
            temperature: take("temperature", json!(1.0)),
            text: take("text", json!({"format": {"type": "text"}})),
            tool_choice: take("tool_choice", json!("auto")),
            tools: take("tools", json!([])),
            top_p: take("top_p", json!(1.0)),
            user: take("user", Value::Null),
        }
    }
}

/// An output item being written.
#[derive(Debug)]
enum Item {
    /// An assistant message of one content part: its text, or a refusal's.
    Message {
        id: String,
        text: String,
        refusal: bool,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        /// The chat stream's `tool_calls[].index`.
        chat_index: u64,
    },
}

/// What the transcoding reads of a chat completion or of one chunk of a chat stream (or the
/// error event the chat path sends instead of one), borrowed where it can be.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<ChatUsage>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    /// `message` of a completion, `delta` of a chunk.
    #[serde(borrow, default, alias = "delta")]
    message: Option<MessagePiece<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct MessagePiece<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    /// A model's refusal (structured outputs), in place of content.
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<CallPiece<'a>>>,
}

/// A call, whole (`message.tool_calls[]`) or in pieces (`delta.tool_calls[]`).
#[derive(Deserialize)]
struct CallPiece<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<FunctionPiece<'a>>,
}

#[derive(Deserialize)]
struct FunctionPiece<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

/// Chat usage, as far as a Response reports it.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct ChatUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<CachedDetails>,
    #[serde(default)]
    completion_tokens_details: Option<ReasoningDetails>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
struct CachedDetails {
    #[serde(default)]
    cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
struct ReasoningDetails {
    #[serde(default)]
    reasoning_tokens: u64,
}

/// Responses usage.
#[derive(Serialize)]
struct ResponsesUsage {
    input_tokens: u64,
    input_tokens_details: CachedDetails,
    output_tokens: u64,
    output_tokens_details: ReasoningDetails,
    total_tokens: u64,
}

impl From<ChatUsage> for ResponsesUsage {
    fn from(usage: ChatUsage) -> Self {
        ResponsesUsage {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: usage.prompt_tokens_details.unwrap_or_default(),
            output_tokens: usage.completion_tokens,
            output_tokens_details: usage.completion_tokens_details.unwrap_or_default(),
            total_tokens: usage
                .total_tokens
                .unwrap_or(usage.prompt_tokens + usage.completion_tokens),
        }
    }
}

/// An output item as the wire carries it.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum OutputItem<'a> {
    Message {
        id: &'a str,
        status: &'a str,
        role: &'static str,
        content: Vec<ContentPart<'a>>,
    },
    FunctionCall {
        id: &'a str,
        status: &'a str,
        call_id: &'a str,
        name: &'a str,
        arguments: &'a str,
    },
}

/// A message's content part: text, or a refusal. In an output item a text part carries its
/// (empty) log probabilities; the part events carry none.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentPart<'a> {
    OutputText {
        text: &'a str,
        annotations: [(); 0],
        #[serde(skip_serializing_if = "Option::is_none")]
        logprobs: Option<[(); 0]>,
    },
    Refusal {
        refusal: &'a str,
    },
}

impl<'a> ContentPart<'a> {
    /// A part of an output item.
    fn new(text: &'a str, refusal: bool) -> Self {
        Self::of(text, refusal, Some([]))
    }

    /// A part as the part events carry it.
    fn streamed(text: &'a str, refusal: bool) -> Self {
        Self::of(text, refusal, None)
    }

    fn of(text: &'a str, refusal: bool, logprobs: Option<[(); 0]>) -> Self {
        if refusal {
            ContentPart::Refusal { refusal: text }
        } else {
            ContentPart::OutputText {
                text,
                annotations: [],
                logprobs,
            }
        }
    }
}

#[derive(Serialize)]
struct Incomplete {
    reason: &'static str,
}

/// The Response object.
#[derive(Serialize)]
struct ResponseObject<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'a str,
    background: bool,
    error: Option<&'a Value>,
    incomplete_details: Option<Incomplete>,
    instructions: &'a Value,
    max_output_tokens: &'a Value,
    metadata: &'a Value,
    model: &'a str,
    output: Vec<OutputItem<'a>>,
    parallel_tool_calls: &'a Value,
    previous_response_id: Option<&'a str>,
    reasoning: &'a Value,
    store: bool,
    temperature: &'a Value,
    text: &'a Value,
    tool_choice: &'a Value,
    tools: &'a Value,
    top_p: &'a Value,
    truncation: &'static str,
    usage: Option<ResponsesUsage>,
    user: &'a Value,
}

/// A stream event: its type and number, then its own fields.
#[derive(Serialize)]
struct Event<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    sequence_number: u64,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct WithResponse<'a> {
    response: ResponseObject<'a>,
}

#[derive(Serialize)]
struct ItemEvent<'a> {
    output_index: usize,
    item: OutputItem<'a>,
}

#[derive(Serialize)]
struct PartEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    part: ContentPart<'a>,
}

#[derive(Serialize)]
struct RefusalEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
}

#[derive(Serialize)]
struct TextEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    logprobs: [(); 0],
}

#[derive(Serialize)]
struct ArgumentsEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorEvent<'a> {
    code: &'a Value,
    message: &'a Value,
    param: &'a Value,
}

/// Turns what the chat path writes into the Responses API's shapes: a chat completion into a
/// Response object, a chat chunk stream into Responses stream events.
#[derive(Debug)]
pub struct Transcoder {
    /// The request part each message of the chat translation came from (`instructions`,
    /// `input`, `input[i]`, `previous_response_id`).
    message_origins: Vec<String>,
    id: String,
    created_at: u64,
    model: String,
    echo: Echoed,
    /// `sequence_number` of the next stream event.
    sequence: u64,
    started: bool,
    finished: bool,
    /// The chat stream reported an error: the response ends `failed`.
    failed: Option<Value>,
    /// The request ID, for item ids.
    request_id: String,
    items: Vec<Item>,
    /// Items at the start of `items` whose done events went out: an item is done when the
    /// next one begins, as OpenAI's streams close each before opening the next.
    closed: usize,
    finish_reason: Option<String>,
    usage: Option<ChatUsage>,
    /// Bytes of an event not yet complete (the chat path writes whole events; kept safe).
    pending: Vec<u8>,
    /// The response is kept: `store` in the answer, and who keeps it.
    store: bool,
    keeper: Option<Keeper>,
    /// The stored response this one continues.
    previous_response_id: Option<String>,
}

/// Keeps a finished Response object (the data plane's closure over the response store);
/// says whether it was kept.
pub type Keep = Box<dyn FnOnce(&Value) -> bool + Send + Sync>;

struct Keeper(Keep);

impl std::fmt::Debug for Keeper {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Keeper")
    }
}

impl Transcoder {
    fn new(request_id: &str, created_at: u64, model: String, echo: Echo) -> Self {
        Transcoder {
            id: format!("resp_{request_id}"),
            created_at,
            model,
            echo: Echoed::new(echo),
            sequence: 0,
            started: false,
            finished: false,
            failed: None,
            request_id: request_id.to_owned(),
            items: Vec::new(),
            closed: 0,
            finish_reason: None,
            usage: None,
            pending: Vec::new(),
            store: false,
            keeper: None,
            previous_response_id: None,
            message_origins: Vec::new(),
        }
    }

    /// A refusal of the translated chat request, named as the client wrote the request:
    /// `input[2].content[0].type` for `messages[3].content[0].type` behind instructions,
    /// `max_output_tokens` for `max_completion_tokens`, `text.format` for `response_format`, a
    /// function tool's own fields.
    pub fn error_in_request_terms(&self, error: &GatewayError) -> GatewayError {
        error.renamed(|param| self.param_name(param), responses_text)
    }

    fn param_name(&self, param: &str) -> String {
        if let Some(rest) = param.strip_prefix("messages[")
            && let Some((index, rest)) = rest.split_once(']')
            && let Some(origin) = index
                .parse::<usize>()
                .ok()
                .and_then(|index| self.message_origins.get(index))
        {
            // The parts of a message are the item's parts; instructions are one string.
            return if origin.starts_with("input[") {
                format!("{origin}{rest}")
            } else {
                origin.clone()
            };
        }
        for (chat, responses) in [
            ("messages", "input"),
            ("max_completion_tokens", "max_output_tokens"),
            ("max_tokens", "max_output_tokens"),
            ("reasoning_effort", "reasoning.effort"),
            // A JSON schema format is flat in `text.format`.
            ("response_format.json_schema.", "text.format."),
            ("response_format", "text.format"),
            ("stream_options", "stream"),
            ("tool_choice.function.", "tool_choice."),
        ] {
            if let Some(rest) = param.strip_prefix(chat)
                && (rest.is_empty() || chat.ends_with('.') || rest.starts_with(['.', '[']))
            {
                return format!("{responses}{rest}");
            }
        }
        // `tools[i].function.parameters` is `tools[i].parameters`: function tools are flat.
        if let Some(rest) = param.strip_prefix("tools[")
            && let Some((index, rest)) = rest.split_once(']')
        {
            let rest = rest.strip_prefix(".function").unwrap_or(rest);
            return format!("tools[{index}]{rest}");
        }
        param.to_owned()
    }

    /// Keeps the response under `id` (which replaces the request-derived one): the answer
    /// says `"store": true`, and `keep` receives the finished Response object before its
    /// last bytes are written. Call before any output.
    pub fn keep_as(&mut self, id: String, keep: Keep) {
        self.id = id;
        self.store = true;
        self.keeper = Some(Keeper(keep));
    }

    /// Keeps nothing after all (a sensitive conversation where the store may not hold
    /// one): the answer says `"store": false`. Call before any output.
    pub fn keep_nothing(&mut self) {
        self.keeper = None;
        self.store = false;
    }

    /// The response's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The stored response this one continues.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.previous_response_id.as_deref()
    }

    /// Whether the response is kept (or, before it is finished, is to be).
    pub fn stored(&self) -> bool {
        self.store
    }

    /// The finished Response object of `status`, handed to the keeper first; if it could
    /// not keep it, the object says `"store": false`.
    fn finished(&mut self, status: &str) -> Value {
        let mut response = serde_json::to_value(self.response(status, true)).unwrap_or_default();
        if let Some(Keeper(keep)) = self.keeper.take()
            && !keep(&response)
        {
            self.store = false;
            response["store"] = Value::Bool(false);
        }
        response
    }

    /// A complete chat completion as a Response object; a body that is not one passes
    /// unchanged (error bodies have the same shape in both APIs).
    pub fn json(&mut self, chat: &[u8]) -> Vec<u8> {
        let Ok(answer) = serde_json::from_slice::<Answer<'_>>(chat) else {
            return chat.to_vec();
        };
        let Some(choice) = answer
            .choices
            .and_then(|choices| choices.into_iter().next())
        else {
            return chat.to_vec();
        };
        let message = choice.message.unwrap_or(MessagePiece {
            content: None,
            refusal: None,
            tool_calls: None,
        });
        if let Some(model) = answer.model {
            self.model = model.into_owned();
        }
        for (text, refusal) in [(message.content, false), (message.refusal, true)] {
            if let Some(text) = text.filter(|text| !text.is_empty()) {
                self.items.push(Item::Message {
                    id: self.message_id(),
                    text: text.into_owned(),
                    refusal,
                });
            }
        }
        for (index, call) in message.tool_calls.into_iter().flatten().enumerate() {
            let function = call.function.unwrap_or(FunctionPiece {
                name: None,
                arguments: None,
            });
            self.items.push(Item::Call {
                id: format!("fc_{}_{index}", self.request_id),
                call_id: call.id.unwrap_or_default().into_owned(),
                name: function.name.unwrap_or_default().into_owned(),
                arguments: function.arguments.unwrap_or_default().into_owned(),
                chat_index: index as u64,
            });
        }
        self.finish_reason = choice.finish_reason.map(Cow::into_owned);
        self.usage = answer.usage;
        let status = self.status();
        serde_json::to_vec(&self.finished(status)).unwrap_or_default()
    }

    /// Chat stream bytes (whole server-sent events) as Responses stream events. `[DONE]`
    /// closes the response (`response.completed` or `response.incomplete`); an error event
    /// becomes an `error` event and the response ends `response.failed`.
    pub fn stream(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        // A cloud backend's events pass through as it wrote them: `\r\n` line ends too.
        while let Some(end) = crate::cloud::event_end(&self.pending[start..]) {
            let event = self.pending[start..start + end].to_vec();
            start += end;
            self.event(&event, &mut out);
        }
        self.pending.drain(..start);
        out
    }

    /// The end of a chat stream that did not close with `[DONE]` (a backend that just
    /// stopped): the response ends as `[DONE]` would end it when a finish reason came, else
    /// with an `error` event and `response.failed`, so that a client never waits for a
    /// terminal event that cannot come.
    pub fn end(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        if self.finish_reason.is_none() && self.failed.is_none() {
            self.start(&mut out);
            let code = Value::from("upstream_error");
            let message = Value::from("the answer ended before it was complete");
            emit(
                &mut out,
                "error",
                self.next_sequence(),
                ErrorEvent {
                    code: &code,
                    message: &message,
                    param: &Value::Null,
                },
            );
            self.failed = Some(json!({"code": code, "message": message}));
        }
        self.finish(&mut out);
        out
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        // An event's `data:` lines, joined by line feeds.
        let mut lines = event
            .split(|byte| *byte == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter_map(|line| line.strip_prefix(b"data:"))
            .map(|data| data.strip_prefix(b" ").unwrap_or(data));
        let Some(first) = lines.next() else {
            return;
        };
        let joined;
        let data = match lines.next() {
            None => first,
            Some(second) => {
                let mut all = [first, second].join(&b'\n');
                for line in lines {
                    all.push(b'\n');
                    all.extend_from_slice(line);
                }
                joined = all;
                joined.as_slice()
            }
        };
        if data == b"[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Answer<'_>>(data) else {
            return;
        };
        if let Some(error) = chunk.error {
            // The response exists before its error: a stream that fails before its first
            // token still opens with `response.created`.
            self.start(out);
            let field = |key: &str| error.get(key).cloned().unwrap_or(Value::Null);
            let (code, message, param) = (field("code"), field("message"), field("param"));
            let kind = "error";
            emit(
                out,
                kind,
                self.next_sequence(),
                ErrorEvent {
                    code: &code,
                    message: &message,
                    param: &param,
                },
            );
            self.failed = Some(json!({"code": code, "message": message}));
            return;
        }
        self.start(out);
        if let Some(model) = chunk.model
            && model != self.model
        {
            self.model = model.into_owned();
        }
        if let Some(usage) = chunk.usage {
            self.usage = Some(usage);
        }
        let Some(choice) = chunk.choices.and_then(|choices| choices.into_iter().next()) else {
            return;
        };
        if let Some(delta) = choice.message {
            if let Some(text) = delta.content.filter(|text| !text.is_empty()) {
                self.text_delta(&text, false, out);
            }
            if let Some(text) = delta.refusal.filter(|text| !text.is_empty()) {
                self.text_delta(&text, true, out);
            }
            for call in delta.tool_calls.into_iter().flatten() {
                self.call_delta(call, out);
            }
        }
        if let Some(reason) = choice.finish_reason {
            self.finish_reason = Some(reason.into_owned());
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        for kind in ["response.created", "response.in_progress"] {
            emit(
                out,
                kind,
                self.next_sequence(),
                WithResponse {
                    response: self.response("in_progress", false),
                },
            );
        }
    }

    /// Text (or a refusal's text) for the message item at the end of the output, opened
    /// here when the last item is something else.
    fn text_delta(&mut self, text: &str, refusal: bool, out: &mut Vec<u8>) {
        let last_open = self.closed < self.items.len();
        let open = match self.items.last_mut() {
            Some(Item::Message {
                text: written,
                refusal: kind,
                ..
            }) if *kind == refusal && last_open => {
                written.push_str(text);
                false
            }
            _ => {
                self.close_items(out);
                let id = self.message_id();
                self.items.push(Item::Message {
                    id,
                    text: text.to_owned(),
                    refusal,
                });
                true
            }
        };
        let output_index = self.items.len() - 1;
        let sequence = self.sequence;
        let Some(Item::Message { id, .. }) = self.items.last() else {
            return;
        };
        let mut number = sequence;
        let mut next = || {
            number += 1;
            number - 1
        };
        if open {
            let item = OutputItem::Message {
                id,
                status: "in_progress",
                role: "assistant",
                content: Vec::new(),
            };
            let kind = "response.output_item.added";
            emit(out, kind, next(), ItemEvent { output_index, item });
            let kind = "response.content_part.added";
            emit(
                out,
                kind,
                next(),
                PartEvent {
                    item_id: id,
                    output_index,
                    content_index: 0,
                    part: ContentPart::streamed("", refusal),
                },
            );
        }
        if refusal {
            let body = RefusalEvent {
                item_id: id,
                output_index,
                content_index: 0,
                delta: Some(text),
                refusal: None,
            };
            emit(out, "response.refusal.delta", next(), body);
        } else {
            let body = TextEvent {
                item_id: id,
                output_index,
                content_index: 0,
                delta: Some(text),
                text: None,
                logprobs: [],
            };
            emit(out, "response.output_text.delta", next(), body);
        }
        self.sequence = number;
    }

    /// Sends the done events of every item not yet closed.
    fn close_items(&mut self, out: &mut Vec<u8>) {
        let status = self.status();
        let mut number = self.sequence;
        let mut next = || {
            number += 1;
            number - 1
        };
        for (output_index, item) in self.items.iter().enumerate().skip(self.closed) {
            match item {
                Item::Message { id, text, refusal } => {
                    if *refusal {
                        let body = RefusalEvent {
                            item_id: id,
                            output_index,
                            content_index: 0,
                            delta: None,
                            refusal: Some(text),
                        };
                        emit(out, "response.refusal.done", next(), body);
                    } else {
                        let body = TextEvent {
                            item_id: id,
                            output_index,
                            content_index: 0,
                            delta: None,
                            text: Some(text),
                            logprobs: [],
                        };
                        emit(out, "response.output_text.done", next(), body);
                    }
                    let body = PartEvent {
                        item_id: id,
                        output_index,
                        content_index: 0,
                        part: ContentPart::streamed(text, *refusal),
                    };
                    emit(out, "response.content_part.done", next(), body);
                }
                Item::Call {
                    id,
                    name,
                    arguments,
                    ..
                } => {
                    let body = ArgumentsEvent {
                        item_id: id,
                        output_index,
                        delta: None,
                        name: Some(name),
                        arguments: Some(arguments),
                    };
                    emit(out, "response.function_call_arguments.done", next(), body);
                }
            }
            let body = ItemEvent {
                output_index,
                item: output_item(item, status),
            };
            emit(out, "response.output_item.done", next(), body);
        }
        self.sequence = number;
        self.closed = self.items.len();
    }

    fn call_delta(&mut self, call: CallPiece<'_>, out: &mut Vec<u8>) {
        let chat_index = call.index.unwrap_or(0);
        let function = call.function.unwrap_or(FunctionPiece {
            name: None,
            arguments: None,
        });
        let existing = self.items.iter().position(
            |item| matches!(item, Item::Call { chat_index: index, .. } if *index == chat_index),
        );
        let output_index = match existing {
            Some(index) => index,
            None => {
                self.close_items(out);
                self.items.push(Item::Call {
                    id: format!("fc_{}_{chat_index}", self.request_id),
                    call_id: call.id.unwrap_or_default().into_owned(),
                    name: function.name.unwrap_or_default().into_owned(),
                    arguments: String::new(),
                    chat_index,
                });
                let output_index = self.items.len() - 1;
                let sequence_number = self.next_sequence();
                let Some(Item::Call {
                    id, call_id, name, ..
                }) = self.items.last()
                else {
                    return;
                };
                let kind = "response.output_item.added";
                let item = OutputItem::FunctionCall {
                    id,
                    status: "in_progress",
                    call_id,
                    name,
                    arguments: "",
                };
                emit(out, kind, sequence_number, ItemEvent { output_index, item });
                output_index
            }
        };
        let Some(arguments) = function.arguments.filter(|arguments| !arguments.is_empty()) else {
            return;
        };
        if output_index < self.closed {
            // A call the stream came back to after another item began: its done events
            // went out already; the finished response carries what it adds.
            if let Item::Call {
                arguments: written, ..
            } = &mut self.items[output_index]
            {
                written.push_str(&arguments);
            }
            return;
        }
        let sequence_number = self.next_sequence();
        let Item::Call {
            id,
            arguments: written,
            ..
        } = &mut self.items[output_index]
        else {
            return;
        };
        written.push_str(&arguments);
        let kind = "response.function_call_arguments.delta";
        let body = ArgumentsEvent {
            item_id: id,
            output_index,
            delta: Some(&arguments),
            name: None,
            arguments: None,
        };
        emit(out, kind, sequence_number, body);
    }

    /// The id of a message item that would go at the end of the output.
    fn message_id(&self) -> String {
        match self.items.len() {
            0 => format!("msg_{}", self.request_id),
            at => format!("msg_{}_{at}", self.request_id),
        }
    }

    /// Closes every open item, then the response.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.finished {
            return;
        }
        self.start(out);
        self.finished = true;
        if self.failed.is_some() {
            // A failed response is not kept.
            self.keeper = None;
            self.store = false;
            let kind = "response.failed";
            emit(
                out,
                kind,
                self.next_sequence(),
                WithResponse {
                    response: self.response("failed", false),
                },
            );
            return;
        }
        self.close_items(out);
        let status = self.status();
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        let sequence_number = self.next_sequence();
        let response = self.finished(status);
        emit(out, kind, sequence_number, json!({ "response": response }));
    }

    fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence - 1
    }

    /// `completed`, or `incomplete` when the answer was cut off.
    fn status(&self) -> &'static str {
        match self.finish_reason.as_deref() {
            Some("length" | "content_filter") => "incomplete",
            _ => "completed",
        }
    }

    /// The Response object, with its output when `with_output`.
    fn response<'a>(&'a self, status: &'a str, with_output: bool) -> ResponseObject<'a> {
        let echo = &self.echo;
        let incomplete = (status == "incomplete").then_some(Incomplete {
            reason: match self.finish_reason.as_deref() {
                Some("content_filter") => "content_filter",
                _ => "max_output_tokens",
            },
        });
        let usage = match status {
            "in_progress" | "failed" => None,
            _ => self.usage.map(ResponsesUsage::from),
        };
        let output = if with_output {
            self.items
                .iter()
                .map(|item| output_item(item, status))
                .collect()
        } else {
            Vec::new()
        };
        ResponseObject {
            id: &self.id,
            object: "response",
            created_at: self.created_at,
            status,
            background: false,
            error: self.failed.as_ref(),
            incomplete_details: incomplete,
            instructions: &echo.instructions,
            max_output_tokens: &echo.max_output_tokens,
            metadata: &echo.metadata,
            model: &self.model,
            output,
            parallel_tool_calls: &echo.parallel_tool_calls,
            previous_response_id: self.previous_response_id.as_deref(),
            reasoning: &echo.reasoning,
            store: self.store,
            temperature: &echo.temperature,
            text: &echo.text,
            tool_choice: &echo.tool_choice,
            tools: &echo.tools,
            top_p: &echo.top_p,
            truncation: "disabled",
            usage,
            user: &echo.user,
        }
    }
}

/// A finished item as the wire carries it.
fn output_item<'a>(item: &'a Item, status: &'a str) -> OutputItem<'a> {
    match item {
        Item::Message { id, text, refusal } => OutputItem::Message {
            id,
            status,
            role: "assistant",
            content: vec![ContentPart::new(text, *refusal)],
        },
        Item::Call {
            id,
            call_id,
            name,
            arguments,
            ..
        } => OutputItem::FunctionCall {
            id,
            status: "completed",
            call_id,
            name,
            arguments,
        },
    }
}

/// Appends one server-sent event: `event: kind`, then its JSON, the type and
/// `sequence_number` first, then `body`'s fields.
fn emit(out: &mut Vec<u8>, kind: &str, sequence_number: u64, body: impl Serialize) {
    let event = Event {
        kind,
        sequence_number,
        body,
    };
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(&mut *out, &event);
    out.extend_from_slice(b"\n\n");
}

#[cfg(test)]
mod tests;
