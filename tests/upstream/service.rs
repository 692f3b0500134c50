//! The request handler: routes a request, reads and fingerprints its body, logs it, carries
//! out the behaviour's plan (inject an error, delay, hold) and answers; plus the `/_control/*`
//! endpoints. [`Answer`] is the response body: whole, or SSE events one frame each, with an
//! optional wait for a release after the first event.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderName, RETRY_AFTER};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::control::{InFlight, RawBehaviour, State};
use crate::openai::{self, Api, Completion, RawRequest};

/// Largest request body read; a bigger one is answered 413.
const BODY_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Largest body of a control request.
const CONTROL_BODY_BYTES_MAX: usize = 64 * 1024;

const X_UPSTREAM_NAME: HeaderName = HeaderName::from_static("x-upstream-name");
const X_RECEIVED_BYTES: HeaderName = HeaderName::from_static("x-received-bytes");
const X_RECEIVED_SHA256: HeaderName = HeaderName::from_static("x-received-sha256");
const X_RECEIVED_MODEL: HeaderName = HeaderName::from_static("x-received-model");
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// What is known about the connection a request came on.
#[derive(Debug)]
pub struct Connection {
    /// Accept order, from 1; tells tests whether requests shared a connection.
    pub id: u64,
    pub tls: bool,
    /// The subject CN of the client certificate (mTLS only).
    pub client_common_name: Option<String>,
    /// Requests answered on it so far.
    pub answered: AtomicU64,
    /// Whether it carried a request other than a control call (counted in `connections`).
    pub served: AtomicBool,
}

/// A request dropped on purpose (`drop_reused`): hyper closes the connection unanswered.
#[derive(Debug)]
pub struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("dropped on purpose (drop_reused)")
    }
}

impl std::error::Error for Dropped {}

