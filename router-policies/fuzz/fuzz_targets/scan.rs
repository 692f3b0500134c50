//! Fuzzes the sensitivity scan and redaction with restore on untrusted prompt text:
//! `cargo +nightly fuzz run scan` from `router-policies/`.
//!
//! Checks that scanning never panics, that findings are sorted, disjoint, non-empty and on
//! character boundaries, that restoring a redacted text gives it back, and that streaming
//! the restore in two chunks cut anywhere gives the one-shot result.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use router_policies::redact::{RedactionMap, Restorer, redact};
use router_policies::sensitivity::{
    DictionaryConfig, PatternConfig, RecognizerConfig, Recognizers,
};

/// Compiled once: compiling per input would spend the run on the regex compiler.
static RECOGNIZERS: LazyLock<Recognizers> = LazyLock::new(|| {
    let config = RecognizerConfig {
        dictionaries: vec![DictionaryConfig {
            name: "projects".to_owned(),
            terms: vec!["Falcon".to_owned(), "Zoë Café".to_owned()],
        }],
        patterns: vec![PatternConfig {
            name: "ticket".to_owned(),
            regex: r"\bINC-\d{6}\b".to_owned(),
        }],
        disabled: Vec::new(),
    };
    let Ok(recognizers) = Recognizers::compile(&config) else {
        panic!("the fuzz configuration compiles");
    };
    recognizers
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let recognizers = &*RECOGNIZERS;
    let findings = recognizers.scan(text);
    let mut previous_end = 0;
    for finding in &findings {
        assert!(
            finding.span.start >= previous_end,
            "findings overlap or are unsorted"
        );
        assert!(finding.span.start < finding.span.end && finding.span.end <= text.len());
        assert!(
            text.is_char_boundary(finding.span.start) && text.is_char_boundary(finding.span.end)
        );
        previous_end = finding.span.end;
    }
    let mut map = RedactionMap::new();
    let redacted = redact(text, &findings, &mut map);
    // A text that already holds a placeholder-like string may not round-trip.
    if !text.contains('<') {
        assert_eq!(map.restore(&redacted), text);
    }
    let whole = map.restore(&redacted);
    let cut = data.first().map_or(0, |&byte| usize::from(byte)) % (redacted.len() + 1);
    if redacted.is_char_boundary(cut) {
        let mut restorer = Restorer::new(map);
        let mut streamed = restorer.push(&redacted[..cut]);
        streamed.push_str(&restorer.push(&redacted[cut..]));
        streamed.push_str(&restorer.finish());
        assert_eq!(streamed, whole);
    }
});
