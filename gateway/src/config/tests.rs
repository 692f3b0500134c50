use std::path::{Path, PathBuf};

use super::{BackendConfig, Environment, ModelConfig, parse};

struct FakeEnvironment;

impl Environment for FakeEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        (name == "ISTHMUS_TEST_KEY").then(|| "secret-from-env-0123".to_owned())
    }

    fn memory_available_bytes(&self) -> Option<u64> {
        Some(8 << 30)
    }
}

/// The metadata of a GGUF model shaped like SmolLM2-135M (30 layers, 3 KV heads of 64):
/// config validation reads no more than that, so it stands in for the model file.
fn gguf_header() -> Vec<u8> {
    let text = |bytes: &mut Vec<u8>, value: &str| {
        bytes.extend((value.len() as u64).to_le_bytes());
        bytes.extend(value.as_bytes());
    };
    let pairs: [(&str, u32); 5] = [
        ("llama.block_count", 30),
        ("llama.context_length", 8192),
        ("llama.embedding_length", 576),
        ("llama.attention.head_count", 9),
        ("llama.attention.head_count_kv", 3),
    ];
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3_u32.to_le_bytes());
    bytes.extend(0_u64.to_le_bytes());
    bytes.extend((pairs.len() as u64 + 1).to_le_bytes());
    text(&mut bytes, "general.architecture");
    bytes.extend(8_u32.to_le_bytes());
    text(&mut bytes, "llama");
    for (key, value) in pairs {
        text(&mut bytes, key);
        bytes.extend(4_u32.to_le_bytes());
        bytes.extend(value.to_le_bytes());
    }
    bytes
}

/// A directory holding a model file with just its metadata.
fn fixture() -> (tempfile::TempDir, PathBuf) {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(error) => panic!("temp dir: {error}"),
    };
    let model = dir.path().join("model.gguf");
    if let Err(error) = std::fs::write(&model, gguf_header()) {
        panic!("writing fixture: {error}");
    }
    let config = dir.path().join("isthmus.toml");
    (dir, config)
}

