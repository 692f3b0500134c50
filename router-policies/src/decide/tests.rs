use expect_test::{Expect, expect};
use proptest::prelude::*;

use crate::{CloudPool, LocalModel, Policy, RequestFacts, decide};

fn policy(default_model: Option<&str>) -> Policy {
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
    let pools = vec![CloudPool {
        name: "aks".to_owned(),
        models: vec!["gpt-4o".to_owned(), "llama-70b".to_owned()],
    }];
    match Policy::compile(models, pools, default_model.map(str::to_owned)) {
        Ok(policy) => policy,
        Err(errors) => panic!("test policy does not compile: {errors:?}"),
    }
}

fn check(default_model: Option<&str>, requested_model: Option<&str>, expect: Expect) {
    let facts = RequestFacts {
        path: "/v1/chat/completions",
        requested_model,
    };
    expect.assert_debug_eq(&decide(&policy(default_model), &facts));
}

#[test]
fn a_served_model_runs_locally_under_the_default_rule() {
    check(
        None,
        Some("gemma3"),
        expect![[r#"
            Local {
                model: "gemma3",
                rule: "default",
            }
        "#]],
    );
}

#[test]
fn an_alias_resolves_to_its_model() {
    check(
        None,
        Some("gpt-4o-mini"),
        expect![[r#"
            Local {
                model: "smollm2",
                rule: "default",
            }
        "#]],
    );
}

#[test]
fn a_model_served_by_a_pool_goes_to_the_cloud() {
    check(
        Some("smollm2"),
        Some("llama-70b"),
        expect![[r#"
            Cloud {
                pool: "aks",
                model: "llama-70b",
                rule: "default",
            }
        "#]],
    );
}

#[test]
fn an_unknown_model_is_rejected_with_its_name() {
    check(
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
}

#[test]
fn a_missing_model_uses_the_default_or_is_rejected() {
    check(
        Some("gemma3"),
        None,
        expect![[r#"
            Local {
                model: "gemma3",
                rule: "default",
            }
        "#]],
    );
    check(
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
}

proptest! {
    /// Whatever a client asks for, the decision is a configured local model, the pool that
    /// serves the name, or a refusal naming exactly what was asked for.
    #[test]
    fn decisions_only_name_configured_models(requested in "\\PC{0,24}") {
        let policy = policy(None);
        let facts = RequestFacts { path: "/v1/completions", requested_model: Some(&requested) };
        match decide(&policy, &facts) {
            crate::Decision::Local { model, .. } => {
                prop_assert!(policy.model_names().any(|name| name == model));
            }
            crate::Decision::Cloud { pool, model, .. } => {
                prop_assert_eq!(pool, "aks");
                prop_assert_eq!(model, requested.clone());
            }
            crate::Decision::Reject { reason, .. } => {
                prop_assert_eq!(
                    reason,
                    crate::RejectReason::ModelNotFound { requested: requested.clone() }
                );
            }
        }
    }
}
