//! The admin listener: liveness, readiness, Prometheus metrics and the admin API.
//!
//! It is plain HTTP and binds to loopback by default; put it behind the platform's own
//! access control (a Kubernetes probe, a local agent) rather than exposing it.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::state::AppState;

/// Serves the admin endpoints.
#[derive(Debug)]
pub struct Admin {
    state: Arc<AppState>,
}

impl Admin {
    pub fn new(state: Arc<AppState>) -> Self {
        Admin { state }
    }

    fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let models_loaded = self.state.models_loaded();
        let listeners_bound = self
            .state
            .listeners_bound
            .load(std::sync::atomic::Ordering::Acquire);
        let models_failed = self.state.failed_models();
        // A log that cannot make records durable under `fail_closed` refuses every request:
        // not ready, so that load balancers send traffic elsewhere meanwhile.
        let audit_accepting = self.state.audit_accepting();
        let ready = models_loaded && models_failed.is_empty() && listeners_bound && audit_accepting;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (
            status,
            serde_json::json!({
                "ready": ready,
                "models_loaded": models_loaded,
                "models_failed": models_failed,
                "listeners_bound": listeners_bound,
                "audit_accepting": audit_accepting,
            }),
        )
    }

    fn models(&self) -> serde_json::Value {
        let models: Vec<serde_json::Value> = self
            .state
            .engine
            .get()
            .map(|engine| {
                engine
                    .models()
                    .iter()
                    .map(|model| {
                        let info = model.info();
                        let stats = model.stats();
                        serde_json::json!({
                            "name": info.name,
                            "path": info.path.display().to_string(),
                            "context_tokens": info.context_tokens,
                            "parallel_sequences": info.parallel_sequences,
                            "lanes": info.lanes,
                            "trained_context_tokens": info.trained_context_tokens,
                            "parameters": info.parameters,
                            "size_bytes": info.size_bytes,
                            "queue_depth": stats.queue_depth(),
                            "active_sequences": stats.active_sequences(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "models": models })
    }

    /// Every configured API key (and anonymous callers, where allowed) with its rate limits
    /// and what is left of them now. Key ids only, never keys.
    fn callers(&self) -> serde_json::Value {
        let routing = self.state.routing();
        let auth = &routing.config.auth;
        let now = std::time::Instant::now();
        let today = std::time::SystemTime::now();
        // With per-client anonymous limits each client has its own buckets: the list gives
        // the limits, and no one "left now" that would describe none of them.
        let per_client = auth.allow_anonymous && auth.anonymous_limits_per_client;
        let entry = |key: &str, caller: crate::auth::Caller, limits: crate::config::RateLimits| {
            let shared = !(per_client && caller == crate::auth::Caller::Anonymous);
            let owner = caller.owner();
            let standing = self.state.rate_limiter.standing(&owner, limits, now);
            let used_today = match (limits.tokens_per_day, &self.state.daily_usage) {
                (Some(_), Some(daily)) => Some(daily.used(&owner, today)),
                _ => None,
            };
            let remaining = |bucket: Option<crate::rate_limit::BucketStanding>| {
                bucket.filter(|_| shared).map(|bucket| bucket.remaining)
            };
            serde_json::json!({
                "key": key,
                "limits": {
                    "requests_per_minute": limits.requests_per_minute,
                    "tokens_per_minute": limits.tokens_per_minute,
                    "tokens_per_day": limits.tokens_per_day,
                    "per_client": !shared,
                },
                "remaining": {
                    "requests": remaining(standing.requests),
                    "tokens": remaining(standing.tokens),
                    "tokens_today": limits
                        .tokens_per_day
                        .zip(used_today)
                        .filter(|_| shared)
                        .map(|(budget, used)| budget.saturating_sub(used)),
                },
            })
        };
        let mut callers: Vec<serde_json::Value> = auth
            .api_keys
            .iter()
            .map(|key| {
                let caller = crate::auth::Caller::ApiKey { id: key.id.clone() };
                entry(&key.id, caller, key.limits)
            })
            .collect();
        if auth.allow_anonymous {
            callers.push(entry(
                "(anonymous)",
                crate::auth::Caller::Anonymous,
                auth.anonymous_limits,
            ));
        }
        serde_json::json!({ "callers": callers })
    }
}

impl Admin {
    /// Explains the routing of the body posted, as if sent to `?path=` (default
    /// `/v1/chat/completions`; `/v1/responses` reads a Responses API body), with the admin
    /// request's headers as the request's and the live signals; nothing runs and no state
    /// changes.
    async fn explain(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        const EXPLAIN_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
        let body = match read_body(session, EXPLAIN_BODY_BYTES_MAX).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let mut target = crate::facts::EXPLAIN_TARGET_DEFAULT.to_owned();
        for (key, value) in query_pairs(session.req_header().uri.query().unwrap_or_default()) {
            match key.as_str() {
                "path" => target = value,
                _ => {
                    return openai_error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown query parameter `{key}` (path)"),
                        "invalid_request_error",
                        "invalid_query",
                    );
                }
            }
        }
        let routing = self.state.routing();
        let headers = session.req_header().headers.clone();
        let loads = self.state.local_loads();
        let state = self.state.route_state();
        // Scanning a body of megabytes takes milliseconds: off the threads that serve.
        let explained = tokio::task::spawn_blocking(move || {
            let header_texts = crate::facts::header_texts(&headers);
            let headers = crate::facts::header_pairs(&header_texts);
            crate::facts::explain(&routing, &target, &headers, &body, &loads, state)
        })
        .await;
        match explained {
            Ok(Ok(explanation)) => json(StatusCode::OK, &explanation),
            Ok(Err(error)) => json(
                error.status(),
                &serde_json::to_value(error.body()).unwrap_or_default(),
            ),
            Err(error) => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("explaining failed: {}", crate::error::join_failure(&error)),
                "server_error",
                "internal_error",
            ),
        }
    }
}

impl Admin {
    /// `PUT /admin/api/upstreams/{pool}/backends/{backend}` with `{"weight": N}`: the
    /// console's canary control. The configuration file is edited and reloaded.
    async fn set_weight(
        &self,
        session: &mut ServerSession,
        pool: String,
        backend: String,
    ) -> Response<Vec<u8>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct WeightEdit {
            weight: u32,
        }
        const EDIT_BODY_BYTES_MAX: usize = 4096;
        let body = match read_body(session, EDIT_BODY_BYTES_MAX).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let edit: WeightEdit = match serde_json::from_slice(&body) {
            Ok(edit) => edit,
            Err(error) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "the body must be {{\"weight\": N}} with N from 0 to {}: {error}",
                        crate::config::edit::WEIGHT_MAX
                    ),
                    "invalid_request_error",
                    "invalid_json",
                );
            }
        };
        let state = Arc::clone(&self.state);
        let outcome = tokio::task::spawn_blocking(move || {
            crate::reload::set_backend_weight(&state, &pool, &backend, edit.weight)
        })
        .await;
        use crate::config::edit::EditError;
        match outcome {
            Ok(Ok(report)) => {
                let mut body = serde_json::to_value(report).unwrap_or_default();
                body["file"] = self.state.config.source.display().to_string().into();
                json(StatusCode::OK, &body)
            }
            Ok(Err(error @ EditError::UnknownBackend { .. })) => openai_error(
                StatusCode::NOT_FOUND,
                &error.to_string(),
                "invalid_request_error",
                "unknown_backend",
            ),
            Ok(Err(error @ EditError::WeightOutOfRange(_))) => openai_error(
                StatusCode::BAD_REQUEST,
                &error.to_string(),
                "invalid_request_error",
                "invalid_weight",
            ),
            Ok(Err(EditError::Invalid(errors))) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"reloaded": false, "errors": errors}),
            ),
            Ok(Err(EditError::Unwritable(message) | EditError::Conflict(message))) => json(
                StatusCode::CONFLICT,
                &serde_json::json!({"reloaded": false, "errors": [message]}),
            ),
            Err(error) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"reloaded": false, "errors": [crate::error::join_failure(&error)]}),
            ),
        }
    }

    /// `GET /admin/api/config`: the configuration file as it is on disk, with its hash for
    /// the save that follows.
    async fn configuration(&self) -> Response<Vec<u8>> {
        let source = self.state.config.source.clone();
        match tokio::fs::read_to_string(&source).await {
            Ok(text) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "file": source.display().to_string(),
                    "sha256": crate::config::edit::text_sha256(&text),
                    "text": text,
                }),
            ),
            Err(error) => openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot read {}: {error}", source.display()),
                "server_error",
                "config_unreadable",
            ),
        }
    }

    /// `PUT /admin/api/config` with `{"text": "...", "base_sha256": "...", "dry_run": false}`:
    /// validates the whole text and, unless a dry run, writes it and reloads (the console's
    /// configuration editor).
    async fn replace_configuration(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct ConfigEdit {
            text: String,
            #[serde(default)]
            base_sha256: Option<String>,
            #[serde(default)]
            dry_run: bool,
        }
        const CONFIG_BODY_BYTES_MAX: usize = 1024 * 1024;
        let body = match read_body(session, CONFIG_BODY_BYTES_MAX).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        let edit: ConfigEdit = match serde_json::from_slice(&body) {
            Ok(edit) => edit,
            Err(error) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    &format!(
                        "the body must be {{\"text\": \"...\", \"base_sha256\": \"...\", \"dry_run\": false}}: {error}"
                    ),
                    "invalid_request_error",
                    "invalid_json",
                );
            }
        };
        let state = Arc::clone(&self.state);
        let outcome = tokio::task::spawn_blocking(move || {
            crate::reload::replace_configuration(
                &state,
                &edit.text,
                edit.base_sha256.as_deref(),
                edit.dry_run,
            )
        })
        .await;
        use crate::config::edit::EditError;
        match outcome {
            Ok(Ok(report)) => json(
                StatusCode::OK,
                &serde_json::to_value(report).unwrap_or_default(),
            ),
            Ok(Err(EditError::Invalid(errors))) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({"reloaded": false, "errors": errors}),
            ),
            Ok(Err(error)) => json(
                StatusCode::CONFLICT,
                &serde_json::json!({"reloaded": false, "errors": [error.to_string()]}),
            ),
            Err(error) => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"reloaded": false, "errors": [crate::error::join_failure(&error)]}),
            ),
        }
    }

    /// `GET /admin/api/audit/records?limit=N&category=C`: the latest stored audit records,
    /// newest first (they carry no prompt or completion text unless an operator turned that
    /// on for a route, and to clients off this machine only that of requests that left it).
    async fn audit_records(&self, query: Option<&str>, on_this_machine: bool) -> Response<Vec<u8>> {
        const LIMIT_DEFAULT: usize = 100;
        const LIMIT_MAX: usize = 500;
        /// How far back a category filter looks.
        const FILTER_SCAN_RECORDS_MAX: usize = 20_000;
        /// Records read from the store at a time: the store's one writer serves appends
        /// between pages, so a filtered look back never holds up the answers waiting for
        /// their records.
        const PAGE_RECORDS: usize = 200;
        let mut limit = LIMIT_DEFAULT;
        let mut category = None;
        for (key, value) in query_pairs(query.unwrap_or_default()) {
            match key.as_str() {
                "limit" => match value.parse::<usize>() {
                    Ok(value) if (1..=LIMIT_MAX).contains(&value) => limit = value,
                    _ => {
                        return openai_error(
                            StatusCode::BAD_REQUEST,
                            &format!("limit must be a number from 1 to {LIMIT_MAX}"),
                            "invalid_request_error",
                            "invalid_limit",
                        );
                    }
                },
                "category" => category = Some(value),
                _ => {
                    return openai_error(
                        StatusCode::BAD_REQUEST,
                        &format!("unknown query parameter `{key}` (limit, category)"),
                        "invalid_request_error",
                        "invalid_query",
                    );
                }
            }
        }
        let Some(trail) = &self.state.audit else {
            return json(
                StatusCode::OK,
                &serde_json::json!({"enabled": false, "records": []}),
            );
        };
        let scan = if category.is_some() {
            FILTER_SCAN_RECORDS_MAX
        } else {
            limit
        };
        let unavailable = |error: crate::audit::AuditError| {
            openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("the audit store cannot be read: {error}"),
                "server_error",
                "audit_unavailable",
            )
        };
        let mut page = match trail.log.read_latest(scan.min(PAGE_RECORDS)).await {
            Ok(page) => page,
            Err(error) => return unavailable(error),
        };
        // The oldest record the store still holds (retention deletes from the start): the
        // look back ends there.
        let oldest_stored = match trail.log.read(1, 1).await {
            Ok(first) => first.first().map_or(u64::MAX, |(seq, _)| *seq),
            Err(error) => return unavailable(error),
        };
        let mut records: Vec<serde_json::Value> = Vec::new();
        let mut scanned = page.len();
        // Records below this `Seq` are still to look at.
        let mut below = page.last().map_or(0, |(seq, _)| *seq);
        loop {
            for (_, line) in &page {
                let Ok(serde_json::Value::Object(mut record)) = serde_json::from_slice(line) else {
                    continue;
                };
                if category
                    .as_deref()
                    .is_some_and(|wanted| record.get("Category") != Some(&wanted.into()))
                {
                    continue;
                }
                if !on_this_machine {
                    crate::audit::content::strip_off_appliance(&mut record);
                }
                records.push(serde_json::Value::Object(record));
                if records.len() == limit {
                    break;
                }
            }
            if records.len() == limit || scanned >= scan || below <= oldest_stored.max(1) {
                break;
            }
            // The next `Seq`s down, whatever gaps the store has (counted as looked at).
            let from = below.saturating_sub(PAGE_RECORDS as u64).max(1);
            let count = usize::try_from(below - from).unwrap_or(PAGE_RECORDS);
            page = match trail.log.read(from, count).await {
                Ok(mut older) => {
                    older.retain(|(seq, _)| *seq < below);
                    older.reverse();
                    older
                }
                Err(error) => return unavailable(error),
            };
            scanned += count;
            below = from;
        }
        json(
            StatusCode::OK,
            &serde_json::json!({"enabled": true, "records": records}),
        )
    }
}

