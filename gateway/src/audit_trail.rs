//! What the data plane writes to the audit log: an intent record before a response's first
//! byte, and the outcome record before its final bytes (or, for requests that end without
//! them, when they end). Records carry types, ids, counts and timings, never a key; prompt
//! and completion text only where `[audit.content]` covers the request's route or rule
//! ([`capture_prompt`], [`capture_completion`]; see [`crate::audit::content`]).

use std::sync::Arc;
use std::time::SystemTime;

use pingora_proxy::Session;

use crate::audit::content::{Captured, ContentPolicy};
use crate::audit::record::{Category, Level, Record, ResultType};
use crate::audit::{AuditError, AuditLog};
use crate::auth::Caller;
use crate::data_plane::{Failure, RequestContext};

/// The OCSF API Activity ids: 1 create (a completion), 2 read (a listing, a stored
/// response, a browser's CORS preflight), 4 delete (a stored response).
fn ocsf_activity(method: &str, path: &str) -> u32 {
    match method {
        "DELETE" => 4,
        "GET" | "HEAD" | "OPTIONS" => 2,
        _ if path.ends_with("/models") => 2,
        _ => 1,
    }
}

/// The Azure-style operation name: `Isthmus/inference/<action>/action` for inference (and
/// `.../preflight` for a browser's CORS preflight of it),
/// `.../responses/read`, `.../responses/inputItems/read` and `.../responses/delete` for
/// stored responses.
fn operation(method: &str, path: &str) -> String {
    let path = path.trim_end_matches('/');
    if path.contains("/responses/") {
        let verb = if method == "DELETE" { "delete" } else { "read" };
        let noun = if path.ends_with("/input_items") {
            "responses/inputItems"
        } else {
            "responses"
        };
        return format!("Isthmus/inference/{noun}/{verb}");
    }
    let action = if path.ends_with("/chat/completions") {
        "chat/completions"
    } else if path.ends_with("/completions") {
        "completions"
    } else if path.ends_with("/models") || path.contains("/models/") {
        "models"
    } else if path.ends_with("/responses") {
        "responses"
    } else if path.ends_with("/embeddings") {
        "embeddings"
    } else {
        "other"
    };
    let verb = if method == "OPTIONS" {
        "preflight"
    } else {
        "action"
    };
    format!("Isthmus/inference/{action}/{verb}")
}