/// The hyper service for one connection.
pub fn service(
    state: &'static State,
    connection: Arc<Connection>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Answer>,
    Error = Dropped,
    Future = impl Future<Output = Result<Response<Answer>, Dropped>> + Send,
> {
    hyper::service::service_fn(move |request| {
        let connection = Arc::clone(&connection);
        async move {
            let mut response = match request.uri().path().strip_prefix("/_control/") {
                Some(endpoint) if state.control => {
                    let endpoint = endpoint.to_owned();
                    control(state, &endpoint, request).await
                }
                _ => {
                    if !connection.served.swap(true, Ordering::Relaxed) {
                        state.stats.connections.fetch_add(1, Ordering::Relaxed);
                    }
                    if request.method() == Method::POST
                        && connection.answered.load(Ordering::Relaxed) > 0
                        && state.take_drop()
                    {
                        return Err(Dropped);
                    }
                    upstream(state, &connection, request).await
                }
            };
            connection.answered.fetch_add(1, Ordering::Relaxed);
            response
                .headers_mut()
                .insert(X_UPSTREAM_NAME, state.name_header.clone());
            Ok(response)
        }
    })
}

/// Which endpoint a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    /// A completion; Azure paths name the deployment, which stands in for a missing model.
    Completion {
        api: Api,
        deployment: Option<String>,
    },
    /// Embeddings: vectors made from the inputs' hashes, no plan.
    Embeddings,
    /// Anything answered without a plan.
    Fixed(Fixed),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fixed {
    Health,
    Models,
    MethodNotAllowed,
    NotFound,
}

fn route(method: &Method, path: &str) -> Route {
    let (route, allowed) = match path {
        "/v1/chat/completions" => (
            Route::Completion {
                api: Api::Chat,
                deployment: None,
            },
            Method::POST,
        ),
        "/v1/completions" => (
            Route::Completion {
                api: Api::Text,
                deployment: None,
            },
            Method::POST,
        ),
        "/health" => (Route::Fixed(Fixed::Health), Method::GET),
        "/v1/models" => (Route::Fixed(Fixed::Models), Method::GET),
        "/v1/embeddings" => (Route::Embeddings, Method::POST),
        _ => match azure_deployment(path) {
            Some(deployment) => (
                Route::Completion {
                    api: Api::Chat,
                    deployment: Some(deployment.to_owned()),
                },
                Method::POST,
            ),
            None => return Route::Fixed(Fixed::NotFound),
        },
    };
    if *method == allowed {
        route
    } else {
        Route::Fixed(Fixed::MethodNotAllowed)
    }
}

/// `d` of `/openai/deployments/{d}/chat/completions`.
fn azure_deployment(path: &str) -> Option<&str> {
    let deployment = path
        .strip_prefix("/openai/deployments/")?
        .strip_suffix("/chat/completions")?;
    (!deployment.is_empty() && !deployment.contains('/')).then_some(deployment)
}

/// A request body as received.
#[derive(Debug)]
struct Received {
    bytes: Bytes,
    sha256: String,
}

#[derive(Debug)]
enum BodyError {
    TooLarge,
    Read,
}

/// Reads the whole body (at most `limit_bytes`), hashing it on the way.
async fn read_body(
    headers: &http::HeaderMap,
    mut body: Incoming,
    limit_bytes: usize,
) -> Result<Received, BodyError> {
    let expected = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .unwrap_or(0);
    if expected > limit_bytes {
        return Err(BodyError::TooLarge);
    }
    let mut hasher = sha2::Sha256::new();
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Read)?.into_data() else {
            continue;
        };
        let received = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if received + data.len() > limit_bytes {
            return Err(BodyError::TooLarge);
        }
        hasher.update(&data);
        // The common case, a body in one frame, is kept without copying.
        match &first {
            None => first = Some(data),
            Some(first) => {
                if rest.is_empty() {
                    rest.reserve(expected.max(first.len() + data.len()));
                    rest.extend_from_slice(first);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    let bytes = if rest.is_empty() {
        first.unwrap_or_default()
    } else {
        Bytes::from(rest)
    };
    Ok(Received {
        bytes,
        sha256: hex::encode(hasher.finalize()),
    })
}

/// Every endpoint an upstream has: completions, health, models.
async fn upstream(
    state: &'static State,
    connection: &Connection,
    request: Request<Incoming>,
) -> Response<Answer> {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let route = route(request.method(), request.uri().path());
    // Counted from the start, so that a client leaving during the upload counts as cancelled.
    let in_flight = matches!(route, Route::Completion { .. }).then(|| state.stats.start());
    let (parts, body) = request.into_parts();
    let received = match read_body(&parts.headers, body, BODY_BYTES_MAX).await {
        Ok(received) => received,
        Err(failure) => {
            let (status, message) = match failure {
                BodyError::TooLarge => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body over {BODY_BYTES_MAX} bytes"),
                ),
                BodyError::Read => (
                    StatusCode::BAD_REQUEST,
                    "request body could not be read".to_owned(),
                ),
            };
            let entry = LogEntry {
                parts: &parts,
                connection,
                received: None,
                request: None,
                model: None,
                status,
            };
            state.record(|| entry.json());
            return error(status, &message, None).with_in_flight(in_flight);
        }
    };
    let mut response = match route {
        Route::Completion { api, deployment } => {
            completion(state, connection, &parts, &received, api, deployment)
                .await
                .with_in_flight(in_flight)
        }
        Route::Embeddings | Route::Fixed(_) => {
            let (response, model) = match route {
                Route::Fixed(fixed) => (fixed_answer(state, fixed, &parts), None),
                _ => {
                    let (status, body, model) = openai::embeddings_answer(&received.bytes);
                    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
                    (respond(status, JSON, body), model)
                }
            };
            let entry = LogEntry {
                parts: &parts,
                connection,
                received: Some(&received),
                request: None,
                model: model.as_deref(),
                status: response.status(),
            };
            state.record(|| entry.json());
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(X_RECEIVED_BYTES, HeaderValue::from(received.bytes.len()));
    if let Ok(sha256) = HeaderValue::from_str(&received.sha256) {
        headers.insert(X_RECEIVED_SHA256, sha256);
    }
    response
}

/// Health, the model list, and the refusals of unknown paths and methods.
fn fixed_answer(state: &State, fixed: Fixed, parts: &Parts) -> Response<Answer> {
    match fixed {
        Fixed::Health => {
            let status = StatusCode::from_u16(state.health_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let text = if status.is_success() {
                "ok"
            } else {
                "unhealthy"
            };
            respond(
                status,
                HeaderValue::from_static("text/plain"),
                Bytes::from_static(text.as_bytes()),
            )
        }
        Fixed::Models => respond(StatusCode::OK, JSON, openai::models_body()),
        Fixed::MethodNotAllowed => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method {} not allowed here", parts.method),
            None,
        ),
        Fixed::NotFound => error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint {}", parts.uri.path()),
            None,
        ),
    }
}

/// A completion request: parse, log, then answer as the behaviour plans.
async fn completion(
    state: &'static State,
    connection: &Connection,
    parts: &Parts,
    received: &Received,
    api: Api,
    deployment: Option<String>,
) -> Response<Answer> {
    let mut entry = LogEntry {
        parts,
        connection,
        received: Some(received),
        request: None,
        model: None,
        status: StatusCode::BAD_REQUEST,
    };
    let request: RawRequest = match serde_json::from_slice(&received.bytes) {
        Ok(request) => request,
        Err(parse) => {
            state.record(|| entry.json());
            return error(
                StatusCode::BAD_REQUEST,
                &format!("request body is not valid JSON: {parse}"),
                None,
            );
        }
    };
    entry.request = Some(&request);
    let Some(model) = request.model.clone().or(deployment) else {
        state.record(|| entry.json());
        return error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            Some("model"),
        );
    };
    entry.model = Some(&model);
    let (plan, generation) = state.plan();
    entry.status = plan.failure.map_or(StatusCode::OK, |failure| {
        StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    });
    state.record(|| entry.json());

    if plan.delay_first_byte_ms > 0 {
        tokio::time::sleep(Duration::from_millis(plan.delay_first_byte_ms)).await;
    }
    let mut response = if let Some(failure) = plan.failure {
        state.stats.injected.fetch_add(1, Ordering::Relaxed);
        let status = entry.status;
        let mut response = error(
            status,
            &format!("{}: injected status {}", state.name, failure.status),
            None,
        );
        if let Some(retry_after_s) = failure.retry_after_s {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    } else {
        let created_s = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let completion = Completion::new(
            api,
            &request,
            model.clone(),
            state.tokens,
            received.bytes.len(),
            state.next_sequence(),
            created_s,
        );
        if request.stream() {
            let hold: Option<Hold> = plan
                .hold
                .then(|| Box::pin(state.wait_release(generation)) as Hold);
            let mut response = Response::new(Answer::events(completion.sse_events(), hold));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        } else {
            if plan.hold {
                state.wait_release(generation).await;
            }
            respond(StatusCode::OK, JSON, completion.json_body())
        }
    };
    if let Ok(model) = HeaderValue::from_str(&model) {
        response.headers_mut().insert(X_RECEIVED_MODEL, model);
    }
    response
}

/// One entry of `/_control/requests`.
#[derive(Debug)]
struct LogEntry<'a> {
    parts: &'a Parts,
    connection: &'a Connection,
    received: Option<&'a Received>,
    request: Option<&'a RawRequest>,
    model: Option<&'a str>,
    status: StatusCode,
}

impl LogEntry<'_> {
    fn json(&self) -> Value {
        let mut headers = serde_json::Map::new();
        for name in self.parts.headers.keys() {
            // Repeated headers are joined as HTTP allows; values as sent, lossily UTF-8.
            let value = self
                .parts
                .headers
                .get_all(name)
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()))
                .collect::<Vec<_>>()
                .join(", ");
            headers.insert(name.as_str().to_owned(), Value::String(value));
        }
        let authority = self
            .parts
            .uri
            .authority()
            .map(|authority| authority.as_str().to_owned())
            .or_else(|| {
                self.parts
                    .headers
                    .get(http::header::HOST)
                    .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
            });
        json!({
            "method": self.parts.method.as_str(),
            "path": self.parts.uri.path(),
            "query": self.parts.uri.query(),
            "authority": authority,
            "headers": headers,
            "body_bytes": self.received.map(|received| received.bytes.len()),
            "body_sha256": self.received.map(|received| received.sha256.as_str()),
            "model": self.model,
            "stream": self.request.map(RawRequest::stream),
            "include_usage": self.request.map(RawRequest::include_usage),
            "last_message": self.request.and_then(RawRequest::last_message),
            "http_version": format!("{:?}", self.parts.version),
            "tls": self.connection.tls,
            "client_cn": self.connection.client_common_name,
            "connection": self.connection.id,
            "status": self.status.as_u16(),
        })
    }
}

