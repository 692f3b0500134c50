//! Architecture checks: the dependency rules of ARCHITECTURE.md, enforced by `cargo test`.

use std::path::{Path, PathBuf};

use cargo_metadata::{DependencyKind, MetadataCommand};
use tests::workspace_root;

/// The only dependencies the pure routing crate may have (normal, not dev).
const ROUTER_POLICIES_ALLOWED: &[&str] = &["aho-corasick", "memchr", "regex", "thiserror"];

/// Source patterns that mean I/O, the clock, randomness or threads.
const IMPURE_PATTERNS: &[&str] = &[
    "std::fs",
    "std::net",
    "std::process",
    "std::thread",
    "std::env",
    "SystemTime",
    "Instant",
    "tokio",
    "rand::",
    "async fn",
    "println!",
    "eprintln!",
];

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && !name.to_string_lossy().starts_with('.') {
                files.extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            files.push(path);
        }
    }
    files
}

/// The workspace's packages and their declared dependencies.
fn workspace_metadata() -> cargo_metadata::Metadata {
    MetadataCommand::new()
        .manifest_path(workspace_root().join("Cargo.toml"))
        .no_deps()
        .exec()
        .unwrap()
}

/// The text of a Rust file with line comments removed (docs may name what code may not).
fn code_without_comments(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn router_policies_stays_pure() {
    let metadata = workspace_metadata();
    let package = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "router-policies")
        .unwrap();
    for dependency in &package.dependencies {
        if dependency.kind == DependencyKind::Normal || dependency.kind == DependencyKind::Build {
            assert!(
                ROUTER_POLICIES_ALLOWED.contains(&dependency.name.as_str()),
                "router-policies may not depend on `{}`: it must stay free of I/O, async, clock and randomness \
                 (extend ROUTER_POLICIES_ALLOWED only for pure crates)",
                dependency.name
            );
        }
    }
    let src = workspace_root().join("router-policies/src");
    for file in rust_files(&src) {
        let text = code_without_comments(&std::fs::read_to_string(&file).unwrap());
        for pattern in IMPURE_PATTERNS {
            assert!(
                !text.contains(pattern),
                "{} uses `{pattern}`; router-policies must stay pure",
                file.display()
            );
        }
    }
}

#[test]
fn llama_cpp_and_pingora_are_named_only_where_allowed() {
    let root = workspace_root();
    let llama_allowed = root.join("edge-runtime/src/llama.rs");
    let pingora_allowed = root.join("gateway/src");
    for file in rust_files(&root) {
        if file.starts_with(root.join("tests/it/tidy.rs")) {
            continue;
        }
        let text = code_without_comments(&std::fs::read_to_string(&file).unwrap());
        if text.contains("llama_cpp_2") {
            assert_eq!(
                file, llama_allowed,
                "only edge-runtime/src/llama.rs may name llama_cpp_2"
            );
        }
        if text.contains("pingora") && !file.starts_with(&pingora_allowed) {
            panic!(
                "{} names pingora; only the gateway crate may",
                file.display()
            );
        }
    }
    let metadata = workspace_metadata();
    for package in &metadata.packages {
        for dependency in &package.dependencies {
            let name = dependency.name.as_str();
            if name.starts_with("llama-cpp") {
                assert_eq!(
                    package.name.as_str(),
                    "edge-runtime",
                    "{} depends on {name}",
                    package.name
                );
            }
            if name.starts_with("pingora") {
                assert_eq!(
                    package.name.as_str(),
                    "gateway",
                    "{} depends on {name}",
                    package.name
                );
            }
        }
    }
}

#[test]
fn edge_runtime_knows_no_wire_format() {
    let metadata = workspace_metadata();
    let package = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "edge-runtime")
        .unwrap();
    for dependency in &package.dependencies {
        if dependency.kind != DependencyKind::Normal {
            continue;
        }
        for forbidden in [
            "http",
            "hyper",
            "serde_json",
            "pingora",
            "reqwest",
            "gateway",
            "router-policies",
        ] {
            assert!(
                !dependency.name.starts_with(forbidden),
                "edge-runtime must not depend on `{}`",
                dependency.name
            );
        }
    }
}
