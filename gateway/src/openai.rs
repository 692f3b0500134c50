//! The OpenAI wire format: request bodies in, response bodies and stream chunks out.
//!
//! Requests are checked field by field so that every mistake is reported with the `param` it
//! concerns. Fields we cannot honour are refused with `unsupported_parameter` rather than
//! silently ignored — a client asking for `prediction` or audio must not get an answer that
//! only looks right. Fields we do not know at all are tolerated, as OpenAI's
//! own API evolves.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::GatewayError;

mod call_reader;
pub mod responses;
pub use call_reader::{CallReader, Piece, compact_json};

/// OpenAI accepts at most four stop sequences.
const STOP_SEQUENCES_MAX: usize = 4;
/// Longest accepted stop sequence, in bytes.
const STOP_SEQUENCE_BYTES_MAX: usize = 1_024;
/// Default `max_tokens` of the legacy completions API, as OpenAI defines it.
const COMPLETIONS_MAX_TOKENS_DEFAULT: u32 = 16;

/// A chat message after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: edge_runtime::Role,
    pub content: String,
}

/// What both generation endpoints share.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub model: Option<String>,
    /// `None` means "until the context is full".
    pub max_tokens: Option<u32>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub user: Option<String>,
    pub ignore_eos: bool,
    /// `response_format`: JSON the answer must be; `None` for free text.
    pub response_format: Option<ResponseFormat>,
    /// Log-probabilities of each token and this many alternatives (chat `logprobs` with
    /// `top_logprobs`, completions `logprobs: N`); `None` for none.
    pub logprobs: Option<u8>,
    /// `presence_penalty` and `frequency_penalty`, -2 to 2.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `logit_bias`: token id → bias, -100 to 100, in key order.
    pub logit_bias: Vec<(u32, f32)>,
    /// `n`: how many choices to generate, 1 to [`CHOICES_MAX`].
    pub n: u32,
    /// `tools` with `tool_choice` `required` or a named function: each choice is a call.
    pub tool_call: Option<ToolCall>,
}

/// One finished choice of a non-streamed response.
#[derive(Debug, Clone)]
pub struct ChoiceBody<'a> {
    pub text: &'a str,
    pub finish_reason: &'a str,
    /// From [`ResponseMeta::logprobs`].
    pub logprobs: Option<Value>,
    /// The function calls the choice is (then `text` is not its content); none for text.
    pub tool_calls: Vec<CalledTool>,
    /// The calls go out as the older `message.function_call` (the request used `functions`).
    pub legacy: bool,
}

/// A function call an answer made: its id, the function's name and the arguments as JSON
/// text (OpenAI's `tool_calls[].function.arguments`).
#[derive(Debug, Clone, PartialEq)]
pub struct CalledTool {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl CalledTool {
    /// Reads the calls from the JSON a call's grammar produced: one `{"name": ...,
    /// "arguments": ...}`, or several as `{"tool_calls": [...]}` (`parallel_tool_calls`);
    /// `None` when it is neither (a text answer, a call cut off by `max_tokens`). `id` names
    /// the call at each position. The arguments keep the order the model wrote them in (a
    /// schema's `properties` order), compacted, as a stream gives them out.
    pub fn from_answer(id: impl Fn(usize) -> String, answer: &str) -> Option<Vec<CalledTool>> {
        #[derive(serde::Deserialize)]
        struct Call<'a> {
            name: String,
            #[serde(borrow)]
            arguments: &'a serde_json::value::RawValue,
        }
        #[derive(serde::Deserialize)]
        struct Calls<'a> {
            #[serde(borrow)]
            tool_calls: Vec<Call<'a>>,
        }
        // Two tries, not an untagged enum: serde buffers those, and a raw value cannot be
        // read from the buffer.
        let calls = match serde_json::from_str::<Calls<'_>>(answer) {
            Ok(calls) => calls.tool_calls,
            Err(_) => vec![serde_json::from_str::<Call<'_>>(answer).ok()?],
        };
        (!calls.is_empty()).then(|| {
            calls
                .into_iter()
                .enumerate()
                .map(|(at, call)| CalledTool {
                    id: id(at),
                    name: call.name,
                    arguments: compact_json(call.arguments.get()),
                })
                .collect()
        })
    }

    /// The text of a `{"response": <text>}` answer (`tool_choice: "auto"` answering without a
    /// call).
    pub fn text_answer(answer: &str) -> Option<String> {
        let value: Value = serde_json::from_str(answer).ok()?;
        Some(value.get("response")?.as_str()?.to_owned())
    }

    /// The entry of `tool_calls` (with `index` when it goes into a stream's delta).
    pub fn body(&self, index: Option<usize>) -> Value {
        let mut call = serde_json::json!({
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let (Some(index), Some(fields)) = (index, call.as_object_mut()) {
            fields.insert("index".to_owned(), Value::from(index));
        }
        call
    }
}

/// Part of a call that a stream gives out as the answer is written.
#[derive(Debug, Clone, Copy)]
pub enum CallPiece<'a> {
    /// Call `at` of the answer begins.
    Start {
        at: usize,
        id: &'a str,
        name: &'a str,
    },
    /// More of call `at`'s arguments.
    Arguments { at: usize, text: &'a str },
}

/// What `response_format` asks the answer to be.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// `json_object`: any JSON object.
    JsonObject,
    /// `json_schema`: JSON that matches `schema`, the JSON Schema object's text as the request
    /// wrote it (its `properties` in the client's order, which the answer follows); `{}` when
    /// the request gave none, which any JSON matches.
    JsonSchema { schema: String },
}

/// The longest `json_schema.name` OpenAI accepts.
const SCHEMA_NAME_CHARS_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub generation: Generation,
}

/// A function a chat request offers (`tools`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// The JSON Schema of its arguments, as JSON text (`{}` when none was given).
    pub parameters: String,
}

/// The functions an answer may call (`tools` with `tool_choice` other than `none`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The functions it may call: every offered one, or the one named.
    pub tools: Vec<Tool>,
    /// `auto`: the answer may be text instead of a call (then the model writes
    /// `{"response": <text>}`, the one JSON shape any model can be held to beside a call);
    /// `required` or a named function: it must be a call.
    pub text_allowed: bool,
    /// `parallel_tool_calls: true`: the answer may make several calls (`{"tool_calls":
    /// [...]}`, at most [`PARALLEL_CALLS_MAX`]); otherwise one.
    pub parallel: bool,
    /// Offered as the older `functions` (with `function_call`): the call comes back as
    /// `message.function_call` with `finish_reason: "function_call"`.
    pub legacy: bool,
}

/// The most calls one answer makes with `parallel_tool_calls`.
pub const PARALLEL_CALLS_MAX: usize = 8;

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// One or more prompts, each answered with `n` choices (prompt-major: choice `i * n + j`
    /// is prompt `i`'s `j`-th).
    pub prompts: Vec<edge_runtime::Prompt>,
    pub generation: Generation,
}