fn errors_of(text: &str, source: &Path) -> Vec<String> {
    match parse(text, source, &FakeEnvironment) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

const VALID: &str = r#"
[server]
listen = "127.0.0.1:0"
state_dir = "state"

[auth]
api_keys = [
  { id = "env", key_env = "ISTHMUS_TEST_KEY" },
  { id = "hash", sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08" },
]

[models.smollm2]
path = "model.gguf"
aliases = ["gpt-4o-mini"]
threads = 2
"#;

#[test]
fn a_valid_file_resolves_paths_relative_to_itself() {
    let (dir, source) = fixture();
    let config = match parse(VALID, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors: {errors:?}"),
    };
    assert_eq!(config.server.state_dir, dir.path().join("state"));
    assert_eq!(config.models[0].path, dir.path().join("model.gguf"));
    assert_eq!(config.models[0].context_tokens, 2048);
    // Settings that pay off only where the device computes apart from the worker's thread:
    // parking finished sequences only while idle, and sending tokens while the next step
    // computes. Off on the CPU, on with GPU layers, unless the file says otherwise.
    type Setting = fn(&ModelConfig) -> bool;
    let settings: [(&str, Setting); 2] = [
        ("park_prefixes_when_idle", |model| {
            model.park_prefixes_when_idle
        }),
        ("overlap_token_delivery", |model| {
            model.overlap_token_delivery
        }),
    ];
    for (key, value) in settings {
        assert!(!value(&config.models[0]), "{key}");
        for (extra, expected) in [
            (String::from("gpu_layers = 99\n"), true),
            (format!("gpu_layers = 99\n{key} = false\n"), false),
            (format!("{key} = true\n"), true),
        ] {
            let text = format!("{VALID}{extra}");
            match parse(&text, &source, &FakeEnvironment) {
                Ok(config) => assert_eq!(value(&config.models[0]), expected, "{extra}"),
                Err(errors) => panic!("{extra}: {errors:?}"),
            }
        }
    }
    let unified = format!("{VALID}kv_unified = true\npark_prefixes_when_idle = true\n");
    assert_eq!(
        errors_of(&unified, &source),
        [
            "models.smollm2.park_prefixes_when_idle: applies only with kv_unified = false (a \
             unified cache parks prefixes on the device)"
        ]
    );
    assert_eq!(config.auth.api_keys.len(), 2);
    assert_eq!(
        config.auth.api_keys[0].sha256,
        super::sha256("secret-from-env-0123")
    );
}

#[test]
fn the_configuration_file_is_watched_only_when_asked() {
    let (_dir, source) = fixture();
    let with = |setting: &str| VALID.replacen("[server]\n", &format!("[server]\n{setting}\n"), 1);
    for (text, expected) in [
        (VALID.to_owned(), None),
        (with("config_watch_interval_ms = 0"), None),
        (
            with("config_watch_interval_ms = 2000"),
            Some(std::time::Duration::from_secs(2)),
        ),
    ] {
        match parse(&text, &source, &FakeEnvironment) {
            Ok(config) => assert_eq!(config.server.config_watch_interval, expected, "{text}"),
            Err(errors) => panic!("{text}: {errors:?}"),
        }
    }
    assert_eq!(
        errors_of(&with("config_watch_interval_ms = 50"), &source),
        ["server.config_watch_interval_ms: must be 0 (off) or at least 100, not 50"]
    );
}

#[test]
fn rate_limits_belong_to_data_plane_callers_and_are_positive() {
    let (_dir, source) = fixture();
    let limited = VALID.replacen(
        "key_env = \"ISTHMUS_TEST_KEY\" }",
        "key_env = \"ISTHMUS_TEST_KEY\", requests_per_minute = 60, tokens_per_minute = 1000, tokens_per_day = 50000 }",
        1,
    );
    let config = match parse(&limited, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    let limits = config.auth.limits_of(Some("env"));
    assert_eq!(
        (
            limits.requests_per_minute,
            limits.tokens_per_minute,
            limits.tokens_per_day
        ),
        (Some(60), Some(1_000), Some(50_000))
    );
    assert!(!config.auth.limits_of(Some("hash")).is_limited());
    assert!(!config.auth.limits_of(None).is_limited());
    let zero = VALID.replacen(
        "key_env = \"ISTHMUS_TEST_KEY\" }",
        "key_env = \"ISTHMUS_TEST_KEY\", requests_per_minute = 0, tokens_per_day = 0 }",
        1,
    );
    assert_eq!(
        errors_of(&zero, &source),
        [
            "auth.api_keys[0].requests_per_minute: must be greater than 0 (leave it out for no limit)",
            "auth.api_keys[0].tokens_per_day: must be greater than 0 (leave it out for no budget)"
        ]
    );
    let anonymous = VALID.replacen(
        "[auth]\n",
        "[auth]\nanonymous_limits = { tokens_per_minute = 100 }\n",
        1,
    );
    assert_eq!(
        errors_of(&anonymous, &source),
        ["auth.anonymous_limits: applies only with allow_anonymous = true"]
    );
    let per_client = VALID.replacen(
        "[auth]\n",
        "[auth]\nallow_anonymous = true\nanonymous_limits = { per_client = true }\n",
        1,
    );
    assert_eq!(
        errors_of(&per_client, &source),
        ["auth.anonymous_limits.per_client: applies only with a limit or budget beside it"]
    );
    let per_client = VALID.replacen(
        "[auth]\n",
        "[auth]\nallow_anonymous = true\nanonymous_limits = { requests_per_minute = 30, per_client = true }\n",
        1,
    );
    match parse(&per_client, &source, &FakeEnvironment) {
        Ok(config) => assert!(
            config.auth.anonymous_limits_per_client
                && config.auth.anonymous_ipv6_prefix_length == 64
        ),
        Err(errors) => panic!("{errors:?}"),
    }
    let prefix = per_client.replace(
        "per_client = true }",
        "per_client = true, ipv6_prefix_length = 16 }",
    );
    assert_eq!(
        errors_of(&prefix, &source),
        ["auth.anonymous_limits.ipv6_prefix_length: must be from 32 to 128, not 16"]
    );
    let admin = VALID.replacen(
        "[server]\n",
        "[server]\nadmin_tokens = [{ id = \"ops\", key_env = \"ISTHMUS_TEST_KEY\", requests_per_minute = 5 }]\n",
        1,
    );
    assert_eq!(
        errors_of(&admin, &source),
        [
            "server.admin_tokens[0]: rate limits are for callers of the data plane (auth.api_keys), not admin tokens"
        ]
    );
}

#[test]
fn every_error_is_reported_with_its_key_path() {
    let (dir, source) = fixture();
    let text = r#"
[server]
listen = "nowhere"
[server.limits]
body_bytes_max = 0
header_bytes_max = 2097152
[auth]
api_keys = [{ id = "k", key_env = "UNSET_VARIABLE" }]
[models.smollm2]
path = "missing.gguf"
[models.other]
path = "model.gguf"
context_tokens = "big"
[models.third]
path = "model.gguf"
parallel_sequences = 0
[routing]
default_model = "nope"
[telemtry]
x = 1
"#;
    let errors = errors_of(text, &source);
    let missing = dir.path().join("missing.gguf");
    let expected = [
        "telemtry: unknown section (expected server, auth, models, upstreams, routing, policy, audit, telemetry, engine, logging, responses, waf, cors)"
            .to_owned(),
        "models.other.context_tokens: invalid type: string \"big\", expected u32".to_owned(),
        "server.listen: `nowhere` is not an address of the form IP:PORT (e.g. 127.0.0.1:8443)"
            .to_owned(),
        "server.limits.body_bytes_max: must be from 1 to 1073741824 (1 GiB)".to_owned(),
        "server.limits.header_bytes_max: must be from 1024 to 1048575".to_owned(),
        "auth.api_keys[0].key_env: environment variable UNSET_VARIABLE is not set or empty"
            .to_owned(),
        format!("models.smollm2.path: file not found: {}", missing.display()),
        "models.third.parallel_sequences: must be between 1 and 256".to_owned(),
        "routing.default_model: `nope` is not a configured model".to_owned(),
    ];
    for line in &expected {
        assert!(errors.contains(line), "missing `{line}` in {errors:#?}");
    }
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
}

#[test]
fn listeners_limits_and_tls_files_are_checked_before_they_are_used() {
    let (dir, source) = fixture();
    let garbage = dir.path().join("garbage.pem");
    if let Err(error) = std::fs::write(&garbage, "not a certificate\n") {
        panic!("writing fixture: {error}");
    }
    let text = format!(
        "{}\n[server.limits]\nbody_bytes_max = 2147483648\nkeepalive_timeout_ms = 500\n\
         [server.tls]\ncert = \"garbage.pem\"\nkey = \"garbage.pem\"\n",
        VALID.replace(
            "listen = \"127.0.0.1:0\"\n",
            "listen = \"0.0.0.0:8443\"\nadmin_listen = \"127.0.0.1:9090\"\n\
             plain_listen = \"127.0.0.1:8443\"\n",
        )
    );
    let errors = errors_of(&text, &source);
    let expected = [
        "server.plain_listen: `127.0.0.1:8443` takes the port server.listen listens on; give each listener its own".to_owned(),
        format!("server.tls: {}: no PEM certificate found", garbage.display()),
        "server.limits.body_bytes_max: must be from 1 to 1073741824 (1 GiB)".to_owned(),
        "server.limits.keepalive_timeout_ms: must be from 1000 to 3600000 (an hour)".to_owned(),
    ];
    assert_eq!(errors, expected, "{errors:#?}");
    // Port 0 picks a free port for each listener, and the IPv4 wildcard leaves IPv6
    // addresses alone: no clash.
    let text = VALID.replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"0.0.0.0:8443\"\nadmin_listen = \"[::1]:8443\"\n",
    );
    assert_eq!(errors_of(&text, &source), Vec::<String>::new());
    let text = VALID.replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n",
    );
    assert_eq!(errors_of(&text, &source), Vec::<String>::new());
    // A keep-alive timeout in range but shorter than the header deadline would cut a reused
    // connection's next header while it is still within its time.
    let text = format!(
        "{VALID}\n[server.limits]\nheader_read_timeout_ms = 20000\nkeepalive_timeout_ms = 5000\n"
    );
    assert_eq!(
        errors_of(&text, &source),
        ["server.limits.keepalive_timeout_ms: must be at least header_read_timeout_ms (20000)"]
    );
}

#[test]
fn a_default_model_with_errors_of_its_own_is_not_reported_missing_too() {
    let (_dir, source) = fixture();
    let text = format!(
        "{}\n[routing]\ndefault_model = \"smollm2\"\n",
        VALID.replace("threads = 2", "threads = -2")
    );
    let errors = errors_of(&text, &source);
    assert_eq!(
        errors,
        ["models.smollm2.threads: invalid value: integer `-2`, expected u32"],
        "{errors:#?}"
    );
}

#[test]
fn callers_named_by_the_policy_must_be_api_keys() {
    let (_dir, source) = fixture();
    let text = format!(
        "{VALID}\n[policy]\ncaller_classifications = {{ hash = \"confidential\", hr-portl = \"confidential\" }}\n\
         [[policy.rules]]\nname = \"hr-local\"\naction = \"local\"\ntarget = \"smollm2\"\n\
         when = {{ callers = [\"env\", \"hr-portl\"] }}\n"
    );
    let errors = errors_of(&text, &source);
    assert_eq!(
        errors,
        [
            "policy.caller_classifications.hr-portl: `hr-portl` is not the id of an [auth] API key",
            "policy.rules[0].when.callers[1]: `hr-portl` is not the id of an [auth] API key",
        ],
        "{errors:#?}"
    );
}

#[test]
fn rule_names_are_plain_tokens_fit_for_headers_and_metric_labels() {
    let (_dir, source) = fixture();
    // Each name as a TOML string literal.
    let rule = |literal: &str| {
        format!("[[policy.rules]]\nname = {literal}\naction = \"local\"\ntarget = \"smollm2\"\n")
    };
    let long = "r".repeat(65);
    let text = format!(
        "{VALID}\n{}{}{}{}",
        rule("\"hr.local:v2_a-b\""),
        rule(r#""say \"hi\"""#),
        rule(r#""bell\u0007""#),
        rule(&format!("\"{long}\"")),
    );
    let errors = errors_of(&text, &source);
    assert_eq!(
        errors,
        [
            r#"policy.rules[1].name: `say \"hi\"` may hold only ASCII letters, digits and - _ . :"#,
            r"policy.rules[2].name: `bell\u{7}` may hold only ASCII letters, digits and - _ . :",
            &format!("policy.rules[3].name: `{long}` is longer than 64 bytes"),
        ],
        "{errors:#?}"
    );
}

#[test]
fn unknown_keys_and_bad_toml_are_errors() {
    let (_dir, source) = fixture();
    let errors = errors_of(&VALID.replace("threads = 2", "thread = 2"), &source);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("models.smollm2.thread: unknown field `thread`"),
        "{errors:?}"
    );
    let errors = errors_of("[server\nlisten = 1", &source);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("invalid TOML (line 1)"), "{errors:?}");
}

#[test]
fn a_file_without_keys_must_opt_into_anonymous_access() {
    let (_dir, source) = fixture();
    let text = "[models.m]\npath = \"model.gguf\"\n";
    assert_eq!(
        errors_of(text, &source),
        ["auth: no API keys are configured; add [[auth.api_keys]] or set allow_anonymous = true"]
    );
    let text = "[auth]\nallow_anonymous = true\n[models.m]\npath = \"model.gguf\"\n";
    assert!(errors_of(text, &source).is_empty());
}

#[test]
fn a_file_that_is_not_gguf_is_refused() {
    let (dir, source) = fixture();
    let other = dir.path().join("notes.txt");
    if let Err(error) = std::fs::write(&other, "hello") {
        panic!("{error}");
    }
    let text = VALID.replace("model.gguf", "notes.txt");
    assert_eq!(
        errors_of(&text, &source),
        [format!(
            "models.smollm2.path: not a GGUF model file: {}",
            other.display()
        )]
    );
}

#[test]
fn paths_are_normalized_lexically() {
    use super::normalize;
    assert_eq!(
        normalize(Path::new("deploy/config/../../state")),
        PathBuf::from("state")
    );
    assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    assert_eq!(normalize(Path::new("../x")), PathBuf::from("../x"));
    assert_eq!(normalize(Path::new("a/..")), PathBuf::from("."));
}

#[test]
fn a_kv_cache_over_the_budget_or_the_trained_context_is_refused_with_the_numbers() {
    let (_dir, source) = fixture();
    let text = VALID.replace(
        "threads = 2",
        "threads = 2\ncontext_tokens = 4096\nparallel_sequences = 8\nkv_memory_bytes_max = 536870912",
    );
    assert_eq!(
        errors_of(&text, &source),
        [
            "models.smollm2.context_tokens: the KV cache for 8 sequences x 4096 tokens (+ 4096 \
          prefix-cache tokens) = 36864 cells (as llama.cpp pads them) x 23040 bytes per token \
          needs 810.0 MiB but the budget is 512.0 MiB (models.smollm2.kv_memory_bytes_max)"
        ]
    );
    // llama.cpp pads each sequence's cache to 256 cells (one cache per sequence, the
    // default): 8 x 300 tokens take 8 x 512 cells, plus the prefix cache's 300 tokens.
    let padded = VALID.replace(
        "threads = 2",
        "threads = 2\ncontext_tokens = 300\nparallel_sequences = 8",
    );
    let config = match parse(&padded, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    assert_eq!(config.models[0].kv_plan.cells, 8 * 512 + 300);
    // One cache for all: its cells padded once.
    let unified = padded.replace("threads = 2", "threads = 2\nkv_unified = true");
    let config = match parse(&unified, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    assert_eq!(
        config.models[0].kv_plan.cells,
        (8 * 300 + 300_u64).div_ceil(256) * 256
    );
    let text = VALID.replace("threads = 2", "threads = 2\ncontext_tokens = 16384");
    assert_eq!(
        errors_of(&text, &source),
        ["models.smollm2.context_tokens: 16384 exceeds the 8192 tokens the model was trained with"]
    );
    let config = match parse(VALID, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    let plan = config.models[0].kv_plan;
    // 4 sequences x 2048 tokens + 2048 prefix-cache tokens.
    assert_eq!(
        (plan.cells, plan.bytes_per_token, plan.bytes),
        (10_240, 23_040, 235_929_600)
    );
}

/// A quantized KV cache is sized by its blocks: the same budget that refuses 8 sequences of
/// 4,096 tokens in f16 holds them in q8_0. Unknown types and types whose blocks do not divide
/// the heads are refused, naming the key.
#[test]
fn the_kv_cache_type_sizes_the_cache_and_is_checked() {
    let (_dir, source) = fixture();
    let budget = "threads = 2
context_tokens = 4096
parallel_sequences = 8
kv_memory_bytes_max = 536870912";
    let text = VALID.replace(
        "threads = 2",
        &format!(
            "{budget}
kv_cache_type = \"q8_0\""
        ),
    );
    let config = match parse(&text, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    let model = &config.models[0];
    assert_eq!(model.kv_cache_type, edge_runtime::KvCacheType::Q8_0);
    // 2 x 30 layers x 3 heads x (64 / 32 x 34 bytes) = 12,240 bytes per token.
    assert_eq!(
        (
            model.kv_plan.cells,
            model.kv_plan.bytes_per_token,
            model.kv_plan.bytes
        ),
        (36_864, 12_240, 451_215_360)
    );
    let text = VALID.replace("threads = 2", "threads = 2\nkv_cache_type = \"q8\"");
    assert_eq!(
        errors_of(&text, &source),
        [
            "models.smollm2.kv_cache_type: `q8` is not a KV cache type (expected one of f32, \
          f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl)"
        ]
    );
    match parse(VALID, &source, &FakeEnvironment) {
        Ok(config) => assert_eq!(
            config.models[0].kv_cache_type,
            edge_runtime::KvCacheType::F16
        ),
        Err(errors) => panic!("{errors:?}"),
    }
}

/// Lanes split the sequences evenly, and each lane has a prefix cache of its own, which the
/// KV plan counts once per lane.
#[test]
fn lanes_must_divide_the_sequences_and_each_has_its_prefix_cache() {
    let (_dir, source) = fixture();
    for lanes in ["0", "3"] {
        let text = format!("{VALID}lanes = {lanes}\n");
        assert_eq!(
            errors_of(&text, &source),
            [
                "models.smollm2.lanes: must divide parallel_sequences (4): each lane decodes an \
              equal share"
            ],
            "lanes = {lanes}"
        );
    }
    let config = match parse(&format!("{VALID}lanes = 2\n"), &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    assert_eq!(config.models[0].lanes, 2);
    // 4 sequences x 2048 tokens + 2 lanes x 2048 prefix-cache tokens.
    assert_eq!(config.models[0].kv_plan.cells, 12_288);
    match parse(VALID, &source, &FakeEnvironment) {
        Ok(config) => assert_eq!(config.models[0].lanes, 1),
        Err(errors) => panic!("{errors:?}"),
    }
}

#[test]
fn parked_prefixes_and_running_sequences_fit_in_a_context() {
    let (_dir, source) = fixture();
    // llama.cpp refuses a context of more than 256 sequences at start: a unified cache's
    // parked prefixes (as many as the sequences, by default) count among them.
    let text = format!(
        "{VALID}parallel_sequences = 200\nkv_unified = true\ncontext_tokens = 64\nbatch_tokens = 256\n"
    );
    assert_eq!(
        errors_of(&text, &source),
        [
            "models.smollm2.prefix_cache_entries: 200 parked prefixes and 200 running sequences \
             per lane exceed the 256 sequences a context holds with kv_unified = true (it \
             defaults to parallel_sequences): set it to at most 56"
        ]
    );
    let fits = format!("{text}prefix_cache_entries = 56\n");
    assert_eq!(errors_of(&fits, &source), Vec::<String>::new());
    let two_lanes = format!("{text}lanes = 2\nprefix_cache_entries = 156\n");
    assert_eq!(errors_of(&two_lanes, &source), Vec::<String>::new());
    let too_many = format!("{VALID}prefix_cache_entries = 4000000000\n");
    assert_eq!(
        errors_of(&too_many, &source),
        ["models.smollm2.prefix_cache_entries: must be at most 256"]
    );
}

#[test]
fn upstream_pools_are_validated_with_every_error_at_once() {
    let (_dir, source) = fixture();
    let text = r#"
[auth]
allow_anonymous = true
[models.smollm2]
path = "model.gguf"
[upstreams.aks]
api = "azure"
protocol = "h3"
connect_timeout_ms = 0
backends = [
  { url = "ftp://x", weight = 1 },
  { url = "https://a.internal:8443/base/", name = "a" },
  { url = "https://b.internal", name = "a", labels = { version = "v2" } },
  { url = "https://svc:pw@c.internal", name = "c" },
]
[upstreams.aks.tls]
client_cert = "client.pem"
[upstreams.aks.auth]
kind = "bearer"
[upstreams.empty]
models = { "x" = "y" }
[upstreams.clash]
models = { "smollm2" = "z" }
backends = [{ url = "http://127.0.0.1:9" }]
[upstreams.typo]
models = { "m" = "n" }
backends = [{ url = "http://127.0.0.1:9", wieght = 3 }]
[upstreams.deployments]
api = "azure"
api_version = "2024-10-21#x"
models = { "gpt-4o" = "gpt 4o", "mini" = "../mini", "ok" = "gpt-4o-mini.v2_1" }
backends = [{ url = "https://aoai.internal" }]
health = { path = "/health check" }
"#;
    let errors = errors_of(text, &source);
    let expected = [
        "upstreams.aks.backends[0].url: `ftp://x` must start with https:// or http://",
        "upstreams.aks.backends[2].name: `a` names two backends of this pool",
        "upstreams.aks.backends[3].url: must not carry credentials (`user:password@`): they would not be sent, and the URL is shown in the admin API; give them in the pool's `auth` settings",
        "upstreams.aks.models: map at least one client model to an upstream model (\"gpt-4o\" = \"served-name\")",
        "upstreams.aks.api_version: required for api = \"azure\" (e.g. \"2024-10-21\")",
        "upstreams.aks.protocol: `h3` is not a protocol (expected auto, http1 or http2)",
        "upstreams.aks.tls.client_key: must be set when tls.client_cert is",
        "upstreams.aks.connect_timeout_ms: must be greater than 0",
        "upstreams.aks.auth: set exactly one of token_file or token_env",
        "upstreams.empty.backends: at least one backend is needed ([[upstreams.NAME.backends]] with a url)",
        "upstreams.typo.backends[0].wieght: unknown field `wieght`, expected one of `url`, `name`, `weight`, `labels`",
        "upstreams.deployments.models.gpt-4o: `gpt 4o` is not an Azure deployment name (letters, digits, `.`, `_` and `-`)",
        "upstreams.deployments.models.mini: `../mini` is not an Azure deployment name (letters, digits, `.`, `_` and `-`)",
        "upstreams.deployments.api_version: `2024-10-21#x` is not an API version (e.g. \"2024-10-21\")",
        "upstreams.deployments.health.path: must be a path and query of visible ASCII characters, without spaces or `#` (percent-encode others)",
    ];
    for line in expected {
        assert!(
            errors.iter().any(|error| error == line),
            "missing `{line}` in {errors:#?}"
        );
    }
    // The local/cloud name clash is the policy's to find (check-config runs it).
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
}

#[test]
fn a_valid_pool_resolves_its_backends() {
    let (_dir, source) = fixture();
    let text = r#"
[auth]
allow_anonymous = true
[upstreams.aks]
models = { "gpt-4o" = "llama-70b" }
sticky = true
[[upstreams.aks.backends]]
url = "https://10.0.0.5:8443/v1-proxy/"
weight = 90
labels = { version = "v1" }
[[upstreams.aks.backends]]
url = "http://[::1]:8000"
name = "canary"
weight = 10
labels = { version = "v2" }
"#;
    let config = match parse(text, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:#?}"),
    };
    assert!(
        config.models.is_empty(),
        "a cloud-only gateway needs no model"
    );
    let pool = &config.upstreams[0];
    assert_eq!(pool.name, "aks");
    assert!(pool.sticky);
    let first = &pool.backends[0];
    assert_eq!(
        (
            first.name.as_str(),
            first.tls,
            first.host.as_str(),
            first.port,
            first.base_path.as_str()
        ),
        ("10.0.0.5:8443", true, "10.0.0.5", 8443, "/v1-proxy")
    );
    assert_eq!(first.variant(), Some("v1"));
    let second = &pool.backends[1];
    assert_eq!(
        (second.name.as_str(), second.host.as_str(), second.port),
        ("canary", "::1", 8000)
    );
    // The Host a request carries: an IPv6 address in brackets, the port unless the default.
    assert_eq!(first.authority(), "10.0.0.5:8443");
    assert_eq!(second.authority(), "[::1]:8000");
    let default_port = BackendConfig {
        port: 443,
        tls: true,
        ..second.clone()
    };
    assert_eq!(default_port.authority(), "[::1]");
}

#[test]
fn an_admin_listener_off_loopback_needs_a_token() {
    let (_dir, source) = fixture();
    let text = r#"
[server]
admin_listen = "0.0.0.0:9090"
[auth]
allow_anonymous = true
[models.smollm2]
path = "model.gguf"
"#;
    let errors = errors_of(text, &source);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("server.admin_tokens: required when server.admin_listen (0.0.0.0:9090) is not a loopback address"),
        "{errors:#?}"
    );
    let with_token = text.replace(
        "admin_listen = \"0.0.0.0:9090\"",
        "admin_listen = \"0.0.0.0:9090\"\nadmin_tokens = [{ id = \"ops\", key_env = \"ISTHMUS_TEST_KEY\" }]",
    );
    assert!(errors_of(&with_token, &source).is_empty());
}

#[test]
fn the_otlp_export_is_validated_with_every_error_at_once() {
    let (_dir, source) = fixture();
    let base = "[auth]\nallow_anonymous = true\n[models.smollm2]\npath = \"model.gguf\"\n";
    let text = format!(
        r#"{base}
[telemetry.otlp]
endpoint = "ftp://collector:4318"
traces = false
metrics = false
metrics_interval_ms = 0
service_name = " "
ca_file = "missing-ca.pem"
headers_from_env = {{ "x-api-key" = "ISTHMUS_NOT_SET", "bad header" = "ISTHMUS_TEST_KEY" }}
"#
    );
    let errors = errors_of(&text, &source);
    let expected = [
        "telemetry.otlp.endpoint: must be an http:// or https:// base URL with a host and no credentials, query or fragment (the collector's OTLP/HTTP port, e.g. http://127.0.0.1:4318), not the URL given for ftp://collector",
        "telemetry.otlp.metrics_interval_ms: must be greater than 0",
        "telemetry.otlp.service_name: must not be empty",
        "telemetry.otlp: exports neither traces nor metrics: set one of them, or remove the section",
        "telemetry.otlp.headers_from_env.bad header: is not a valid HTTP header name",
        "telemetry.otlp.headers_from_env.x-api-key: environment variable ISTHMUS_NOT_SET is not set",
    ];
    for line in expected {
        assert!(
            errors.iter().any(|error| error == line),
            "missing `{line}` in {errors:#?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|error| error.starts_with("telemetry.otlp.ca_file: cannot read ")),
        "{errors:#?}"
    );
    assert_eq!(errors.len(), expected.len() + 1, "{errors:#?}");

    let valid = format!(
        "{base}[telemetry.otlp]\nendpoint = \"http://collector.monitoring:4318/\"\nheaders_from_env = {{ \"x-api-key\" = \"ISTHMUS_TEST_KEY\" }}\n"
    );
    let config = match parse(&valid, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:#?}"),
    };
    let otlp = config.telemetry.otlp.expect("otlp configured");
    assert_eq!(
        otlp.signal_url("traces"),
        "http://collector.monitoring:4318/v1/traces"
    );
    assert_eq!(
        otlp.headers,
        vec![("x-api-key".to_owned(), "secret-from-env-0123".to_owned())]
    );
}

#[test]
fn audit_content_and_syslog_are_validated_with_every_error_at_once() {
    let (_dir, source) = fixture();
    let valid = format!(
        "{VALID}\n[[policy.rules]]\nname = \"support-desk\"\naction = \"local\"\n\
         target = \"smollm2\"\nwhen = {{ headers = {{ \"x-team\" = \"support\" }} }}\n\n\
         [audit.content]\nroutes = [\"cloud\"]\nrules = [\"support-desk\", \"fail_closed\"]\n\n\
         [audit.syslog]\naddress = \"127.0.0.1:514\"\ntransport = \"tcp\"\nformat = \"cef\"\n\
         facility = \"audit\"\n"
    );
    let config = match parse(&valid, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors: {errors:?}"),
    };
    let content = config.audit.content.as_ref().map(|content| {
        (
            content.covers("cloud", "x"),
            content.covers("local", "support-desk"),
            content.covers("local", "x"),
            content.text_bytes_max,
        )
    });
    assert_eq!(content, Some((true, true, false, 8192)));
    let syslog = config.audit.syslog.as_ref().map(|syslog| {
        (
            syslog.address.to_string(),
            syslog.transport,
            syslog.format,
            syslog.facility,
            syslog.app_name.clone(),
        )
    });
    assert_eq!(
        syslog,
        Some((
            "127.0.0.1:514".to_owned(),
            crate::audit::syslog::Transport::Tcp,
            crate::audit::syslog::Format::Cef,
            13,
            "isthmus".to_owned()
        ))
    );
    // Off unless configured.
    let plain = parse(VALID, &source, &FakeEnvironment).ok();
    assert!(
        plain.is_some_and(|config| config.audit.content.is_none() && config.audit.syslog.is_none())
    );

    let invalid = format!(
        "{VALID}\n[audit.content]\nroutes = [\"edge\"]\nrules = [\" \"]\ntext_bytes_max = 100000\n\n\
         [audit.syslog]\naddress = \"collector\"\ntransport = \"quic\"\nformat = \"leef\"\n\
         facility = \"local9\"\napp_name = \"two words\"\nqueue_records_max = 0\n"
    );
    let errors = errors_of(&invalid, &source);
    let expected = [
        "audit.content.routes[0]: unknown route `edge` (expected local, cloud or rejected)",
        "audit.content.rules[0]: must be a policy rule name",
        "audit.content.text_bytes_max: must be between 1 and 12288 (two texts must fit a record): 100000",
        "audit.syslog.address: `collector` is not an address of the form IP:PORT (e.g. 127.0.0.1:8443)",
        "audit.syslog.transport: unknown transport `quic` (expected udp or tcp)",
        "audit.syslog.format: unknown format `leef` (expected rfc5424 or cef)",
        "audit.syslog.app_name: must be 1 to 48 printable ASCII characters without spaces: \"two words\"",
        "audit.syslog.queue_records_max: must be between 1 and 1000000: 0",
    ];
    for message in expected {
        assert!(
            errors.iter().any(|error| error == message),
            "missing `{message}` in {errors:#?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|error| error.starts_with("audit.syslog.facility: unknown facility `local9`")),
        "{errors:#?}"
    );

    // A rule name no policy rule carries would record nothing: refused, naming the choices.
    let misspelt = format!("{VALID}\n[audit.content]\nrules = [\"default\", \"suport-desk\"]\n");
    assert_eq!(
        errors_of(&misspelt, &source),
        [
            "audit.content.rules[1]: no policy rule is named `suport-desk` (expected a \
             [[policy.rules]] name or default, fail_closed, spillover)"
        ]
    );
}

#[test]
fn cors_origins_are_exact_and_validated_with_every_error_at_once() {
    let (_dir, source) = fixture();
    let config = match parse(&format!("{VALID}\n[cors]\n"), &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    assert!(!config.cors.enabled(), "no origins, no CORS");
    let listed = format!(
        "{VALID}\n[cors]\nallow_origins = [\"HTTPS://Chat.Contoso.com:443\", \"http://localhost:5173\"]\nmax_age_s = 60\n"
    );
    let config = match parse(&listed, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    assert_eq!(
        config.cors.allow_origins,
        ["https://chat.contoso.com", "http://localhost:5173"]
    );
    assert!(config.cors.allows("https://chat.contoso.com"));
    assert!(config.cors.allows("HTTPS://CHAT.CONTOSO.COM"));
    assert!(!config.cors.allows("https://chat.contoso.com:8443"));
    assert!(!config.cors.allows("https://evil.example"));
    assert!(!config.cors.allows("null"));
    assert_eq!(config.cors.max_age_s, 60);
    let any = format!("{VALID}\n[cors]\nallow_origins = [\"*\"]\n");
    let config = match parse(&any, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    assert!(config.cors.allows("https://anything.example"));
    let bad = format!(
        "{VALID}\n[cors]\nallow_origins = [\"*\", \"https://a.example/\", \"https://*.contoso.com\", \"https://b.example\", \"https://B.example:443\"]\nmax_age_s = 100000\n"
    );
    assert_eq!(
        errors_of(&bad, &source),
        [
            "cors.max_age_s: must be at most 86400 (24 h), not 100000",
            "cors.allow_origins[1]: `https://a.example/` ends with `/`; browsers send origins without it",
            "cors.allow_origins[2]: `https://*.contoso.com` has a wildcard; list each origin, or \"*\" alone",
            "cors.allow_origins[4]: `https://b.example` is listed twice",
            "cors.allow_origins: \"*\" allows every origin: list it alone or list origins",
        ]
    );
}

#[test]
fn the_response_store_key_is_read_and_checked_without_being_shown() {
    let (dir, source) = fixture();
    let key_file = dir.path().join("responses.key");
    if let Err(error) = std::fs::write(&key_file, format!("{}\n", "1f".repeat(32))) {
        panic!("writing the key: {error}");
    }
    let with_file =
        format!("{VALID}\n[responses]\nstore = true\nencryption_key_file = \"responses.key\"\n");
    let config = match parse(&with_file, &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("{errors:?}"),
    };
    let key = config
        .responses
        .encryption_key
        .as_ref()
        .map(|key| format!("{key:?}"));
    assert!(
        key.as_ref().is_some_and(|key| !key.contains("1f1f")),
        "{key:?}"
    );
    let short = dir.path().join("short.key");
    if let Err(error) = std::fs::write(&short, "0123abcd") {
        panic!("writing the key: {error}");
    }
    let text = format!(
        "{VALID}\n[responses]\nencryption_key_file = \"short.key\"\nencryption_key_env = \"ISTHMUS_TEST_KEY\"\n"
    );
    assert_eq!(
        errors_of(&text, &source),
        ["responses: set at most one of encryption_key_file or encryption_key_env"]
    );
    let text = format!("{VALID}\n[responses]\nencryption_key_file = \"short.key\"\n");
    let errors = errors_of(&text, &source);
    assert!(
        errors.len() == 1
            && errors[0].starts_with("responses.encryption_key_file: ")
            && errors[0].ends_with("must be 32 bytes (256 bits), not 6 bytes"),
        "{errors:?}"
    );
    for (setting, expected) in [
        (
            "encryption_key_env = \"ISTHMUS_TEST_KEY\"",
            "responses.encryption_key_env: environment variable ISTHMUS_TEST_KEY: must be 32 bytes written as 64 hexadecimal digits or in base64 (e.g. the output of `openssl rand -hex 32`)",
        ),
        (
            "encryption_key_env = \"NOT_SET\"",
            "responses.encryption_key_env: environment variable NOT_SET is not set",
        ),
    ] {
        let text = format!("{VALID}\n[responses]\n{setting}\n");
        assert_eq!(errors_of(&text, &source), [expected]);
    }
}

#[test]
fn a_chat_template_file_is_read_and_checked_before_the_model_loads() {
    let (dir, source) = fixture();
    let with_file = |file: &str| format!("{VALID}chat_template_file = \"{file}\"\n");
    let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                    {% endfor %}<|im_start|>assistant\n";
    std::fs::write(dir.path().join("chatml.jinja"), template).unwrap();
    let config = match parse(&with_file("chatml.jinja"), &source, &FakeEnvironment) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors: {errors:?}"),
    };
    assert_eq!(config.models[0].chat_template.as_deref(), Some(template));
    assert_eq!(
        parse(VALID, &source, &FakeEnvironment)
            .map(|config| config.models[0].chat_template.clone())
            .ok(),
        Some(None)
    );

    std::fs::write(dir.path().join("broken.jinja"), "{% for m in messages %}").unwrap();
    std::fs::write(dir.path().join("wrong.jinja"), "{{ messages[0].upper() }}").unwrap();
    let file = |name: &str| dir.path().join(name).display().to_string();
    for (name, expected) in [
        (
            "missing.jinja",
            format!("file not found: {}", file("missing.jinja")),
        ),
        (
            "broken.jinja",
            format!(
                "{} is not a usable chat template: syntax error: unexpected end of input, \
                 expected end of block (in chat_template:1)",
                file("broken.jinja")
            ),
        ),
        (
            "wrong.jinja",
            format!(
                "{} is not a usable chat template: it cannot render a user message: ",
                file("wrong.jinja")
            ),
        ),
    ] {
        let errors = errors_of(&with_file(name), &source);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        let prefix = format!("models.smollm2.chat_template_file: {expected}");
        assert!(
            errors[0].starts_with(&prefix),
            "{errors:#?} against {prefix}"
        );
    }
}

#[test]
fn keys_shorter_than_sixteen_characters_are_refused_without_being_shown() {
    let (dir, source) = fixture();
    let short = dir.path().join("short.key");
    if let Err(error) = std::fs::write(&short, "hunter2\n") {
        panic!("writing fixture: {error}");
    }
    let text = VALID.replace(
        "{ id = \"env\", key_env = \"ISTHMUS_TEST_KEY\" },",
        "{ id = \"env\", key_env = \"ISTHMUS_TEST_KEY\" }, { id = \"short\", key_file = \"short.key\" },",
    );
    let errors = errors_of(&text, &source);
    assert_eq!(
        errors,
        [format!(
            "auth.api_keys[1].key_file: {} holds a key of 7 characters; keys need at least 16 (e.g. `openssl rand -hex 24`)",
            short.display()
        )]
    );
}

#[test]
fn secrets_sent_to_a_backend_may_not_come_from_the_state_directory() {
    let (dir, source) = fixture();
    let state = dir.path().join("state");
    if let Err(error) = std::fs::create_dir_all(&state)
        .and_then(|()| std::fs::write(state.join("audit-device.key"), "device-key-material\n"))
    {
        panic!("writing fixture: {error}");
    }
    let text = format!(
        "{VALID}\n[upstreams.aks]\nmodels = {{ \"gpt-4o\" = \"m\" }}\n\
         backends = [{{ url = \"https://aks.example\" }}]\n\
         auth = {{ kind = \"api_key\", key_file = \"state/audit-device.key\" }}\n"
    );
    let errors = errors_of(&text, &source);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].starts_with("upstreams.aks.auth: ")
            && errors[0].contains("lies in the state directory"),
        "{errors:#?}"
    );
}