/// `/_control/{endpoint}`.
async fn control(
    state: &'static State,
    endpoint: &str,
    request: Request<Incoming>,
) -> Response<Answer> {
    let method = request.method().clone();
    let value = match (endpoint, &method) {
        ("requests", &Method::GET) => state.requests(),
        ("requests", &Method::DELETE) => json!({"cleared": state.clear_requests()}),
        ("behaviour", &Method::GET) => json!(state.behaviour()),
        ("behaviour", &Method::POST) => {
            let (parts, body) = request.into_parts();
            let Ok(received) = read_body(&parts.headers, body, CONTROL_BODY_BYTES_MAX).await else {
                return error(StatusCode::BAD_REQUEST, "unreadable behaviour body", None);
            };
            let change = serde_json::from_slice::<RawBehaviour>(&received.bytes)
                .map_err(|parse| parse.to_string())
                .and_then(|raw| state.change_behaviour(raw));
            match change {
                Ok(behaviour) => json!(behaviour),
                Err(message) => return error(StatusCode::BAD_REQUEST, &message, None),
            }
        }
        ("release", &Method::POST) => {
            let held = state.stats.held.load(Ordering::Relaxed);
            state.release();
            json!({"released": held})
        }
        ("in-flight", &Method::GET) => json!(state.stats.in_flight.load(Ordering::Relaxed)),
        ("stats", &Method::GET) => state.stats.json(),
        ("requests" | "behaviour" | "release" | "in-flight" | "stats", _) => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("method {method} not allowed here"),
                None,
            );
        }
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no control endpoint {endpoint}"),
                None,
            );
        }
    };
    respond(StatusCode::OK, JSON, Bytes::from(value.to_string()))
}