/// Reads a request body of at most `bytes_max` bytes, or the error response to send.
async fn read_body(
    session: &mut ServerSession,
    bytes_max: usize,
) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > bytes_max {
                    return Err(openai_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        &format!("the body exceeds {bytes_max} bytes"),
                        "invalid_request_error",
                        "request_too_large",
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(error) => {
                return Err(openai_error(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the body: {error}"),
                    "invalid_request_error",
                    "invalid_json",
                ));
            }
        }
    }
}

fn openai_error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response<Vec<u8>> {
    json(
        status,
        &serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

/// The methods the admin listener answers on `path` (its `Allow`), or `None` for a path it
/// does not know. The console's files are served before this is asked.
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/admin/api/reload" | "/admin/api/explain" => Some("POST"),
        "/admin/api/config" => Some("GET, HEAD, PUT"),
        "/healthz"
        | "/readyz"
        | "/metrics"
        | "/admin/api/models"
        | "/admin/api/callers"
        | "/admin/api/audit"
        | "/admin/api/audit/records"
        | "/admin/api/upstreams" => Some("GET, HEAD"),
        _ if backend_path(path).is_some() => Some("PUT"),
        _ => None,
    }
}

/// 405 with the `Allow` header RFC 9110 asks for.
fn method_not_allowed(method: &http::Method, path: &str, allow: &'static str) -> Response<Vec<u8>> {
    let mut response = openai_error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} is not allowed for {path}; use {allow}"),
        "invalid_request_error",
        "method_not_allowed",
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    response
}

