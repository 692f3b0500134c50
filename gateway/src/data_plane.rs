//! The data plane: Pingora proxy phases serving the OpenAI API.
//!
//! `request_filter` owns every response (it always returns "answered"): it identifies the
//! request, authenticates the caller, reads the body under its limit, parses it, asks
//! `router_policies::decide` where it runs and carries the decision out. `logging` runs for
//! every request whatever happened and records metrics and one access-log line, which never
//! contains prompt or completion text.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_http::ResponseHeader;
use pingora_proxy::{ProxyHttp, Session};
use router_policies::{Decision, RejectReason};

use crate::auth::{Caller, authenticate};
use crate::cloud::Forwarded;
use crate::error::GatewayError;
use crate::local::{self, Answered};
use crate::openai::{self, Endpoint};
use crate::state::{AppState, InFlight, Routing};

/// Where a request runs, as the data plane carries it out.
enum Target {
    Local(String),
    Cloud {
        pool: String,
        model: String,
        /// Redact-then-cloud: the body to forward and the map to restore the answer with,
        /// when routing redacted it already.
        redact: Option<Option<Box<(Bytes, router_policies::redact::RedactionMap)>>>,
    },
}

/// What sticky assignment hashes: the API key's name, else the body's `user`, else the
/// client's address (behind trusted proxies, the address they forwarded for; never the
/// port, which changes with each connection).
fn sticky_key(ctx: &RequestContext, user: Option<&str>) -> String {
    match (&ctx.caller, user) {
        (Some(Caller::ApiKey { id }), _) => format!("key:{id}"),
        (_, Some(user)) => format!("user:{user}"),
        _ => ctx
            .client_ip
            .map_or_else(|| "unknown".to_owned(), |client| format!("addr:{client}")),
    }
}

/// The request's client (`crate::client_address`), from its socket and, where that is a
/// trusted proxy, the forwarding header the configuration names.
fn client_ip(session: &Session, server: &crate::config::ServerConfig) -> Option<std::net::IpAddr> {
    let peer = session.client_addr()?.as_inet()?.ip();
    Some(crate::client_address::client_address(
        peer,
        server.forwarded_header,
        session
            .req_header()
            .headers
            .get_all(server.forwarded_header.name())
            .iter()
            .map(http::HeaderValue::as_bytes),
        &server.trusted_proxies,
    ))
}

/// Longest `x-request-id` we adopt from a client.
const REQUEST_ID_BYTES_MAX: usize = 128;

/// What the phases of one request share.
#[derive(Debug)]
pub struct RequestContext {
    pub started: Instant,
    pub request_id: String,
    /// The audit records' `CorrelationId`: a GUID the gateway made, which pairs a request's
    /// intent and outcome records whatever `x-request-id` the client sent (the request id
    /// itself when the gateway made that).
    pub correlation_id: String,
    /// `local`, `cloud`, `rejected`; `none` until something decided.
    pub route: &'static str,
    pub target: Option<String>,
    pub rule: &'static str,
    pub rule_name: Option<String>,
    pub status: u16,
    pub caller: Option<Caller>,
    pub usage: edge_runtime::Usage,
    pub first_token: Option<Duration>,
    /// When the last generated token was handed to the client.
    pub last_token: Option<Duration>,
    /// With several choices (`n`), the tokens of the longest: the one that spans first to
    /// last token, which time per output token divides by (the usage sums them all).
    pub longest_choice_tokens: Option<u32>,
    pub finish_reason: Option<&'static str>,
    /// Why the response ended early, for the access log.
    pub outcome: Option<String>,
    /// The answer failed after its status went out (a stream broken off, generation failed
    /// mid-stream): its record says `Failed` whatever the status.
    pub cut_short: bool,
    /// Upstream attempts (cloud route).
    pub attempts: u32,
    /// Set when the answer comes from a fallback (`x-isthmus-degraded`).
    pub degraded: Option<&'static str>,
    /// The W3C trace context of the request: the client's trace when its `traceparent` is
    /// valid, else a new one, with the gateway's own span.
    pub trace: Option<crate::telemetry::TraceContext>,
    /// `trace` as a `traceparent` naming the gateway's span: passed to cloud backends and
    /// carried by audit records.
    pub traceparent: Option<String>,
    /// The audit log, when on; `sealed` once the outcome record is written.
    pub trail: Option<crate::audit_trail::Trail>,
    pub sealed: bool,
    /// Prompt and completion text for the record, only where `[audit.content]` covers the
    /// request (`audit_trail::capture_prompt`).
    pub content: Option<crate::audit::content::Captured>,
    /// Hash of the configuration that routed the request.
    pub policy_hash: String,
    /// The configuration the request is served with, taken once when it arrives: a reload
    /// meanwhile does not give it CORS, keys, policy or pools of another (nor an audit
    /// `PolicyHash` other than the one that routed it).
    pub routing: Option<Arc<Routing>>,
    /// Values replaced by placeholders (redact-then-cloud).
    pub redactions: usize,
    /// The cloud pool the request was forwarded to is marked `on_premises` (unredacted
    /// sensitive content may go there), whether or not one of its backends answered.
    pub on_premises: bool,
    /// Entity types the sensitivity scan found (never values).
    pub sensitive_entities: Vec<String>,
    /// Kinds of attached content the scan could not read (`crate::facts::attachments`).
    pub attachments: Vec<&'static str>,
    pub complexity: Option<f32>,
    /// The firewall's action, score and matched rule ids, when a rule matched.
    pub waf: Option<(&'static str, u32, Vec<u32>)>,
    /// A Responses API request: what the chat path writes is transcoded into that API's
    /// shapes on its way out.
    pub responses: Option<Box<crate::openai::responses::Transcoder>>,
    /// A limited caller's buckets, charged with the request's tokens once they are known.
    pub rate_limit: Option<RateCharge>,
    /// What the `x-ratelimit-*` headers say.
    pub rate_standing: Option<crate::rate_limit::Standing>,
    /// `Access-Control-Allow-Origin` for a browser origin `[cors]` allows.
    pub cors_origin: Option<http::HeaderValue>,
    /// The client: the socket's peer, or behind trusted proxies the address they forwarded
    /// for. Audit records and sticky assignment name it.
    pub client_ip: Option<std::net::IpAddr>,
    /// The body was asked for (and `100 Continue` sent where the client waits for it).
    pub body_requested: bool,
    /// The longest a body refused unread is read and dropped for, in all: the time a client
    /// has for a request header (`header_read_timeout_ms`).
    pub unread_body_timeout: Duration,
    _in_flight: Option<InFlight>,
}

/// What a request without a token limit is taken to hold of a daily budget for each answer
/// a cloud pool writes (a local model's answers are bounded by its context instead).
const RESERVED_ANSWER_TOKENS_DEFAULT: u64 = 4_096;

/// Holds what the request may use of its caller's daily token budget (its body's bytes / 4
/// for the prompts, a generous estimate, and each answer's limit times the answers, `n` for
/// each prompt) while it runs: refused with
/// `insufficient_quota` when the day's count and the requests already in flight hold the
/// whole budget, so that many requests at once cannot each cross it.
fn reserve_daily_budget(
    ctx: &mut RequestContext,
    body_bytes: usize,
    answer_tokens: u64,
    answers: u32,
) -> Result<(), GatewayError> {
    let Some(charge) = ctx.rate_limit.as_mut() else {
        return Ok(());
    };
    let (Some(budget), Some(daily)) = (charge.limits.tokens_per_day, &charge.daily) else {
        return Ok(());
    };
    let tokens = (body_bytes as u64 / 4)
        .max(1)
        .saturating_add(answer_tokens.saturating_mul(u64::from(answers.max(1))));
    let now = SystemTime::now();
    match daily.reserve(&charge.bucket, tokens, budget, now) {
        Ok(reservation) => {
            charge.reservation = Some(reservation);
            Ok(())
        }
        Err(_) => {
            let caller = format!("{} (with its requests in flight)", charge.caller);
            ctx.reject("quota");
            Err(GatewayError::QuotaExceeded {
                caller,
                budget,
                retry_after_s: crate::daily_usage::until_tomorrow(now).as_secs().max(1),
            })
        }
    }
}

/// Where a limited caller's tokens are charged.
#[derive(Debug)]
pub struct RateCharge {
    limiter: Arc<crate::rate_limit::RateLimiter>,
    daily: Option<Arc<crate::daily_usage::DailyUsage>>,
    bucket: String,
    limits: crate::config::RateLimits,
    /// What the request holds of a daily budget while it runs; given back after its tokens
    /// were counted (dropped with the charge).
    reservation: Option<crate::daily_usage::Reservation>,
    /// The caller as refusals name it.
    caller: String,
}

impl RequestContext {
    /// Charges the request's tokens to its caller's bucket, once: before the answer's last
    /// bytes where there are any, else when the request ends.
    pub fn charge_rate_limit(&mut self) {
        if let Some(charge) = self.rate_limit.take() {
            let tokens =
                u64::from(self.usage.prompt_tokens) + u64::from(self.usage.completion_tokens);
            charge.limiter.charge(
                &charge.bucket,
                charge.limits,
                tokens,
                std::time::Instant::now(),
            );
            if let (Some(_), Some(daily)) = (charge.limits.tokens_per_day, &charge.daily) {
                daily.add(&charge.bucket, tokens, SystemTime::now());
            }
        }
    }

