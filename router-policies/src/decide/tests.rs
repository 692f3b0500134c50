use expect_test::{Expect, expect};
use proptest::prelude::*;

use crate::{
    Action, CloudPool, Conditions, Decision, LocalLoad, LocalModel, Policy, RequestFacts,
    RouteState, Rule, Sensitivity, Signals, Spillover, decide,
};

fn base(default_model: Option<&str>) -> Policy {
    let models = vec![
        LocalModel {
            name: "smollm2".to_owned(),
            aliases: vec!["gpt-4o-mini".to_owned()],
        },
        LocalModel {
            name: "gemma3".to_owned(),
            aliases: vec![],
        },
    ];
    let pools = vec![
        CloudPool {
            name: "aks".to_owned(),
            models: vec!["gpt-4o".to_owned(), "llama-70b".to_owned()],
            on_premises: false,
        },
        CloudPool {
            name: "onprem".to_owned(),
            models: vec!["big-local".to_owned()],
            on_premises: true,
        },
    ];
    match Policy::compile(models, pools, default_model.map(str::to_owned)) {
        Ok(policy) => policy,
        Err(errors) => panic!("test policy does not compile: {errors:?}"),
    }
}

fn rule(name: &str, conditions: Conditions, action: Action) -> Rule {
    Rule {
        name: name.to_owned(),
        conditions,
        action,
    }
}

/// Spillover from 8 waiting requests down to 2, to pool `aks` as `model`.
fn spillover_to(model: &str) -> Spillover {
    Spillover {
        queue_high: 8,
        queue_low: 2,
        pool: "aks".to_owned(),
        model: Some(model.to_owned()),
    }
}

/// The policy of the rule tests: sensitive stays local, complex goes to the cloud, finance
/// may redact, a blocked caller is refused, and spillover to the cloud.
fn ruled() -> Policy {
    let rules = vec![
        rule(
            "blocked-caller",
            Conditions {
                callers: vec!["mallory".to_owned()],
                ..Conditions::default()
            },
            Action::Reject {
                status: 403,
                message: "caller blocked".to_owned(),
            },
        ),
        rule(
            "finance-redacts",
            Conditions {
                headers: vec![("x-team".to_owned(), "finance".to_owned())],
                complexity_min: Some(0.5),
                ..Conditions::default()
            },
            Action::RedactThenCloud {
                pool: "aks".to_owned(),
                model: Some("gpt-4o".to_owned()),
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
            "complex-to-cloud",
            Conditions {
                complexity_min: Some(0.6),
                pool_available: Some(("aks".to_owned(), true)),
                ..Conditions::default()
            },
            Action::Cloud {
                pool: "aks".to_owned(),
                model: Some("gpt-4o".to_owned()),
            },
        ),
    ];
    let spillover = Some(spillover_to("gpt-4o"));
    match base(Some("smollm2")).with_rules(rules, vec!["confidential".to_owned()], spillover) {
        Ok(policy) => policy,
        Err(errors) => panic!("{errors:?}"),
    }
}

/// A request as the rule tests vary it.
#[derive(Debug, Clone, Copy, Default)]
struct Case<'a> {
    model: Option<&'a str>,
    caller: Option<&'a str>,
    team: Option<&'a str>,
    entities: &'a [&'a str],
    classification: Option<&'a str>,
    complexity: f32,
    queue: u64,
    aks_available: bool,
    spillover: bool,
    attachments: &'a [&'a str],
}

fn run(policy: &Policy, case: Case<'_>) -> crate::Outcome {
    let team = case.team.map(|team| ("x-team", team));
    let headers: Vec<(&str, &str)> = team.into_iter().collect();
    let facts = RequestFacts {
        path: "/v1/chat/completions",
        operation_path: None,
        method: "POST",
        headers: &headers,
        requested_model: case.model,
        caller: case.caller,
        sensitivity: Sensitivity {
            entities: case.entities,
            classification: case.classification,
            redactable: true,
        },
        attachments: case.attachments,
        complexity: case.complexity,
    };
    let local = [LocalLoad {
        model: "smollm2",
        queue_depth: case.queue,
        kv_use: 0.1,
    }];
    let pools = [("aks", case.aks_available), ("onprem", true)];
    let signals = Signals {
        local: &local,
        pools: &pools,
    };
    decide(policy, &facts, &signals, RouteState::all(case.spillover))
}

