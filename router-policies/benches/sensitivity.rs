//! Throughput of the sensitivity scan on 4 KB prompts: prose with a few entities (the common
//! case), prose and code with none, a dense mix, prose in other languages (non-ASCII) with and
//! without look-alike characters to fold, and the same prose with deployment dictionaries and
//! a pattern. Target: 200 MB/s or more on a 4 KB prompt.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use router_policies::redact::{RedactionMap, Restorer, redact};
use router_policies::sensitivity::{
    DictionaryConfig, PatternConfig, RecognizerConfig, Recognizers,
};

const PROMPT_BYTES: usize = 4096;

const PROSE: &str = "The quarterly review covers the migration of the billing service to the new \
cluster. We moved 12 services in 3 waves between 2024-01-15 and 2024-03-02, upgraded the runtime \
from version 1.2.3.4 to 2.0, and closed tickets ORD-2024-000123 and ORD-2024-000187. Latency at \
the 99th percentile fell from 840 ms to 310 ms, and the error rate stayed under 0.2% during every \
cut-over. Please summarise what went well, what went wrong, and which follow-ups we still owe the \
platform team, in no more than five bullet points with one sentence each. ";

const CODE: &str = "fn main() {\n    let items: Vec<u32> = (0..100).map(|x| x * 2).collect();\n    \
for (index, item) in items.iter().enumerate() {\n        if index % 10 == 0 { \
log::info!(\"item {index}: {item}\"); }\n    }\n    let config = Config::load(\"app.toml\")?;\n}\n";

const ENTITIES: &str = "Contact Jane at jane.doe@example.com or +44 20 7946 0958; her card is \
4111 1111 1111 1111 and the refund goes to DE89 3704 0044 0532 0130 00. ";

const SECRETS: &str = "password=hunter22 token eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c AKIAZ3MJQ4R5T6Y7U8I9 \
host 10.20.30.40 ssn 536-22-1234 ";

/// Prose in other languages: non-ASCII, with nothing to fold.
const EUROPEAN: &str = "Die Überprüfung der Abrechnung für das dritte Quartal ergab, dass \
die Migration größtenteils reibungslos verlief. Le délai de réponse a baissé de 840 ms à 310 ms, \
et le taux d'erreur est resté sous 0,2 % pendant chaque bascule. Résumez ce qui s'est bien passé. ";

/// The same prose as pasted from a word processor: no-break spaces and en dashes, folded.
const PASTED: &str = "Die Überprüfung der Abrechnung – drittes Quartal – ergab, dass die \
Migration größtenteils reibungslos verlief. Le délai de réponse a baissé de 840\u{a0}ms à \
310\u{a0}ms, et le taux d'erreur est resté sous 0,2\u{a0}% pendant chaque bascule\u{a0}: \
«\u{a0}Résumez ce qui s'est bien passé\u{a0}». ";

/// `parts` repeated in turn up to [`PROMPT_BYTES`], cut on a character boundary.
fn prompt(parts: &[&str]) -> String {
    let mut text = String::with_capacity(PROMPT_BYTES + 512);
    while text.len() < PROMPT_BYTES {
        for part in parts {
            text.push_str(part);
        }
    }
    let mut end = PROMPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn deployment() -> Recognizers {
    let config = RecognizerConfig {
        dictionaries: vec![
            DictionaryConfig {
                name: "projects".to_owned(),
                terms: [
                    "Falcon",
                    "Blue Heron",
                    "Northwind",
                    "Project Aurora",
                    "Tailspin",
                ]
                .map(str::to_owned)
                .to_vec(),
            },
            DictionaryConfig {
                name: "customers".to_owned(),
                terms: (0..500)
                    .map(|index| format!("Customer {index:04}"))
                    .collect(),
            },
        ],
        patterns: vec![PatternConfig {
            name: "ticket".to_owned(),
            regex: r"\bINC-\d{6}\b".to_owned(),
        }],
        disabled: Vec::new(),
    };
    Recognizers::compile(&config).unwrap_or_default()
}

fn scan(criterion: &mut Criterion) {
    let builtin = Recognizers::default();
    let deployment = deployment();
    let cases = [
        (
            "prose_with_entities_4k",
            prompt(&[PROSE, PROSE, ENTITIES, CODE]),
        ),
        ("prose_and_code_4k", prompt(&[PROSE, CODE])),
        ("dense_4k", prompt(&[ENTITIES, SECRETS])),
        ("european_prose_4k", prompt(&[EUROPEAN, ENTITIES])),
        ("pasted_prose_4k", prompt(&[PASTED, ENTITIES])),
    ];
    let mut group = criterion.benchmark_group("scan");
    group.throughput(Throughput::Bytes(PROMPT_BYTES as u64));
    for (name, text) in &cases {
        group.bench_function(*name, |bencher| {
            bencher.iter(|| builtin.scan(std::hint::black_box(text)))
        });
    }
    let (_, text) = &cases[0];
    group.bench_function("prose_with_entities_4k_dictionaries", |bencher| {
        bencher.iter(|| deployment.scan(std::hint::black_box(text)))
    });
    group.finish();

    let mut group = criterion.benchmark_group("redact");
    group.throughput(Throughput::Bytes(PROMPT_BYTES as u64));
    let findings = builtin.scan(text);
    group.bench_function("redact_4k", |bencher| {
        bencher.iter(|| {
            redact(
                std::hint::black_box(text),
                &findings,
                &mut RedactionMap::new(),
            )
        })
    });
    let mut map = RedactionMap::new();
    let redacted = redact(text, &findings, &mut map);
    group.bench_function("restore_stream_4k_in_16_byte_chunks", |bencher| {
        bencher.iter(|| {
            let mut restorer = Restorer::new(map.clone());
            let mut restored = String::with_capacity(redacted.len() * 2);
            let mut rest = redacted.as_str();
            while !rest.is_empty() {
                let mut cut = rest.len().min(16);
                while !rest.is_char_boundary(cut) {
                    cut += 1;
                }
                restored.push_str(&restorer.push(&rest[..cut]));
                rest = &rest[cut..];
            }
            restored.push_str(&restorer.finish());
            restored
        })
    });
    group.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