/// Parses a `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, GatewayError> {
    let mut fields = Fields::parse(body)?;
    refuse_unsupported(&mut fields, CHAT_UNSUPPORTED)?;
    let messages = fields.required("messages")?;
    let messages = parse_messages(&messages)?;
    let max_completion = fields.optional_u32("max_completion_tokens", 1)?;
    let max_tokens = fields.optional_u32("max_tokens", 1)?;
    let mut generation = parse_generation(&mut fields, body, max_completion.or(max_tokens))?;
    let logprobs = fields.optional_bool("logprobs")?.unwrap_or(false);
    let top = fields.optional_u32("top_logprobs", 0)?;
    generation.logprobs = match (logprobs, top) {
        (false, None) => None,
        (false, Some(_)) => {
            return Err(GatewayError::invalid_value(
                "top_logprobs",
                "top_logprobs needs logprobs set to true",
            ));
        }
        (true, top) => Some(logprob_alternatives("top_logprobs", top.unwrap_or(0))?),
    };
    generation.tool_call = parse_any_tools(&mut fields, body)?;
    if let Some(value) = fields.take("parallel_tool_calls") {
        let Some(parallel) = value.as_bool() else {
            return Err(GatewayError::invalid_value(
                "parallel_tool_calls",
                "parallel_tool_calls must be a boolean",
            ));
        };
        if let Some(call) = &mut generation.tool_call {
            // The older `function_call` carries one call.
            call.parallel = parallel && !call.legacy;
        }
    }
    if generation.tool_call.is_some() && generation.logprobs.is_some() {
        // A call's JSON and a text answer's `{"response": ...}` wrapper are not the content
        // the entries would have to spell.
        return Err(GatewayError::unsupported(
            "logprobs",
            "local models give no log-probabilities for answers to requests that offer \
             tools; drop logprobs or set tool_choice to none",
        ));
    }
    // Beside tools the answer may take (`auto`), a format shapes its text answer, and its
    // schema goes into the same grammar as the tools': the limits hold for all of them.
    if let (Some(call), Some(ResponseFormat::JsonSchema { schema })) =
        (&generation.tool_call, &generation.response_format)
    {
        let size_of = |text: &str| {
            serde_json::from_str::<Value>(text)
                .map(|schema| SchemaSize::of(&schema))
                .unwrap_or_default()
        };
        call.tools
            .iter()
            .map(|tool| size_of(&tool.parameters))
            .fold(size_of(schema), SchemaSize::add)
            .check("response_format")?;
    }
    // A forced call leaves no text answer to shape.
    if generation
        .tool_call
        .as_ref()
        .is_some_and(|call| !call.text_allowed)
        && generation.response_format.is_some()
    {
        return Err(GatewayError::invalid_value(
            "response_format",
            "a forced tool call already decides the answer's shape; drop response_format",
        ));
    }
    Ok(ChatRequest {
        messages,
        generation,
    })
}

/// What routing needs of a chat or completions body, read before the request goes local
/// (where the strict parse follows) or to the cloud (where the body goes on as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub model: Option<String>,
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    pub user: Option<String>,
}

/// Reads the routing envelope of a body; the body must be a JSON object. Only these fields
/// are built; the messages are skipped over, which matters for multi-MB prompts.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope, GatewayError> {
    #[derive(serde::Deserialize)]
    struct StreamOptions {
        #[serde(default)]
        include_usage: Option<Value>,
    }
    #[derive(Default)]
    struct Raw {
        model: Option<Value>,
        user: Option<Value>,
        stream: Option<Value>,
        stream_options: Option<Value>,
    }
    /// Keys compared in a list before a set takes over.
    const KEYS_LISTED_MAX: usize = 32;
    /// A member's name, borrowed from the body unless it has escapes.
    #[derive(PartialEq)]
    struct Key<'de>(std::borrow::Cow<'de, str>);
    struct KeyVisitor;
    impl<'de> serde::de::Visitor<'de> for KeyVisitor {
        type Value = Key<'de>;
        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a key")
        }
        fn visit_borrowed_str<E>(self, key: &'de str) -> Result<Key<'de>, E> {
            Ok(Key(std::borrow::Cow::Borrowed(key)))
        }
        fn visit_str<E>(self, key: &str) -> Result<Key<'de>, E> {
            Ok(Key(std::borrow::Cow::Owned(key.to_owned())))
        }
    }
    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Key<'de>, D::Error> {
            deserializer.deserialize_str(KeyVisitor)
        }
    }
    /// The object's members, each key once; values of other keys are skipped unbuilt.
    struct RawVisitor;
    impl<'de> serde::de::Visitor<'de> for RawVisitor {
        type Value = Raw;
        fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            formatter.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
            let mut raw = Raw::default();
            // A chat body has a dozen keys, compared in a list; a body with many more (an
            // 8 MB body can hold hundreds of thousands) is checked through a set, so the
            // check stays linear whatever a client sends.
            let mut keys: Vec<Key<'de>> = Vec::new();
            let mut many: std::collections::HashSet<std::borrow::Cow<'de, str>> =
                std::collections::HashSet::new();
            while let Some(key) = map.next_key::<Key<'de>>()? {
                let repeated = if keys.len() < KEYS_LISTED_MAX {
                    keys.contains(&key)
                } else {
                    if many.is_empty() {
                        many.extend(keys.iter().map(|key| key.0.clone()));
                    }
                    many.contains(&key.0)
                };
                if repeated {
                    return Err(serde::de::Error::custom(format!(
                        "the request body has the key `{}` more than once",
                        key.0
                    )));
                }
                let slot = match key.0.as_ref() {
                    "model" => Some(&mut raw.model),
                    "user" => Some(&mut raw.user),
                    "stream" => Some(&mut raw.stream),
                    "stream_options" => Some(&mut raw.stream_options),
                    _ => None,
                };
                match slot {
                    Some(slot) => *slot = Some(map.next_value()?),
                    None => {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                if keys.len() < KEYS_LISTED_MAX {
                    keys.push(key);
                } else {
                    many.insert(key.0);
                }
            }
            Ok(raw)
        }
    }
    impl<'de> serde::Deserialize<'de> for Raw {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Raw, D::Error> {
            deserializer.deserialize_map(RawVisitor)
        }
    }
    // Which copy of a repeated key counts would differ between this gateway and a backend
    // behind it, so none is chosen.
    let raw: Raw = match serde_json::from_slice::<Raw>(body) {
        Ok(raw) => raw,
        Err(error) if error.is_data() => {
            let message = error.to_string();
            let message = match message.find(" at line ") {
                Some(end) if message.starts_with("the request body has the key") => {
                    message[..end].to_owned()
                }
                _ => "the request body must be a JSON object".to_owned(),
            };
            return Err(GatewayError::InvalidJson { message });
        }
        Err(error) => {
            return Err(GatewayError::InvalidJson {
                message: format!("the request body is not valid JSON: {error}"),
            });
        }
    };
    let string = |name: &str, value: Option<Value>| match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(GatewayError::invalid_value(
            name,
            format!("`{name}` must be a string"),
        )),
    };
    let stream = match raw.stream {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => stream,
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "stream",
                "`stream` must be a boolean",
            ));
        }
    };
    let include_usage = raw
        .stream_options
        .and_then(|options| serde_json::from_value::<StreamOptions>(options).ok())
        .and_then(|options| options.include_usage)
        .and_then(|value| value.as_bool())
        .unwrap_or(false);
    Ok(Envelope {
        model: string("model", raw.model)?,
        stream,
        include_usage,
        user: string("user", raw.user)?,
    })
}

/// Parses a `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, GatewayError> {
    let mut fields = Fields::parse(body)?;
    refuse_unsupported(&mut fields, COMPLETIONS_UNSUPPORTED)?;
    let prompts = texts_or_token_ids("prompt", fields.required("prompt")?)?
        .into_iter()
        .map(|input| match input {
            TextOrTokens::Text(text) => edge_runtime::Prompt::Text(text),
            TextOrTokens::Tokens(tokens) => edge_runtime::Prompt::Tokens(tokens),
        })
        .collect();
    let max_tokens = fields
        .optional_u32("max_tokens", 1)?
        .or(Some(COMPLETIONS_MAX_TOKENS_DEFAULT));
    let mut generation = parse_generation(&mut fields, body, max_tokens)?;
    generation.logprobs = fields
        .optional_u32("logprobs", 0)?
        .map(|top| logprob_alternatives("logprobs", top))
        .transpose()?;
    Ok(CompletionRequest {
        prompts,
        generation,
    })
}

/// The most alternatives a token's `top_logprobs` may list: OpenAI's limit for chat (its
/// legacy completions allow 5; more are served here too).
const LOGPROB_ALTERNATIVES_MAX: u32 = 20;

