//! The OpenAI wire format, as far as the fake upstream speaks it: the request fields it reads
//! and the bodies it answers with (completion JSON, SSE chunks, error and model list bodies).
//! Pure functions over plain data; `service` does the I/O.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

/// The words answers are made of, one completion token each, cycled.
const WORDS: &[&str] = &[
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
];
/// `system_fingerprint` of every answer, so that a client can tell it met the fake.
const FINGERPRINT: &str = "fake-upstream";

/// Which completion API a request used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions` and Azure's `/openai/deployments/{d}/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Text,
}

/// The request fields the fake reads; everything else is ignored.
#[derive(Debug, Default, Deserialize)]
pub struct RawRequest {
    pub model: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<RawStreamOptions>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    /// Test extension: answer with the last message's text, in pieces of three characters
    /// (so that a gateway restoring placeholders meets them split across chunks).
    pub fake_echo: Option<bool>,
    /// Test extension: with `fake_echo`, answer with a call of a function `echo` whose
    /// arguments are `{"text": ...}` with the last message's text, streamed in pieces of
    /// three characters of that JSON.
    pub fake_echo_tool_call: Option<bool>,
    pub messages: Option<Vec<RawMessage>>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawMessage {
    pub content: Option<Value>,
}

impl RawRequest {
    /// The text of the last message, when it is a string (logged, and echoed on request).
    pub fn last_message(&self) -> Option<String> {
        let content = self.messages.as_ref()?.last()?.content.as_ref()?;
        content.as_str().map(str::to_owned)
    }

    /// The text to echo, when the request asks for it: as a call's arguments when it asks
    /// for that.
    fn echo(&self) -> Option<String> {
        if self.fake_echo != Some(true) {
            return None;
        }
        let text = self.last_message()?;
        if self.fake_echo_tool_call == Some(true) {
            return Some(json!({ "text": text }).to_string());
        }
        Some(text)
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RawStreamOptions {
    pub include_usage: Option<bool>,
}

impl RawRequest {
    pub fn stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|options| options.include_usage)
            .unwrap_or(false)
    }
}

/// Everything an answer's bodies are made from.
#[derive(Debug, Clone)]
pub struct Completion {
    pub api: Api,
    pub id: String,
    pub created_s: u64,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `length` when the request's token limit cut the answer short, else `stop`.
    pub finish_reason: &'static str,
    pub include_usage: bool,
    /// Echo mode: the pieces the answer is made of instead of the cycled words.
    pub pieces: Option<Vec<String>>,
    /// The pieces are a call's arguments rather than text.
    pub tool_call: bool,
}

impl Completion {
    /// The answer to `request` with `tokens` words at most, for a body of `body_bytes`.
    pub fn new(
        api: Api,
        request: &RawRequest,
        model: String,
        tokens: u32,
        body_bytes: usize,
        sequence: u64,
        created_s: u64,
    ) -> Completion {
        let pieces: Option<Vec<String>> = request.echo().map(|text| {
            let characters: Vec<char> = text.chars().collect();
            characters
                .chunks(3)
                .map(|piece| piece.iter().collect())
                .collect()
        });
        let tokens = pieces.as_ref().map_or(tokens, |pieces| {
            u32::try_from(pieces.len()).unwrap_or(u32::MAX)
        });
        let limit = request.max_completion_tokens.or(request.max_tokens);
        let completion_tokens =
            limit.map_or(u64::from(tokens), |limit| limit.min(u64::from(tokens)));
        let id = match api {
            Api::Chat => format!("chatcmpl-fake-{sequence}"),
            Api::Text => format!("cmpl-fake-{sequence}"),
        };
        Completion {
            api,
            id,
            created_s,
            model,
            // About four bytes per token, as tokenizers average on English.
            prompt_tokens: body_bytes.div_ceil(4) as u64,
            completion_tokens,
            finish_reason: if completion_tokens < u64::from(tokens) {
                "length"
            } else if request.fake_echo == Some(true) && request.fake_echo_tool_call == Some(true) {
                "tool_calls"
            } else {
                "stop"
            },
            include_usage: request.include_usage(),
            tool_call: pieces.is_some() && request.fake_echo_tool_call == Some(true),
            pieces,
        }
    }

