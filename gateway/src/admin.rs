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
        let ready = models_loaded && listeners_bound;
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
                "listeners_bound": listeners_bound,
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
}

impl Admin {
    /// Explains the routing of the chat body posted, with the admin request's headers as the
    /// request's and the live signals; nothing runs and no state changes.
    async fn explain(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        const EXPLAIN_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > EXPLAIN_BODY_BYTES_MAX {
                        return json(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &serde_json::json!({"error": {"message": "the body exceeds 8 MiB", "type": "invalid_request_error", "param": null, "code": "request_too_large"}}),
                        );
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        &serde_json::json!({"error": {"message": format!("reading the body: {error}"), "type": "invalid_request_error", "param": null, "code": "invalid_json"}}),
                    );
                }
            }
        }
        let envelope = match crate::openai::parse_envelope(&body) {
            Ok(envelope) => envelope,
            Err(error) => {
                return json(
                    error.status(),
                    &serde_json::to_value(error.body()).unwrap_or_default(),
                );
            }
        };
        let routing = self.state.routing();
        let header = session.req_header();
        let headers = crate::facts::header_pairs(&header.headers);
        let request = crate::facts::RequestView {
            path: "/v1/chat/completions",
            target: "/v1/chat/completions",
            method: "POST",
            headers: &headers,
            caller: None,
            model: envelope.model.as_deref(),
            body: &body,
        };
        let loads = self.state.local_loads();
        let state = self.state.route_state();
        let evaluation =
            crate::facts::evaluate(&routing, &request, &loads, |policy, facts, signals| {
                router_policies::decide(policy, facts, signals, state)
            });
        json(
            StatusCode::OK,
            &crate::facts::explanation(&evaluation, &routing.policy),
        )
    }
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

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Vec<u8>> {
    respond(
        status,
        "application/json",
        serde_json::to_vec(value).unwrap_or_default(),
    )
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let header = session.req_header();
        let method = header.method.clone();
        let path = header.uri.path().to_owned();
        let tokens = &self.state.config.server.admin_tokens;
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
                    &serde_json::json!({"reloaded": false, "errors": [error.to_string()]}),
                ),
            };
        }
        if path == "/admin/api/explain" && method == http::Method::POST {
            return self.explain(session).await;
        }
        if method != http::Method::GET && method != http::Method::HEAD {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({"error": {"message": format!("method {method} is not allowed"), "type": "invalid_request_error", "param": null, "code": "method_not_allowed"}}),
            );
        }
        match path.as_str() {
            "/healthz" => respond(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                b"ok\n".to_vec(),
            ),
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
                    ready: self.state.ready(),
                });
                respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.into_bytes(),
                )
            }
            "/admin/api/models" => json(StatusCode::OK, &self.models()),
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
