use std::time::Duration;

use super::{GenerationRecord, Metrics, ModelGauges, RequestRecord};

#[test]
fn requests_tokens_and_latencies_are_counted() {
    let metrics = Metrics::default();
    let local = RequestRecord {
        route: "local",
        rule: "default",
        status: 200,
        duration: Duration::from_millis(30),
        prompt_tokens: 12,
        completion_tokens: 5,
        generation: Some(GenerationRecord {
            model: "smollm2",
            time_to_first_token: Duration::from_millis(20),
            decode: Duration::from_millis(32),
            tokens_after_first: 4,
        }),
        sensitive: Some("kept_local"),
        attachments: (&["image"], "kept_local"),
        caller: Some("app-a"),
    };
    metrics.record(&local);
    metrics.record(&local);
    metrics.record(&RequestRecord {
        route: "rejected",
        rule: "request",
        status: 404,
        duration: Duration::from_millis(1),
        prompt_tokens: 0,
        completion_tokens: 0,
        generation: None,
        sensitive: None,
        attachments: (&[], "rejected"),
        caller: None,
    });
    metrics.record_rate_limited("tokens");
    metrics.record_config_load(false, true);
    metrics.record_config_load(true, true);
    metrics.record_config_load(true, false);
    let gauges = [ModelGauges {
        model: "smollm2".to_owned(),
        active_sequences: 2,
        kv_cells_used: 300,
        kv_cells_total: 8192,
        prefix_hit_tokens: 40,
        decode_seconds: 1.5,
        sampling_seconds: 0.25,
        ..ModelGauges::default()
    }];
    let backends = [crate::cloud::BackendStatus {
        pool: "aks".to_owned(),
        backend: "v2".to_owned(),
        url: "https://v2.example/".to_owned(),
        weight: 10,
        variant: Some("v2".to_owned()),
        resolved: true,
        probed_healthy: true,
        circuit: "open",
        in_flight: 1,
        requests: 7,
        connections: 2,
        throttled_ms: 0,
    }];
    let gpus = [crate::gpu::GpuSample {
        index: 0,
        utilization_percent: 67,
        memory_used_bytes: 1 << 30,
        memory_total_bytes: 80 << 30,
    }];
    let text = metrics.render(&super::Live {
        models: &gauges,
        backends: &backends,
        gpus: &gpus,
        open_connections: 3,
        connection_refusals: [
            ("header_too_large", 2),
            ("header_timeout", 5),
            ("tls_handshake", 0),
        ],
        ready: true,
        restart_required: &["models"],
        stored_responses: Some((3, 4_096)),
    });
    assert!(
        text.lines()
            .any(|line| line.starts_with("isthmus_config_last_reload_success_timestamp_seconds 1")),
        "{text}"
    );
    for line in [
        "isthmus_requests_total{route=\"local\",status=\"200\"} 2",
        "isthmus_requests_total{route=\"rejected\",status=\"404\"} 1",
        "isthmus_rule_requests_total{route=\"local\",rule=\"default\",status=\"200\"} 2",
        "isthmus_rule_requests_total{route=\"rejected\",rule=\"request\",status=\"404\"} 1",
        "isthmus_output_input_token_ratio{route=\"local\"} 0.4166666666666667",
        "isthmus_prompt_tokens_total{route=\"local\"} 24",
        "isthmus_completion_tokens_total{route=\"local\"} 10",
        "isthmus_request_duration_seconds_bucket{route=\"local\",le=\"0.05\"} 2",
        "isthmus_request_duration_seconds_bucket{route=\"local\",le=\"0.025\"} 0",
        "gen_ai_server_time_to_first_token_seconds_count{gen_ai_request_model=\"smollm2\"} 2",
        // 32 ms over 4 tokens: 8 ms per token.
        "gen_ai_server_time_per_output_token_seconds_bucket{gen_ai_request_model=\"smollm2\",le=\"0.0075\"} 0",
        "gen_ai_server_time_per_output_token_seconds_bucket{gen_ai_request_model=\"smollm2\",le=\"0.01\"} 2",
        "gen_ai_server_request_duration_seconds_count{gen_ai_request_model=\"smollm2\"} 2",
        "isthmus_local_active_sequences{model=\"smollm2\"} 2",
        "isthmus_local_kv_cells_used{model=\"smollm2\"} 300",
        "isthmus_local_kv_cells_total{model=\"smollm2\"} 8192",
        "isthmus_local_prefix_hit_tokens_total{model=\"smollm2\"} 40",
        "isthmus_local_decode_seconds_total{model=\"smollm2\"} 1.5",
        "isthmus_local_sampling_seconds_total{model=\"smollm2\"} 0.25",
        "isthmus_upstream_backend_up{pool=\"aks\",backend=\"v2\"} 0",
        "isthmus_upstream_backend_circuit_open{pool=\"aks\",backend=\"v2\"} 1",
        "isthmus_upstream_backend_requests_total{pool=\"aks\",backend=\"v2\"} 7",
        "isthmus_upstream_backend_connections_total{pool=\"aks\",backend=\"v2\"} 2",
        "isthmus_gpu_utilization_ratio{gpu=\"0\"} 0.67",
        "isthmus_gpu_memory_total_bytes{gpu=\"0\"} 85899345920",
        "isthmus_sensitive_requests_total{disposition=\"kept_local\"} 2",
        "isthmus_attachment_requests_total{kind=\"image\",disposition=\"kept_local\"} 2",
        "isthmus_open_connections 3",
        "isthmus_connections_refused_total{reason=\"header_too_large\"} 2",
        "isthmus_connections_refused_total{reason=\"header_timeout\"} 5",
        "isthmus_connections_refused_total{reason=\"tls_handshake\"} 0",
        "isthmus_ready 1",
        "isthmus_config_restart_required{section=\"models\"} 1",
        "isthmus_config_reloads_total{outcome=\"failure\"} 1",
        "isthmus_config_reloads_total{outcome=\"success\"} 1",
        "isthmus_config_last_reload_successful 0",
        "isthmus_stored_responses 3",
        "isthmus_caller_requests_total{key=\"app-a\",route=\"local\"} 2",
        "isthmus_caller_tokens_total{key=\"app-a\",route=\"local\",kind=\"prompt\"} 24",
        "isthmus_caller_tokens_total{key=\"app-a\",route=\"local\",kind=\"completion\"} 10",
        "isthmus_caller_requests_total{key=\"(anonymous)\",route=\"rejected\"} 1",
        "isthmus_rate_limited_requests_total{limit=\"tokens\"} 1",
        "isthmus_rate_limited_requests_total{limit=\"requests\"} 0",
        "isthmus_stored_responses_bytes 4096",
    ] {
        assert!(
            text.lines().any(|candidate| candidate == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

#[test]
fn gpu_and_backend_series_are_absent_without_gpus_or_pools() {
    let text = Metrics::default().render(&super::Live {
        models: &[],
        backends: &[],
        gpus: &[],
        open_connections: 0,
        connection_refusals: [
            ("header_too_large", 0),
            ("header_timeout", 0),
            ("tls_handshake", 0),
        ],
        ready: false,
        restart_required: &[],
        stored_responses: None,
    });
    assert!(!text.contains("isthmus_gpu_"), "{text}");
    assert!(!text.contains("isthmus_upstream_backend_"), "{text}");
    assert!(!text.contains("isthmus_config_restart_required{"), "{text}");
    assert!(!text.contains("isthmus_stored_responses"), "{text}");
    assert!(
        !text.contains("isthmus_config_last_reload_success_timestamp_seconds "),
        "{text}"
    );
}