    /// A complete successful answer in the request's API: a chat completion becomes a
    /// Response object for the Responses API.
    pub fn answer_body(&mut self, body: Vec<u8>) -> Vec<u8> {
        match self.responses.as_mut() {
            Some(transcoder) => transcoder.json(&body),
            None => body,
        }
    }

    /// Streamed answer bytes (whole server-sent events) in the request's API.
    pub fn stream_bytes(&mut self, bytes: Bytes) -> Bytes {
        match self.responses.as_mut() {
            Some(transcoder) => Bytes::from(transcoder.stream(&bytes)),
            None => bytes,
        }
    }

    /// The end of a stream that did not close with `[DONE]`: a Responses stream still gets
    /// its terminal event; a chat stream is passed on as the backend ended it.
    pub fn end_of_unclosed_stream(&mut self) -> Bytes {
        match self.responses.as_mut() {
            Some(transcoder) => Bytes::from(transcoder.end()),
            None => Bytes::new(),
        }
    }

    /// The rule that decided, as `x-isthmus-rule` reports it.
    pub fn rule(&self) -> &str {
        self.rule_name.as_deref().unwrap_or(self.rule)
    }

    /// The status the client got (or is getting): what was decided, else what was written.
    pub fn final_status(&self, session: &Session) -> u16 {
        if self.status == 0 {
            session
                .response_written()
                .map_or(0, |header| header.status.as_u16())
        } else {
            self.status
        }
    }

    /// `local`, `cloud` or `rejected` (a request refused before routing counts as rejected).
    pub fn route_label(&self) -> &'static str {
        match self.route {
            "none" => "rejected",
            route => route,
        }
    }

    /// Records that the request was refused before or by routing.
    pub fn reject(&mut self, check: &'static str) {
        self.route = "rejected";
        if self.rule_name.is_none() {
            self.rule = check;
        }
    }
}

/// A body up to this size is evaluated (firewall, scan, complexity) on the runtime's thread;
/// a larger one on a blocking thread (about a millisecond per 256 KiB).
const SCAN_ON_RUNTIME_BYTES_MAX: usize = 256 * 1024;

/// A request's routing view, owned, to evaluate it on another thread.
struct OwnedRequest {
    path: String,
    target: String,
    method: String,
    headers: Vec<(String, String)>,
    caller: Option<String>,
    model: Option<String>,
}

impl OwnedRequest {
    fn of(request: &crate::facts::RequestView<'_>) -> OwnedRequest {
        OwnedRequest {
            path: request.path.to_owned(),
            target: request.target.to_owned(),
            method: request.method.to_owned(),
            headers: request
                .headers
                .iter()
                .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                .collect(),
            caller: request.caller.map(str::to_owned),
            model: request.model.map(str::to_owned),
        }
    }

    fn view<'a>(
        &'a self,
        headers: &'a [(&'a str, &'a str)],
        body: &'a [u8],
    ) -> crate::facts::RequestView<'a> {
        crate::facts::RequestView {
            path: &self.path,
            target: &self.target,
            method: &self.method,
            headers,
            caller: self.caller.as_deref(),
            model: self.model.as_deref(),
            body,
        }
    }

    fn header_pairs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect()
    }
}

/// Runs `future` to its end, or to a panic inside it (`None`); the panic hook has printed
/// where by then. Pinned by the caller: a request's handling is too large to move.
pub(crate) async fn unless_it_panics<F: std::future::Future>(
    mut future: std::pin::Pin<&mut F>,
) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| future.as_mut().poll(cx)))
            .map_or(Poll::Ready(None), |poll| poll.map(Some))
    })
    .await
}

/// Whose a stored response is: the API key's id, or every anonymous caller's.
fn response_owner(ctx: &RequestContext) -> String {
    ctx.caller
        .as_ref()
        .map_or_else(|| Caller::Anonymous.owner(), Caller::owner)
}

/// The caller's API key id, when it authenticated with one.
fn api_key_id(ctx: &RequestContext) -> Option<&str> {
    match &ctx.caller {
        Some(Caller::ApiKey { id }) => Some(id.as_str()),
        _ => None,
    }
}

/// The data-plane service.
#[derive(Debug)]
pub struct DataPlane {
    state: Arc<AppState>,
}

impl DataPlane {
    pub fn new(state: Arc<AppState>) -> Self {
        DataPlane { state }
    }
}

/// The operations the data plane serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Chat {
        deployment: Option<String>,
    },
    Completions {
        deployment: Option<String>,
    },
    Embeddings {
        deployment: Option<String>,
    },
    /// The Responses API: a chat request in another dialect (`openai::responses`).
    Responses,
    /// A stored response: `GET` or `DELETE /v1/responses/{id}`, or its input items.
    StoredResponse {
        id: String,
        part: StoredPart,
    },
    Models,
    /// `GET /v1/models/{id}`: one model, by a name clients may ask for.
    Model {
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoredPart {
    Get,
    Delete,
    InputItems,
}

/// The rule stored-response operations are recorded under.
const STORED_RESPONSE_RULE: &str = "stored_response";

/// What an inference request asks for: a generation (chat or text completion) or
/// embeddings. Routing, the firewall, the audit and the cloud leg treat them alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Generate(Endpoint),
    Embeddings,
    /// The Responses API, translated into a chat request as the body is read; the answer is
    /// transcoded back (`RequestContext::responses`).
    Responses,
}

impl Api {
    fn cloud_action(self) -> crate::cloud::CloudAction {
        match self {
            Api::Generate(Endpoint::Chat) | Api::Responses => crate::cloud::CloudAction::Chat,
            Api::Generate(Endpoint::Completions) => crate::cloud::CloudAction::Completions,
            Api::Embeddings => crate::cloud::CloudAction::Embeddings,
        }
    }
}

/// Whether `target` (a data-plane path, with its query) is where inference requests go, and
/// whether it is the Responses API: what `explain` needs to read a body as serving would.
pub(crate) fn explain_target(target: &str) -> Result<bool, GatewayError> {
    let (path, query) = target
        .split_once('?')
        .map_or((target, None), |(path, query)| (path, Some(query)));
    Ok(matches!(
        route_path(&http::Method::POST, path, query)?,
        Operation::Responses
    ))
}

fn route_path(
    method: &http::Method,
    path: &str,
    query: Option<&str>,
) -> Result<Operation, GatewayError> {
    // Another method on a known path is refused naming the methods the path takes (an
    // `OPTIONS` preflight is answered from that where `[cors]` allows origins).
    let not_allowed = |allow: &'static str| {
        Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
            allow,
        })
    };
    let post = |operation: Operation| {
        if method == http::Method::POST {
            Ok(operation)
        } else {
            not_allowed("POST")
        }
    };
    // HEAD is GET without the content (RFC 9110): the same route, and `write_whole` sends
    // the header alone.
    let get = *method == http::Method::GET || *method == http::Method::HEAD;
    let path = path.trim_end_matches('/');
    // Azure OpenAI's v1 API (`{endpoint}/openai/v1/...`) names the model in the body, as
    // OpenAI's own does: the same operations.
    let path = match path.strip_prefix("/openai") {
        Some(rest) if rest.starts_with("/v1/") => rest,
        _ => path,
    };
    match path {
        "/v1/chat/completions" => post(Operation::Chat { deployment: None }),
        "/v1/completions" => post(Operation::Completions { deployment: None }),
        "/v1/embeddings" => post(Operation::Embeddings { deployment: None }),
        // Azure OpenAI's preview form of the Responses API (`?api-version=`) too.
        "/v1/responses" | "/openai/responses" => post(Operation::Responses),
        stored if stored.starts_with("/v1/responses/") => {
            let rest = &stored["/v1/responses/".len()..];
            let (id, part) = match rest.split_once('/') {
                None if get => (rest, StoredPart::Get),
                None if *method == http::Method::DELETE => (rest, StoredPart::Delete),
                None => return not_allowed("GET, HEAD, DELETE"),
                Some((id, "input_items")) if get => (id, StoredPart::InputItems),
                Some((_, "input_items")) => return not_allowed("GET, HEAD"),
                Some(_) => {
                    return Err(GatewayError::UnknownUrl {
                        method: method.to_string(),
                        path: path.to_owned(),
                    });
                }
            };
            Ok(Operation::StoredResponse {
                id: id.to_owned(),
                part,
            })
        }
        "/v1/models" if get => Ok(Operation::Models),
        "/v1/models" => not_allowed("GET, HEAD"),
        // Pool models may be named `org/model`, and clients percent-encode the `/` or not.
        model if model.starts_with("/v1/models/") => {
            let id = crate::admin::percent_decode(&model["/v1/models/".len()..])
                .filter(|id| !id.is_empty());
            match id {
                Some(id) if get => Ok(Operation::Model { id }),
                Some(_) => not_allowed("GET, HEAD"),
                None => Err(GatewayError::UnknownUrl {
                    method: method.to_string(),
                    path: path.to_owned(),
                }),
            }
        }
        azure if azure.starts_with("/openai/deployments/") => {
            let rest = &azure["/openai/deployments/".len()..];
            let (deployment, action) = rest.split_once('/').unwrap_or((rest, ""));
            let has_api_version = query.unwrap_or("").split('&').any(|pair| {
                pair.split_once('=')
                    .is_some_and(|(key, value)| key == "api-version" && !value.is_empty())
            });
            let operation = match action {
                "chat/completions" => Operation::Chat {
                    deployment: Some(deployment.to_owned()),
                },
                "completions" => Operation::Completions {
                    deployment: Some(deployment.to_owned()),
                },
                "embeddings" => Operation::Embeddings {
                    deployment: Some(deployment.to_owned()),
                },
                _ => {
                    return Err(GatewayError::UnknownUrl {
                        method: method.to_string(),
                        path: path.to_owned(),
                    });
                }
            };
            if deployment.is_empty() {
                return Err(GatewayError::UnknownUrl {
                    method: method.to_string(),
                    path: path.to_owned(),
                });
            }
            if !has_api_version {
                return Err(GatewayError::invalid_value(
                    "api-version",
                    "the api-version query parameter is required (e.g. ?api-version=2024-10-21)",
                ));
            }
            post(operation)
        }
        _ => Err(GatewayError::UnknownUrl {
            method: method.to_string(),
            path: path.to_owned(),
        }),
    }
}