    /// The text of token `index`.
    fn token(&self, index: u64) -> String {
        match &self.pieces {
            Some(pieces) => usize::try_from(index)
                .ok()
                .and_then(|index| pieces.get(index))
                .cloned()
                .unwrap_or_default(),
            None => token_text(index),
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    /// The whole answer as one JSON body.
    pub fn json_body(&self) -> Bytes {
        let text = (0..self.completion_tokens)
            .map(|index| self.token(index))
            .collect::<String>();
        let body = match self.api {
            Api::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created_s,
                "model": self.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{
                    "index": 0,
                    "message": if self.tool_call {
                        json!({"role": "assistant", "content": null, "refusal": null,
                            "tool_calls": [{"id": "call_fake", "type": "function",
                                "function": {"name": "echo", "arguments": text}}]})
                    } else {
                        json!({"role": "assistant", "content": text, "refusal": null})
                    },
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage(),
            }),
            Api::Text => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created_s,
                "model": self.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": self.finish_reason,
                }],
                "usage": self.usage(),
            }),
        };
        Bytes::from(body.to_string())
    }

    /// The answer as server-sent events: one chunk per token, a chunk with the finish
    /// reason, a usage chunk when asked for, and `[DONE]`.
    pub fn sse_events(&self) -> Vec<Bytes> {
        let mut events = Vec::with_capacity(self.completion_tokens as usize + 3);
        for index in 0..self.completion_tokens {
            let choice = match self.api {
                Api::Chat if self.tool_call => {
                    let call = if index == 0 {
                        json!({"index": 0, "id": "call_fake", "type": "function",
                            "function": {"name": "echo", "arguments": self.token(index)}})
                    } else {
                        json!({"index": 0, "function": {"arguments": self.token(index)}})
                    };
                    json!({
                        "index": 0,
                        "delta": {"tool_calls": [call]},
                        "logprobs": null,
                        "finish_reason": null,
                    })
                }
                Api::Chat if index == 0 => json!({
                    "index": 0,
                    "delta": {"role": "assistant", "content": self.token(index)},
                    "logprobs": null,
                    "finish_reason": null,
                }),
                Api::Chat => json!({
                    "index": 0,
                    "delta": {"content": self.token(index)},
                    "logprobs": null,
                    "finish_reason": null,
                }),
                Api::Text => json!({
                    "index": 0,
                    "text": self.token(index),
                    "logprobs": null,
                    "finish_reason": null,
                }),
            };
            events.push(self.chunk(vec![choice], Value::Null));
        }
        let last = match self.api {
            Api::Chat => json!({
                "index": 0,
                "delta": {},
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }),
            Api::Text => json!({
                "index": 0,
                "text": "",
                "logprobs": null,
                "finish_reason": self.finish_reason,
            }),
        };
        events.push(self.chunk(vec![last], Value::Null));
        if self.include_usage {
            events.push(self.chunk(Vec::new(), self.usage()));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }

    /// One `data:` event; `usage` appears (as null until the last) only when asked for, as
    /// OpenAI does.
    fn chunk(&self, choices: Vec<Value>, usage: Value) -> Bytes {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Text => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created_s,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = usage;
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }
}

/// The text of token `index`: a word, with a space before all but the first.
fn token_text(index: u64) -> String {
    let word = WORDS[(index % WORDS.len() as u64) as usize];
    if index == 0 {
        word.to_owned()
    } else {
        format!(" {word}")
    }
}

/// An OpenAI error body.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> Bytes {
    let body = json!({
        "error": {"message": message, "type": kind, "param": param, "code": code},
    });
    Bytes::from(body.to_string())
}

/// The OpenAI `type` of an error status.
pub fn error_kind(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// `GET /v1/models`: one model, `fake`.
pub fn models_body() -> Bytes {
    let body = json!({
        "object": "list",
        "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "fake-upstream"}],
    });
    Bytes::from(body.to_string())
}

/// `POST /v1/embeddings`: one vector of 8 numbers per input, taken from the SHA-256 of the
/// input's JSON (so equal inputs get equal vectors), and one prompt token per word or token
/// id (inputs may be strings, a list of token ids, or lists of them). Returns the status, the
/// body and the model asked for.
pub fn embeddings_answer(body: &[u8]) -> (u16, Bytes, Option<String>) {
    use sha2::Digest as _;
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return (
            400,
            error_body(
                "request body is not valid JSON",
                "invalid_request_error",
                None,
                "invalid_json",
            ),
            None,
        );
    };
    let model = request["model"].as_str().map(str::to_owned);
    let inputs: Vec<Value> = match &request["input"] {
        Value::Array(items)
            if !items.is_empty()
                && (items.iter().all(Value::is_string) || items.iter().all(Value::is_array)) =>
        {
            items.clone()
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            vec![request["input"].clone()]
        }
        Value::String(_) => vec![request["input"].clone()],
        _ => {
            return (
                400,
                error_body(
                    "input must be a string, strings, token ids or lists of token ids",
                    "invalid_request_error",
                    Some("input"),
                    "invalid_value",
                ),
                model,
            );
        }
    };
    let mut tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            tokens += match input {
                Value::String(text) => text.split_whitespace().count(),
                Value::Array(ids) => ids.len(),
                _ => 0,
            };
            let digest = sha2::Sha256::digest(input.to_string().as_bytes());
            let vector: Vec<f64> = digest[..8]
                .iter()
                .map(|byte| f64::from(*byte) / 255.0)
                .collect();
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model.clone().unwrap_or_default(),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    });
    (200, Bytes::from(body.to_string()), model)
}
