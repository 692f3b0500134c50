use serde_json::{Map, Value, json};

use super::{Tally, percentile, render};

fn record(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

fn outcome(seq: u64, request: &str, properties: Value) -> Map<String, Value> {
    record(json!({
        "Category": "IsthmusAudit",
        "TimeGenerated": format!("2026-11-23T08:00:{seq:02}Z"),
        "ResultType": "Succeeded",
        "RequestId": request,
        "Seq": seq,
        "Properties": properties,
    }))
}

#[test]
fn sensitive_requests_are_counted_by_where_they_went_and_leaks_are_named() {
    let mut tally = Tally::default();
    let intent = |request: &str| {
        record(json!({"Category": "IsthmusAudit", "RequestId": request,
            "Properties": {"Phase": "intent", "Route": "local"}}))
    };
    tally.add(&intent("r1"));
    tally.add(&outcome(
        2,
        "r1",
        json!({"Route": "local", "SensitiveEntityTypes": ["email"], "PromptTokens": 10,
               "CompletionTokens": 4, "CachedTokens": 8, "TtftMs": 30}),
    ));
    tally.add(&outcome(
        3,
        "r2",
        json!({"Route": "cloud", "SensitiveEntityTypes": ["email", "iban"], "Redactions": 2,
               "Target": "aks/v1", "TtftMs": 90}),
    ));
    tally.add(&outcome(
        4,
        "r3",
        json!({"Route": "cloud", "SensitiveEntityTypes": ["credit_card"], "OnPremises": true,
               "Target": "hci/gpu"}),
    ));
    tally.add(&outcome(
        5,
        "r4",
        json!({"Route": "rejected", "SensitiveEntityTypes": ["credit_card"], "Rule": "fail_closed"}),
    ));
    tally.add(&outcome(
        6,
        "r5",
        json!({"Route": "cloud", "SensitiveEntityTypes": ["aws_key"], "Target": "aks/v2"}),
    ));
    tally.add(&outcome(
        7,
        "r6",
        json!({"Route": "rejected", "WafAction": "Blocked"}),
    ));
    tally.add(&record(json!({"Category": "IsthmusWaf", "RequestId": "r6",
        "Properties": {"RuleId": "990100", "Action": "Blocked"}})));
    tally.add(&intent("r7"));
    tally.add(&record(json!({"Category": "IsthmusCheckpoint"})));
    let tally = tally.finish();

    assert_eq!(tally.requests, 6);
    assert_eq!(tally.unfinished_requests, 1, "r7 never got its outcome");
    let sensitive = &tally.sensitive;
    assert_eq!(
        (
            sensitive.requests,
            sensitive.kept_local,
            sensitive.redacted_to_cloud,
            sensitive.unredacted_to_on_premises_pool,
            sensitive.rejected,
            sensitive.left_unredacted
        ),
        (5, 1, 1, 1, 1, 1)
    );
    assert_eq!(
        sensitive.left_unredacted_records,
        ["Seq 6 RequestId r5 Target aks/v2"]
    );
    assert_eq!(sensitive.by_entity_type["credit_card"], 2);
    assert_eq!(tally.by_route["local"].cached_prompt_tokens, 8);
    assert_eq!(tally.by_route["cloud"].ttft_p50_ms, Some(90));
    assert_eq!(tally.waf.blocked_requests, 1);
    assert_eq!(tally.waf.matches["990100"]["Blocked"], 1);
    assert_eq!(tally.from.as_deref(), Some("2026-11-23T08:00:02Z"));

    let text = render(std::path::Path::new("audit"), "7 records", &tally);
    assert!(
        text.contains("LEFT THE PREMISES UNREDACTED: 1\n    Seq 6 RequestId r5 Target aks/v2\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "kept local 1, redacted to the cloud 1, unredacted to on-premises pools 1, refused 1"
        ),
        "{text}"
    );
    assert!(text.contains("unfinished: 1 request(s)"), "{text}");
}

#[test]
fn percentiles_are_nearest_rank() {
    assert_eq!(percentile(&[], 50), None);
    assert_eq!(percentile(&[7], 95), Some(7));
    let values: Vec<u64> = (1..=20).collect();
    assert_eq!(percentile(&values, 50), Some(10));
    assert_eq!(percentile(&values, 95), Some(19));
}

#[test]
fn requests_with_attachments_are_counted_by_kind_and_where_they_went() {
    let mut tally = Tally::default();
    let cases = [
        json!({"Route": "local", "Attachments": ["image"]}),
        json!({"Route": "rejected", "Attachments": ["file", "image"]}),
        json!({"Route": "cloud", "Attachments": ["audio"], "OnPremises": true}),
        json!({"Route": "cloud", "Attachments": ["image"], "Target": "aks/v1"}),
        json!({"Route": "cloud", "Target": "aks/v1"}),
    ];
    for (seq, properties) in (1..).zip(cases) {
        tally.add(&outcome(seq, &format!("r{seq}"), properties));
    }
    let tally = tally.finish();
    let attachments = &tally.attachments;
    assert_eq!(
        (
            attachments.requests,
            attachments.kept_local,
            attachments.to_on_premises_pool,
            attachments.rejected,
            attachments.to_cloud
        ),
        (4, 1, 1, 1, 1)
    );
    assert_eq!(attachments.by_kind["image"], 3);
    let text = render(std::path::Path::new("audit"), "5 records", &tally);
    assert!(
        text.contains(
            "attachments the scan cannot read: 4 requests (audio 1, file 1, image 3)\n  kept local 1, to on-premises pools 1, refused 1, to the cloud unscanned 1\n"
        ),
        "{text}"
    );
}

#[test]
fn intents_pair_with_outcomes_by_correlation_id_whatever_request_id_the_client_sent() {
    let mut tally = Tally::default();
    let with = |correlation: &str, phase: Option<&str>| {
        let properties = match phase {
            Some(phase) => json!({"Phase": phase, "Route": "local"}),
            None => json!({"Route": "local"}),
        };
        record(json!({"Category": "IsthmusAudit", "RequestId": "same-id",
            "CorrelationId": correlation, "Properties": properties}))
    };
    // Two requests under one client-chosen id; only the first finishes.
    tally.add(&with(
        "6f1c0b0e-0000-4000-8000-000000000001",
        Some("intent"),
    ));
    tally.add(&with(
        "6f1c0b0e-0000-4000-8000-000000000002",
        Some("intent"),
    ));
    tally.add(&with("6f1c0b0e-0000-4000-8000-000000000001", None));
    assert_eq!(tally.finish().unfinished_requests, 1);
}