fn respond(status: StatusCode, content_type: HeaderValue, body: Bytes) -> Response<Answer> {
    let mut response = Response::new(Answer::whole(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

/// An OpenAI error answer.
fn error(status: StatusCode, message: &str, param: Option<&str>) -> Response<Answer> {
    let kind = openai::error_kind(status.as_u16());
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_lowercase()
        .replace(' ', "_");
    respond(
        status,
        JSON,
        openai::error_body(message, kind, param, &code),
    )
}

/// A wait for a release, polled by a held stream between its first event and the rest.
type Hold = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A response body: its frames are known up front; a held stream waits after the first.
/// Carries the request's [`InFlight`] and finishes it when the last frame is handed over, so
/// a body dropped early (the client left) counts the request as cancelled.
pub struct Answer {
    frames: VecDeque<Bytes>,
    /// Whether the body's length is known (a whole body) or it is an event stream.
    whole: bool,
    started: bool,
    hold: Option<Hold>,
    in_flight: Option<InFlight>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Answer")
            .field("frames", &self.frames.len())
            .field("held", &self.hold.is_some())
            .finish()
    }
}

impl Answer {
    fn whole(body: Bytes) -> Answer {
        Answer {
            frames: VecDeque::from([body]),
            whole: true,
            started: false,
            hold: None,
            in_flight: None,
        }
    }

    fn events(events: Vec<Bytes>, hold: Option<Hold>) -> Answer {
        Answer {
            frames: VecDeque::from(events),
            whole: false,
            started: false,
            hold,
            in_flight: None,
        }
    }
}

trait WithInFlight {
    /// Hands the request's in-flight guard to the body.
    fn with_in_flight(self, in_flight: Option<InFlight>) -> Self;
}

impl WithInFlight for Response<Answer> {
    fn with_in_flight(mut self, in_flight: Option<InFlight>) -> Self {
        let body = self.body_mut();
        body.in_flight = in_flight;
        if body.frames.is_empty()
            && let Some(in_flight) = &mut body.in_flight
        {
            in_flight.finish();
        }
        self
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.started
            && let Some(hold) = &mut this.hold
        {
            if hold.as_mut().poll(context).is_pending() {
                return Poll::Pending;
            }
            this.hold = None;
        }
        let Some(frame) = this.frames.pop_front() else {
            return Poll::Ready(None);
        };
        this.started = true;
        if this.frames.is_empty()
            && let Some(in_flight) = &mut this.in_flight
        {
            in_flight.finish();
        }
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.whole {
            SizeHint::with_exact(self.frames.iter().map(|frame| frame.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}