/// Whether an HTTP/1.1 request waits for `100 Continue` before sending its body.
fn expects_continue(header: &pingora_http::RequestHeader) -> bool {
    header.version == http::Version::HTTP_11
        && header
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A `Content-Encoding` other than `identity` on a request, as the client named it (cut to
/// 64 printable characters). Bodies are scanned, filtered and forwarded as sent, so a
/// compressed one is refused instead of being read as bad JSON.
fn content_encoding(header: &pingora_http::RequestHeader) -> Option<String> {
    let mut named = header
        .headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"));
    let coding = named.next()?;
    Some(
        coding
            .iter()
            .take(64)
            .map(|&byte| {
                if byte.is_ascii_graphic() {
                    char::from(byte)
                } else {
                    '?'
                }
            })
            .collect(),
    )
}

/// The client's `x-request-id` when it is a sane token.
fn client_request_id(session: &Session) -> Option<String> {
    session
        .req_header()
        .headers
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|value| {
            !value.is_empty()
                && value.len() <= REQUEST_ID_BYTES_MAX
                && value
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"._:-".contains(&byte))
        })
        .map(str::to_owned)
}

/// The id of a response that is kept: random, never derived from the client's request id.
fn new_response_id() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    format!("resp_{}", hex::encode(bytes))
}

/// A random (version 4) UUID from the thread's generator, which is seeded once, instead of
/// a system call per request.
fn new_request_id() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// A response header carrying the headers every response has.
/// The head of a streamed answer (server-sent events). On HTTP/1.1 the body is chunked: the
/// connection can serve the client's next request after it, and a stream cut short (no
/// final chunk) can be told from a complete one. HTTP/2 frames it itself.
pub fn stream_header(
    session: &Session,
    ctx: &RequestContext,
) -> pingora_error::Result<ResponseHeader> {
    let mut header = response_header(ctx, 200, "text/event-stream")?;
    header.insert_header("cache-control", "no-cache")?;
    if session.req_header().version == http::Version::HTTP_11 {
        header.insert_header("transfer-encoding", "chunked")?;
    }
    Ok(header)
}

pub fn response_header(
    ctx: &RequestContext,
    status: u16,
    content_type: &str,
) -> pingora_error::Result<ResponseHeader> {
    let mut header = ResponseHeader::build(status, Some(8))?;
    header.insert_header("content-type", content_type)?;
    header.insert_header("x-request-id", ctx.request_id.as_str())?;
    header.insert_header("x-isthmus-route", ctx.route_label())?;
    if let Some(target) = &ctx.target {
        header.insert_header("x-isthmus-target", target.as_str())?;
    }
    header.insert_header("x-isthmus-rule", ctx.rule())?;
    if let Some(degraded) = ctx.degraded {
        header.insert_header("x-isthmus-degraded", degraded)?;
    }
    if let Some(origin) = &ctx.cors_origin {
        if origin != "*" {
            header.insert_header("vary", "Origin")?;
        }
        header.insert_header("access-control-allow-origin", origin.clone())?;
        header.insert_header("access-control-expose-headers", CORS_EXPOSED_HEADERS)?;
    }
    if let Some(standing) = &ctx.rate_standing {
        for (kind, bucket) in [("requests", standing.requests), ("tokens", standing.tokens)] {
            let Some(bucket) = bucket else {
                continue;
            };
            header.insert_header(
                format!("x-ratelimit-limit-{kind}"),
                bucket.limit.to_string(),
            )?;
            header.insert_header(
                format!("x-ratelimit-remaining-{kind}"),
                bucket.remaining.to_string(),
            )?;
            header.insert_header(
                format!("x-ratelimit-reset-{kind}"),
                crate::rate_limit::reset_text(bucket.reset),
            )?;
        }
    }
    Ok(header)
}

/// What a browser page may read of an answer beyond the CORS-safelisted headers.
const CORS_EXPOSED_HEADERS: &str = "x-request-id, x-isthmus-route, x-isthmus-target, \
     x-isthmus-rule, x-isthmus-degraded, retry-after, x-ratelimit-limit-requests, \
     x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, \
     x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";

/// Request headers a preflight may ask for: what OpenAI clients send (the SDKs'
/// `x-stainless-*` and `openai-*` among them), the canary header and trace context.
fn cors_request_header_allowed(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "api-key"
            | "content-type"
            | "x-request-id"
            | "x-isthmus-canary"
            | "x-data-classification"
            | "traceparent"
            | "tracestate"
            | "user-agent"
    ) || name.starts_with("openai-")
        || name.starts_with("x-stainless-")
        || name.starts_with("x-ms-")
}

/// Writes a complete JSON response.
pub async fn respond_json(
    session: &mut Session,
    ctx: &mut RequestContext,
    status: u16,
    body: Vec<u8>,
    retry_after_s: Option<u64>,
) -> pingora_error::Result<()> {
    let header = json_header(ctx, status, body.len(), retry_after_s)?;
    write_whole(session, ctx, header, Bytes::from(body)).await
}

fn json_header(
    ctx: &mut RequestContext,
    status: u16,
    body_bytes: usize,
    retry_after_s: Option<u64>,
) -> pingora_error::Result<ResponseHeader> {
    let mut header = response_header(ctx, status, "application/json")?;
    header.insert_header("content-length", body_bytes.to_string())?;
    if let Some(seconds) = retry_after_s {
        header.insert_header("retry-after", seconds.to_string())?;
    }
    ctx.status = status;
    Ok(header)
}

/// The slowest a client may read a whole answer before its write times out (beyond
/// `server.limits.response_write_timeout_ms`, which any write gets), or send a whole body
/// (beyond `body_read_timeout_ms`).
const TRANSFER_BYTES_PER_SECOND_MIN: u64 = 64 * 1024;

/// Writes a header and a complete body in one go (one write to the socket on HTTP/1.1). The
/// answer to a HEAD request is the header alone, with the length the body would have: HTTP/2
/// forbids content on it, and HTTP/1.1 would misframe the next response. So is an empty body
/// (a 204).
pub async fn write_whole(
    session: &mut Session,
    ctx: &mut RequestContext,
    header: ResponseHeader,
    body: Bytes,
) -> pingora_error::Result<()> {
    use pingora_core::protocols::http::HttpTask;
    crate::audit_trail::seal(session, ctx)
        .await
        .map_err(|failure| Error::explain(ErrorType::WriteError, format!("{failure:?}")))?;
    // On HTTP/1.1 Pingora times the whole body's write as one: a large answer (embeddings,
    // a long JSON body) to a client that reads slowly but steadily gets time in proportion.
    if let Some(pause) = session.get_write_timeout() {
        let bytes = u64::try_from(body.len()).unwrap_or(u64::MAX);
        session.set_write_timeout(Some(
            pause + Duration::from_secs(bytes / TRANSFER_BYTES_PER_SECOND_MIN),
        ));
    }
    let tasks = if session.req_header().method == http::Method::HEAD || body.is_empty() {
        vec![HttpTask::Header(Box::new(header), true)]
    } else {
        vec![
            HttpTask::Header(Box::new(header), false),
            HttpTask::Body(Some(body), true),
        ]
    };
    session.write_response_tasks(tasks).await.map(|_| ())
}

/// Writes an OpenAI error response.
pub async fn respond_error(
    session: &mut Session,
    ctx: &mut RequestContext,
    error: &GatewayError,
) -> pingora_error::Result<()> {
    // A Responses API request is answered in its own names, not its chat translation's.
    let renamed = ctx
        .responses
        .as_ref()
        .map(|transcoder| transcoder.error_in_request_terms(error));
    let error = renamed.as_ref().unwrap_or(error);
    if !ctx.body_requested {
        drain_unread_body(session, ctx.unread_body_timeout).await;
    }
    ctx.outcome = Some(error.record_description());
    let body = error.body_json();
    let mut header = json_header(
        ctx,
        error.status().as_u16(),
        body.len(),
        error.retry_after_s(),
    )?;
    if let Some(allow) = error.allow() {
        header.insert_header("allow", allow)?;
    }
    write_whole(session, ctx, header, Bytes::from(body)).await
}

