//! The gateway's one error type for requests, and its one mapping to an HTTP status and an
//! OpenAI error body. The mapping has no catch-all arm: a new variant must be classified on
//! purpose.

use http::StatusCode;
use serde::Serialize;

/// Why a request was not answered normally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    InvalidJson { message: String },
    #[error("{message}")]
    InvalidValue { param: String, message: String },
    #[error("{message}")]
    UnsupportedParameter { param: String, message: String },
    /// `param`: what is too long (`messages` for a prompt, `input` for embeddings).
    #[error("{message}")]
    ContextLengthExceeded {
        message: String,
        param: &'static str,
    },
    #[error("missing API key: send it as `Authorization: Bearer KEY` or in the `api-key` header")]
    MissingApiKey,
    #[error("incorrect API key provided")]
    InvalidApiKey,
    #[error("the model `{model}` does not exist or you do not have access to it")]
    ModelNotFound { model: String },
    #[error("unknown URL: {method} {path}")]
    UnknownUrl { method: String, path: String },
    /// A stored response was asked for (`/v1/responses/{id}`) and the store is off.
    #[error(
        "response `{id}` is not stored: this gateway keeps no responses ([responses] store is off; every answer says \"store\": false)"
    )]
    ResponseNotStored { id: String },
    /// No stored response of the caller has this id (unknown, deleted, expired, or another
    /// caller's: not told apart).
    #[error("no response with id `{id}` was found")]
    ResponseNotFound { id: String },
    /// `previous_response_id` names no stored response of the caller.
    #[error(
        "previous response with id `{id}` was not found (unknown, deleted or expired); send the whole conversation in `input`"
    )]
    PreviousResponseNotFound { id: String },
    /// `allow`: the methods the path takes, for the `Allow` header.
    #[error("method {method} is not allowed for {path}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allow: &'static str,
    },
    /// A browser page of an origin `[cors]` does not list.
    #[error("the origin `{origin}` may not call this gateway from a browser")]
    OriginNotAllowed { origin: String },
    /// More than one credential, or an `Authorization` and an `api-key` that disagree: which
    /// one to check would be a guess, so neither is.
    #[error(
        "more than one API key presented: send one `Authorization: Bearer KEY` or one `api-key` header"
    )]
    AmbiguousApiKey,
    #[error("request body is larger than the limit of {limit_bytes} bytes")]
    RequestTooLarge { limit_bytes: u64 },
    /// The request body did not arrive within the body read timeouts (408).
    #[error("the request body was not received in time")]
    BodyTimeout,
    /// Answered by the listener itself, before any request exists.
    #[error("request header is larger than the limit of {limit_bytes} bytes")]
    HeaderTooLarge { limit_bytes: u64 },
    /// A compressed request body: the scanners and the firewall read bodies as sent, so one
    /// they cannot read is refused rather than forwarded or misreported as bad JSON.
    #[error(
        "request bodies with `Content-Encoding: {encoding}` are not accepted; send the body uncompressed"
    )]
    UnsupportedContentEncoding { encoding: String },
    #[error("the local inference queue is full; retry after {retry_after_s} s")]
    QueueFull { retry_after_s: u64 },
    /// A caller used its tokens for the day (`crate::daily_usage`).
    #[error(
        "{caller} used its {budget} tokens for today (UTC); the budget starts again in {retry_after_s} s"
    )]
    QuotaExceeded {
        caller: String,
        budget: u64,
        retry_after_s: u64,
    },
    /// A caller's requests or tokens per minute are used up (`crate::rate_limit`).
    #[error(
        "rate limit reached for {caller} on {kind} per minute: limit {limit}; retry after {retry_after_s} s"
    )]
    RateLimited {
        caller: String,
        /// `requests` or `tokens`: the error's `type`, as OpenAI writes it.
        kind: &'static str,
        limit: u64,
        retry_after_s: u64,
    },
    #[error("{message}")]
    Unavailable { message: String, retry_after_s: u64 },
    #[error("{message}")]
    Timeout { message: String },
    /// A policy rule refused the request, or sensitive content could not stay local.
    #[error("{message}")]
    PolicyRejected { status: u16, message: String },
    /// The web application firewall blocked the request.
    #[error("the request was blocked by the web application firewall (rules {})", rule_list(.rule_ids))]
    WafBlocked { rule_ids: Vec<u32> },
    /// A cloud backend failed or answered something unusable.
    #[error("{message}")]
    BadGateway { message: String },
    /// A cloud backend answered 429 (`throttled`, answered 503 with `Retry-After`) or 5xx
    /// (answered 502). `detail`, the start of its body, is for the client alone: a backend's
    /// error text may quote the request (a traceback, a validation echo), so logs and audit
    /// records carry `message` only.
    #[error("{message}: {detail}")]
    BackendRefused {
        message: String,
        detail: String,
        throttled: bool,
        retry_after_s: u64,
    },
    /// The gateway could not authenticate to a cloud pool: no token could be had, or a
    /// backend refused the gateway's credentials (401, 403). `message`, in the gateway's
    /// words, goes to the client; `detail` (a token endpoint's answer, a tenant, a file)
    /// only to the log and the audit record.
    #[error("{message}")]
    UpstreamCredentials { message: String, detail: String },
    #[error("internal error: {message}")]
    Internal { message: String },
}