fn logprob_alternatives(param: &str, top: u32) -> Result<u8, GatewayError> {
    u8::try_from(top)
        .ok()
        .filter(|top| u32::from(*top) <= LOGPROB_ALTERNATIVES_MAX)
        .ok_or_else(|| {
            GatewayError::invalid_value(
                param,
                format!("`{param}` must be an integer from 0 to {LOGPROB_ALTERNATIVES_MAX}"),
            )
        })
}

/// Fields whose presence asks for something the local engine does not do. Each entry is
/// the field and a value that is harmless (the default), if any.
const CHAT_UNSUPPORTED: &[(&str, Option<&str>)] = &[
    ("audio", None),
    ("modalities", Some(r#"["text"]"#)),
    ("prediction", None),
    ("web_search_options", None),
    ("reasoning_effort", None),
];

const COMPLETIONS_UNSUPPORTED: &[(&str, Option<&str>)] = &[
    ("echo", Some("false")),
    ("suffix", None),
    ("best_of", Some("1")),
];

fn refuse_unsupported(
    fields: &mut Fields,
    unsupported: &[(&str, Option<&str>)],
) -> Result<(), GatewayError> {
    for (name, harmless) in unsupported {
        let Some(value) = fields.take(name) else {
            continue;
        };
        let is_harmless = harmless
            .and_then(|text| serde_json::from_str::<Value>(text).ok())
            .is_some_and(|harmless| same_value(&harmless, &value));
        if !is_harmless {
            return Err(GatewayError::unsupported(
                *name,
                format!("`{name}` is not supported by this endpoint's local models"),
            ));
        }
    }
    Ok(())
}

/// JSON equality that treats 0 and 0.0 alike.
fn same_value(left: &Value, right: &Value) -> bool {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => left.as_f64() == right.as_f64(),
        _ => left == right,
    }
}

fn parse_generation(
    fields: &mut Fields,
    body: &[u8],
    max_tokens: Option<u32>,
) -> Result<Generation, GatewayError> {
    let model = fields.optional_string("model")?;
    if let Some(model) = &model
        && model.is_empty()
    {
        return Err(GatewayError::invalid_value(
            "model",
            "model must not be empty",
        ));
    }
    let temperature = fields.optional_f32("temperature", 0.0, 2.0)?.unwrap_or(1.0);
    let top_p = fields.optional_f32("top_p", 0.0, 1.0)?.unwrap_or(1.0);
    let seed = match fields.take("seed") {
        None => None,
        Some(Value::Number(number)) => match (number.as_u64(), number.as_i64()) {
            (Some(seed), _) => Some(seed),
            (None, Some(seed)) => Some(seed as u64),
            (None, None) => {
                return Err(GatewayError::invalid_value(
                    "seed",
                    "seed must be an integer",
                ));
            }
        },
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "seed",
                "seed must be an integer",
            ));
        }
    };
    let stop = parse_stop(fields.take("stop"))?;
    let n = fields.optional_u32("n", 1)?.unwrap_or(1);
    if n > CHOICES_MAX {
        return Err(GatewayError::invalid_value(
            "n",
            format!("`n` must be an integer from 1 to {CHOICES_MAX}"),
        ));
    }
    let stream = fields.optional_bool("stream")?.unwrap_or(false);
    let include_usage = match fields.take("stream_options") {
        None => false,
        Some(Value::Object(options)) => {
            if !stream {
                return Err(GatewayError::invalid_value(
                    "stream_options",
                    "stream_options is only allowed when stream is true",
                ));
            }
            match options.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(include)) => *include,
                Some(_) => {
                    return Err(GatewayError::invalid_value(
                        "stream_options.include_usage",
                        "include_usage must be a boolean",
                    ));
                }
            }
        }
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "stream_options",
                "stream_options must be an object",
            ));
        }
    };
    let user = fields.optional_string("user")?;
    let ignore_eos = fields.optional_bool("ignore_eos")?.unwrap_or(false);
    let response_format = parse_response_format(fields.take("response_format"), body)?;
    let presence_penalty = fields
        .optional_f32("presence_penalty", -2.0, 2.0)?
        .unwrap_or(0.0);
    let frequency_penalty = fields
        .optional_f32("frequency_penalty", -2.0, 2.0)?
        .unwrap_or(0.0);
    let logit_bias = parse_logit_bias(fields.take("logit_bias"))?;
    if ignore_eos && response_format.is_some() {
        return Err(GatewayError::invalid_value(
            "ignore_eos",
            "ignore_eos cannot be combined with a JSON response_format: the format decides where \
             the answer ends",
        ));
    }
    Ok(Generation {
        model,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        stream,
        include_usage,
        user,
        ignore_eos,
        response_format,
        logprobs: None,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        n,
        tool_call: None,
    })
}

/// The most choices one request may ask for (`n`); each is a sequence of its own.
pub const CHOICES_MAX: u32 = 16;

/// The most tokens one `logit_bias` may name (OpenAI's limit).
const LOGIT_BIAS_TOKENS_MAX: usize = 300;

fn parse_logit_bias(value: Option<Value>) -> Result<Vec<(u32, f32)>, GatewayError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Value::Object(biases) = value else {
        return Err(GatewayError::invalid_value(
            "logit_bias",
            "logit_bias must be an object mapping token ids to biases",
        ));
    };
    if biases.len() > LOGIT_BIAS_TOKENS_MAX {
        return Err(GatewayError::invalid_value(
            "logit_bias",
            format!("logit_bias may name at most {LOGIT_BIAS_TOKENS_MAX} tokens"),
        ));
    }
    biases
        .iter()
        .map(|(token, bias)| {
            let param = || format!("logit_bias.{token}");
            let token = token.parse::<u32>().map_err(|_| {
                GatewayError::invalid_value(
                    param(),
                    format!("`{token}` is not a token id: logit_bias keys are token ids"),
                )
            })?;
            let bias = bias
                .as_f64()
                .filter(|bias| (-100.0..=100.0).contains(bias))
                .ok_or_else(|| {
                    GatewayError::invalid_value(param(), "a bias must be a number from -100 to 100")
                })?;
            Ok((token, bias as f32))
        })
        .collect()
}

fn parse_response_format(
    value: Option<Value>,
    body: &[u8],
) -> Result<Option<ResponseFormat>, GatewayError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let Value::Object(mut format) = value else {
        return Err(GatewayError::invalid_value(
            "response_format",
            "response_format must be an object such as {\"type\": \"json_object\"}",
        ));
    };
    let kind = match format.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        _ => {
            return Err(GatewayError::invalid_value(
                "response_format.type",
                "response_format.type must be one of `text`, `json_object`, `json_schema`",
            ));
        }
    };
    match kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(ResponseFormat::JsonObject)),
        "json_schema" => {
            let Some(Value::Object(mut spec)) = format.remove("json_schema") else {
                return Err(GatewayError::invalid_value(
                    "response_format.json_schema",
                    "response_format.json_schema must be an object with the schema's `name` \
                     and `schema`",
                ));
            };
            let name_ok = match spec.get("name") {
                Some(Value::String(name)) => is_name(name, SCHEMA_NAME_CHARS_MAX),
                _ => false,
            };
            if !name_ok {
                return Err(GatewayError::invalid_value(
                    "response_format.json_schema.name",
                    format!(
                        "json_schema.name must be 1 to {SCHEMA_NAME_CHARS_MAX} letters, digits, \
                         underscores or dashes"
                    ),
                ));
            }
            if !matches!(
                spec.get("strict"),
                None | Some(Value::Null | Value::Bool(_))
            ) {
                return Err(GatewayError::invalid_value(
                    "response_format.json_schema.strict",
                    "json_schema.strict must be a boolean",
                ));
            }
            let schema = match spec.remove("schema") {
                None | Some(Value::Null) => "{}".to_owned(),
                Some(schema @ Value::Object(_)) => {
                    SchemaSize::of(&schema).check("response_format.json_schema.schema")?;
                    schema_text(body).unwrap_or_else(|| schema.to_string())
                }
                Some(_) => {
                    return Err(GatewayError::invalid_value(
                        "response_format.json_schema.schema",
                        "json_schema.schema must be a JSON Schema object",
                    ));
                }
            };
            Ok(Some(ResponseFormat::JsonSchema { schema }))
        }
        other => Err(GatewayError::invalid_value(
            "response_format.type",
            format!(
                "unknown response_format.type `{other}`: use `text`, `json_object` or `json_schema`"
            ),
        )),
    }
}