fn check(case: Case<'_>, expect: Expect) {
    let outcome = run(&ruled(), case);
    let verdicts: Vec<String> = outcome
        .verdicts
        .iter()
        .map(|verdict| format!("{}: {}", verdict.rule, verdict.failed.unwrap_or("matched")))
        .collect();
    expect.assert_debug_eq(&(outcome.decision, outcome.state.any(), verdicts));
}

#[test]
fn attachments_the_scan_cannot_read_can_be_kept_off_the_cloud() {
    let rules = vec![
        rule(
            "pictures-stay",
            Conditions {
                attachments: vec!["image".to_owned(), "file".to_owned()],
                ..Conditions::default()
            },
            Action::Local {
                model: "smollm2".to_owned(),
            },
        ),
        rule(
            "other-media-refused",
            Conditions {
                attachments: vec!["*".to_owned()],
                ..Conditions::default()
            },
            Action::Reject {
                status: 403,
                message: "media cannot be checked".to_owned(),
            },
        ),
        rule(
            "rest-to-cloud",
            Conditions::default(),
            Action::Cloud {
                pool: "aks".to_owned(),
                model: None,
            },
        ),
    ];
    let policy = match base(Some("smollm2")).with_rules(rules, Vec::new(), None) {
        Ok(policy) => policy,
        Err(errors) => panic!("{errors:?}"),
    };
    let decided = |attachments: &[&str]| {
        let facts = RequestFacts {
            path: "/v1/chat/completions",
            operation_path: None,
            method: "POST",
            requested_model: Some("gpt-4o"),
            attachments,
            ..RequestFacts::default()
        };
        let outcome = decide(&policy, &facts, &Signals::default(), RouteState::default());
        outcome.decision.rule().to_owned()
    };
    assert_eq!(decided(&[]), "rest-to-cloud");
    assert_eq!(decided(&["image"]), "pictures-stay");
    assert_eq!(decided(&["audio", "file"]), "pictures-stay");
    assert_eq!(decided(&["audio"]), "other-media-refused");
    // A kind the policy does not know is refused when it compiles.
    let unknown = base(Some("smollm2")).with_rules(
        vec![rule(
            "typo",
            Conditions {
                attachments: vec!["pictures".to_owned()],
                ..Conditions::default()
            },
            Action::Local {
                model: "smollm2".to_owned(),
            },
        )],
        Vec::new(),
        None,
    );
    assert_eq!(
        unknown.err().map(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>()),
        Some(vec![
            "rule `typo`: attachments: `pictures` is not a kind of attachment (image, audio, video, file, tokens, or * for any)".to_owned()
        ])
    );
}

#[test]
fn a_rule_on_a_model_name_nothing_serves_is_refused() {
    let models = |names: &[&str]| Conditions {
        models: names.iter().map(|name| (*name).to_owned()).collect(),
        ..Conditions::default()
    };
    let local = || Action::Local {
        model: "smollm2".to_owned(),
    };
    let compiled = base(Some("smollm2")).with_rules(
        vec![
            rule("served", models(&["smollm2", "gpt-4o"]), local()),
            rule("typo", models(&["gpt4o"]), local()),
        ],
        Vec::new(),
        None,
    );
    assert_eq!(
        compiled
            .err()
            .map(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>()),
        Some(vec![
            "rule `typo`: models: `gpt4o` is neither a local model (or alias) nor a model of a pool"
                .to_owned()
        ])
    );
}

fn by_name(default_model: Option<&str>, requested_model: Option<&str>, expect: Expect) {
    let facts = RequestFacts {
        path: "/v1/chat/completions",
        operation_path: None,
        method: "POST",
        requested_model,
        ..RequestFacts::default()
    };
    let outcome = decide(
        &base(default_model),
        &facts,
        &Signals::default(),
        RouteState::default(),
    );
    expect.assert_debug_eq(&outcome.decision);
}

