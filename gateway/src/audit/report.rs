//! `isthmus audit report`: what a verified audit trail shows, for the people who must prove
//! where data went. The chain is verified first (as `audit verify` does); the figures are
//! taken only from records whose hashes, links and checkpoint signatures held:
//!
//! - requests by route and result, with tokens and time to first token per route;
//! - every request in which the sensitivity scan found something, by where it went: answered
//!   locally, sent to the cloud redacted, sent unredacted to a pool marked `on_premises`,
//!   refused, or **sent unredacted to a pool that is not on the premises** (the policy never
//!   does this; any such record is listed, and the command fails);
//! - firewall events by rule and action;
//! - requests whose intent record has no outcome (the process died while answering).

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use serde_json::{Map, Value};

/// The most records listed by name as leaving unredacted (the count is always whole).
const LEFT_UNREDACTED_LISTED_MAX: usize = 20;

/// Tokens and latency of one route.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct RouteTally {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_prompt_tokens: u64,
    #[serde(skip)]
    ttft_ms: Vec<u64>,
    pub ttft_p50_ms: Option<u64>,
    pub ttft_p95_ms: Option<u64>,
}

/// Where requests with sensitive content went.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct SensitiveTally {
    pub requests: u64,
    pub by_entity_type: BTreeMap<String, u64>,
    pub kept_local: u64,
    pub redacted_to_cloud: u64,
    pub unredacted_to_on_premises_pool: u64,
    pub rejected: u64,
    /// Must be 0: unredacted sensitive content to a pool not marked `on_premises`.
    pub left_unredacted: u64,
    /// The first of those, as `Seq RequestId Target`.
    pub left_unredacted_records: Vec<String>,
}

/// Where requests with attachments the scan cannot read (images, audio, video, files, token
/// ids) went.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct AttachmentTally {
    pub requests: u64,
    pub by_kind: BTreeMap<String, u64>,
    pub kept_local: u64,
    /// Forwarded unscanned to a pool not marked `on_premises` (which the policy allowed).
    pub to_cloud: u64,
    pub to_on_premises_pool: u64,
    pub rejected: u64,
}

/// Firewall events.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct WafTally {
    /// Requests the firewall blocked (outcome records with `WafAction` Blocked).
    pub blocked_requests: u64,
    /// Rule matches by rule id and action (`IsthmusWaf` records).
    pub matches: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The figures of a report.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Tally {
    /// `TimeGenerated` of the first and last request counted.
    pub from: Option<String>,
    pub to: Option<String>,
    pub requests: u64,
    pub by_route: BTreeMap<String, RouteTally>,
    pub by_result: BTreeMap<String, u64>,
    pub sensitive: SensitiveTally,
    pub attachments: AttachmentTally,
    pub waf: WafTally,
    /// Intent records whose outcome record never came.
    pub unfinished_requests: u64,
    #[serde(skip)]
    pending_intents: HashSet<String>,
}

impl Tally {
    /// Counts one verified record.
    pub fn add(&mut self, record: &Map<String, Value>) {
        let text = |name: &str| record.get(name).and_then(Value::as_str).unwrap_or_default();
        let properties = record.get("Properties").and_then(Value::as_object);
        let property = |name: &str| properties.and_then(|properties| properties.get(name));
        let property_text = |name: &str| property(name).and_then(Value::as_str).unwrap_or_default();
        // Intent and outcome pair by the gateway's CorrelationId (records written before it
        // was a GUID of the gateway's own: by RequestId, which the client may have chosen).
        let request_id = match text("CorrelationId") {
            "" => text("RequestId").to_owned(),
            correlation => correlation.to_owned(),
        };
        match text("Category") {
            "IsthmusWaf" => {
                *self
                    .waf
                    .matches
                    .entry(property_text("RuleId").to_owned())
                    .or_default()
                    .entry(property_text("Action").to_owned())
                    .or_default() += 1;
            }
            "IsthmusAudit" if property_text("Phase") == "intent" => {
                self.pending_intents.insert(request_id);
            }
            "IsthmusAudit" => {
                self.pending_intents.remove(&request_id);
                self.add_outcome(record, property);
            }
            _ => {}
        }
    }