/// The text of `response_format.json_schema.schema` as the body has it: a parsed object
/// forgets the order of its keys, and a schema's `properties` order is the answer's. `None`
/// when the body cannot be read that way (a repeated key), and the parsed object is used.
fn schema_text(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        response_format: Format<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Format<'a> {
        #[serde(borrow)]
        json_schema: Spec<'a>,
    }
    #[derive(serde::Deserialize)]
    struct Spec<'a> {
        #[serde(borrow)]
        schema: &'a serde_json::value::RawValue,
    }
    serde_json::from_slice::<Body<'_>>(body)
        .ok()
        .map(|body| body.response_format.json_schema.schema.get().to_owned())
}

fn parse_stop(value: Option<Value>) -> Result<Vec<String>, GatewayError> {
    let stops = match value {
        None => return Ok(Vec::new()),
        Some(Value::String(stop)) => vec![stop],
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop),
                _ => Err(GatewayError::invalid_value(
                    "stop",
                    "stop must be a string or an array of strings",
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "stop",
                "stop must be a string or an array of strings",
            ));
        }
    };
    if stops.len() > STOP_SEQUENCES_MAX {
        return Err(GatewayError::invalid_value(
            "stop",
            format!("at most {STOP_SEQUENCES_MAX} stop sequences are allowed"),
        ));
    }
    if stops
        .iter()
        .any(|stop| stop.len() > STOP_SEQUENCE_BYTES_MAX)
    {
        return Err(GatewayError::invalid_value(
            "stop",
            format!("stop sequences are limited to {STOP_SEQUENCE_BYTES_MAX} bytes"),
        ));
    }
    Ok(stops)
}

/// Whether `name` is 1 to `chars_max` letters, digits, underscores or dashes: OpenAI's rule
/// for schema and function names.
fn is_name(name: &str, chars_max: usize) -> bool {
    !name.is_empty()
        && name.chars().count() <= chars_max
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// A token as the legacy completions' log probabilities name it: its text, or for bytes that
/// are not UTF-8 on their own (a piece of a character) `bytes:\xe4\xb8` as OpenAI writes them,
/// so that two such tokens among the alternatives stay two keys, not one U+FFFD.
fn token_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let mut text = String::from("bytes:");
            for byte in bytes {
                text.push_str(&format!("\\x{byte:02x}"));
            }
            text
        }
    }
}

/// The longest function name OpenAI accepts.
const TOOL_NAME_CHARS_MAX: usize = 64;

/// Optional properties (named in `properties`, not in `required`) of one object in a JSON
/// schema the local model is to follow. llama.cpp's schema-to-grammar converter spells out
/// every order of optional properties, with time that grows about with the cube of their
/// number and recursion as deep: measured on this project's 2-core machine, 64 take 1.2 ms,
/// 256 take 25 ms, 1,024 take 1.1 s, and a few thousand would overflow a thread's stack.
const SCHEMA_OPTIONAL_PROPERTIES_MAX: usize = 256;
/// Optional properties in all of a request's schemas (`response_format` or every tool's
/// parameters together): at most about 100 ms of conversion per request.
const SCHEMA_OPTIONAL_PROPERTIES_TOTAL_MAX: usize = 1_024;
/// Properties in all of a request's schemas, required ones included (OpenAI's own limit for
/// structured outputs).
const SCHEMA_PROPERTIES_TOTAL_MAX: usize = 5_000;

/// How deep `$ref`s and nested alternatives are followed when counting what `allOf` merges
/// (deeper counts as over every limit).
const SCHEMA_MERGE_DEPTH_MAX: u32 = 16;

/// The properties `part` of an `allOf` brings into the merged object: its own, those of the
/// local definition it refers to, and those of its `anyOf`, `oneOf` and `allOf` members,
/// each of which the converter adds. `root` holds the `$defs`.
fn merged_properties(root: &Value, part: &Value, depth: u32) -> usize {
    let mut depth = depth;
    let mut part = part;
    // A reference to a definition that is itself a reference is followed the same way, each
    // step spending depth: the converter follows such chains without end, so a cycle
    // (`A` → `A`, `A` → `B` → `A`) would recurse until its thread's stack overflowed and
    // took the process down. Here it runs out of depth and is refused.
    loop {
        if depth == 0 {
            return usize::MAX;
        }
        let Some(reference) = part.get("$ref").and_then(Value::as_str) else {
            break;
        };
        let target = reference
            .strip_prefix("#/$defs/")
            .map(|name| root.get("$defs").and_then(|defs| defs.get(name)))
            .or_else(|| {
                reference
                    .strip_prefix("#/definitions/")
                    .map(|name| root.get("definitions").and_then(|defs| defs.get(name)))
            })
            .flatten();
        match target {
            Some(target) => part = target,
            None => return 0,
        }
        depth -= 1;
    }
    let own = part
        .get("properties")
        .and_then(Value::as_object)
        .map_or(0, serde_json::Map::len);
    ["anyOf", "oneOf", "allOf"]
        .iter()
        .filter_map(|key| part.get(key).and_then(Value::as_array))
        .flatten()
        .map(|member| merged_properties(root, member, depth - 1))
        .fold(own, usize::saturating_add)
}

/// How large a JSON schema is, for the limits above.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct SchemaSize {
    properties: usize,
    optional: usize,
    optional_in_one_object: usize,
}

impl SchemaSize {
    /// Counts every `properties` map in `schema`, at any depth (a property that happens to be
    /// named `properties` counts its schema's keys too: an overcount by a few keywords). An
    /// object with `allOf` becomes one object in the converter, the properties of every
    /// member (through local `$ref`s, and of the `anyOf`/`oneOf`/`allOf` alternatives inside
    /// them) optional: those count as optional properties of that one object.
    fn of(schema: &Value) -> SchemaSize {
        let mut size = SchemaSize::default();
        let mut pending = vec![schema];
        while let Some(value) = pending.pop() {
            match value {
                Value::Object(members) => {
                    let mut optional = 0;
                    if let Some(Value::Object(properties)) = members.get("properties") {
                        let required = match members.get("required") {
                            Some(Value::Array(names)) => properties
                                .keys()
                                .filter(|key| names.iter().any(|name| name == key.as_str()))
                                .count(),
                            _ => 0,
                        };
                        optional = properties.len() - required;
                        size.properties = size.properties.saturating_add(properties.len());
                    }
                    if let Some(Value::Array(parts)) = members.get("allOf") {
                        // Saturating: `usize::MAX` (too deep) must stay itself.
                        optional = parts
                            .iter()
                            .map(|part| merged_properties(schema, part, SCHEMA_MERGE_DEPTH_MAX))
                            .fold(optional, usize::saturating_add);
                    }
                    size.optional = size.optional.saturating_add(optional);
                    size.optional_in_one_object = size.optional_in_one_object.max(optional);
                    pending.extend(members.values());
                }
                Value::Array(items) => pending.extend(items),
                _ => {}
            }
        }
        size
    }

    fn add(self, other: SchemaSize) -> SchemaSize {
        SchemaSize {
            properties: self.properties.saturating_add(other.properties),
            optional: self.optional.saturating_add(other.optional),
            optional_in_one_object: self
                .optional_in_one_object
                .max(other.optional_in_one_object),
        }
    }