#[test]
fn without_rules_the_model_name_decides() {
    by_name(
        None,
        Some("gemma3"),
        expect![[r#"
            Local {
                model: "gemma3",
                rule: "default",
            }
        "#]],
    );
    by_name(
        None,
        Some("gpt-4o-mini"),
        expect![[r#"
            Local {
                model: "smollm2",
                rule: "default",
            }
        "#]],
    );
    by_name(
        Some("smollm2"),
        Some("llama-70b"),
        expect![[r#"
            Cloud {
                pool: "aks",
                model: "llama-70b",
                rule: "default",
                redact: false,
            }
        "#]],
    );
    by_name(
        Some("smollm2"),
        Some("gpt-5"),
        expect![[r#"
            Reject {
                reason: ModelNotFound {
                    requested: "gpt-5",
                },
                rule: "default",
            }
        "#]],
    );
    by_name(
        Some("gemma3"),
        None,
        expect![[r#"
            Local {
                model: "gemma3",
                rule: "default",
            }
        "#]],
    );
    by_name(
        None,
        None,
        expect![[r#"
            Reject {
                reason: ModelRequired,
                rule: "default",
            }
        "#]],
    );
}

#[test]
fn sensitive_requests_stay_local_and_complex_ones_go_to_the_cloud() {
    check(
        Case {
            model: Some("smollm2"),
            entities: &["iban"],
            complexity: 0.9,
            aks_available: true,
            ..Case::default()
        },
        expect![[r#"
            (
                Local {
                    model: "smollm2",
                    rule: "sensitive-local",
                },
                false,
                [
                    "blocked-caller: caller",
                    "finance-redacts: headers",
                    "sensitive-local: matched",
                ],
            )
        "#]],
    );
    check(
        Case {
            model: Some("smollm2"),
            complexity: 0.9,
            aks_available: true,
            ..Case::default()
        },
        expect![[r#"
            (
                Cloud {
                    pool: "aks",
                    model: "gpt-4o",
                    rule: "complex-to-cloud",
                    redact: false,
                },
                false,
                [
                    "blocked-caller: caller",
                    "finance-redacts: headers",
                    "sensitive-local: sensitive",
                    "complex-to-cloud: matched",
                ],
            )
        "#]],
    );
    // The pool is down: the complex request stays local under the default rule.
    check(
        Case {
            model: Some("smollm2"),
            complexity: 0.9,
            aks_available: false,
            ..Case::default()
        },
        expect![[r#"
            (
                Local {
                    model: "smollm2",
                    rule: "default",
                },
                false,
                [
                    "blocked-caller: caller",
                    "finance-redacts: headers",
                    "sensitive-local: sensitive",
                    "complex-to-cloud: pool_available",
                ],
            )
        "#]],
    );
}

#[test]
fn redaction_is_allowed_for_found_entities_but_not_for_classified_documents() {
    check(
        Case {
            model: Some("smollm2"),
            team: Some("finance"),
            entities: &["email"],
            complexity: 0.7,
            aks_available: true,
            ..Case::default()
        },
        expect![[r#"
            (
                Cloud {
                    pool: "aks",
                    model: "gpt-4o",
                    rule: "finance-redacts",
                    redact: true,
                },
                false,
                [
                    "blocked-caller: caller",
                    "finance-redacts: matched",
                ],
            )
        "#]],
    );
    check(
        Case {
            model: Some("smollm2"),
            team: Some("finance"),
            classification: Some("Confidential"),
            complexity: 0.7,
            aks_available: true,
            ..Case::default()
        },
        expect![[r#"
            (
                Local {
                    model: "smollm2",
                    rule: "fail_closed",
                },
                false,
                [
                    "blocked-caller: caller",
                    "finance-redacts: matched",
                ],
            )
        "#]],
    );
}

#[test]
fn rules_can_refuse_and_sensitive_cloud_only_requests_are_refused() {
    check(
        Case {
            model: Some("smollm2"),
            caller: Some("mallory"),
            ..Case::default()
        },
        expect![[r#"
            (
                Reject {
                    reason: Policy {
                        status: 403,
                        message: "caller blocked",
                    },
                    rule: "blocked-caller",
                },
                false,
                [
                    "blocked-caller: matched",
                ],
            )
        "#]],
    );
    // No default model and a cloud-only name: nothing local can take the secret.
    let policy = base(None);
    let facts = RequestFacts {
        path: "/v1/chat/completions",
        operation_path: None,
        method: "POST",
        requested_model: Some("gpt-4o"),
        sensitivity: Sensitivity {
            entities: &["aws_access_key"],
            classification: None,
            redactable: true,
        },
        ..RequestFacts::default()
    };
    expect![[r#"
        Reject {
            reason: SensitiveMustStayLocal {
                entities: [
                    "aws_access_key",
                ],
                pool: "aks",
            },
            rule: "fail_closed",
        }
    "#]]
    .assert_debug_eq(&decide(&policy, &facts, &Signals::default(), RouteState::default()).decision);
    // An on-premises pool may take it.
    let facts = RequestFacts {
        requested_model: Some("big-local"),
        ..facts
    };
    assert!(matches!(
        decide(&policy, &facts, &Signals::default(), RouteState::default()).decision,
        Decision::Cloud { ref pool, .. } if pool == "onprem"
    ));
}

#[test]
fn spillover_turns_on_above_the_high_mark_and_off_at_the_low_mark() {
    let policy = ruled();
    let mut state = false;
    let mut routes = Vec::new();
    for queue in [1, 5, 8, 6, 3, 2, 5] {
        let outcome = run(
            &policy,
            Case {
                model: Some("smollm2"),
                queue,
                aks_available: true,
                spillover: state,
                ..Case::default()
            },
        );
        state = outcome
            .state
            .spilling(policy.local_index("smollm2").unwrap_or(usize::MAX));
        routes.push(format!("{queue}:{}", outcome.decision.rule()));
    }
    assert_eq!(
        routes,
        [
            "1:default",
            "5:default",
            "8:spillover",
            "6:spillover",
            "3:spillover",
            "2:default",
            "5:default"
        ]
    );
    // Without a default model, a request for a cloud model's name says nothing of the local
    // queue: spillover stays as it was.
    let no_default = base(None)
        .with_rules(Vec::new(), Vec::new(), Some(spillover_to("gpt-4o")))
        .unwrap_or_else(|errors| panic!("{errors:?}"));
    let outcome = run(
        &no_default,
        Case {
            model: Some("gpt-4o"),
            queue: 20,
            aks_available: true,
            spillover: true,
            ..Case::default()
        },
    );
    assert!(
        outcome.state.any(),
        "turned off by a request without a local model"
    );
    // Sensitive requests never spill.
    let outcome = run(
        &policy,
        Case {
            model: Some("smollm2"),
            entities: &["email"],
            queue: 20,
            aks_available: true,
            ..Case::default()
        },
    );
    assert_eq!(outcome.decision.rule(), "sensitive-local");
    // Nor does content the scan cannot read.
    let outcome = run(
        &policy,
        Case {
            model: Some("smollm2"),
            attachments: &["image"],
            queue: 20,
            aks_available: true,
            spillover: true,
            ..Case::default()
        },
    );
    assert!(
        matches!(outcome.decision, Decision::Local { .. }),
        "{:?}",
        outcome.decision
    );
}

#[test]
fn compile_reports_every_problem() {
    let models = vec![
        LocalModel {
            name: "a".to_owned(),
            aliases: vec!["b".to_owned()],
        },
        LocalModel {
            name: "b".to_owned(),
            aliases: vec![],
        },
    ];
    let pools = vec![CloudPool {
        name: "aks".to_owned(),
        models: vec!["a".to_owned()],
        on_premises: false,
    }];
    expect![[r#"
        Err(
            [
                DuplicateName {
                    name: "b",
                    first: "a",
                    second: "b",
                },
                LocalAndCloud {
                    name: "a",
                    local: "a",
                    pool: "aks",
                },
                UnknownDefault(
                    "c",
                ),
            ],
        )
    "#]]
    .assert_debug_eq(&Policy::compile(models, pools, Some("c".to_owned())));
    let rules = vec![
        rule(
            "default",
            Conditions::default(),
            Action::Local {
                model: "nope".to_owned(),
            },
        ),
        rule(
            "x",
            Conditions {
                complexity_min: Some(1.5),
                pool_available: Some(("gone".to_owned(), true)),
                ..Conditions::default()
            },
            Action::Reject {
                status: 200,
                message: String::new(),
            },
        ),
        rule(
            "x",
            Conditions::default(),
            Action::Cloud {
                pool: "gone".to_owned(),
                model: None,
            },
        ),
    ];
    let spillover = Some(Spillover {
        queue_high: 2,
        queue_low: 2,
        pool: "aks".to_owned(),
        model: None,
    });
    let errors: Vec<String> = base(None)
        .with_rules(rules, Vec::new(), spillover)
        .err()
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    expect![[r#"
        [
            "rule `default`: this name is reserved",
            "rule `default`: local model `nope` is not configured",
            "rule `x`: status 200 is not an error status",
            "rule `x`: complexity_min must be between 0 and 1",
            "rule `x`: pool_available names pool `gone`, which is not configured",
            "rule `x`: a rule of this name comes earlier",
            "rule `x`: pool `gone` is not configured",
            "spillover: queue_low must be below queue_high",
            "spillover: pool `aks` does not serve `smollm2`, `gpt-4o-mini`, `gemma3`, which would spill under that name: set spillover's model to one the pool serves",
        ]
    "#]]
    .assert_debug_eq(&errors);
}

fn entity_names() -> impl Strategy<Value = Vec<&'static str>> {
    prop::collection::vec(
        prop::sample::select(vec!["iban", "email", "credit_card", "jwt"]),
        0..3,
    )
}

proptest! {
    /// Whatever the request, rules and signals, unredacted sensitive content never goes to
    /// a pool off the premises, and a redacted one only when the finding can be redacted.
    #[test]
    fn sensitive_content_never_leaves_unredacted(
        model in prop::option::of(prop::sample::select(vec!["smollm2", "gpt-4o", "big-local", "nope"])),
        entities in entity_names(),
        classification in prop::option::of(prop::sample::select(vec!["confidential", "public"])),
        redactable in any::<bool>(),
        complexity in 0.0f32..1.0,
        queue in 0u64..20,
        team in prop::option::of(prop::sample::select(vec!["finance", "ops"])),
        spillover in any::<bool>(),
        aks_available in any::<bool>(),
    ) {
        let policy = ruled();
        let headers: Vec<(&str, &str)> = team.map(|team| ("x-team", team)).into_iter().collect();
        let facts = RequestFacts {
            path: "/v1/chat/completions",
            operation_path: None,
            method: "POST",
            headers: &headers,
            requested_model: model,
            caller: None,
            sensitivity: Sensitivity { entities: &entities, classification, redactable },
            attachments: &[],
            complexity,
        };
        let local = [LocalLoad { model: "smollm2", queue_depth: queue, kv_use: 0.5 }];
        let pools = [("aks", aks_available), ("onprem", true)];
        let signals = Signals { local: &local, pools: &pools };
        let outcome = decide(&policy, &facts, &signals, RouteState::all(spillover));
        // Deterministic.
        prop_assert_eq!(&outcome, &decide(&policy, &facts, &signals, RouteState::all(spillover)));
        let sensitive = !entities.is_empty() || classification == Some("confidential");
        prop_assert_eq!(outcome.sensitive, sensitive);
        if let Decision::Cloud { pool, redact, .. } = &outcome.decision && sensitive {
            let on_premises = pool == "onprem";
            let redacted = *redact && redactable && classification != Some("confidential");
            prop_assert!(on_premises || redacted, "{:?}", outcome);
        }
    }
}

#[test]
fn path_conditions_match_the_operation_however_the_path_names_it() {
    let rules = vec![rule(
        "no-embeddings",
        Conditions {
            paths: vec!["/v1/embeddings".to_owned()],
            ..Conditions::default()
        },
        Action::Reject {
            status: 403,
            message: "embeddings are off".to_owned(),
        },
    )];
    let policy = match base(Some("smollm2")).with_rules(rules, Vec::new(), None) {
        Ok(policy) => policy,
        Err(errors) => panic!("{errors:?}"),
    };
    let rule_for = |path: &str, operation_path: Option<&str>| {
        let facts = RequestFacts {
            path,
            operation_path,
            method: "POST",
            requested_model: Some("smollm2"),
            ..RequestFacts::default()
        };
        decide(&policy, &facts, &Signals::default(), RouteState::default())
            .decision
            .rule()
            .to_owned()
    };
    assert_eq!(rule_for("/v1/embeddings", None), "no-embeddings");
    for path in [
        "/v1/embeddings/",
        "/openai/v1/embeddings",
        "/openai/deployments/small/embeddings",
    ] {
        assert_eq!(
            rule_for(path, Some("/v1/embeddings")),
            "no-embeddings",
            "{path}"
        );
    }
    assert_eq!(
        rule_for("/v1/chat/completions", None),
        "default",
        "another operation"
    );
}

#[test]
fn a_cloud_rule_or_spillover_names_a_model_its_pool_serves() {
    let rules = vec![rule(
        "to-cloud",
        Conditions::default(),
        Action::Cloud {
            pool: "aks".to_owned(),
            model: Some("gpt-5".to_owned()),
        },
    )];
    let spillover = Some(spillover_to("gpt-5"));
    let errors: Vec<String> = base(Some("smollm2"))
        .with_rules(rules, Vec::new(), spillover)
        .err()
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        errors,
        [
            "rule `to-cloud`: pool `aks` does not serve model `gpt-5` (its models map names it)",
            "spillover: pool `aks` does not serve model `gpt-5`",
        ]
    );
}

#[test]
fn each_local_model_spills_by_its_own_queue() {
    let policy = ruled();
    let loads = |smollm2: u64, gemma3: u64| {
        [
            LocalLoad {
                model: "smollm2",
                queue_depth: smollm2,
                kv_use: 0.1,
            },
            LocalLoad {
                model: "gemma3",
                queue_depth: gemma3,
                kv_use: 0.1,
            },
        ]
    };
    let pools = [("aks", true), ("onprem", true)];
    let ask = |model: &str, local: &[LocalLoad<'_>], state: RouteState| {
        let facts = RequestFacts {
            requested_model: Some(model),
            ..RequestFacts::default()
        };
        let signals = Signals {
            local,
            pools: &pools,
        };
        decide(&policy, &facts, &signals, state)
    };
    // smollm2's queue is over the mark: its requests spill, gemma3's (short queue) do not.
    let busy = loads(9, 0);
    let outcome = ask("smollm2", &busy, RouteState::default());
    assert_eq!(outcome.decision.rule(), "spillover");
    let state = outcome.state;
    let outcome = ask("gemma3", &busy, state);
    assert_eq!(outcome.decision.rule(), "default");
    // gemma3's own queue going down does not end smollm2's spillover.
    let state = outcome.state;
    let outcome = ask("smollm2", &loads(5, 0), state);
    assert_eq!(outcome.decision.rule(), "spillover");
}

#[test]
fn a_rule_naming_a_model_by_its_alias_decides_the_model_and_spills_by_its_queue() {
    let policy = base(None)
        .with_rules(
            vec![rule(
                "by-alias",
                Conditions::default(),
                Action::Local {
                    model: "gpt-4o-mini".to_owned(),
                },
            )],
            Vec::new(),
            Some(spillover_to("gpt-4o")),
        )
        .unwrap_or_else(|errors| panic!("{errors:?}"));
    let local = [LocalLoad {
        model: "smollm2",
        queue_depth: 0,
        kv_use: 0.1,
    }];
    let busy = [LocalLoad {
        model: "smollm2",
        queue_depth: 9,
        kv_use: 0.1,
    }];
    let pools = [("aks", true), ("onprem", true)];
    let facts = RequestFacts::default();
    let quiet = decide(
        &policy,
        &facts,
        &Signals {
            local: &local,
            pools: &pools,
        },
        RouteState::default(),
    );
    assert_eq!(
        quiet.decision,
        Decision::Local {
            model: "smollm2".to_owned(),
            rule: "by-alias".to_owned()
        }
    );
    let spilled = decide(
        &policy,
        &facts,
        &Signals {
            local: &busy,
            pools: &pools,
        },
        quiet.state,
    );
    assert_eq!(spilled.decision.rule(), "spillover");
    assert!(policy.spilling_for(spilled.state, "gpt-4o-mini"));
}
