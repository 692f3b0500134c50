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
//! The gateway keeps no responses: `previous_response_id`, `conversation`, `background` and
//! stored prompts are refused with `unsupported_parameter`, and every answer says
//! `"store": false`. Built-in tools (web search, file search, ...) are refused; functions are
//! served.

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
}

/// Translates a Responses request body into a chat completions body.
pub fn to_chat(body: &[u8], request_id: &str, created_at: u64) -> Result<Translated, GatewayError> {
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
    for (key, why) in [
        (
            "previous_response_id",
            "the gateway keeps no responses: send the whole conversation in `input`",
        ),
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
    match present("instructions") {
        None => {}
        Some(Value::String(instructions)) => {
            messages.push(json!({"role": "system", "content": instructions}));
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
    match present("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (index, item) in items.iter().enumerate() {
                input_item(item, &format!("input[{index}]"), &mut messages)?;
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
        chat.insert("max_tokens".into(), max.clone());
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

    let chat_body =
        serde_json::to_vec(&Value::Object(chat)).map_err(|error| GatewayError::Internal {
            message: format!("writing the translated request: {error}"),
        })?;
    let model = present("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(Translated {
        chat_body,
        transcoder: Transcoder::new(request_id, created_at, model, echo),
    })
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
            let content = match object.get("content") {
                Some(Value::String(text)) => Value::String(text.clone()),
                Some(Value::Array(parts)) => Value::Array(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(index, part)| {
                            content_part(part, &format!("{param}.content[{index}]"))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(GatewayError::invalid_value(
                        format!("{param}.content"),
                        "content must be a string or an array of content parts",
                    ));
                }
            };
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
            // Consecutive calls are one assistant turn, as chat completions write them.
            let joined = messages.last_mut().and_then(|last| {
                (last.get("role").and_then(Value::as_str) == Some("assistant"))
                    .then(|| last.get_mut("tool_calls").and_then(Value::as_array_mut))
                    .flatten()
            });
            match joined {
                Some(calls) => calls.push(call),
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
            let output = match object.get("output") {
                Some(Value::String(text)) => Value::String(text.clone()),
                Some(Value::Array(parts)) => Value::Array(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(index, part)| {
                            content_part(part, &format!("{param}.output[{index}]"))
                        })
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(GatewayError::invalid_value(
                        format!("{param}.output"),
                        "a function call output needs `output`, a string or content parts",
                    ));
                }
            };
            messages.push(json!({"role": "tool", "tool_call_id": call_id, "content": output}));
        }
        // A reasoning model's earlier thoughts: nothing a chat model reads.
        Some("reasoning") => {}
        Some("item_reference") => {
            return Err(GatewayError::unsupported(
                format!("{param}.type"),
                "item references need stored responses, which the gateway does not keep",
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

/// An output item being written.
#[derive(Debug)]
enum Item {
    Message {
        id: String,
        text: String,
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

/// Turns what the chat path writes into the Responses API's shapes: a chat completion into a
/// Response object, a chat chunk stream into Responses stream events.
#[derive(Debug)]
pub struct Transcoder {
    id: String,
    created_at: u64,
    model: String,
    echo: Echo,
    /// `sequence_number` of the next stream event.
    sequence: u64,
    started: bool,
    finished: bool,
    /// The chat stream reported an error: the response ends `failed`.
    failed: Option<Value>,
    /// The request ID, for item ids.
    request_id: String,
    items: Vec<Item>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    /// Bytes of an event not yet complete (the chat path writes whole events; kept safe).
    pending: Vec<u8>,
}

impl Transcoder {
    fn new(request_id: &str, created_at: u64, model: String, echo: Echo) -> Self {
        Transcoder {
            id: format!("resp_{request_id}"),
            created_at,
            model,
            echo,
            sequence: 0,
            started: false,
            finished: false,
            failed: None,
            request_id: request_id.to_owned(),
            items: Vec::new(),
            finish_reason: None,
            usage: None,
            pending: Vec::new(),
        }
    }

    /// A complete chat completion as a Response object; a body that is not one passes
    /// unchanged (error bodies have the same shape in both APIs).
    pub fn json(&mut self, chat: &[u8]) -> Vec<u8> {
        let Ok(answer) = serde_json::from_slice::<Value>(chat) else {
            return chat.to_vec();
        };
        let Some(choice) = answer
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|choices| choices.first())
        else {
            return chat.to_vec();
        };
        if let Some(model) = answer.get("model").and_then(Value::as_str) {
            model.clone_into(&mut self.model);
        }
        let message = choice.get("message").cloned().unwrap_or(Value::Null);
        if let Some(text) = message
            .get("content")
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
        {
            self.items.push(Item::Message {
                id: self.message_id(),
                text: text.to_owned(),
            });
        }
        for (index, call) in message
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let text = |pointer: &str| {
                call.pointer(pointer)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            self.items.push(Item::Call {
                id: format!("fc_{}_{index}", self.request_id),
                call_id: text("/id"),
                name: text("/function/name"),
                arguments: text("/function/arguments"),
                chat_index: index as u64,
            });
        }
        self.finish_reason = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        self.usage = answer
            .get("usage")
            .filter(|usage| usage.is_object())
            .cloned();
        let output: Vec<Value> = self.items.iter().map(|item| self.item_done(item)).collect();
        serde_json::to_vec(&self.response(self.status(), output)).unwrap_or_default()
    }

    /// Chat stream bytes (whole server-sent events) as Responses stream events. `[DONE]`
    /// closes the response (`response.completed` or `response.incomplete`); an error event
    /// becomes an `error` event.
    pub fn stream(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = find(&self.pending, b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            self.event(&event[..end], &mut out);
        }
        out
    }

    fn event(&mut self, event: &[u8], out: &mut Vec<u8>) {
        let data: Vec<u8> = event
            .split(|byte| *byte == b'\n')
            .filter_map(|line| line.strip_prefix(b"data:"))
            .flat_map(|line| line.strip_prefix(b" ").unwrap_or(line).iter().copied())
            .collect();
        if data.is_empty() {
            return;
        }
        if data == b"[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Value>(&data) else {
            return;
        };
        if let Some(error) = chunk.get("error") {
            let field = |key: &str| error.get(key).cloned().unwrap_or(Value::Null);
            self.emit(
                out,
                "error",
                json!({"code": field("code"), "message": field("message"), "param": field("param")}),
            );
            self.failed = Some(json!({"code": field("code"), "message": field("message")}));
            return;
        }
        self.start(out);
        if let Some(model) = chunk.get("model").and_then(Value::as_str) {
            model.clone_into(&mut self.model);
        }
        if let Some(usage) = chunk.get("usage").filter(|usage| usage.is_object()) {
            self.usage = Some(usage.clone());
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|choices| choices.first())
        else {
            return;
        };
        let delta = choice.get("delta").cloned().unwrap_or(Value::Null);
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|text| !text.is_empty())
        {
            self.text_delta(text, out);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.call_delta(call, out);
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(reason.to_owned());
        }
    }

    fn start(&mut self, out: &mut Vec<u8>) {
        if self.started {
            return;
        }
        self.started = true;
        let response = self.response("in_progress", Vec::new());
        self.emit(out, "response.created", json!({"response": response}));
        let response = self.response("in_progress", Vec::new());
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    fn text_delta(&mut self, text: &str, out: &mut Vec<u8>) {
        let open = match self.items.last_mut() {
            Some(Item::Message { text: written, .. }) => {
                written.push_str(text);
                None
            }
            _ => Some(self.message_id()),
        };
        if let Some(id) = open {
            self.items.push(Item::Message {
                id: id.clone(),
                text: text.to_owned(),
            });
            let output_index = self.items.len() - 1;
            self.emit(
                out,
                "response.output_item.added",
                json!({
                    "output_index": output_index,
                    "item": {"id": id, "type": "message", "status": "in_progress",
                             "role": "assistant", "content": []},
                }),
            );
            self.emit(
                out,
                "response.content_part.added",
                json!({
                    "item_id": id, "output_index": output_index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []},
                }),
            );
        }
        let output_index = self.items.len() - 1;
        let id = match &self.items[output_index] {
            Item::Message { id, .. } | Item::Call { id, .. } => id.clone(),
        };
        self.emit(
            out,
            "response.output_text.delta",
            json!({
                "item_id": id, "output_index": output_index, "content_index": 0,
                "delta": text, "logprobs": [],
            }),
        );
    }

    fn call_delta(&mut self, call: &Value, out: &mut Vec<u8>) {
        let chat_index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
        let arguments = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let existing = self.items.iter().position(
            |item| matches!(item, Item::Call { chat_index: index, .. } if *index == chat_index),
        );
        let output_index = match existing {
            Some(index) => index,
            None => {
                let text = |pointer: &str| {
                    call.pointer(pointer)
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                let id = format!("fc_{}_{chat_index}", self.request_id);
                let call_id = text("/id");
                let name = text("/function/name");
                self.items.push(Item::Call {
                    id: id.clone(),
                    call_id: call_id.clone(),
                    name: name.clone(),
                    arguments: String::new(),
                    chat_index,
                });
                let output_index = self.items.len() - 1;
                self.emit(
                    out,
                    "response.output_item.added",
                    json!({
                        "output_index": output_index,
                        "item": {"id": id, "type": "function_call", "status": "in_progress",
                                 "call_id": call_id, "name": name, "arguments": ""},
                    }),
                );
                output_index
            }
        };
        if arguments.is_empty() {
            return;
        }
        let Item::Call {
            id,
            arguments: written,
            ..
        } = &mut self.items[output_index]
        else {
            return;
        };
        written.push_str(arguments);
        let id = id.clone();
        self.emit(
            out,
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": output_index, "delta": arguments}),
        );
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
        if let Some(error) = self.failed.take() {
            let mut response = self.response("failed", Vec::new());
            response["error"] = error;
            self.emit(out, "response.failed", json!({"response": response}));
            return;
        }
        let items = std::mem::take(&mut self.items);
        for (output_index, item) in items.iter().enumerate() {
            match item {
                Item::Message { id, text } => {
                    self.emit(
                        out,
                        "response.output_text.done",
                        json!({"item_id": id, "output_index": output_index,
                               "content_index": 0, "text": text, "logprobs": []}),
                    );
                    self.emit(
                        out,
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": output_index, "content_index": 0,
                               "part": {"type": "output_text", "text": text, "annotations": []}}),
                    );
                }
                Item::Call {
                    id,
                    name,
                    arguments,
                    ..
                } => self.emit(
                    out,
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": output_index, "name": name,
                           "arguments": arguments}),
                ),
            }
            let done = self.item_done(item);
            self.emit(
                out,
                "response.output_item.done",
                json!({"output_index": output_index, "item": done}),
            );
        }
        let output: Vec<Value> = items.iter().map(|item| self.item_done(item)).collect();
        self.items = items;
        let status = self.status();
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        let response = self.response(status, output);
        self.emit(out, kind, json!({"response": response}));
    }

    /// `completed`, or `incomplete` when the answer was cut off.
    fn status(&self) -> &'static str {
        match self.finish_reason.as_deref() {
            Some("length" | "content_filter") => "incomplete",
            _ => "completed",
        }
    }

    fn item_done(&self, item: &Item) -> Value {
        let status = self.status();
        match item {
            Item::Message { id, text } => json!({
                "id": id, "type": "message", "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }),
            Item::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            } => json!({
                "id": id, "type": "function_call", "status": "completed",
                "call_id": call_id, "name": name, "arguments": arguments,
            }),
        }
    }

    /// The Response object.
    fn response(&self, status: &str, output: Vec<Value>) -> Value {
        let echo =
            |key: &str, default: Value| self.echo.fields.get(key).cloned().unwrap_or(default);
        let incomplete = match (status, self.finish_reason.as_deref()) {
            ("incomplete", Some("content_filter")) => json!({"reason": "content_filter"}),
            ("incomplete", _) => json!({"reason": "max_output_tokens"}),
            _ => Value::Null,
        };
        let usage = match (status, &self.usage) {
            ("in_progress" | "failed", _) | (_, None) => Value::Null,
            (_, Some(usage)) => responses_usage(usage),
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": incomplete,
            "instructions": echo("instructions", Value::Null),
            "max_output_tokens": echo("max_output_tokens", Value::Null),
            "metadata": echo("metadata", json!({})),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": echo("parallel_tool_calls", Value::Bool(true)),
            "previous_response_id": null,
            "reasoning": echo("reasoning", json!({"effort": null, "summary": null})),
            "store": false,
            "temperature": echo("temperature", json!(1.0)),
            "text": echo("text", json!({"format": {"type": "text"}})),
            "tool_choice": echo("tool_choice", json!("auto")),
            "tools": echo("tools", json!([])),
            "top_p": echo("top_p", json!(1.0)),
            "truncation": "disabled",
            "usage": usage,
            "user": echo("user", Value::Null),
        })
    }

    fn emit(&mut self, out: &mut Vec<u8>, kind: &str, mut event: Value) {
        if let Value::Object(fields) = &mut event {
            fields.insert("type".into(), Value::String(kind.to_owned()));
            fields.insert("sequence_number".into(), Value::from(self.sequence));
        }
        self.sequence += 1;
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        out.extend(serde_json::to_vec(&event).unwrap_or_default());
        out.extend_from_slice(b"\n\n");
    }
}

/// Chat usage as Responses usage.
fn responses_usage(usage: &Value) -> Value {
    let number = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let input = number("/prompt_tokens");
    let output = number("/completion_tokens");
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": number("/prompt_tokens_details/cached_tokens")},
        "output_tokens": output,
        "output_tokens_details": {
            "reasoning_tokens": number("/completion_tokens_details/reasoning_tokens"),
        },
        "total_tokens": usage.get("total_tokens").and_then(Value::as_u64).unwrap_or(input + output),
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

#[cfg(test)]
mod tests;