    /// The request's schemas, all of them, within the limits; `param` names them.
    fn check(self, param: &str) -> Result<(), GatewayError> {
        let problem = if self.optional_in_one_object == usize::MAX {
            format!(
                "an allOf merges definitions or alternatives nested more than \
                 {SCHEMA_MERGE_DEPTH_MAX} deep"
            )
        } else if self.optional_in_one_object > SCHEMA_OPTIONAL_PROPERTIES_MAX {
            format!(
                "an object has {} optional properties (at most {SCHEMA_OPTIONAL_PROPERTIES_MAX}: \
                 list the others in `required`)",
                self.optional_in_one_object
            )
        } else if self.optional > SCHEMA_OPTIONAL_PROPERTIES_TOTAL_MAX {
            format!(
                "the schemas have {} optional properties in all (at most \
                 {SCHEMA_OPTIONAL_PROPERTIES_TOTAL_MAX})",
                self.optional
            )
        } else if self.properties > SCHEMA_PROPERTIES_TOTAL_MAX {
            format!(
                "the schemas have {} properties in all (at most {SCHEMA_PROPERTIES_TOTAL_MAX})",
                self.properties
            )
        } else {
            return Ok(());
        };
        Err(GatewayError::invalid_value(param, problem))
    }
}

/// `tools` and `tool_choice`: the functions the answer may or must call, if any (`auto`, the
/// default when tools are offered, lets it answer with text instead).
fn parse_tools(
    tools: Option<Value>,
    choice: Option<Value>,
    written: &[Option<String>],
) -> Result<Option<ToolCall>, GatewayError> {
    let tools = match tools {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            items
                .iter()
                .map(|item| SchemaSize::of(&item["function"]["parameters"]))
                .fold(SchemaSize::default(), SchemaSize::add)
                .check("tools")?;
            items
                .iter()
                .enumerate()
                .map(|(index, item)| {
                    parse_tool(index, item, written.get(index).and_then(Option::as_deref))
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "tools",
                "tools must be an array of functions",
            ));
        }
    };
    let mut text_allowed = false;
    let named = match choice {
        None if tools.is_empty() => return Ok(None),
        None => {
            text_allowed = true;
            None
        }
        Some(Value::String(choice)) => match choice.as_str() {
            "none" => return Ok(None),
            "auto" if tools.is_empty() => return Ok(None),
            "auto" => {
                text_allowed = true;
                None
            }
            "required" => None,
            other => {
                return Err(GatewayError::invalid_value(
                    "tool_choice",
                    format!(
                        "unknown tool_choice `{other}`: use `none`, `auto`, `required` or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        },
        Some(Value::Object(choice)) => match choice
            .get("function")
            .and_then(|function| function.get("name"))
            .and_then(Value::as_str)
        {
            Some(name) => Some(name.to_owned()),
            None => {
                return Err(GatewayError::invalid_value(
                    "tool_choice.function.name",
                    "a named tool_choice needs `function.name`",
                ));
            }
        },
        Some(_) => {
            return Err(GatewayError::invalid_value(
                "tool_choice",
                "tool_choice must be a string or an object",
            ));
        }
    };
    if tools.is_empty() {
        return Err(GatewayError::invalid_value(
            "tools",
            "tool_choice asks for a call but no tools are offered",
        ));
    }
    let tools = match named {
        None => tools,
        Some(name) => {
            let Some(tool) = tools.into_iter().find(|tool| tool.name == name) else {
                return Err(GatewayError::invalid_value(
                    "tool_choice.function.name",
                    format!("`{name}` is not one of the offered tools"),
                ));
            };
            vec![tool]
        }
    };
    Ok(Some(ToolCall {
        tools,
        text_allowed,
        parallel: false,
        legacy: false,
    }))
}

/// `tools` with `tool_choice`, or the older `functions` with `function_call` (OpenAI's
/// function calling before tools), read as the same offer; an error names the field the
/// request used.
fn parse_any_tools(fields: &mut Fields, body: &[u8]) -> Result<Option<ToolCall>, GatewayError> {
    let written = parameters_texts(body);
    let tools = fields.take("tools");
    let choice = fields.take("tool_choice");
    let functions = fields.take("functions");
    let function_call = fields.take("function_call");
    let Some(functions) = functions else {
        if function_call.is_some_and(|call| !call.is_null()) {
            return Err(GatewayError::invalid_value(
                "function_call",
                "function_call needs functions",
            ));
        }
        return parse_tools(tools, choice, &written);
    };
    if tools.is_some() || choice.is_some() {
        return Err(GatewayError::invalid_value(
            "functions",
            "offer tools or the older functions, not both",
        ));
    }
    // `[{name, description, parameters}]` → `[{"type": "function", "function": {...}}]`, and
    // `{"name": ...}` → `{"type": "function", "function": {"name": ...}}`.
    let as_tools = match functions {
        Value::Array(functions) => Value::Array(
            functions
                .into_iter()
                .map(|function| serde_json::json!({"type": "function", "function": function}))
                .collect(),
        ),
        other => other,
    };
    let as_choice = function_call.map(|call| match call {
        Value::Object(call) => serde_json::json!({"type": "function", "function": call}),
        other => other,
    });
    // `tools[0].function.name` → `functions[0].name`, `tool_choice...` → `function_call...`.
    let legacy_param = |param: String| {
        for (new, old) in [("function_call", "tool_choice"), ("functions", "tools")] {
            if let Some(rest) = param.strip_prefix(old) {
                return format!("{new}{}", rest.replacen(".function", "", 1));
            }
        }
        param
    };
    let call = parse_tools(Some(as_tools), as_choice, &written).map_err(|error| match error {
        GatewayError::InvalidValue { param, message } => GatewayError::InvalidValue {
            param: legacy_param(param),
            message,
        },
        GatewayError::UnsupportedParameter { param, message } => {
            GatewayError::UnsupportedParameter {
                param: legacy_param(param),
                message,
            }
        }
        other => other,
    })?;
    Ok(call.map(|call| ToolCall {
        legacy: true,
        ..call
    }))
}

/// Each offered function's `parameters` as the client wrote them (`tools[i].function` or the
/// older `functions[i]`): a grammar writes the arguments in the schema's key order, which a
/// parsed value does not keep. Empty where the body cannot be read so (the parsed value's
/// text is used then).
fn parameters_texts(body: &[u8]) -> Vec<Option<String>> {
    use serde_json::value::RawValue;
    #[derive(serde::Deserialize)]
    struct Body<'a> {
        #[serde(borrow, default)]
        tools: Option<Vec<Offered<'a>>>,
        #[serde(borrow, default)]
        functions: Option<Vec<Function<'a>>>,
    }
    #[derive(serde::Deserialize)]
    struct Offered<'a> {
        #[serde(borrow, default)]
        function: Option<Function<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Function<'a> {
        #[serde(borrow, default)]
        parameters: Option<&'a RawValue>,
    }
    let text = |function: Option<&Function<'_>>| {
        function
            .and_then(|function| function.parameters)
            .map(|raw| raw.get().to_owned())
    };
    match serde_json::from_slice::<Body<'_>>(body) {
        Ok(Body {
            tools: Some(tools), ..
        }) => tools
            .iter()
            .map(|tool| text(tool.function.as_ref()))
            .collect(),
        Ok(Body {
            functions: Some(functions),
            ..
        }) => functions
            .iter()
            .map(|function| text(Some(function)))
            .collect(),
        _ => Vec::new(),
    }
}