/// What an anonymous client's own limits are kept by: its IPv4 address, or the leading
/// `ipv6_prefix_length` bits of its IPv6 address (a /64 by default: one host is given a whole
/// /64 and could send each request from another address of it).
fn client_network(address: std::net::IpAddr, ipv6_prefix_length: u8) -> String {
    match address.to_canonical() {
        std::net::IpAddr::V4(address) => address.to_string(),
        std::net::IpAddr::V6(address) => {
            let length = u32::from(ipv6_prefix_length.min(128));
            let mask = u128::MAX.checked_shl(128 - length).unwrap_or(0);
            let network = std::net::Ipv6Addr::from(u128::from(address) & mask);
            format!("{network}/{length}")
        }
    }
}

/// The most bytes of a request body refused unread that are read and dropped so that the
/// connection can serve the next request; a longer body ends the connection.
const UNREAD_BODY_DRAIN_BYTES_MAX: u64 = 1 << 20;

/// The most memory a request body's declared length reserves before its bytes arrive.
const BODY_PREALLOCATION_BYTES_MAX: u64 = 1 << 20;

/// Reads and drops the body of a request answered before its body was asked for (refused by
/// authentication, admission or routing), so that the body's bytes are not read as the next
/// request on the connection and the client, still sending, sees the answer instead of a
/// reset. Where that cannot be done the connection ends with the answer: a client waiting
/// for `100 Continue` sends its body late or not at all, so what it sends next cannot be told
/// apart from that body; a body longer than [`UNREAD_BODY_DRAIN_BYTES_MAX`], one still
/// arriving after `timeout` or one that cannot be read is not worth waiting for.
async fn drain_unread_body(session: &mut Session, timeout: Duration) {
    let header = session.req_header();
    if header.version != http::Version::HTTP_11 && header.version != http::Version::HTTP_10 {
        return;
    }
    let declared = header
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let chunked = header.headers.contains_key(http::header::TRANSFER_ENCODING);
    if !chunked && declared.unwrap_or(0) == 0 {
        return;
    }
    if expects_continue(header)
        || declared.is_some_and(|length| length > UNREAD_BODY_DRAIN_BYTES_MAX)
    {
        session.set_keepalive(None);
        return;
    }
    let drain = async {
        let mut drained = 0u64;
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    drained += chunk.len() as u64;
                    if drained > UNREAD_BODY_DRAIN_BYTES_MAX {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    // Each read has its own timeout, but a body trickled in a byte per read would hold the
    // connection for as long as the client liked, with no key needed.
    let drained = tokio::time::timeout(timeout, drain).await;
    if !matches!(drained, Ok(true)) {
        session.set_keepalive(None);
    }
}

impl DataPlane {
    async fn handle(&self, session: &mut Session, ctx: &mut RequestContext) -> Result<(), Failure> {
        let routing = ctx.routing.clone().unwrap_or_else(|| self.state.routing());
        let cors = &routing.config.cors;
        let header = session.req_header();
        // RFC 9112 3.2: two Host headers are ambiguous (which one did a proxy in front check?)
        // and an HTTP/1.1 request without one is malformed.
        let hosts = header.headers.get_all(http::header::HOST).iter().count();
        if hosts > 1 || (hosts == 0 && header.version == http::Version::HTTP_11) {
            ctx.reject("request");
            return Err(GatewayError::invalid_value(
                "host",
                "an HTTP/1.1 request needs exactly one Host header",
            )
            .into());
        }
        // A browser page's origin, where `[cors]` allows it: every answer, errors included,
        // then says so. Another origin is refused before anything runs.
        let origin = header
            .headers
            .get(http::header::ORIGIN)
            .filter(|_| cors.enabled())
            .cloned();
        if let Some(origin) = &origin {
            if !origin.to_str().is_ok_and(|text| cors.allows(text)) {
                ctx.reject("cors");
                return Err(GatewayError::OriginNotAllowed {
                    origin: String::from_utf8_lossy(origin.as_bytes()).into_owned(),
                }
                .into());
            }
            ctx.cors_origin = Some(if cors.any_origin {
                http::HeaderValue::from_static("*")
            } else {
                origin.clone()
            });
        }
        let operation = match route_path(&header.method, header.uri.path(), header.uri.query()) {
            Err(GatewayError::MethodNotAllowed { allow, .. })
                if header.method == http::Method::OPTIONS =>
            {
                return self.preflight(session, ctx, allow, origin.is_some()).await;
            }
            routed => routed?,
        };
        if !self.state.ready() {
            return Err(GatewayError::Unavailable {
                message: "the gateway is starting: models are still loading".to_owned(),
                retry_after_s: 1,
            }
            .into());
        }
        let caller = authenticate(&session.req_header().headers, &routing.config.auth)
            .inspect_err(|_| ctx.reject("auth"))?;
        ctx.caller = Some(caller);
        self.admit(ctx, &routing)?;
        match operation {
            Operation::Models => {
                self.check_bodiless(session, ctx, &routing)?;
                ctx.route = "local";
                ctx.rule = "default";
                let models = self.served_models(&routing, false);
                let body = serde_json::to_vec(&openai::models_list(&models)).unwrap_or_default();
                respond_json(session, ctx, 200, body, None).await?;
                Ok(())
            }
            Operation::Model { id } => {
                self.check_bodiless(session, ctx, &routing)?;
                ctx.route = "local";
                ctx.rule = "default";
                let Some((id, created)) = self
                    .served_models(&routing, true)
                    .into_iter()
                    .find(|(name, _)| *name == id)
                else {
                    ctx.route = "rejected";
                    return Err(GatewayError::ModelNotFound { model: id }.into());
                };
                let body =
                    serde_json::to_vec(&openai::model_object(&id, created)).unwrap_or_default();
                respond_json(session, ctx, 200, body, None).await?;
                Ok(())
            }
            Operation::Chat { deployment } => {
                self.generate(
                    session,
                    ctx,
                    &routing,
                    Api::Generate(Endpoint::Chat),
                    deployment,
                )
                .await
            }
            Operation::Completions { deployment } => {
                self.generate(
                    session,
                    ctx,
                    &routing,
                    Api::Generate(Endpoint::Completions),
                    deployment,
                )
                .await
            }
            Operation::Embeddings { deployment } => {
                self.generate(session, ctx, &routing, Api::Embeddings, deployment)
                    .await
            }
            Operation::Responses => {
                self.generate(session, ctx, &routing, Api::Responses, None)
                    .await
            }
            Operation::StoredResponse { id, part } => {
                self.stored_response(session, ctx, &routing, id, part).await
            }
        }
    }

    /// The models clients may name, with when each was loaded (0 for pool models): the local
    /// models (and their aliases, when asked) and the models of the cloud pools.
    fn served_models(&self, routing: &Routing, with_aliases: bool) -> Vec<(String, u64)> {
        let mut models: Vec<(String, u64)> = Vec::new();
        if let Some(engine) = self.state.engine.get() {
            for model in engine.models() {
                let info = model.info();
                models.push((info.name.clone(), info.created_unix_s));
                if with_aliases
                    && let Some(config) = routing
                        .config
                        .models
                        .iter()
                        .find(|config| config.name == info.name)
                {
                    for alias in &config.aliases {
                        models.push((alias.clone(), info.created_unix_s));
                    }
                }
            }
        }
        for pool in &routing.config.upstreams {
            for name in pool.models.keys() {
                if !models.iter().any(|(known, _)| known == name) {
                    models.push((name.clone(), 0));
                }
            }
        }
        models
    }

    /// Takes the request from its caller's rate limits, or refuses it with 429.
    fn admit(&self, ctx: &mut RequestContext, routing: &Routing) -> Result<(), GatewayError> {
        let limits = routing.config.auth.limits_of(api_key_id(ctx));
        if !limits.is_limited() {
            return Ok(());
        }
        // Anonymous clients share one bucket, or with `per_client` have one each by address
        // (behind trusted proxies, the address they forwarded for; IPv6 by /64).
        let per_client = (api_key_id(ctx).is_none()
            && routing.config.auth.anonymous_limits_per_client)
            .then_some(ctx.client_ip)
            .flatten()
            .map(|address| {
                client_network(address, routing.config.auth.anonymous_ipv6_prefix_length)
            });
        let bucket = match &per_client {
            Some(address) => format!("{}@{address}", response_owner(ctx)),
            None => response_owner(ctx),
        };
        let caller = || match (api_key_id(ctx), &per_client) {
            (Some(id), _) => format!("API key `{id}`"),
            (None, Some(address)) => format!("anonymous client {address}"),
            (None, None) => "anonymous callers".to_owned(),
        };
        if let (Some(budget), Some(daily)) = (limits.tokens_per_day, &self.state.daily_usage) {
            let now = SystemTime::now();
            if daily.used(&bucket, now) >= budget {
                let refused = GatewayError::QuotaExceeded {
                    caller: caller(),
                    budget,
                    retry_after_s: crate::daily_usage::until_tomorrow(now).as_secs().max(1),
                };
                ctx.reject("quota");
                self.state.metrics.record_rate_limited("tokens_per_day");
                return Err(refused);
            }
        }
        match self
            .state
            .rate_limiter
            .admit(&bucket, limits, std::time::Instant::now())
        {
            Ok(standing) => {
                let caller = caller();
                ctx.rate_standing = Some(standing);
                ctx.rate_limit = Some(RateCharge {
                    limiter: Arc::clone(&self.state.rate_limiter),
                    daily: self.state.daily_usage.clone(),
                    bucket,
                    limits,
                    reservation: None,
                    caller,
                });
                Ok(())
            }
            Err(refusal) => {
                let refused = GatewayError::RateLimited {
                    caller: caller(),
                    kind: refusal.kind,
                    limit: refusal.limit,
                    retry_after_s: refusal.retry_after.as_millis().div_ceil(1_000).max(1) as u64,
                };
                ctx.reject("rate_limit");
                // The refusal carries the headers too, as OpenAI's do.
                ctx.rate_standing = Some(self.state.rate_limiter.standing(
                    &bucket,
                    limits,
                    std::time::Instant::now(),
                ));
                self.state.metrics.record_rate_limited(refusal.kind);
                Err(refused)
            }
        }
    }

    /// The firewall's verdict on a request without a body: its target and headers are what
    /// it reads.
    fn check_bodiless(
        &self,
        session: &Session,
        ctx: &mut RequestContext,
        routing: &Routing,
    ) -> Result<(), GatewayError> {
        let header = session.req_header();
        let header_texts = crate::facts::header_texts(&header.headers);
        let headers = crate::facts::header_pairs(&header_texts);
        let request = crate::facts::RequestView {
            path: header.uri.path(),
            target: crate::facts::request_target(&header.uri),
            method: header.method.as_str(),
            headers: &headers,
            caller: api_key_id(ctx),
            model: None,
            body: &[],
        };
        let verdict =
            crate::facts::firewall(routing, &request, &crate::facts::PromptTexts::default());
        self.apply_waf(session, ctx, &verdict)
    }

    /// Translates a Responses request into the chat body to run. The stored response it
    /// continues (`previous_response_id`, the caller's own) is looked up first; when the
    /// answer is to be kept, the transcoder gets a random id and a keeper over the store.
    async fn translate_responses(
        &self,
        ctx: &mut RequestContext,
        body: &[u8],
    ) -> Result<Bytes, GatewayError> {
        let store = self.state.responses.clone();
        let owner = response_owner(ctx);
        let previous = match (openai::responses::previous_response_id(body)?, &store) {
            (Some(id), Some(store)) => {
                let store = Arc::clone(store);
                let reader = owner.clone();
                let looked_up = tokio::task::spawn_blocking(move || {
                    store.get(&id, &reader).map(|found| (id, found))
                })
                .await
                .map_err(|error| GatewayError::unfinished("the response store", &error))?
                .map_err(|error| GatewayError::Internal {
                    message: error.to_string(),
                })?;
                match looked_up {
                    (id, Some(stored)) => Some((id, stored)),
                    (id, None) => return Err(GatewayError::PreviousResponseNotFound { id }),
                }
            }
            // With the store off, the translation refuses `previous_response_id`.
            _ => None,
        };
        let translated = openai::responses::to_chat(
            body,
            &ctx.request_id,
            unix_now_s(),
            previous
                .as_ref()
                .map(|(id, stored)| openai::responses::Previous {
                    id,
                    input_items: &stored.input_items,
                    output: stored.output(),
                }),
        )?;
        let mut transcoder = translated.transcoder;
        if let (true, Some(store)) = (translated.store, store) {
            let id = new_response_id();
            let key = id.clone();
            let request_id = ctx.request_id.clone();
            let input_items = translated.input_items;
            transcoder.keep_as(
                id,
                Box::new(move |response: &serde_json::Value| {
                    let record = crate::response_store::StoredResponse::new(
                        &owner,
                        &request_id,
                        input_items,
                        response.clone(),
                    );
                    match store.put(&key, &record) {
                        Ok(()) => true,
                        Err(error) => {
                            tracing::warn!(%request_id, %error, "response not kept");
                            false
                        }
                    }
                }),
            );
        }
        ctx.responses = Some(Box::new(transcoder));
        Ok(Bytes::from(translated.chat_body))
    }

    /// Reads or deletes a stored response of the caller, or lists its input items.
    async fn stored_response(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        routing: &Routing,
        id: String,
        part: StoredPart,
    ) -> Result<(), Failure> {
        self.check_bodiless(session, ctx, routing)?;
        let query = session.req_header().uri.query().map(str::to_owned);
        ctx.route = "local";
        ctx.rule = STORED_RESPONSE_RULE;
        let Some(store) = self.state.responses.clone() else {
            return Err(GatewayError::ResponseNotStored { id }.into());
        };
        let page = match part {
            StoredPart::InputItems => Some(
                crate::openai::responses::ItemsPage::parse(query.as_deref())
                    .inspect_err(|_| ctx.reject("request"))?,
            ),
            _ => None,
        };
        let owner = response_owner(ctx);
        let looked_up = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, GatewayError> {
            let unavailable = |error: crate::response_store::StoreError| GatewayError::Internal {
                message: error.to_string(),
            };
            let not_found = || GatewayError::ResponseNotFound { id: id.clone() };
            match part {
                StoredPart::Delete => {
                    if !store.delete(&id, &owner).map_err(unavailable)? {
                        return Err(not_found());
                    }
                    Ok(serde_json::to_vec(&serde_json::json!({
                        "id": id, "object": "response.deleted", "deleted": true,
                    }))
                    .unwrap_or_default())
                }
                StoredPart::Get | StoredPart::InputItems => {
                    let stored = store.get(&id, &owner).map_err(unavailable)?;
                    let stored = stored.ok_or_else(not_found)?;
                    Ok(match page {
                        Some(page) => serde_json::to_vec(&page.list(&stored.input_items)),
                        None => serde_json::to_vec(&stored.response),
                    }
                    .unwrap_or_default())
                }
            }
        })
        .await
        .map_err(|error| GatewayError::unfinished("the response store", &error))?;
        let body = looked_up?;
        respond_json(session, ctx, 200, body, None).await?;
        Ok(())
    }

    /// A browser's preflight from an allowed origin (`cors_origin` set): the methods and
    /// request headers the path takes, for `max_age_s`. Without `[cors]` origins, or without
    /// the preflight's headers, `OPTIONS` is a method the path does not take.
    async fn preflight(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        allow: &'static str,
        from_allowed_origin: bool,
    ) -> Result<(), Failure> {
        let header = session.req_header();
        let not_allowed = || {
            Failure::from(GatewayError::MethodNotAllowed {
                method: header.method.to_string(),
                path: header.uri.path().to_owned(),
                allow,
            })
        };
        let method = header
            .headers
            .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|value| value.to_str().ok());
        let Some(method) = method.filter(|_| from_allowed_origin) else {
            ctx.reject("request");
            return Err(not_allowed());
        };
        if !allow.split(", ").any(|allowed| allowed == method) {
            ctx.reject("cors");
            return Err(not_allowed());
        }
        let mut headers = Vec::new();
        for name in header
            .headers
            .get_all(http::header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .flat_map(|value| value.to_str().unwrap_or("\u{0}").split(','))
        {
            let name = name.trim().to_ascii_lowercase();
            if name.is_empty() {
                continue;
            }
            if !cors_request_header_allowed(&name) {
                ctx.reject("cors");
                return Err(GatewayError::invalid_value(
                    "access-control-request-headers",
                    format!("a browser may not send the header `{name}` to this gateway"),
                )
                .into());
            }
            headers.push(name);
        }
        let max_age_s = ctx.routing.as_ref().map_or_else(
            || self.state.routing().config.cors.max_age_s,
            |routing| routing.config.cors.max_age_s,
        );
        ctx.route = "preflight";
        ctx.rule = "cors";
        ctx.status = 204;
        let mut answer = response_header(ctx, 204, "text/plain")?;
        answer.remove_header("content-type");
        answer.remove_header("access-control-expose-headers");
        answer.insert_header("access-control-allow-methods", allow)?;
        if !headers.is_empty() {
            answer.insert_header("access-control-allow-headers", headers.join(", "))?;
        }
        answer.insert_header("access-control-max-age", max_age_s.to_string())?;
        if ctx.cors_origin.as_ref().is_some_and(|origin| origin != "*") {
            answer.remove_header("vary");
            answer.insert_header(
                "vary",
                "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            )?;
        }
        write_whole(session, ctx, answer, Bytes::new()).await?;
        Ok(())
    }

    /// A chat or text completion, or embeddings: read the body, decide where it runs, run
    /// it there.
    async fn generate(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        routing: &Arc<Routing>,
        api: Api,
        deployment: Option<String>,
    ) -> Result<(), Failure> {
        let body = self.read_body(session, ctx).await?;
        let (api, body) = match api {
            Api::Responses => {
                let body = self
                    .translate_responses(ctx, &body)
                    .await
                    .inspect_err(|_| ctx.reject("request"))?;
                (Api::Generate(Endpoint::Chat), body)
            }
            api => (api, body),
        };
        let envelope = openai::parse_envelope(&body).inspect_err(|_| ctx.reject("request"))?;
        let model = deployment.or_else(|| envelope.model.clone());
        let target = self
            .route(session, ctx, routing, model.as_deref(), &body)
            .await;
        // Neither what the scan found nor what it cannot read (an image of a passport) is
        // kept at rest unless the operator said so.
        if (!ctx.sensitive_entities.is_empty() || !ctx.attachments.is_empty())
            && !self.state.config.responses.keep_sensitive
            && let Some(responses) = ctx.responses.as_mut()
        {
            responses.keep_nothing();
        }
        crate::audit_trail::capture_prompt(ctx, &body, false);
        match target? {
            Target::Local(model) => self.serve_local(session, ctx, api, &model, &body).await,
            Target::Cloud {
                pool,
                model,
                redact,
            } => {
                let Some(pool) = routing.pools.get(&pool) else {
                    return Err(GatewayError::Internal {
                        message: format!("routed to pool `{pool}`, which is not configured"),
                    }
                    .into());
                };
                let headers = &session.req_header().headers;
                let header_text = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|value| value.to_str().ok())
                        .map(str::to_owned)
                };
                let variant = header_text(crate::cloud::CANARY_HEADER);
                let traceparent = ctx.traceparent.clone();
                let sticky_key = pool
                    .config
                    .sticky
                    .then(|| sticky_key(ctx, envelope.user.as_deref()));
                // Redact-then-cloud: the values stay here; placeholders go.
                let redacted = match redact {
                    Some(Some(redacted)) => Some(*redacted),
                    Some(None) => Some(crate::redaction::redact_body(&body, &routing.sensitivity)?),
                    None => None,
                };
                let forwarded_body = redacted.as_ref().map_or(&body, |(body, _)| body);
                ctx.redactions = redacted.as_ref().map_or(0, |(_, map)| map.len());
                if redacted.is_some() {
                    crate::audit_trail::capture_prompt(ctx, forwarded_body, true);
                }
                let request = crate::cloud::CloudRequest {
                    action: api.cloud_action(),
                    body: forwarded_body,
                    restore: redacted.as_ref().map(|(_, map)| map),
                    model: &model,
                    stream: envelope.stream,
                    client_wants_usage: envelope.include_usage,
                    variant: variant.as_deref(),
                    sticky_key: sticky_key.as_deref(),
                    traceparent: traceparent.as_deref(),
                };
                let forwarded = crate::cloud::forward(session, ctx, pool, &request).await?;
                match forwarded {
                    Forwarded::Answered => Ok(()),
                    Forwarded::ClientGone(reason) => Err(Failure::ClientGone(reason)),
                    Forwarded::Unavailable(error) => {
                        let fallback = pool.config.fallback_to_local.then(|| {
                            routing.config.routing.default_model.clone().or_else(|| {
                                self.state
                                    .config
                                    .models
                                    .first()
                                    .map(|model| model.name.clone())
                            })
                        });
                        match fallback.flatten() {
                            Some(local) => {
                                tracing::warn!(
                                    request_id = %ctx.request_id,
                                    pool = %pool.config.name,
                                    error = %error.record_description(),
                                    "cloud pool unavailable; serving locally"
                                );
                                ctx.degraded = Some("cloud-unavailable");
                                ctx.route = "local";
                                ctx.target = Some(local.clone());
                                crate::audit_trail::capture_prompt(ctx, &body, false);
                                self.serve_local(session, ctx, api, &local, &body).await
                            }
                            None => Err(error.into()),
                        }
                    }
                }
            }
        }
    }

    /// Runs a request on a local model: the strict parse (what the engine can honour), the
    /// prompt, the generation.
    async fn serve_local(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        api: Api,
        model: &str,
        body: &Bytes,
    ) -> Result<(), Failure> {
        let endpoint = match api {
            Api::Generate(endpoint) => endpoint,
            Api::Responses => Endpoint::Chat,
            Api::Embeddings => return self.serve_embeddings(session, ctx, model, body).await,
        };
        match endpoint {
            Endpoint::Chat => {
                let request = openai::parse_chat(body).inspect_err(|_| ctx.reject("request"))?;
                let mut messages: Vec<edge_runtime::ChatMessage> = request
                    .messages
                    .into_iter()
                    .map(|message| edge_runtime::ChatMessage {
                        role: message.role,
                        content: message.content,
                    })
                    .collect();
                if let Some(call) = &request.generation.tool_call {
                    // The functions join the system message (templates expect one, first).
                    let instructions = local::tool_instructions(call);
                    match messages.first_mut() {
                        Some(first) if first.role == edge_runtime::Role::System => {
                            first.content = format!("{}\n\n{instructions}", first.content);
                        }
                        _ => messages.insert(
                            0,
                            edge_runtime::ChatMessage {
                                role: edge_runtime::Role::System,
                                content: instructions,
                            },
                        ),
                    }
                }
                let prompt = edge_runtime::Prompt::Chat(messages);
                self.run_local(
                    session,
                    ctx,
                    endpoint,
                    model,
                    vec![prompt],
                    &request.generation,
                )
                .await
            }
            Endpoint::Completions => {
                let request =
                    openai::parse_completion(body).inspect_err(|_| ctx.reject("request"))?;
                self.run_local(
                    session,
                    ctx,
                    endpoint,
                    model,
                    request.prompts,
                    &request.generation,
                )
                .await
            }
        }
    }

    /// Embeddings from a local model: one unit-length vector per input.
    async fn serve_embeddings(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        model: &str,
        body: &Bytes,
    ) -> Result<(), Failure> {
        let request = openai::parse_embeddings(body).inspect_err(|_| ctx.reject("request"))?;
        let handle = self
            .state
            .engine
            .get()
            .and_then(|engine| engine.model(model))
            .ok_or_else(|| GatewayError::ModelNotFound {
                model: model.to_owned(),
            })?;
        let width = handle.info().embedding_width;
        if let Some(dimensions) = request.dimensions
            && dimensions != width
        {
            ctx.reject("request");
            return Err(GatewayError::invalid_value(
                "dimensions",
                format!(
                    "`{model}` makes embeddings of {width} dimensions; `dimensions` cannot change that"
                ),
            )
            .into());
        }
        // Tokenizing up to 2,048 inputs takes a while: on a blocking thread, not the
        // runtime's, as a chat's prompt is.
        let submitting = handle.clone();
        let inputs = request.inputs;
        let submitted = tokio::task::spawn_blocking(move || submitting.embed(&inputs))
            .await
            .map_err(|error| GatewayError::unfinished("tokenizing the inputs failed", &error))?;
        let pending = submitted.map_err(|error| {
            ctx.reject("request");
            local::embed_submit_error(error, model)
        })?;
        // A client that leaves stops the wait (and drops the answer it would have had).
        let finished = tokio::select! {
            finished = pending => finished,
            idle = session.as_downstream_mut().read_body_or_idle(true) => {
                return Err(Failure::ClientGone(crate::cloud::client_gone(idle)));
            }
        };
        let embeddings = match finished {
            Ok(Ok(embeddings)) => embeddings,
            Ok(Err(error)) => return Err(local::embedding_error(error).into()),
            Err(_) => {
                return Err(
                    local::embedding_error(edge_runtime::EmbeddingError::WorkerStopped).into(),
                );
            }
        };
        ctx.usage.prompt_tokens = embeddings.prompt_tokens;
        let answer = openai::embeddings_response(model, &embeddings, request.base64);
        let body = serde_json::to_vec(&answer).unwrap_or_default();
        respond_json(session, ctx, 200, body, None).await?;
        Ok(())
    }

    /// Asks the policy where the request runs.
    async fn route(
        &self,
        session: &Session,
        ctx: &mut RequestContext,
        routing: &Arc<Routing>,
        model: Option<&str>,
        body: &Bytes,
    ) -> Result<Target, GatewayError> {
        let header = session.req_header();
        let header_texts = crate::facts::header_texts(&header.headers);
        let headers = crate::facts::header_pairs(&header_texts);
        let request = crate::facts::RequestView {
            path: header.uri.path(),
            target: crate::facts::request_target(&header.uri),
            method: header.method.as_str(),
            headers: &headers,
            caller: api_key_id(ctx),
            model,
            body,
        };
        let loads = self.state.local_loads();
        let evaluation = if body.len() <= SCAN_ON_RUNTIME_BYTES_MAX {
            crate::facts::evaluate(routing, &request, &loads, |policy, facts, signals| {
                self.state.decide(policy, facts, signals)
            })
        } else {
            // Scanning a large body (the firewall, the sensitivity scan, the redacted body's
            // second scan) takes milliseconds per megabyte: on a blocking thread, so that
            // the runtime's other connections do not wait for it.
            let request = OwnedRequest::of(&request);
            let (routing, state, body) =
                (Arc::clone(routing), Arc::clone(&self.state), body.clone());
            tokio::task::spawn_blocking(move || {
                let headers = request.header_pairs();
                crate::facts::evaluate(
                    &routing,
                    &request.view(&headers, &body),
                    &loads,
                    |policy, facts, signals| state.decide(policy, facts, signals),
                )
            })
            .await
            .unwrap_or_else(|error| Err(GatewayError::unfinished("evaluating the request", &error)))
        };
        let crate::facts::Evaluation {
            outcome,
            scan,
            complexity,
            attachments,
            redacted,
            waf,
            max_tokens,
            answers,
        } = evaluation.inspect_err(|_| ctx.reject("request"))?;
        self.apply_waf(session, ctx, &waf)?;
        // Without a limit, a local answer runs at most to its model's context.
        let answer_tokens = match (max_tokens, &outcome.decision) {
            (Some(limit), _) => u64::from(limit),
            (None, Decision::Local { model, .. }) => self
                .state
                .config
                .models
                .iter()
                .find(|config| config.name == *model)
                .map_or(RESERVED_ANSWER_TOKENS_DEFAULT, |config| {
                    u64::from(config.context_tokens)
                }),
            (None, _) => RESERVED_ANSWER_TOKENS_DEFAULT,
        };
        reserve_daily_budget(ctx, body.len(), answer_tokens, answers)
            .inspect_err(|_| self.state.metrics.record_rate_limited("tokens_per_day"))?;
        ctx.rule_name = Some(outcome.decision.rule().to_owned());
        ctx.sensitive_entities = scan.entity_types.clone();
        ctx.attachments = attachments;
        ctx.complexity = Some(complexity);
        match outcome.decision {
            Decision::Local { model, .. } => {
                ctx.route = "local";
                ctx.target = Some(model.clone());
                Ok(Target::Local(model))
            }
            Decision::Cloud {
                pool,
                model,
                redact,
                ..
            } => {
                ctx.route = "cloud";
                ctx.target = Some(pool.clone());
                Ok(Target::Cloud {
                    pool,
                    model,
                    redact: redact.then(|| redacted.map(Box::new)),
                })
            }
            Decision::Reject { reason, .. } => {
                ctx.route = "rejected";
                Err(match reason {
                    RejectReason::ModelNotFound { requested } => {
                        GatewayError::ModelNotFound { model: requested }
                    }
                    RejectReason::ModelRequired => {
                        GatewayError::invalid_value("model", "missing required parameter `model`")
                    }
                    RejectReason::Policy { status, message } => {
                        GatewayError::PolicyRejected { status, message }
                    }
                    RejectReason::SensitiveMustStayLocal { entities, pool } => {
                        GatewayError::PolicyRejected {
                            status: 403,
                            message: format!(
                                "the request contains sensitive data ({}) that may not leave the premises, pool `{pool}` is off the premises and no local model serves the request",
                                entities.join(", ")
                            ),
                        }
                    }
                })
            }
        }
    }

    /// Acts on the firewall's verdict: counts and records what matched (a warning in the log
    /// with rule ids, `IsthmusWaf` audit records), and refuses a blocked request.
    fn apply_waf(
        &self,
        session: &Session,
        ctx: &mut RequestContext,
        verdict: &router_policies::waf::WafVerdict,
    ) -> Result<(), GatewayError> {
        if verdict.matches.is_empty() {
            return Ok(());
        }
        let rule_ids = verdict.rule_ids();
        tracing::warn!(
            request_id = %ctx.request_id,
            action = verdict.action.as_str(),
            score = verdict.score,
            rules = ?rule_ids,
            "web application firewall"
        );
        self.state.metrics.record_waf(verdict);
        if let Some(trail) = &ctx.trail {
            for record in crate::audit_trail::waf_records(session, ctx, verdict, &trail.instance) {
                if let Err(error) = trail.log.submit(record) {
                    tracing::error!(request_id = %ctx.request_id, %error, "firewall audit record not queued");
                }
            }
        }
        ctx.waf = Some((verdict.action.as_str(), verdict.score, rule_ids.clone()));
        if verdict.action == router_policies::waf::WafAction::Blocked {
            ctx.reject("waf");
            return Err(GatewayError::WafBlocked { rule_ids });
        }
        Ok(())
    }

    /// Reads the whole request body, refusing it as soon as it exceeds the limit.
    async fn read_body(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
    ) -> Result<Bytes, Failure> {
        let limit_bytes = self.state.config.server.limits.body_bytes_max;
        let too_large = |session: &mut Session, ctx: &mut RequestContext| {
            // The rest of the body is not read, so the connection cannot be reused.
            session.set_keepalive(None);
            ctx.reject("limits");
            Failure::from(GatewayError::RequestTooLarge { limit_bytes })
        };
        if let Some(encoding) = content_encoding(session.req_header()) {
            // The body is not read, so the connection cannot be reused.
            session.set_keepalive(None);
            ctx.reject("request");
            return Err(GatewayError::UnsupportedContentEncoding { encoding }.into());
        }
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > limit_bytes) {
            return Err(too_large(session, ctx));
        }
        // An HTTP/1.1 client that asked to hear `100 Continue` before sending its body (curl
        // does above 1 MB) would otherwise wait a second for it. It is sent only here, once
        // the caller is authenticated and admitted and the declared length is within limits.
        ctx.body_requested = true;
        if expects_continue(session.req_header()) {
            session.write_continue_response().await.map_err(|error| {
                ctx.reject("limits");
                Failure::ClientGone(format!("writing 100 Continue: {error}"))
            })?;
        }
        // Memory follows the bytes that arrive, not the length a client declares: requests
        // that each declare the limit and send nothing would otherwise take it each at once.
        let mut body = BytesMut::with_capacity(
            declared
                .unwrap_or(0)
                .min(limit_bytes)
                .min(BODY_PREALLOCATION_BYTES_MAX) as usize,
        );
        // Pingora times out each read of an HTTP/1 body (`set_read_timeout`); an HTTP/2
        // stream's reads get the same limit here. The whole body has a deadline too: a
        // pause per read, plus a second per 64 KiB of what may come (a caller trickling a
        // byte per read would otherwise hold its connection for as long as it liked).
        let read_timeout = self.state.config.server.limits.body_read_timeout;
        let expected = declared.unwrap_or(limit_bytes).min(limit_bytes);
        let deadline = tokio::time::Instant::now()
            + read_timeout
            + Duration::from_secs(expected / TRANSFER_BYTES_PER_SECOND_MIN);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let read =
                match tokio::time::timeout(read_timeout.min(left), session.read_request_body())
                    .await
                {
                    Ok(read) => read,
                    Err(_) => Err(pingora_error::Error::explain(
                        ErrorType::ReadTimedout,
                        "the body did not arrive within the body read timeouts",
                    )),
                };
            match read {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > limit_bytes {
                        return Err(too_large(session, ctx));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(error) => {
                    ctx.reject("limits");
                    return Err(match error.etype() {
                        ErrorType::ReadTimedout => {
                            session.set_keepalive(None);
                            GatewayError::BodyTimeout.into()
                        }
                        // Pingora's names for a chunked body it cannot frame.
                        ErrorType::Custom("InvalidChunk" | "InvalidTrailerEnd") => {
                            session.set_keepalive(None);
                            GatewayError::invalid_value(
                                "body",
                                "the request body's chunked transfer coding is malformed",
                            )
                            .into()
                        }
                        _ => Failure::ClientGone(format!("reading the request body: {error}")),
                    });
                }
            }
        }
    }

    async fn run_local(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        endpoint: Endpoint,
        model: &str,
        prompts: Vec<edge_runtime::Prompt>,
        generation: &openai::Generation,
    ) -> Result<(), Failure> {
        let engine = self
            .state
            .engine
            .get()
            .ok_or_else(|| GatewayError::Unavailable {
                message: "models are still loading".to_owned(),
                retry_after_s: 1,
            })?;
        let handle = engine.model(model).ok_or_else(|| GatewayError::Internal {
            message: format!("routed to model `{model}`, which is not loaded"),
        })?;
        let outcome = local::run(
            session,
            ctx,
            handle,
            local::LocalRequest {
                endpoint,
                prompts,
                generation,
                first_token_timeout: self.state.config.server.limits.first_token_timeout,
            },
        )
        .await?;
        match outcome {
            Answered::Complete => Ok(()),
            Answered::ClientGone(reason) => Err(Failure::ClientGone(reason)),
        }
    }
}