/// `pool` and `backend` of `/admin/api/upstreams/{pool}/backends/{backend}`, decoded.
fn backend_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/admin/api/upstreams/")?;
    let (pool, backend) = rest.split_once("/backends/")?;
    if pool.is_empty() || backend.is_empty() || pool.contains('/') || backend.contains('/') {
        return None;
    }
    Some((percent_decode(pool)?, percent_decode(backend)?))
}

/// The `key=value` pairs of a query string, percent-decoded (`+` is a space); pairs that do
/// not decode to UTF-8 are dropped.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Some((
                percent_decode(&key.replace('+', " "))?,
                percent_decode(&value.replace('+', " "))?,
            ))
        })
        .collect()
}

/// `text` with its `%XX` escapes decoded; `None` when an escape is malformed or the result
/// is not UTF-8. (Query values have their `+` turned into spaces first.)
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Serves one of the console's embedded files.
fn console_file(asset: &crate::console::Asset) -> Response<Vec<u8>> {
    let mut response = respond(StatusCode::OK, asset.content_type, asset.bytes.to_vec());
    let cache = if crate::console::immutable(asset) {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (http::header::CACHE_CONTROL, cache),
        (
            http::header::CONTENT_SECURITY_POLICY,
            crate::console::CONTENT_SECURITY_POLICY,
        ),
        (http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (http::header::REFERRER_POLICY, "no-referrer"),
        (http::header::X_FRAME_OPTIONS, "DENY"),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    response
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    let length = response.body().len();
    if let Ok(value) = length.to_string().parse() {
        response
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, value);
    }
    response
}

/// A JSON answer, never stored by a browser or a proxy: the configuration, audit records
/// with prompt text and caller lists come this way.
fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    let mut response = respond(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    );
    let headers = response.headers_mut();
    headers.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    response
}