/// The record of a request as `ctx` knows it now.
pub fn record(
    session: &Session,
    ctx: &RequestContext,
    instance: &str,
    policy_hash: &str,
    intent: bool,
) -> Record {
    let header = session.req_header();
    let path = header.uri.path();
    let status = ctx.final_status(session);
    let route = ctx.route_label();
    let (result, level) = match (intent, route, status) {
        (true, _, _) => (ResultType::Succeeded, Level::Informational),
        (false, "rejected", _) => (ResultType::Rejected, Level::Warning),
        (false, _, _) if ctx.cut_short => (ResultType::Failed, Level::Error),
        (false, _, 200..=399) => (ResultType::Succeeded, Level::Informational),
        (false, _, 400..=499) => (ResultType::Rejected, Level::Warning),
        (false, _, _) => (ResultType::Failed, Level::Error),
    };
    let description = if intent {
        "responding".to_owned()
    } else {
        ctx.outcome.clone().unwrap_or_else(|| "answered".to_owned())
    };
    let client = ctx
        .client_ip
        .map(|address| address.to_string())
        .unwrap_or_default();
    let method = header.method.as_str();
    let mut builder = Record::builder(Category::Audit, operation(method, path), SystemTime::now())
        .result(result, status.to_string(), description)
        .duration_ms(u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX))
        .level(level)
        .caller_ip_address(client)
        .correlation_id(ctx.correlation_id.clone())
        .request_id(ctx.request_id.clone())
        .gateway_instance(instance)
        .ocsf_activity_id(ocsf_activity(method, path));
    if let Some(traceparent) = &ctx.traceparent {
        builder = builder.trace_parent(traceparent.clone());
    }
    builder = match &ctx.caller {
        Some(Caller::ApiKey { id }) => builder
            .identity("AuthType", "ApiKey")
            .identity("KeyId", id.clone()),
        Some(Caller::Anonymous) => builder.identity("AuthType", "Anonymous"),
        None => builder.identity("AuthType", "None"),
    };
    builder = builder
        .property("Route", route)
        .property("Rule", ctx.rule())
        .property("Method", header.method.as_str())
        .property("Path", path)
        .property("PolicyHash", policy_hash);
    if let Some(target) = &ctx.target {
        builder = builder.property("Target", target.clone());
    }
    // A Responses API request: the response's id, whether it is kept, what it continued.
    if let Some(responses) = &ctx.responses {
        builder = builder
            .property("ResponseId", responses.id().to_owned())
            .property("ResponseStored", responses.stored());
        if let Some(previous) = responses.previous_response_id() {
            builder = builder.property("PreviousResponseId", previous.to_owned());
        }
    }
    if !intent {
        builder = builder
            .property("Attempts", ctx.attempts)
            .property("PromptTokens", ctx.usage.prompt_tokens)
            .property("CompletionTokens", ctx.usage.completion_tokens)
            .property("CachedTokens", ctx.usage.cached_tokens);
        if let Some(first_token) = ctx.first_token {
            builder = builder.property(
                "TtftMs",
                u64::try_from(first_token.as_millis()).unwrap_or(u64::MAX),
            );
        }
        if let Some(reason) = ctx.finish_reason {
            builder = builder.property("FinishReason", reason);
        }
    }
    if !ctx.sensitive_entities.is_empty() {
        builder = builder.property("SensitiveEntityTypes", ctx.sensitive_entities.clone());
    }
    if !ctx.attachments.is_empty() {
        builder = builder.property("Attachments", ctx.attachments.clone());
    }
    if ctx.redactions > 0 {
        builder = builder.property("Redactions", ctx.redactions);
    }
    if ctx.on_premises && route == "cloud" {
        builder = builder.property("OnPremises", true);
    }
    if let Some(complexity) = ctx.complexity {
        // Thousandths: the hashed record holds integers only.
        builder = builder.property("ComplexityMilli", (complexity * 1000.0).round() as i64);
    }
    if let Some(degraded) = ctx.degraded {
        builder = builder.property("Degraded", degraded);
    }
    if let Some((action, score, rule_ids)) = &ctx.waf {
        builder = builder
            .property("WafAction", *action)
            .property("WafScore", *score)
            .property("WafRuleIds", rule_ids.clone());
    }
    // Content last: it takes the room the rest leaves.
    let policy = ctx
        .trail
        .as_ref()
        .and_then(|trail| trail.content.as_deref());
    if let (false, Some(policy), Some(captured)) = (intent, policy, &ctx.content)
        && policy.covers(route, ctx.rule())
    {
        for (name, value) in captured.members(builder.room_bytes()) {
            builder = builder.property(name, value);
        }
    }
    builder.build()
}

