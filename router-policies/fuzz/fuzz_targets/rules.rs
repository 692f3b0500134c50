//! Fuzzes the rule compiler and the decision: `cargo +nightly fuzz run rules` from
//! `router-policies/`.
//!
//! The input bytes pick rules (conditions, actions, names, thresholds, also invalid ones) and
//! a request (entities, classification, complexity, load, pool health). Compiling never panics
//! and either succeeds or names problems; a compiled policy decides deterministically and never
//! sends unredacted sensitive content to a pool off the premises.

#![no_main]

use libfuzzer_sys::fuzz_target;
use router_policies::{
    Action, CloudPool, Conditions, Decision, LocalLoad, LocalModel, Policy, RequestFacts,
    RouteState, Rule, Sensitivity, Signals, Spillover, decide,
};

/// Reads small choices from the fuzzer's bytes; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((first, rest)) => {
                self.0 = rest;
                *first
            }
            None => 0,
        }
    }

    fn pick<'b>(&mut self, options: &[&'b str]) -> &'b str {
        options[usize::from(self.byte()) % options.len()]
    }

    fn fraction(&mut self) -> f32 {
        // Also out of range on purpose: the compiler must refuse, not panic.
        f32::from(self.byte()) / 200.0
    }

    fn maybe(&mut self) -> bool {
        self.byte() % 2 == 1
    }
}

const MODELS: &[&str] = &["smollm2", "gpt-4o", "nope", ""];
const POOLS: &[&str] = &["aks", "onprem", "gone"];
const ENTITIES: &[&str] = &["iban", "email", "credit_card", "jwt"];
const ATTACHMENTS: &[&str] = &["*", "image", "file", "video"];
const NAMES: &[&str] = &["a", "b", "default", "fail_closed", "spillover", "a"];

fn rule(bytes: &mut Bytes<'_>) -> Rule {
    let mut conditions = Conditions::default();
    if bytes.maybe() {
        conditions.sensitive = Some(bytes.maybe());
    }
    if bytes.maybe() {
        conditions.entities = vec![bytes.pick(ENTITIES).to_owned()];
    }
    if bytes.maybe() {
        conditions.classifications = vec!["confidential".to_owned()];
    }
    if bytes.maybe() {
        conditions.complexity_min = Some(bytes.fraction());
    }
    if bytes.maybe() {
        conditions.complexity_max = Some(bytes.fraction());
    }
    if bytes.maybe() {
        conditions.local_queue_min = Some(u64::from(bytes.byte()));
    }
    if bytes.maybe() {
        conditions.pool_available = Some((bytes.pick(POOLS).to_owned(), bytes.maybe()));
    }
    if bytes.maybe() {
        conditions.models = vec![bytes.pick(MODELS).to_owned()];
    }
    if bytes.maybe() {
        conditions.paths = vec!["/v1/*".to_owned()];
    }
    if bytes.maybe() {
        conditions.attachments = vec![bytes.pick(ATTACHMENTS).to_owned()];
    }
    let action = match bytes.byte() % 4 {
        0 => Action::Local {
            model: bytes.pick(MODELS).to_owned(),
        },
        1 => Action::Cloud {
            pool: bytes.pick(POOLS).to_owned(),
            model: bytes.maybe().then(|| "gpt-4o".to_owned()),
        },
        2 => Action::RedactThenCloud {
            pool: bytes.pick(POOLS).to_owned(),
            model: None,
        },
        _ => Action::Reject {
            status: u16::from(bytes.byte()) * 3,
            message: String::new(),
        },
    };
    Rule {
        name: bytes.pick(NAMES).to_owned(),
        conditions,
        action,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = Bytes(data);
    let models = vec![LocalModel {
        name: "smollm2".to_owned(),
        aliases: Vec::new(),
    }];
    let pools = vec![
        CloudPool {
            name: "aks".to_owned(),
            models: vec!["gpt-4o".to_owned()],
            on_premises: false,
        },
        CloudPool {
            name: "onprem".to_owned(),
            models: vec!["big".to_owned()],
            on_premises: true,
        },
    ];
    let default_model = bytes.maybe().then(|| "smollm2".to_owned());
    let Ok(policy) = Policy::compile(models, pools, default_model) else {
        return;
    };
    let rules: Vec<Rule> = (0..bytes.byte() % 6).map(|_| rule(&mut bytes)).collect();
    let spillover = bytes.maybe().then(|| Spillover {
        queue_high: u64::from(bytes.byte()),
        queue_low: u64::from(bytes.byte()),
        pool: bytes.pick(POOLS).to_owned(),
        model: None,
    });
    let policy: Policy = match policy.with_rules(rules, vec!["confidential".to_owned()], spillover)
    {
        Ok(policy) => policy,
        Err(errors) => {
            assert!(!errors.is_empty());
            return;
        }
    };
    let entities: Vec<&str> = (0..bytes.byte() % 3)
        .map(|_| bytes.pick(ENTITIES))
        .collect();
    let classification = bytes.maybe().then_some("confidential");
    let redactable = bytes.maybe();
    let attachments: Vec<&str> = (0..bytes.byte() % 2)
        .map(|_| bytes.pick(&ATTACHMENTS[1..]))
        .collect();
    let facts = RequestFacts {
        path: "/v1/chat/completions",
        operation_path: None,
        method: "POST",
        headers: &[],
        requested_model: Some(bytes.pick(MODELS)),
        caller: None,
        sensitivity: Sensitivity {
            entities: &entities,
            classification,
            redactable,
        },
        attachments: &attachments,
        complexity: bytes.fraction().min(1.0),
    };
    let local = [LocalLoad {
        model: "smollm2",
        queue_depth: u64::from(bytes.byte()),
        kv_use: bytes.fraction().min(1.0),
    }];
    let pool_health = [("aks", bytes.maybe()), ("onprem", bytes.maybe())];
    let signals = Signals {
        local: &local,
        pools: &pool_health,
    };
    let state = RouteState::all(bytes.maybe());
    let outcome = decide(&policy, &facts, &signals, state);
    assert_eq!(outcome, decide(&policy, &facts, &signals, state));
    let sensitive = !entities.is_empty() || classification.is_some();
    if let Decision::Cloud { pool, redact, .. } = &outcome.decision
        && sensitive
    {
        assert!(pool == "onprem" || (*redact && redactable && classification.is_none()));
    }
});