fn parse_tool(index: usize, item: &Value, written: Option<&str>) -> Result<Tool, GatewayError> {
    let param = format!("tools[{index}]");
    if item.get("type").and_then(Value::as_str) != Some("function") {
        return Err(GatewayError::invalid_value(
            format!("{param}.type"),
            "each tool must have type `function`",
        ));
    }
    let Some(Value::Object(function)) = item.get("function") else {
        return Err(GatewayError::invalid_value(
            format!("{param}.function"),
            "each tool needs a `function` object",
        ));
    };
    let name = match function.get("name") {
        Some(Value::String(name)) if is_name(name, TOOL_NAME_CHARS_MAX) => name.clone(),
        _ => {
            return Err(GatewayError::invalid_value(
                format!("{param}.function.name"),
                format!(
                    "a function name is 1 to {TOOL_NAME_CHARS_MAX} letters, digits, underscores \
                     or dashes"
                ),
            ));
        }
    };
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(description)) => Some(description.clone()),
        Some(_) => {
            return Err(GatewayError::invalid_value(
                format!("{param}.function.description"),
                "description must be a string",
            ));
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(parameters @ Value::Object(_)) => {
            written.map_or_else(|| parameters.to_string(), str::to_owned)
        }
        Some(_) => {
            return Err(GatewayError::invalid_value(
                format!("{param}.function.parameters"),
                "parameters must be a JSON Schema object",
            ));
        }
    };
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

fn parse_messages(value: &Value) -> Result<Vec<Message>, GatewayError> {
    let Value::Array(items) = value else {
        return Err(GatewayError::invalid_value(
            "messages",
            "messages must be an array",
        ));
    };
    if items.is_empty() {
        return Err(GatewayError::invalid_value(
            "messages",
            "messages must contain at least one message",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| parse_message(index, item))
        .collect()
}

fn parse_message(index: usize, item: &Value) -> Result<Message, GatewayError> {
    let param = format!("messages[{index}]");
    let Value::Object(message) = item else {
        return Err(GatewayError::invalid_value(
            param,
            "each message must be an object",
        ));
    };
    let role = match message.get("role") {
        Some(Value::String(role)) => role.as_str(),
        Some(_) => {
            return Err(GatewayError::invalid_value(
                format!("{param}.role"),
                "role must be a string",
            ));
        }
        None => {
            return Err(GatewayError::invalid_value(
                format!("{param}.role"),
                "each message needs a role",
            ));
        }
    };
    let is_tool = role == "tool";
    let is_function = role == "function";
    let role = match role {
        "system" | "developer" => edge_runtime::Role::System,
        // A tool's result reaches the model as the user's words: the local models' chat
        // templates know no tool role.
        "user" | "tool" => edge_runtime::Role::User,
        "assistant" => edge_runtime::Role::Assistant,
        // The older function calling's results, as the user's words like a tool's.
        "function" => edge_runtime::Role::User,
        other => {
            return Err(GatewayError::invalid_value(
                format!("{param}.role"),
                format!(
                    "`{other}` is not a role (expected system, developer, user, assistant, tool \
                     or function)"
                ),
            ));
        }
    };
    for unsupported in ["audio"] {
        if message
            .get(unsupported)
            .is_some_and(|value| !value.is_null())
        {
            return Err(GatewayError::unsupported(
                format!("{param}.{unsupported}"),
                format!("`{unsupported}` in messages is not supported by local models"),
            ));
        }
    }
    let content = match message.get("content") {
        Some(Value::String(content)) => content.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (part_index, part) in parts.iter().enumerate() {
                let part_param = format!("{param}.content[{part_index}]");
                match part {
                    Value::Object(part) => match part.get("type").and_then(Value::as_str) {
                        Some("text") => match part.get("text") {
                            // One line feed between parts, as llama.cpp joins them for
                            // templates that take a message's text whole: "Translate:" and
                            // "Good morning" must not run together.
                            Some(Value::String(part_text)) => {
                                if !text.is_empty() {
                                    text.push('\n');
                                }
                                text.push_str(part_text);
                            }
                            _ => {
                                return Err(GatewayError::invalid_value(
                                    format!("{part_param}.text"),
                                    "a text part needs a string `text`",
                                ));
                            }
                        },
                        Some(other) => {
                            return Err(GatewayError::unsupported(
                                format!("{part_param}.type"),
                                format!(
                                    "`{other}` content parts are not supported by local models"
                                ),
                            ));
                        }
                        None => {
                            return Err(GatewayError::invalid_value(
                                format!("{part_param}.type"),
                                "each content part needs a type",
                            ));
                        }
                    },
                    _ => {
                        return Err(GatewayError::invalid_value(
                            part_param,
                            "each content part must be an object",
                        ));
                    }
                }
            }
            text
        }
        Some(Value::Null) | None if role == edge_runtime::Role::Assistant => String::new(),
        _ => {
            return Err(GatewayError::invalid_value(
                format!("{param}.content"),
                "content must be a string or an array of text parts",
            ));
        }
    };
    let content = if is_tool {
        let id = message
            .get("tool_call_id")
            .and_then(Value::as_str)
            .unwrap_or("");
        format!("Result of tool call {id}: {content}")
    } else if is_function {
        let name = message.get("name").and_then(Value::as_str).unwrap_or("");
        format!("Result of function {name}: {content}")
    } else {
        content
    };
    type Render = fn(String, &Value, &str) -> Result<String, GatewayError>;
    let mut content = content;
    for (field, render) in [
        ("function_call", with_call as Render),
        ("tool_calls", with_tool_calls as Render),
    ] {
        match message.get(field) {
            None | Some(Value::Null) => {}
            Some(calls) if role == edge_runtime::Role::Assistant => {
                content = render(content, calls, &format!("{param}.{field}"))?;
            }
            Some(_) => {
                return Err(GatewayError::invalid_value(
                    format!("{param}.{field}"),
                    format!("only assistant messages carry {field}"),
                ));
            }
        }
    }
    Ok(Message { role, content })
}

/// An assistant message's text with its earlier tool calls, each as the JSON object the
/// model writes for a call (`{"name": ..., "arguments": ...}`), one per line.
fn with_tool_calls(content: String, calls: &Value, param: &str) -> Result<String, GatewayError> {
    let Value::Array(calls) = calls else {
        return Err(GatewayError::invalid_value(
            param,
            "tool_calls must be an array",
        ));
    };
    let mut text = content;
    for (index, call) in calls.iter().enumerate() {
        let function = call.get("function").unwrap_or(&Value::Null);
        text = with_call(text, function, &format!("{param}[{index}].function"))?;
    }
    Ok(text)
}

/// `text` and then, on a line of its own, the call `function` (`{"name": ..., "arguments":
/// <JSON text>}`) as the model writes one: name first.
fn with_call(mut text: String, function: &Value, param: &str) -> Result<String, GatewayError> {
    let name = function.get("name").and_then(Value::as_str);
    let arguments = function.get("arguments").and_then(Value::as_str);
    let (Some(name), Some(arguments)) = (name, arguments) else {
        return Err(GatewayError::invalid_value(
            param,
            "a call needs `name` and `arguments` (a JSON string)",
        ));
    };
    // Arguments that are not JSON (a call cut short by `max_tokens`, which clients send back
    // as it came) stay in the history as the string they are, as OpenAI takes them.
    let arguments: Value =
        serde_json::from_str(arguments).unwrap_or_else(|_| Value::String(arguments.to_owned()));
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(&format!(
        r#"{{"name":{},"arguments":{arguments}}}"#,
        Value::from(name)
    ));
    Ok(text)
}

/// The top-level fields of a JSON object body; absent and `null` fields read alike.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    fn parse(body: &[u8]) -> Result<Fields, GatewayError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Fields { map }),
            Ok(_) => Err(GatewayError::InvalidJson {
                message: "the request body must be a JSON object".to_owned(),
            }),
            Err(error) => Err(GatewayError::InvalidJson {
                message: format!("the request body is not valid JSON: {error}"),
            }),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.map.remove(name).filter(|value| !value.is_null())
    }

    fn required(&mut self, name: &str) -> Result<Value, GatewayError> {
        self.take(name).ok_or_else(|| {
            GatewayError::invalid_value(name, format!("missing required parameter `{name}`"))
        })
    }

    fn optional_string(&mut self, name: &str) -> Result<Option<String>, GatewayError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(value)) => Ok(Some(value)),
            Some(_) => Err(GatewayError::invalid_value(
                name,
                format!("`{name}` must be a string"),
            )),
        }
    }

    fn optional_bool(&mut self, name: &str) -> Result<Option<bool>, GatewayError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(value)),
            Some(_) => Err(GatewayError::invalid_value(
                name,
                format!("`{name}` must be a boolean"),
            )),
        }
    }

    fn optional_u32(&mut self, name: &str, minimum: u32) -> Result<Option<u32>, GatewayError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(number)) => number
                .as_u64()
                .and_then(|value| u32::try_from(value).ok())
                .filter(|value| *value >= minimum)
                .map(Some)
                .ok_or_else(|| {
                    GatewayError::invalid_value(
                        name,
                        format!("`{name}` must be an integer of at least {minimum}"),
                    )
                }),
            Some(_) => Err(GatewayError::invalid_value(
                name,
                format!("`{name}` must be an integer"),
            )),
        }
    }

    fn optional_f32(
        &mut self,
        name: &str,
        minimum: f32,
        maximum: f32,
    ) -> Result<Option<f32>, GatewayError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(number)) => number
                .as_f64()
                .map(|value| value as f32)
                .filter(|value| (minimum..=maximum).contains(value))
                .map(Some)
                .ok_or_else(|| {
                    GatewayError::invalid_value(
                        name,
                        format!("`{name}` must be a number between {minimum} and {maximum}"),
                    )
                }),
            Some(_) => Err(GatewayError::invalid_value(
                name,
                format!("`{name}` must be a number"),
            )),
        }
    }
}

