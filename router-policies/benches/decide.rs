//! The whole routing decision on a 4 KB prompt, as the gateway makes it: the sensitivity
//! scan, the complexity score and `decide` over a policy of five rules with spillover.
//! Target: median 20 µs or less. The same on a short chat prompt (about 400 bytes, the size
//! `isthmus bench --prompt-tokens 64` sends) shows the cost every request pays whatever its
//! length.

use criterion::{Criterion, criterion_group, criterion_main};
use router_policies::complexity::{ComplexityFacts, ComplexityModel};
use router_policies::sensitivity::Recognizers;
use router_policies::{
    Action, CloudPool, Conditions, LocalLoad, LocalModel, Policy, RequestFacts, RouteState, Rule,
    Sensitivity, Signals, Spillover, decide,
};

const PROMPT_BYTES: usize = 4096;

const PROSE: &str = "The quarterly review covers the migration of the billing service to the new \
cluster. We moved 12 services in 3 waves between 2024-01-15 and 2024-03-02 and closed tickets \
ORD-2024-000123 and ORD-2024-000187. Latency at the 99th percentile fell from 840 ms to 310 ms. \
First explain what went well, then derive which follow-ups we still owe, step by step. ";
const ENTITIES: &str =
    "Refunds go to DE89 3704 0044 0532 0130 00; questions to jane.doe@example.com. ";

/// The short prompt: plain words, no entities.
const SHORT: &str = "Continue this text: river garden window silver morning lantern harbor \
meadow pencil thunder orchard velvet canyon blossom compass feather marble lighthouse \
cinnamon glacier ribbon saddle quarry tundra violet walnut yonder zephyr anchor bramble \
cobalt dune ember fjord granite hollow island jasper kettle lagoon mosaic nectar oyster \
pebble quartz rustic summit timber umber valley willow xylem yarrow zenith acorn birch \
cedar delta";

fn prompt() -> String {
    let mut text = String::new();
    while text.len() < PROMPT_BYTES {
        text.push_str(PROSE);
        text.push_str(PROSE);
        text.push_str(ENTITIES);
    }
    text.truncate(PROMPT_BYTES);
    text
}

fn policy() -> Policy {
    let rule = |name: &str, conditions: Conditions, action: Action| Rule {
        name: name.to_owned(),
        conditions,
        action,
    };
    let pool = |pool: &str| Action::Cloud {
        pool: pool.to_owned(),
        model: Some("gpt-4o".to_owned()),
    };
    let rules = vec![
        rule(
            "blocked",
            Conditions {
                callers: vec!["mallory".to_owned()],
                ..Conditions::default()
            },
            Action::Reject {
                status: 403,
                message: "blocked".to_owned(),
            },
        ),
        rule(
            "finance",
            Conditions {
                headers: vec![("x-team".to_owned(), "finance".to_owned())],
                ..Conditions::default()
            },
            Action::RedactThenCloud {
                pool: "aks".to_owned(),
                model: None,
            },
        ),
        rule(
            "secrets-local",
            Conditions {
                entities: vec!["aws_access_key".to_owned(), "private_key".to_owned()],
                ..Conditions::default()
            },
            Action::Local {
                model: "smollm2".to_owned(),
            },
        ),
        rule(
            "sensitive-local",
            Conditions {
                sensitive: Some(true),
                ..Conditions::default()
            },
            Action::Local {
                model: "smollm2".to_owned(),
            },
        ),
        rule(
            "complex",
            Conditions {
                complexity_min: Some(0.59),
                pool_available: Some(("aks".to_owned(), true)),
                ..Conditions::default()
            },
            pool("aks"),
        ),
    ];
    let models = vec![LocalModel {
        name: "smollm2".to_owned(),
        aliases: Vec::new(),
    }];
    let pools = vec![CloudPool {
        name: "aks".to_owned(),
        models: vec!["gpt-4o".to_owned()],
        on_premises: false,
    }];
    let spillover = Some(Spillover {
        queue_high: 16,
        queue_low: 4,
        pool: "aks".to_owned(),
        model: Some("gpt-4o".to_owned()),
    });
    Policy::compile(models, pools, Some("smollm2".to_owned()))
        .and_then(|policy| policy.with_rules(rules, vec!["confidential".to_owned()], spillover))
        .unwrap_or_else(|errors| panic!("{errors:?}"))
}

fn bench(criterion: &mut Criterion) {
    bench_prompt(criterion, "decide_with_scan_and_score_4k", &prompt());
    bench_prompt(criterion, "decide_with_scan_and_score_short", SHORT);
}

fn bench_prompt(criterion: &mut Criterion, name: &str, text: &str) {
    let policy = policy();
    let recognizers = Recognizers::default();
    let complexity = ComplexityModel::builtin();
    let headers = [("content-type", "application/json"), ("x-team", "ops")];
    let local = [LocalLoad {
        model: "smollm2",
        queue_depth: 3,
        kv_use: 0.4,
    }];
    let pools = [("aks", true)];
    criterion.bench_function(name, |bencher| {
        bencher.iter(|| {
            let text = std::hint::black_box(text);
            let findings = recognizers.scan(text);
            let mut entities: Vec<&str> = findings
                .iter()
                .map(|finding| finding.entity.as_str())
                .collect();
            entities.sort_unstable();
            entities.dedup();
            let texts = [text];
            let score = complexity.score(&ComplexityFacts {
                texts: &texts,
                turns: 1,
                max_tokens: None,
                tools: 0,
            });
            let facts = RequestFacts {
                path: "/v1/chat/completions",
                operation_path: None,
                method: "POST",
                headers: &headers,
                requested_model: Some("smollm2"),
                caller: Some("team-a"),
                sensitivity: Sensitivity {
                    entities: &entities,
                    classification: None,
                    redactable: true,
                },
                attachments: &[],
                complexity: score,
            };
            let signals = Signals {
                local: &local,
                pools: &pools,
            };
            decide(&policy, &facts, &signals, RouteState::default())
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
