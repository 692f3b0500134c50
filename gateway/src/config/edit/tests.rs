use std::path::Path;

use super::{EditError, WEIGHT_MAX, set_backend_weight};
use crate::config::Environment;

struct NoEnvironment;

impl Environment for NoEnvironment {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }

    fn memory_available_bytes(&self) -> Option<u64> {
        Some(8 << 30)
    }
}

const TABLES: &str = r#"[auth]
allow_anonymous = true

# The cloud pool: v2 is the canary.
[upstreams.aks]
models = { "gpt-4o" = "gpt-4o-2024" }

[[upstreams.aks.backends]]
name = "v1"
url = "http://127.0.0.1:18101"
weight = 90   # stable

[[upstreams.aks.backends]]
url = "http://127.0.0.1:18102"
labels = { version = "v2" }
"#;

fn edit(text: &str, pool: &str, backend: &str, weight: u32) -> Result<String, EditError> {
    set_backend_weight(
        text,
        Path::new("/etc/isthmus/isthmus.toml"),
        &NoEnvironment,
        pool,
        backend,
        weight,
    )
    .map(|(edited, _)| edited)
}

fn weights(text: &str) -> Vec<(String, u32)> {
    let config =
        crate::config::parse(text, Path::new("/etc/isthmus/isthmus.toml"), &NoEnvironment).unwrap();
    config.upstreams[0]
        .backends
        .iter()
        .map(|backend| (backend.name.clone(), backend.weight))
        .collect()
}

#[test]
fn a_weight_is_replaced_in_place_keeping_comments_and_layout() {
    let edited = edit(TABLES, "aks", "v1", 40).unwrap();
    assert_eq!(
        edited,
        TABLES.replace("weight = 90   # stable", "weight = 40   # stable")
    );
}

#[test]
fn an_unnamed_backend_is_found_by_host_and_port_and_gains_a_weight() {
    let edited = edit(TABLES, "aks", "127.0.0.1:18102", 10).unwrap();
    assert!(edited.contains("\n# The cloud pool: v2 is the canary.\n[upstreams.aks]\n"));
    assert_eq!(
        weights(&edited),
        [("v1".to_owned(), 90), ("127.0.0.1:18102".to_owned(), 10)]
    );
}

#[test]
fn inline_backend_arrays_are_edited_too() {
    let text = "[auth]\nallow_anonymous = true\n[upstreams.aks]\nmodels = { m = \"m\" }\nbackends = [\n  { name = \"a\", url = \"http://127.0.0.1:1\", weight = 5 },\n  { name = \"b\", url = \"http://127.0.0.1:2\" },\n]\n";
    let edited = edit(text, "aks", "b", 7).unwrap();
    assert_eq!(weights(&edited), [("a".to_owned(), 5), ("b".to_owned(), 7)]);
    assert!(edited.contains("{ name = \"a\", url = \"http://127.0.0.1:1\", weight = 5 }"));
}

#[test]
fn an_edit_that_leaves_the_pool_unable_to_serve_is_refused_with_the_key() {
    let once = edit(TABLES, "aks", "127.0.0.1:18102", 0).unwrap();
    match edit(&once, "aks", "v1", 0) {
        Err(EditError::Invalid(errors)) => {
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].contains("upstreams.aks.backends") && errors[0].contains("weight 0"),
                "{errors:?}"
            );
        }
        other => panic!("expected the edit to be refused: {other:?}"),
    }
}

#[test]
fn unknown_pools_and_backends_and_huge_weights_are_named() {
    assert_eq!(
        edit(TABLES, "aks", "v3", 1),
        Err(EditError::UnknownBackend {
            pool: "aks".to_owned(),
            backend: "v3".to_owned()
        })
    );
    assert!(matches!(
        edit(TABLES, "gpu", "v1", 1),
        Err(EditError::UnknownBackend { .. })
    ));
    assert_eq!(
        edit(TABLES, "aks", "v1", WEIGHT_MAX + 1),
        Err(EditError::WeightOutOfRange(u64::from(WEIGHT_MAX) + 1))
    );
}

#[test]
fn a_file_that_is_already_invalid_is_not_edited() {
    let broken = format!("{TABLES}\n[server]\nlisten = \"nowhere\"\n");
    match edit(&broken, "aks", "v1", 1) {
        Err(EditError::Invalid(errors)) => {
            assert!(
                errors.iter().any(|error| error.contains("server.listen")),
                "{errors:?}"
            );
        }
        other => panic!("expected the broken file to be reported: {other:?}"),
    }
}