// ---- Responses ----

#[derive(Debug, Serialize)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<edge_runtime::Usage> for UsageBody {
    fn from(usage: edge_runtime::Usage) -> Self {
        UsageBody {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.prompt_tokens + usage.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: usage.cached_tokens,
            },
        }
    }
}

/// Which endpoint a response belongs to; they differ only in object names and choice shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// The identity every body and chunk of one response repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub endpoint: Endpoint,
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl ResponseMeta {
    pub fn new(endpoint: Endpoint, request_id: &str, created: u64, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        ResponseMeta {
            endpoint,
            id: format!("{prefix}-{request_id}"),
            created,
            model: model.to_owned(),
        }
    }

    /// The complete, non-streamed response: `choices` in index order.
    pub fn full_response(&self, choices: &[ChoiceBody<'_>], usage: edge_runtime::Usage) -> Value {
        let choices: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(index, choice)| {
                let logprobs = choice.logprobs.clone().unwrap_or(Value::Null);
                match (self.endpoint, choice.tool_calls.as_slice()) {
                    (Endpoint::Chat, [call, ..]) if choice.legacy => serde_json::json!({
                        "index": index,
                        "message": {"role": "assistant", "content": null, "refusal": null,
                            "function_call": call.body(None)["function"]},
                        "logprobs": logprobs,
                        // `function_call`, or `length` for a call cut short.
                        "finish_reason": choice.finish_reason,
                    }),
                    (Endpoint::Chat, calls @ [_, ..]) => serde_json::json!({
                        "index": index,
                        "message": {"role": "assistant", "content": null, "refusal": null,
                            "tool_calls": calls.iter().map(|call| call.body(None)).collect::<Value>()},
                        "logprobs": logprobs,
                        // `tool_calls`, or `length` for calls cut short.
                        "finish_reason": choice.finish_reason,
                    }),
                    (Endpoint::Chat, []) => serde_json::json!({
                        "index": index,
                        "message": {"role": "assistant", "content": choice.text, "refusal": null},
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }),
                    (Endpoint::Completions, _) => serde_json::json!({
                        "index": index,
                        "text": choice.text,
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }),
                }
            })
            .collect();
        serde_json::json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
            "usage": UsageBody::from(usage),
        })
    }

    /// One stream chunk of choice `index`. `role` marks a chat choice's first chunk; `text`
    /// is the delta; `finish_reason` marks the choice's last content chunk.
    /// `with_usage_field` adds `"usage": null`, as OpenAI does on every chunk when the client
    /// asked for usage. `logprobs`: the chunk's token's, from [`ResponseMeta::logprobs`].
    pub fn chunk(
        &self,
        index: usize,
        role: bool,
        text: Option<&str>,
        finish_reason: Option<&str>,
        with_usage_field: bool,
        logprobs: Option<Value>,
    ) -> Value {
        let logprobs = logprobs.unwrap_or(Value::Null);
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".to_owned(), Value::from("assistant"));
                }
                if let Some(text) = text {
                    delta.insert("content".to_owned(), Value::from(text));
                }
                serde_json::json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                })
            }
            Endpoint::Completions => serde_json::json!({
                "index": index,
                "text": text.unwrap_or(""),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }),
        };
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [choice],
        });
        if with_usage_field && let Some(object) = chunk.as_object_mut() {
            object.insert("usage".to_owned(), Value::Null);
        }
        chunk
    }

    /// The stream chunk that carries choice `index`'s whole function call.
    /// A chunk with call `at` of choice `index` whole.
    pub fn tool_call_chunk(
        &self,
        index: usize,
        at: usize,
        call: &CalledTool,
        legacy: bool,
        with_usage_field: bool,
    ) -> Value {
        self.tool_call_delta(index, call.body(Some(at)), legacy, with_usage_field)
    }

    /// A chunk whose delta carries one `tool_calls` entry: a call's start (`id`, `type` and
    /// the function's name) or more of its `arguments`, as OpenAI streams a call.
    pub fn tool_call_piece(
        &self,
        index: usize,
        piece: CallPiece<'_>,
        legacy: bool,
        with_usage_field: bool,
    ) -> Value {
        let entry = match piece {
            CallPiece::Start { at, id, name } => serde_json::json!({
                "index": at, "id": id, "type": "function",
                "function": {"name": name, "arguments": ""},
            }),
            CallPiece::Arguments { at, text } => {
                serde_json::json!({"index": at, "function": {"arguments": text}})
            }
        };
        self.tool_call_delta(index, entry, legacy, with_usage_field)
    }

    /// With `legacy` the delta is the older `function_call` (the entry's `function`).
    fn tool_call_delta(
        &self,
        index: usize,
        entry: Value,
        legacy: bool,
        with_usage_field: bool,
    ) -> Value {
        let delta = if legacy {
            serde_json::json!({"function_call": entry["function"]})
        } else {
            serde_json::json!({"tool_calls": [entry]})
        };
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": index,
                "delta": delta,
                "logprobs": null,
                "finish_reason": null,
            }],
        });
        if with_usage_field && let Some(object) = chunk.as_object_mut() {
            object.insert("usage".to_owned(), Value::Null);
        }
        chunk
    }

    /// A choice's `logprobs` for `tokens`: chat's `{"content": [{"token", "logprob", "bytes",
    /// "top_logprobs"}], "refusal": null}`, or legacy completions' parallel `tokens`,
    /// `token_logprobs`, `top_logprobs` (token → log-probability) and `text_offset` (bytes
    /// into the answer; `offset` is where `tokens` begin). A token holding part of a UTF-8
    /// character shows it as U+FFFD in `token`; `bytes` are exact.
    pub fn logprobs(&self, tokens: &[&edge_runtime::TokenLogprobs], offset: usize) -> Value {
        fn entry(token: &[u8], logprob: f32) -> Map<String, Value> {
            let mut entry = Map::new();
            entry.insert(
                "token".to_owned(),
                Value::from(String::from_utf8_lossy(token)),
            );
            entry.insert("logprob".to_owned(), Value::from(logprob));
            entry.insert("bytes".to_owned(), Value::from(token.to_vec()));
            entry
        }
        match self.endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|token| {
                        let mut chosen = entry(&token.token, token.logprob);
                        let top: Vec<Value> = token
                            .top
                            .iter()
                            .map(|top| Value::Object(entry(&top.token, top.logprob)))
                            .collect();
                        chosen.insert("top_logprobs".to_owned(), Value::from(top));
                        Value::Object(chosen)
                    })
                    .collect();
                serde_json::json!({"content": content, "refusal": null})
            }
            Endpoint::Completions => {
                let mut offsets = Vec::with_capacity(tokens.len());
                let mut at = offset;
                for token in tokens {
                    offsets.push(at);
                    at += token.token.len();
                }
                let top: Vec<Value> = tokens
                    .iter()
                    .map(|token| {
                        Value::Object(
                            token
                                .top
                                .iter()
                                .map(|top| (token_text(&top.token), Value::from(top.logprob)))
                                .collect(),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "tokens": tokens
                        .iter()
                        .map(|token| token_text(&token.token))
                        .collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|token| token.logprob).collect::<Vec<_>>(),
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The usage chunk that ends a stream when the client asked for usage: no choices.
    pub fn usage_chunk(&self, usage: edge_runtime::Usage) -> Value {
        serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": UsageBody::from(usage),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completions, _) => "text_completion",
        }
    }
}

/// An SSE `data:` event.
pub fn sse_event(value: &Value) -> bytes::Bytes {
    let mut event = b"data: ".to_vec();
    event.extend(serde_json::to_vec(value).unwrap_or_default());
    event.extend(b"\n\n");
    bytes::Bytes::from(event)
}

/// The event that ends every stream.
pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// `GET /v1/models`.
pub fn models_list(models: &[(String, u64)]) -> Value {
    let data: Vec<Value> = models
        .iter()
        .map(|(id, created)| model_object(id, *created))
        .collect();
    serde_json::json!({"object": "list", "data": data})
}

/// One model as OpenAI describes it (`GET /v1/models/{id}`, and each entry of the list).
pub fn model_object(id: &str, created: u64) -> Value {
    serde_json::json!({"id": id, "object": "model", "created": created, "owned_by": "isthmus"})
}

/// Most inputs one embeddings request may carry (OpenAI's own limit).
pub const EMBEDDING_INPUTS_MAX: usize = 2048;

/// A `/v1/embeddings` request as the local model serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingsRequest {
    pub inputs: Vec<edge_runtime::EmbeddingInput>,
    /// `encoding_format: "base64"`: each vector as little-endian `f32` bytes in base64.
    pub base64: bool,
    /// `dimensions`: accepted only when it is the model's own width.
    pub dimensions: Option<u32>,
}