    fn add_outcome<'a>(
        &mut self,
        record: &Map<String, Value>,
        property: impl Fn(&str) -> Option<&'a Value>,
    ) {
        let time = record
            .get("TimeGenerated")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if self.from.is_none() {
            self.from.clone_from(&time);
        }
        self.to = time;
        self.requests += 1;
        let result = record
            .get("ResultType")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        *self.by_result.entry(result.to_owned()).or_default() += 1;
        let number = |name: &str| property(name).and_then(Value::as_u64).unwrap_or(0);
        let route = property("Route")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        let tally = self.by_route.entry(route.clone()).or_default();
        tally.requests += 1;
        tally.prompt_tokens += number("PromptTokens");
        tally.completion_tokens += number("CompletionTokens");
        tally.cached_prompt_tokens += number("CachedTokens");
        if let Some(ttft) = property("TtftMs").and_then(Value::as_u64) {
            tally.ttft_ms.push(ttft);
        }
        if property("WafAction").and_then(Value::as_str) == Some("Blocked") {
            self.waf.blocked_requests += 1;
        }
        let on_premises = property("OnPremises").and_then(Value::as_bool) == Some(true);
        let kinds: Vec<&str> = property("Attachments")
            .and_then(Value::as_array)
            .map(|kinds| kinds.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !kinds.is_empty() {
            let attachments = &mut self.attachments;
            attachments.requests += 1;
            for kind in kinds {
                *attachments.by_kind.entry(kind.to_owned()).or_default() += 1;
            }
            match attachment_disposition(&route, on_premises) {
                "kept_local" => attachments.kept_local += 1,
                "on_premises_pool" => attachments.to_on_premises_pool += 1,
                "to_cloud" => attachments.to_cloud += 1,
                _ => attachments.rejected += 1,
            }
        }
        let entities: Vec<&str> = property("SensitiveEntityTypes")
            .and_then(Value::as_array)
            .map(|types| types.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if entities.is_empty() {
            return;
        }
        let sensitive = &mut self.sensitive;
        sensitive.requests += 1;
        for entity in entities {
            *sensitive
                .by_entity_type
                .entry(entity.to_owned())
                .or_default() += 1;
        }
        let redacted = number("Redactions") > 0;
        match sensitive_disposition(&route, redacted, on_premises) {
            "kept_local" => sensitive.kept_local += 1,
            "redacted_to_cloud" => sensitive.redacted_to_cloud += 1,
            "on_premises_pool" => sensitive.unredacted_to_on_premises_pool += 1,
            "left_unredacted" => {
                sensitive.left_unredacted += 1;
                if sensitive.left_unredacted_records.len() < LEFT_UNREDACTED_LISTED_MAX {
                    let seq = record.get("Seq").and_then(Value::as_u64).unwrap_or(0);
                    let request_id = record
                        .get("RequestId")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let target = property("Target")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    sensitive
                        .left_unredacted_records
                        .push(format!("Seq {seq} RequestId {request_id} Target {target}"));
                }
            }
            _ => sensitive.rejected += 1,
        }
    }

    /// Closes the count: percentiles, and intents left without an outcome.
    pub fn finish(mut self) -> Tally {
        for tally in self.by_route.values_mut() {
            tally.ttft_ms.sort_unstable();
            tally.ttft_p50_ms = percentile(&tally.ttft_ms, 50);
            tally.ttft_p95_ms = percentile(&tally.ttft_ms, 95);
        }
        self.unfinished_requests = self.pending_intents.len() as u64;
        self
    }
}

/// Where a request with sensitive content went, by its route, whether it was redacted and
/// whether the pool that answered is marked `on_premises`: `kept_local`,
/// `redacted_to_cloud`, `on_premises_pool`, `rejected`, or `left_unredacted` (which the
/// policy never allows). The metrics and this report use the same names.
pub fn sensitive_disposition(route: &str, redacted: bool, on_premises: bool) -> &'static str {
    match route {
        "local" => "kept_local",
        "cloud" if redacted => "redacted_to_cloud",
        "cloud" if on_premises => "on_premises_pool",
        "cloud" => "left_unredacted",
        _ => "rejected",
    }
}

/// Where a request with attachments the scan cannot read went: `kept_local`,
/// `on_premises_pool`, `to_cloud` (unscanned, as the policy allowed) or `rejected`. The
/// metrics and this report use the same names.
pub fn attachment_disposition(route: &str, on_premises: bool) -> &'static str {
    match route {
        "local" => "kept_local",
        "cloud" if on_premises => "on_premises_pool",
        "cloud" => "to_cloud",
        _ => "rejected",
    }
}

/// The nearest-rank percentile of sorted `values`.
fn percentile(values: &[u64], percent: usize) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let rank = (values.len() * percent).div_ceil(100).max(1);
    values.get(rank - 1).copied()
}