/// The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

const INVALID_REQUEST: &str = "invalid_request_error";

impl GatewayError {
    /// HTTP status, OpenAI error `type`, `code` and `param`.
    #[allow(clippy::too_many_lines, reason = "one arm per variant, on purpose")]
    fn classify(&self) -> (StatusCode, &'static str, Option<&'static str>, Option<&str>) {
        use GatewayError::*;
        match self {
            InvalidJson { .. } => (
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                Some("invalid_json"),
                None,
            ),
            InvalidValue { param, .. } => (
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                Some("invalid_value"),
                Some(param),
            ),
            UnsupportedParameter { param, .. } => (
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                Some("unsupported_parameter"),
                Some(param),
            ),
            ContextLengthExceeded { param, .. } => (
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                Some("context_length_exceeded"),
                Some(param),
            ),
            MissingApiKey | InvalidApiKey | AmbiguousApiKey => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
                None,
            ),
            ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                Some("model_not_found"),
                Some("model"),
            ),
            UnknownUrl { .. } => (
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                Some("unknown_url"),
                None,
            ),
            ResponseNotStored { .. } | ResponseNotFound { .. } => (
                StatusCode::NOT_FOUND,
                INVALID_REQUEST,
                Some("response_not_found"),
                None,
            ),
            PreviousResponseNotFound { .. } => (
                StatusCode::BAD_REQUEST,
                INVALID_REQUEST,
                Some("previous_response_not_found"),
                Some("previous_response_id"),
            ),
            MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                INVALID_REQUEST,
                Some("method_not_allowed"),
                None,
            ),
            RequestTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID_REQUEST,
                Some("request_too_large"),
                None,
            ),
            BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                INVALID_REQUEST,
                Some("request_timeout"),
                None,
            ),
            OriginNotAllowed { .. } => (
                StatusCode::FORBIDDEN,
                INVALID_REQUEST,
                Some("origin_not_allowed"),
                None,
            ),
            HeaderTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                INVALID_REQUEST,
                Some("request_header_too_large"),
                None,
            ),
            UnsupportedContentEncoding { .. } => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                INVALID_REQUEST,
                Some("unsupported_content_encoding"),
                None,
            ),
            QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
                None,
            ),
            QuotaExceeded { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
                None,
            ),
            RateLimited { kind, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                kind,
                Some("rate_limit_exceeded"),
                None,
            ),
            Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("unavailable"),
                None,
            ),
            Timeout { .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                "api_error",
                Some("timeout"),
                None,
            ),
            PolicyRejected { status, .. } => (
                StatusCode::from_u16(*status)
                    .ok()
                    .filter(|status| status.is_client_error() || status.is_server_error())
                    .unwrap_or(StatusCode::FORBIDDEN),
                "permission_error",
                Some("policy_rejected"),
                None,
            ),
            WafBlocked { .. } => (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("waf_blocked"),
                None,
            ),
            BackendRefused {
                throttled: true, ..
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                Some("unavailable"),
                None,
            ),
            BadGateway { .. } | BackendRefused { .. } | UpstreamCredentials { .. } => (
                StatusCode::BAD_GATEWAY,
                "api_error",
                Some("upstream_error"),
                None,
            ),
            Internal { .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                Some("internal_error"),
                None,
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.classify().0
    }

    /// Seconds a client should wait before retrying, for `Retry-After`.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            GatewayError::QueueFull { retry_after_s }
            | GatewayError::RateLimited { retry_after_s, .. }
            | GatewayError::QuotaExceeded { retry_after_s, .. }
            | GatewayError::Unavailable { retry_after_s, .. }
            | GatewayError::BackendRefused {
                retry_after_s,
                throttled: true,
                ..
            } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// The methods a path takes, for the `Allow` header of a 405.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            GatewayError::MethodNotAllowed { allow, .. } => Some(allow),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        let (_, kind, code, param) = self.classify();
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param: param.map(str::to_owned),
                code,
            },
        }
    }

    /// What the log and the audit record say of the error. The message goes to the client
    /// only where it may quote the client's body (a role, a part type, a tool or model name,
    /// a key, a parser's view of a value): the body's strings are the client's content, and
    /// audit records leave the appliance through the exporters. Those errors are recorded
    /// by code and parameter path, each name of the path the gateway does not know left
    /// out; every other error's message is the gateway's own words and configuration.
    pub fn record_description(&self) -> String {
        use GatewayError::*;
        match self {
            InvalidJson { .. }
            | InvalidValue { .. }
            | UnsupportedParameter { .. }
            | ModelNotFound { .. } => {
                let (status, _, code, param) = self.classify();
                let code = code.unwrap_or("invalid_request_error");
                match param {
                    Some(param) => format!(
                        "{} {code}: parameter `{}` (message to the client only)",
                        status.as_u16(),
                        recorded_param(param)
                    ),
                    None => format!("{} {code} (message to the client only)", status.as_u16()),
                }
            }
            BackendRefused { message, .. } => {
                format!("{message} (its body to the client only)")
            }
            UpstreamCredentials { message, detail } => format!("{message}: {detail}"),
            _ => self.to_string(),
        }
    }

    /// The body serialized as JSON.
    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).unwrap_or_else(|_| b"{}".to_vec())
    }

    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        GatewayError::InvalidValue {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        GatewayError::UnsupportedParameter {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The same error with its parameter and message in another API's names (a Responses
    /// API request's, where its chat translation was refused). Errors without a parameter
    /// are returned as they are.
    pub fn renamed(
        &self,
        param: impl Fn(&str) -> String,
        message: impl Fn(&str) -> String,
    ) -> GatewayError {
        match self {
            GatewayError::InvalidValue {
                param: name,
                message: text,
            } => GatewayError::InvalidValue {
                param: param(name),
                message: message(text),
            },
            GatewayError::UnsupportedParameter {
                param: name,
                message: text,
            } => GatewayError::UnsupportedParameter {
                param: param(name),
                message: message(text),
            },
            GatewayError::ContextLengthExceeded {
                message: text,
                param: name,
            } => {
                GatewayError::ContextLengthExceeded {
                    message: message(text),
                    // Always a whole request part here: `messages` is `input`.
                    param: if *name == "messages" { "input" } else { name },
                }
            }
            other => other.clone(),
        }
    }
}

/// Names a request parameter path may hold (OpenAI's chat, completions, embeddings and
/// Responses fields): any other name in a path came from the client's body.
const PARAMETER_NAMES: &[&str] = &[
    "arguments",
    "audio",
    "background",
    "best_of",
    "content",
    "conversation",
    "description",
    "dimensions",
    "echo",
    "effort",
    "encoding_format",
    "file",
    "format",
    "frequency_penalty",
    "function",
    "function_call",
    "functions",
    "ignore_eos",
    "image_url",
    "include",
    "include_usage",
    "input",
    "input_audio",
    "instructions",
    "json_schema",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_output_tokens",
    "max_tokens",
    "messages",
    "metadata",
    "modalities",
    "model",
    "n",
    "name",
    "parallel_tool_calls",
    "parameters",
    "prediction",
    "presence_penalty",
    "previous_response_id",
    "prompt",
    "reasoning",
    "refusal",
    "response_format",
    "role",
    "schema",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "strict",
    "suffix",
    "temperature",
    "text",
    "tool_call_id",
    "tool_calls",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "truncation",
    "type",
    "user",
];

/// `param` with every name outside [`PARAMETER_NAMES`] replaced by `…` (array positions
/// kept): `messages[0].content[1].type` stays, `logit_bias.4111` becomes `logit_bias.…`.
fn recorded_param(param: &str) -> String {
    param
        .split('.')
        .map(|segment| {
            let (name, positions) = segment.split_at(segment.find('[').unwrap_or(segment.len()));
            let positions_ok = positions.split_inclusive(']').all(|position| {
                position
                    .strip_prefix('[')
                    .and_then(|rest| rest.strip_suffix(']'))
                    .is_some_and(|digits| {
                        !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit())
                    })
            });
            match (PARAMETER_NAMES.contains(&name), positions_ok) {
                (true, true) => segment.to_owned(),
                (true, false) => format!("{name}…"),
                (false, _) => "…".to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn rule_list(rule_ids: &[u32]) -> String {
    rule_ids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests;

impl GatewayError {
    /// `what` did not finish on the blocking pool (see [`join_failure`]).
    pub fn unfinished(what: &str, error: &tokio::task::JoinError) -> GatewayError {
        GatewayError::Internal {
            message: format!("{what}: {}", join_failure(error)),
        }
    }
}

/// Why a task on the blocking pool did not finish, without its panic's message: one
/// formatted while running can quote the data the task worked on (a prompt, a stored
/// answer), and this text reaches clients, the log and audit records. The panic hook has
/// logged where it happened.
pub fn join_failure(error: &tokio::task::JoinError) -> &'static str {
    if error.is_panic() {
        "it panicked (the log says where)"
    } else {
        "it was cancelled"
    }
}
