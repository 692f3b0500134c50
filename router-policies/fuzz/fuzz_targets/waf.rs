//! Fuzzes the firewall on untrusted request parts: `cargo +nightly fuzz run waf` from
//! `router-policies/`. The input is split at NUL bytes into a target, a header value, a
//! prompt and the body's other strings.
//!
//! Checks that inspection never panics, that the score is the sum of the matched rules'
//! severities, each rule at most once, and that the action follows the threshold.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use router_policies::waf::{INBOUND_THRESHOLD_DEFAULT, Waf, WafAction, WafRequest, inspect};

/// Compiled once: building the automatons costs far more than one inspection.
static WAF: OnceLock<Waf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\0');
    let target = parts.next().unwrap_or_default();
    let value = parts.next().unwrap_or_default();
    let prompts = [parts.next().unwrap_or_default().to_owned()];
    let other = parts.next().unwrap_or_default();
    let headers = [
        ("user-agent", value),
        ("referer", value),
        ("content-type", value),
    ];
    let verdict = inspect(
        WAF.get_or_init(Waf::default),
        &WafRequest {
            method: "POST",
            target,
            headers: &headers,
            prompt_texts: &prompts,
            other_text: other,
            caller: None,
        },
    );
    let score: u32 = verdict
        .matches
        .iter()
        .map(|found| found.rule.severity.score())
        .sum();
    assert_eq!(verdict.score, score);
    let mut ids = verdict.rule_ids();
    ids.dedup();
    assert_eq!(ids.len(), verdict.matches.len(), "a rule counted twice");
    assert_eq!(
        verdict.action == WafAction::Blocked,
        score >= INBOUND_THRESHOLD_DEFAULT
    );
});