/// Parses an embeddings body: `input` as a string, an array of strings, an array of token ids
/// or an array of such arrays; `encoding_format` `float` or `base64`; `dimensions`; `model`
/// and `user` (read by routing). Anything else is refused by name.
pub fn parse_embeddings(body: &[u8]) -> Result<EmbeddingsRequest, GatewayError> {
    let value: Value = serde_json::from_slice(body).map_err(|error| GatewayError::InvalidJson {
        message: format!("the request body is not valid JSON: {error}"),
    })?;
    let Value::Object(fields) = value else {
        return Err(GatewayError::InvalidJson {
            message: "the request body must be a JSON object".to_owned(),
        });
    };
    let mut inputs = None;
    let mut base64 = false;
    let mut dimensions = None;
    for (name, value) in fields {
        match name.as_str() {
            "model" | "user" => {}
            "input" => inputs = Some(embedding_inputs(value)?),
            "encoding_format" => {
                // `null` is the default, as for every other parameter.
                base64 = match value.as_str() {
                    Some("float") => false,
                    None if value.is_null() => false,
                    Some("base64") => true,
                    _ => {
                        return Err(GatewayError::invalid_value(
                            "encoding_format",
                            "`encoding_format` must be \"float\" or \"base64\"",
                        ));
                    }
                }
            }
            "dimensions" => {
                dimensions = match value {
                    Value::Null => None,
                    value => Some(
                        value
                            .as_u64()
                            .and_then(|number| u32::try_from(number).ok())
                            .filter(|number| *number > 0)
                            .ok_or_else(|| {
                                GatewayError::invalid_value(
                                    "dimensions",
                                    "`dimensions` must be a positive integer",
                                )
                            })?,
                    ),
                }
            }
            other => {
                return Err(GatewayError::unsupported(
                    other,
                    format!("`{other}` is not a parameter of /v1/embeddings"),
                ));
            }
        }
    }
    let inputs = inputs.ok_or_else(|| {
        GatewayError::invalid_value("input", "missing required parameter `input`")
    })?;
    Ok(EmbeddingsRequest {
        inputs,
        base64,
        dimensions,
    })
}

/// One text of a completions `prompt` or an embeddings `input`.
enum TextOrTokens {
    Text(String),
    Tokens(Vec<u32>),
}

/// A `prompt` or `input` value: a string, an array of strings, an array of token ids, or an
/// array of arrays of token ids.
fn texts_or_token_ids(
    param: &'static str,
    value: Value,
) -> Result<Vec<TextOrTokens>, GatewayError> {
    let invalid = || {
        GatewayError::invalid_value(
            param,
            format!(
                "`{param}` must be a string, an array of strings, an array of token ids, or an \
                 array of arrays of token ids"
            ),
        )
    };
    let tokens = |items: &[Value]| -> Option<Vec<u32>> {
        items
            .iter()
            .map(|item| item.as_u64().and_then(|token| u32::try_from(token).ok()))
            .collect()
    };
    Ok(match value {
        Value::String(text) => vec![TextOrTokens::Text(text)],
        Value::Array(items) if items.is_empty() => {
            return Err(GatewayError::invalid_value(
                param,
                format!("`{param}` must not be an empty array"),
            ));
        }
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .into_iter()
            .filter_map(|item| match item {
                Value::String(text) => Some(TextOrTokens::Text(text)),
                _ => None,
            })
            .collect(),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![TextOrTokens::Tokens(tokens(&items).ok_or_else(invalid)?)]
        }
        Value::Array(items) if items.iter().all(Value::is_array) => items
            .iter()
            .map(|item| {
                item.as_array()
                    .and_then(|inner| tokens(inner))
                    .map(TextOrTokens::Tokens)
                    .ok_or_else(invalid)
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(invalid()),
    })
}

fn embedding_inputs(value: Value) -> Result<Vec<edge_runtime::EmbeddingInput>, GatewayError> {
    use edge_runtime::EmbeddingInput;
    let inputs: Vec<EmbeddingInput> = texts_or_token_ids("input", value)?
        .into_iter()
        .map(|input| match input {
            TextOrTokens::Text(text) => EmbeddingInput::Text(text),
            TextOrTokens::Tokens(tokens) => EmbeddingInput::Tokens(tokens),
        })
        .collect();
    if inputs.len() > EMBEDDING_INPUTS_MAX {
        return Err(GatewayError::invalid_value(
            "input",
            format!("at most {EMBEDDING_INPUTS_MAX} inputs per request"),
        ));
    }
    Ok(inputs)
}

/// The `/v1/embeddings` answer: one `embedding` object per vector, in input order.
pub fn embeddings_response(
    model: &str,
    embeddings: &edge_runtime::Embeddings,
    base64: bool,
) -> Value {
    use base64::Engine as _;
    let data: Vec<Value> = embeddings
        .vectors
        .iter()
        .enumerate()
        .map(|(index, vector)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = vector
                    .iter()
                    .flat_map(|value| value.to_le_bytes())
                    .collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::from(vector.clone())
            };
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {
            "prompt_tokens": embeddings.prompt_tokens,
            "total_tokens": embeddings.prompt_tokens,
        },
    })
}

#[cfg(test)]
mod tests;
