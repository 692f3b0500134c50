//! `isthmus check-config`: every example configuration validates, and a broken file gets
//! every error at once with its key path.

use std::path::Path;
use std::process::{Command, Output};

use tests::{isthmus_binary, workspace_root};

/// `isthmus check-config PATH`, run to its end.
fn check_config(path: impl AsRef<Path>) -> Output {
    Command::new(isthmus_binary())
        .arg("check-config")
        .arg(path.as_ref())
        .output()
        .unwrap()
}

#[test]
fn every_example_configuration_validates() {
    tests::model_path();
    let dir = workspace_root().join("deploy/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|extension| extension != "toml") {
            continue;
        }
        let output = check_config(&path);
        assert!(
            output.status.success(),
            "{} does not validate:\n{}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        // Each model's KV plan, with the numbers an operator sizes memory by.
        let stdout = String::from_utf8_lossy(&output.stdout);
        if path.ends_with("demo.toml") {
            assert!(
                stdout.contains(
                    "model smollm2: KV cache 8 sequences x 2048 tokens + 2048 prefix-cache \
                     tokens = 18432 cells x 23040 bytes (f16) = 405.0 MiB"
                ),
                "{stdout}"
            );
        }
        if path.ends_with("demo.toml") {
            assert!(
                stdout.contains(
                    "callers: 1 API key (0 with rate limits or a daily budget, 0 read from files)"
                ),
                "{stdout}"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 1,
        "no example configurations in {}",
        dir.display()
    );
}

#[test]
fn the_plan_names_callers_stored_responses_browsers_proxies_and_reloads() {
    let dir = tests::scratch_dir();
    let config = dir.path().join("isthmus.toml");
    let key_file = dir.path().join("app.key");
    std::fs::write(&key_file, "app-key-0123456789\n").unwrap();
    let text = tests::config_text(
        &tests::GatewayOptions {
            config_watch_interval_ms: 5_000,
            extra: "[responses]\nstore = true\nretention_hours = 24\n[cors]\nallow_origins = [\"https://chat.contoso.com\"]\n".to_owned(),
            ..tests::GatewayOptions::default()
        },
        dir.path(),
    )
    .replacen(
        "api_keys = [",
        &format!(
            "api_keys = [{{ id = \"app\", key_file = {key_file:?}, tokens_per_day = 1000 }}, "
        ),
        1,
    )
    .replacen(
        "[server]\n",
        "[server]\ntrusted_proxies = [\"10.244.0.0/16\", \"fd00::1\"]\nforwarded_header = \"forwarded\"\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let output = check_config(&config);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    for line in [
        "  callers: 2 API keys (1 with rate limits or a daily budget, 1 read from files)"
            .to_owned(),
        format!(
            "  stored responses: on, 24 h, up to 256 MiB (sensitive conversations not kept; kept as JSON, unencrypted) in {}",
            dir.path().join("state/responses-store").display()
        ),
        "  browsers: pages of https://chat.contoso.com may call the gateway (cors); other origins get 403"
            .to_owned(),
        "  clients: Forwarded (for=) believed from 10.244.0.0/16, fd00::1/128 (server.trusted_proxies)"
            .to_owned(),
        "  reload: SIGHUP, the admin API, and this file (and key files) read every 5000 ms"
            .to_owned(),
    ] {
        assert!(
            stdout.lines().any(|candidate| candidate == line),
            "missing `{line}` in:\n{stdout}"
        );
    }
}

#[test]
fn check_config_reports_every_error_with_its_key_path() {
    let dir = tests::scratch_dir();
    let config = dir.path().join("broken.toml");
    let text = r#"
[server]
admin_listen = "localhost"
forwarded_header = "x-real-ip"

[auth]
allow_anonymous = true

[models.smollm2]
path = "missing-model.gguf"
"#;
    std::fs::write(&config, text).unwrap();
    let output = check_config(&config);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let missing = dir.path().join("missing-model.gguf");
    assert!(stderr.contains("3 errors"), "{stderr}");
    assert!(
        stderr.contains(
            "server.forwarded_header: `x-real-ip` is not a forwarding header: use \"x-forwarded-for\" or \"forwarded\""
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("server.admin_listen: `localhost` is not an address of the form IP:PORT"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "models.smollm2.path: file not found: {}",
            missing.display()
        )),
        "{stderr}"
    );
    let output = check_config(dir.path().join("absent.toml"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("absent.toml: cannot read"));
}

#[test]
fn check_config_refuses_a_kv_cache_that_cannot_fit_with_the_numbers() {
    let dir = tests::scratch_dir();
    let config = dir.path().join("big.toml");
    let text = format!(
        "[auth]\nallow_anonymous = true\n[models.smollm2]\npath = {:?}\ncontext_tokens = 8192\n\
         parallel_sequences = 16\nkv_memory_bytes_max = 1073741824\n",
        tests::model_path()
    );
    std::fs::write(&config, text).unwrap();
    let output = check_config(&config);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "models.smollm2.context_tokens: the KV cache for 16 sequences x 8192 tokens (+ 8192 \
             prefix-cache tokens) = 139264 cells (as llama.cpp pads them) x 23040 bytes per token \
             needs 3060.0 MiB but the budget is 1024.0 MiB (models.smollm2.kv_memory_bytes_max)"
        ),
        "{stderr}"
    );
}

#[test]
fn check_config_refuses_rules_that_name_entities_no_recognizer_reports() {
    let dir = tests::scratch_dir();
    let config = dir.path().join("rules.toml");
    let text = format!(
        "[auth]\nallow_anonymous = true\n[models.smollm2]\npath = {:?}\n\
         [policy]\ndictionaries = {{ projects = [\"Falcon\"] }}\ndisabled_entities = [\"email\"]\n\
         [[policy.rules]]\nname = \"cards-stay\"\naction = \"local\"\ntarget = \"smollm2\"\n\
         when = {{ entities = [\"credit_cardz\", \"iban\", \"dictionary:projects\", \
         \"dictionary:customers\", \"email\"] }}\n",
        tests::model_path()
    );
    std::fs::write(&config, text).unwrap();
    // `--config`, as `serve` and `explain` take it.
    let output = Command::new(isthmus_binary())
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("3 errors"), "{stderr}");
    for wanted in [
        "policy.rules[0].when.entities[0]: `credit_cardz` is not an entity type (built-in: \
         credit_card, iban,",
        "policy.rules[0].when.entities[3]: `dictionary:customers` is not an entity type",
        "policy.rules[0].when.entities[4]: `email` is in policy.disabled_entities, so the rule \
         could never match it",
    ] {
        assert!(stderr.contains(wanted), "{wanted}\n{stderr}");
    }
}