/// The firewall's findings on a request as `IsthmusWaf` records, one per matched rule, with
/// the field names of Azure's `AGCFirewallLogs`; correlated with the request's own record by
/// `RequestId`. Where and what kind of pattern matched, never the matched text; the URI
/// without its query.
pub fn waf_records(
    session: &Session,
    ctx: &RequestContext,
    verdict: &router_policies::waf::WafVerdict,
    instance: &str,
) -> Vec<Record> {
    let header = session.req_header();
    let client = ctx
        .client_ip
        .map(|address| address.to_string())
        .unwrap_or_default();
    let host = header
        .uri
        .host()
        .map(str::to_owned)
        .or_else(|| {
            header
                .headers
                .get(http::header::HOST)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let (result, level) = match verdict.action {
        router_policies::waf::WafAction::Blocked => (ResultType::Rejected, Level::Warning),
        _ => (ResultType::Succeeded, Level::Informational),
    };
    let now = SystemTime::now();
    verdict
        .matches
        .iter()
        .map(|found| {
            Record::builder(Category::Waf, "Isthmus/waf/inspect/action", now)
                .result(
                    result,
                    if verdict.action == router_policies::waf::WafAction::Blocked {
                        "403"
                    } else {
                        "0"
                    },
                    found.rule.message,
                )
                .level(level)
                .caller_ip_address(client.clone())
                .correlation_id(ctx.correlation_id.clone())
                .request_id(ctx.request_id.clone())
                .gateway_instance(instance)
                .ocsf_activity_id(99)
                .property("Action", verdict.action.as_str())
                .property("RuleId", found.rule.id.to_string())
                .property("RuleSetType", router_policies::waf::RULE_SET_TYPE)
                .property("RuleSetVersion", router_policies::waf::RULE_SET_VERSION)
                .property("Severity", found.rule.severity.as_str())
                .property("Message", found.rule.message)
                .property(
                    "DetailedData",
                    format!("{}: {}", found.location, found.detail),
                )
                .property("Hostname", host.clone())
                .property("RequestUri", header.uri.path())
                .property("ClientIp", client.clone())
                .property("AnomalyScore", verdict.score)
                .build()
        })
        .collect()
}

/// Starts capturing the request's text for its record when `[audit.content]` covers the
/// route and rule decided so far: the prompt from `body` (the body as received, or the
/// redacted body that goes to the cloud with `redacted`). Call again when the route changes
/// (a fallback); a request not covered captures nothing.
pub fn capture_prompt(ctx: &mut RequestContext, body: &[u8], redacted: bool) {
    let text_bytes_max = ctx
        .trail
        .as_ref()
        .and_then(|trail| trail.content.as_deref())
        .filter(|policy| policy.covers(ctx.route_label(), ctx.rule()))
        .map(|policy| policy.text_bytes_max);
    ctx.content = text_bytes_max.map(|bytes_max| Captured::new(body, redacted, bytes_max));
}

/// Appends generated text to the capture, if there is one.
pub fn capture_completion(ctx: &mut RequestContext, text: &str) {
    if let Some(captured) = &mut ctx.content {
        captured.completion.push(text);
    }
}

/// The log and what every record of this process carries.
#[derive(Debug, Clone)]
pub struct Trail {
    pub log: Arc<AuditLog>,
    pub instance: String,
    /// `[audit.content]`: whose prompt and completion text records carry.
    pub content: Option<Arc<ContentPolicy>>,
}

impl Trail {
    /// Hands the intent record to the log ahead of the response's first byte. It is not
    /// awaited: records commit in order, so it is durable no later than the outcome, and
    /// within one group commit (a fraction of a millisecond under load) in any case.
    pub fn intent(&self, session: &Session, ctx: &RequestContext) -> Result<(), AuditError> {
        let record = record(session, ctx, &self.instance, &ctx.policy_hash, true);
        self.log.submit_intent(record).map(|_| ())
    }
}

/// Makes the outcome record durable before the response's final bytes: call right before
/// writing them. Once per request; later calls do nothing. When the log cannot take it, the
/// final bytes must not go out (the caller drops the connection instead), unless the
/// deployment set `fail_closed = false`.
pub async fn seal(session: &Session, ctx: &mut RequestContext) -> Result<(), Failure> {
    // The usage is final here, before the last bytes: the caller's next request sees it.
    ctx.charge_rate_limit();
    let Some(trail) = ctx.trail.clone() else {
        return Ok(());
    };
    if ctx.sealed {
        return Ok(());
    }
    ctx.sealed = true;
    let record = record(session, ctx, &trail.instance, &ctx.policy_hash, false);
    match trail.log.append(record).await {
        Ok(_) => Ok(()),
        // A deployment that chose availability over the record answers anyway.
        Err(error) if !trail.log.fail_closed() => {
            tracing::error!(request_id = %ctx.request_id, %error, "audit outcome record not durable; answering anyway (fail_closed = false)");
            Ok(())
        }
        Err(error) => Err(Failure::ClientGone(format!(
            "the audit log could not make the outcome durable ({error}); the response was cut short"
        ))),
    }
}

/// For requests that ended without their final bytes (client gone, broken stream): the
/// outcome record, queued without waiting.
pub fn seal_late(session: &Session, ctx: &mut RequestContext) {
    let Some(trail) = ctx.trail.clone() else {
        return;
    };
    if ctx.sealed {
        return;
    }
    ctx.sealed = true;
    let record = record(session, ctx, &trail.instance, &ctx.policy_hash, false);
    if let Err(error) = trail.log.submit(record) {
        tracing::error!(request_id = %ctx.request_id, %error, "audit record not queued");
    }
}