#[async_trait]
impl ServeHttp for Admin {
    /// The answer to a HEAD request is a GET's header alone, with the length its content
    /// would have: content on it is a protocol error on HTTP/2.
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let head = session.req_header().method == http::Method::HEAD;
        let mut response = self.answer(session).await;
        if head {
            response.body_mut().clear();
        }
        response
    }
}

impl Admin {
    async fn answer(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let header = session.req_header();
        let method = header.method.clone();
        let path = header.uri.path().to_owned();
        let query = header.uri.query().map(str::to_owned);
        if (method == http::Method::GET || method == http::Method::HEAD)
            && let Some(asset) = crate::console::find(&path)
        {
            return console_file(asset);
        }
        // The tokens in force, so that a rotated token takes effect with a reload; a reload
        // cannot take every token away (that needs a restart: the listener may be exposed).
        let routing = self.state.routing();
        let tokens = match routing.config.server.admin_tokens.as_slice() {
            [] => &self.state.config.server.admin_tokens,
            in_force => in_force,
        };
        // Without tokens the listener is on loopback, and the browser is the way in: a page
        // whose name was rebound to 127.0.0.1 (DNS rebinding) or a cross-site form. Such
        // requests name another host or come from another origin.
        if tokens.is_empty()
            && let Err(problem) = addressed_from_this_machine(&header.headers)
        {
            return json(
                StatusCode::FORBIDDEN,
                &serde_json::json!({"error": {"message": problem, "type": "permission_error", "param": null, "code": "not_loopback"}}),
            );
        }
        if !tokens.is_empty() && !crate::auth::bearer_matches(&header.headers, tokens) {
            let mut response = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": {"message": "the admin API needs `Authorization: Bearer TOKEN`", "type": "authentication_error", "param": null, "code": "invalid_api_key"}}),
            );
            if let Ok(value) = "Bearer".parse() {
                response
                    .headers_mut()
                    .insert(http::header::WWW_AUTHENTICATE, value);
            }
            return response;
        }
        if path == "/admin/api/reload" && method == http::Method::POST {
            let state = Arc::clone(&self.state);
            // Resolving backend host names blocks.
            let outcome =
                tokio::task::spawn_blocking(move || crate::reload::reload(&state, "admin API"))
                    .await;
            return match outcome {
                Ok(Ok(report)) => json(
                    StatusCode::OK,
                    &serde_json::to_value(report).unwrap_or_default(),
                ),
                Ok(Err(errors)) => json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"reloaded": false, "errors": errors}),
                ),
                Err(error) => json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"reloaded": false, "errors": [crate::error::join_failure(&error)]}),
                ),
            };
        }
        if path == "/admin/api/explain" && method == http::Method::POST {
            return self.explain(session).await;
        }
        if let Some((pool, backend)) = backend_path(&path)
            && method == http::Method::PUT
        {
            return self.set_weight(session, pool, backend).await;
        }
        if path == "/admin/api/config" {
            if method == http::Method::PUT {
                return self.replace_configuration(session).await;
            }
            if method == http::Method::GET || method == http::Method::HEAD {
                return self.configuration().await;
            }
        }
        if path == "/admin/api/audit/records"
            && (method == http::Method::GET || method == http::Method::HEAD)
        {
            // A client elsewhere than this machine gets records as exports do: without the
            // text of requests that stayed on the premises.
            let on_this_machine = session
                .client_addr()
                .and_then(|address| address.as_inet())
                .is_some_and(|address| address.ip().to_canonical().is_loopback());
            return self.audit_records(query.as_deref(), on_this_machine).await;
        }
        match allowed_methods(&path) {
            None => {
                return json(
                    StatusCode::NOT_FOUND,
                    &serde_json::json!({"error": {"message": format!("unknown URL: {method} {path}"), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
                );
            }
            Some(allow) if !allow.split(", ").any(|allowed| allowed == method.as_str()) => {
                return method_not_allowed(&method, &path, allow);
            }
            Some(_) => {}
        }
        match path.as_str() {
            "/healthz" => {
                let failed = self.state.failed_models();
                if failed.is_empty() {
                    respond(
                        StatusCode::OK,
                        "text/plain; charset=utf-8",
                        b"ok\n".to_vec(),
                    )
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain; charset=utf-8",
                        format!(
                            "an inference thread of {} is down after a panic: it restarts, \
                             unless it panicked three times in ten minutes (then restart the \
                             gateway)\n",
                            failed.join(", ")
                        )
                        .into_bytes(),
                    )
                }
            }
            "/readyz" => {
                let (status, body) = self.readiness();
                json(status, &body)
            }
            "/metrics" => {
                let body = self.state.metrics.render(&crate::metrics::Live {
                    models: &self.state.model_gauges(),
                    backends: &self.state.routing().pools.status(),
                    gpus: &self.state.gpu_samples(),
                    open_connections: self.state.open_connections.get(),
                    connection_refusals: self.state.connection_refusals.counts(),
                    ready: self.state.ready_to_serve(),
                    restart_required: &crate::reload::restart_required(&self.state),
                    stored_responses: self.state.responses.as_ref().map(|store| store.usage()),
                });
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.into_bytes(),
                )
            }
            "/admin/api/models" => json(StatusCode::OK, &self.models()),
            "/admin/api/callers" => json(StatusCode::OK, &self.callers()),
            "/admin/api/audit" => json(
                StatusCode::OK,
                &match &self.state.audit {
                    Some(trail) => serde_json::json!({
                        "enabled": true,
                        "stream_id": trail.log.stream_id(),
                        "healthy": trail.log.is_healthy(),
                        "fail_closed": trail.log.fail_closed(),
                        "exported_up_to": trail.log.exported_up_to(),
                        "syslog": trail.log.syslog_status(),
                    }),
                    None => serde_json::json!({ "enabled": false }),
                },
            ),
            "/admin/api/upstreams" => json(
                StatusCode::OK,
                &serde_json::json!({ "backends": self.state.routing().pools.status() }),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": {"message": format!("unknown URL: {method} {path}"), "type": "invalid_request_error", "param": null, "code": "unknown_url"}}),
            ),
        }
    }
}