/// The CLI: verifies PATH, then prints the figures (text, or JSON with `json`). Exit 0 when
/// the chain verifies and nothing sensitive left unredacted; 1 when the chain fails or
/// something did (the records are named); 2 when PATH or the key cannot be read.
pub fn run(
    path: &std::path::Path,
    public_keys: &[std::path::PathBuf],
    json: bool,
) -> std::process::ExitCode {
    use std::process::ExitCode;
    let (report, tally) = match super::verify::report_path(path, public_keys) {
        Ok(outcome) => outcome,
        Err(error) => {
            eprintln!("isthmus audit report: {error}");
            return ExitCode::from(2);
        }
    };
    if let Some(problem) = &report.problem {
        println!("{}: FAILED: {problem}", path.display());
        println!("  no report: the trail does not verify");
        return ExitCode::from(1);
    }
    if json {
        let value = serde_json::json!({
            "path": path.display().to_string(),
            "verified": report.summary.to_string(),
            "signatures_checked": report.summary.signatures_checked,
            "report": tally,
        });
        println!("{value:#}");
    } else {
        print!("{}", render(path, &report.summary.to_string(), &tally));
    }
    if tally.sensitive.left_unredacted > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The text form of a report.
pub fn render(path: &std::path::Path, verified: &str, tally: &Tally) -> String {
    use std::fmt::Write as _;
    let mut text = String::new();
    let _ = writeln!(text, "{}: verified: {verified}", path.display());
    let _ = writeln!(
        text,
        "requests: {} ({} to {})",
        tally.requests,
        tally.from.as_deref().unwrap_or("-"),
        tally.to.as_deref().unwrap_or("-")
    );
    for (route, figures) in &tally.by_route {
        let _ = writeln!(
            text,
            "  {route}: {} requests, {} prompt tokens ({} from the prefix cache), {} completion tokens, TTFT p50 {} / p95 {}",
            figures.requests,
            figures.prompt_tokens,
            figures.cached_prompt_tokens,
            figures.completion_tokens,
            milliseconds(figures.ttft_p50_ms),
            milliseconds(figures.ttft_p95_ms)
        );
    }
    let results: Vec<String> = tally
        .by_result
        .iter()
        .map(|(result, count)| format!("{result} {count}"))
        .collect();
    let _ = writeln!(text, "  results: {}", results.join(", "));
    let sensitive = &tally.sensitive;
    let types: Vec<String> = sensitive
        .by_entity_type
        .iter()
        .map(|(entity, count)| format!("{entity} {count}"))
        .collect();
    let _ = writeln!(
        text,
        "sensitive requests: {} ({})",
        sensitive.requests,
        if types.is_empty() {
            "none".to_owned()
        } else {
            types.join(", ")
        }
    );
    let _ = writeln!(
        text,
        "  kept local {}, redacted to the cloud {}, unredacted to on-premises pools {}, refused {}",
        sensitive.kept_local,
        sensitive.redacted_to_cloud,
        sensitive.unredacted_to_on_premises_pool,
        sensitive.rejected
    );
    if sensitive.left_unredacted == 0 {
        let _ = writeln!(text, "  left the premises unredacted: 0");
    } else {
        let _ = writeln!(
            text,
            "  LEFT THE PREMISES UNREDACTED: {}",
            sensitive.left_unredacted
        );
        for record in &sensitive.left_unredacted_records {
            let _ = writeln!(text, "    {record}");
        }
    }
    let attachments = &tally.attachments;
    if attachments.requests > 0 {
        let kinds: Vec<String> = attachments
            .by_kind
            .iter()
            .map(|(kind, count)| format!("{kind} {count}"))
            .collect();
        let _ = writeln!(
            text,
            "attachments the scan cannot read: {} requests ({})",
            attachments.requests,
            kinds.join(", ")
        );
        let _ = writeln!(
            text,
            "  kept local {}, to on-premises pools {}, refused {}, to the cloud unscanned {}",
            attachments.kept_local,
            attachments.to_on_premises_pool,
            attachments.rejected,
            attachments.to_cloud
        );
    }
    let _ = writeln!(
        text,
        "firewall: {} requests blocked",
        tally.waf.blocked_requests
    );
    for (rule, actions) in &tally.waf.matches {
        let actions: Vec<String> = actions
            .iter()
            .map(|(action, count)| format!("{action} {count}"))
            .collect();
        let _ = writeln!(text, "  rule {rule}: {}", actions.join(", "));
    }
    if tally.unfinished_requests > 0 {
        let _ = writeln!(
            text,
            "unfinished: {} request(s) with an intent record and no outcome (the process stopped while answering)",
            tally.unfinished_requests
        );
    }
    text
}

fn milliseconds(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value} ms"))
}

#[cfg(test)]
mod tests;