/// How handling ended when it did not end with a response written.
#[derive(Debug)]
pub enum Failure {
    /// Answer with this error.
    Error(GatewayError),
    /// The client went away or the connection broke; nothing more can be written.
    ClientGone(String),
}

impl From<GatewayError> for Failure {
    fn from(error: GatewayError) -> Self {
        Failure::Error(error)
    }
}

impl From<Box<Error>> for Failure {
    fn from(error: Box<Error>) -> Self {
        Failure::ClientGone(error.to_string())
    }
}

#[async_trait]
impl ProxyHttp for DataPlane {
    type CTX = RequestContext;

    fn new_ctx(&self) -> Self::CTX {
        RequestContext {
            started: Instant::now(),
            request_id: String::new(),
            correlation_id: String::new(),
            route: "none",
            cut_short: false,
            target: None,
            rule: "default",
            rule_name: None,
            status: 0,
            caller: None,
            usage: edge_runtime::Usage::default(),
            first_token: None,
            last_token: None,
            longest_choice_tokens: None,
            finish_reason: None,
            outcome: None,
            attempts: 0,
            degraded: None,
            sensitive_entities: Vec::new(),
            attachments: Vec::new(),
            complexity: None,
            waf: None,
            responses: None,
            trace: None,
            traceparent: None,
            trail: None,
            sealed: false,
            content: None,
            policy_hash: String::new(),
            routing: None,
            redactions: 0,
            on_premises: false,
            rate_limit: None,
            rate_standing: None,
            cors_origin: None,
            client_ip: None,
            body_requested: false,
            unread_body_timeout: Duration::ZERO,
            _in_flight: None,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora_error::Result<()> {
        ctx.started = Instant::now();
        ctx._in_flight = Some(self.state.begin_request());
        let limits = &self.state.config.server.limits;
        session.set_read_timeout(Some(limits.body_read_timeout));
        ctx.unread_body_timeout = limits.header_read_timeout;
        // Pingora keeps an HTTP/1.1 connection waiting for its next request for ever: a
        // client (authenticated or not) could hold every one of `connections_max` with
        // connections it opened once and left idle. A connection that is not to be kept
        // (`Connection: close`, HTTP/1.0, a drain) stays so.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(limits.keepalive_timeout.as_secs()));
        }
        // Pingora waits forever for a client that stopped reading; a stream's slot, its
        // connection and a backend's connection would go with it.
        session.set_write_timeout(Some(limits.response_write_timeout));
        Ok(())
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora_error::Result<bool> {
        (ctx.request_id, ctx.correlation_id) = match client_request_id(session) {
            Some(client) => (client, new_request_id()),
            None => {
                let made = new_request_id();
                (made.clone(), made)
            }
        };
        ctx.client_ip = client_ip(session, &self.state.config.server);
        let trace = crate::telemetry::TraceContext::from_header(
            session
                .req_header()
                .headers
                .get("traceparent")
                .and_then(|value| value.to_str().ok()),
        );
        ctx.traceparent = Some(trace.traceparent());
        ctx.trace = Some(trace);
        let routing = self.state.routing();
        ctx.policy_hash = routing.config.digest.clone();
        ctx.routing = Some(routing);
        if let Some(trail) = &self.state.audit {
            let refused = if !trail.log.is_healthy() && trail.log.fail_closed() {
                Some("the audit log cannot make records durable".to_owned())
            } else {
                ctx.trail = Some(trail.clone());
                match trail.intent(session, ctx) {
                    Ok(()) => None,
                    Err(error) if trail.log.fail_closed() => {
                        Some(format!("the audit log refused the record: {error}"))
                    }
                    Err(error) => {
                        tracing::error!(request_id = %ctx.request_id, %error, "audit intent record not written; answering anyway (fail_closed = false)");
                        None
                    }
                }
            };
            if let Some(reason) = refused {
                // Fail closed: no response without its record.
                ctx.trail = None;
                ctx.reject("audit");
                let error = GatewayError::Unavailable {
                    message: format!("{reason}; retry later"),
                    retry_after_s: 1,
                };
                if let Err(write_error) = respond_error(session, ctx, &error).await {
                    // Nothing (or not all) was written: the connection must not wait for
                    // the client's next request with this one unanswered.
                    session.set_keepalive(None);
                    ctx.outcome = Some(format!("writing the error response: {write_error}"));
                }
                return Ok(true);
            }
        }
        // Everything logged while handling the request carries its id and trace.
        let span = tracing::info_span!(
            "request",
            request_id = %ctx.request_id,
            trace_id = %ctx.trace.map(|trace| hex::encode(trace.trace_id)).unwrap_or_default(),
        );
        let handled = {
            let handling = std::pin::pin!(tracing::Instrument::instrument(
                self.handle(session, ctx),
                span
            ));
            unless_it_panics(handling).await
        };
        let Some(handled) = handled else {
            // A bug: the panic hook printed where. The request gets a clean refusal and its
            // records instead of a reset stream with none; its text stays out of the log.
            tracing::error!(request_id = %ctx.request_id, "handling the request panicked");
            if ctx.status != 0 {
                return Error::e_explain(
                    ErrorType::InternalError,
                    "handling the request panicked after its response began",
                );
            }
            let error = GatewayError::Internal {
                message: "the gateway failed while handling this request".to_owned(),
            };
            if ctx.route == "none" {
                ctx.reject("request");
            }
            if let Err(write_error) = respond_error(session, ctx, &error).await {
                session.set_keepalive(None);
                ctx.outcome = Some(format!("writing the error response: {write_error}"));
            }
            return Ok(true);
        };
        match handled {
            Ok(()) => {}
            Err(Failure::Error(error)) => {
                if ctx.route == "none" {
                    ctx.reject(match error {
                        GatewayError::Unavailable { .. } => "readiness",
                        _ => "request",
                    });
                }
                if let Err(write_error) = respond_error(session, ctx, &error).await {
                    // Nothing (or not all) was written: the connection must not wait for
                    // the client's next request with this one unanswered.
                    session.set_keepalive(None);
                    ctx.outcome = Some(format!("writing the error response: {write_error}"));
                }
            }
            Err(Failure::ClientGone(reason)) => {
                session.set_keepalive(None);
                if ctx.status == 0 {
                    // Nginx's convention for "client closed the request".
                    ctx.status = 499;
                } else {
                    // The answer began and did not end (the client left, or its last bytes
                    // were held back because its record could not be made durable): the
                    // connection is dropped (HTTP/2: the stream reset), never ended as if
                    // the answer were whole.
                    ctx.outcome = Some(reason.clone());
                    return Err(Error::create(
                        ErrorType::ConnectionClosed,
                        pingora_error::ErrorSource::Downstream,
                        Some(reason.into()),
                        None,
                    ));
                }
                ctx.outcome = Some(reason);
            }
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora_error::Result<Box<HttpPeer>> {
        // request_filter answers every request; the proxy phases never pick an upstream.
        Error::e_explain(
            ErrorType::InternalError,
            "the data plane does not use Pingora's upstream phases",
        )
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Self::CTX) {
        crate::audit_trail::seal_late(session, ctx);
        // Requests that ended without their last bytes (errors, cut streams) pay here.
        ctx.charge_rate_limit();
        let duration = ctx.started.elapsed();
        let status = ctx.final_status(session);
        let route = ctx.route_label();
        let record = crate::metrics::RequestRecord {
            sensitive: (!ctx.sensitive_entities.is_empty()).then(|| {
                crate::audit::report::sensitive_disposition(
                    route,
                    ctx.redactions > 0,
                    ctx.on_premises,
                )
            }),
            attachments: (
                &ctx.attachments,
                crate::audit::report::attachment_disposition(route, ctx.on_premises),
            ),
            route,
            rule: ctx.rule(),
            caller: api_key_id(ctx),
            status,
            duration,
            prompt_tokens: ctx.usage.prompt_tokens,
            completion_tokens: ctx.usage.completion_tokens,
            generation: match (ctx.first_token, ctx.target.as_deref()) {
                (Some(first_token), Some(model)) if route == "local" => {
                    Some(crate::metrics::GenerationRecord {
                        model,
                        time_to_first_token: first_token,
                        decode: ctx
                            .last_token
                            .unwrap_or(first_token)
                            .saturating_sub(first_token),
                        tokens_after_first: ctx
                            .longest_choice_tokens
                            .unwrap_or(ctx.usage.completion_tokens)
                            .saturating_sub(1),
                    })
                }
                _ => None,
            },
        };
        self.state.metrics.record(&record);
        let header = session.req_header();
        let error_text = error.map(|error| error.to_string());
        if let (Some(telemetry), Some(trace)) = (&self.state.telemetry, ctx.trace) {
            telemetry.record(
                &record,
                &crate::telemetry::SpanRecord {
                    trace,
                    started: std::time::SystemTime::now()
                        .checked_sub(duration)
                        .unwrap_or(std::time::UNIX_EPOCH),
                    duration,
                    method: header.method.as_str(),
                    operation: crate::telemetry::operation(header.uri.path()),
                    status,
                    route,
                    rule: ctx.rule(),
                    request_id: &ctx.request_id,
                    target: ctx.target.as_deref(),
                    prompt_tokens: ctx.usage.prompt_tokens,
                    completion_tokens: ctx.usage.completion_tokens,
                    time_to_first_token: ctx.first_token,
                    attempts: ctx.attempts,
                    degraded: ctx.degraded,
                    error: error_text.as_deref(),
                },
            );
        }
        tracing::info!(
            request_id = %ctx.request_id,
            method = %header.method,
            path = header.uri.path(),
            status,
            route,
            target = ctx.target.as_deref().unwrap_or("-"),
            rule = ctx.rule(),
            caller = ctx.caller.as_ref().map_or("-", Caller::label),
            traceparent = ctx.traceparent.as_deref().unwrap_or("-"),
            attempts = ctx.attempts,
            degraded = ctx.degraded,
            entities = %ctx.sensitive_entities.join(","),
            complexity = ctx.complexity,
            duration_ms = duration.as_millis() as u64,
            ttft_ms = ctx.first_token.map(|first_token| first_token.as_millis() as u64),
            prompt_tokens = ctx.usage.prompt_tokens,
            completion_tokens = ctx.usage.completion_tokens,
            finish_reason = ctx.finish_reason,
            outcome = ctx.outcome.as_deref(),
            error = error_text,
            "request"
        );
    }
}

#[cfg(test)]
mod tests;