/// Whether a request to the tokenless (loopback) admin listener names a loopback host
/// (`localhost`, `127.0.0.1`, `[::1]`, with any port) in `Host`, and, when it carries an
/// `Origin`, comes from a page of such a host; else why not.
fn addressed_from_this_machine(headers: &http::HeaderMap) -> Result<(), String> {
    if let Some(host) = headers.get(http::header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !is_loopback_authority(host) {
            return Err(format!(
                "the admin API without admin tokens answers requests for a loopback host \
                 (localhost, 127.0.0.1, [::1]), not `{}`",
                host.escape_debug()
            ));
        }
    }
    // What browsers say of every request they send: one a page of another site made (an
    // `<img>` or a form needs no `Origin`) is not the operator's.
    if let Some(site) = headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Err(format!(
            "the admin API without admin tokens answers its own pages and clients other than \
             browsers, not a request another page made (Sec-Fetch-Site: {})",
            String::from_utf8_lossy(site.as_bytes()).escape_debug()
        ));
    }
    if let Some(origin) = headers.get(http::header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if !authority.is_some_and(is_loopback_authority) {
            return Err(format!(
                "the admin API without admin tokens answers pages of a loopback host, not \
                 origin `{}`",
                origin.escape_debug()
            ));
        }
    }
    Ok(())
}

/// `HOST[:PORT]` where HOST is `localhost` or a loopback address.
fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((host, port)) if port.is_empty() || port.starts_with(':') => host,
            _ => return false,
        },
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

#[cfg(test)]
mod tests;
