//! Durable audit appends per second with many concurrent appenders: every measured append
//! returns only once its record's group commit has flushed the sled store (and the batch has
//! been written and synced to the JSONL file). Target: 20,000 records/s on the 2-core machine.
//!
//! `cargo bench --workspace --bench audit`

use std::time::{Duration, Instant, SystemTime};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::audit::{AuditConfig, AuditLog, Category, Record, ResultType};

/// A request record of realistic size (about 700 bytes serialised).
fn request(number: u64) -> Record {
    Record::builder(
        Category::Audit,
        "Isthmus/inference/chat/completions/action",
        SystemTime::now(),
    )
    .result(ResultType::Succeeded, "200", "answered")
    .duration_ms(250 + number % 100)
    .caller_ip_address("10.1.2.3")
    .correlation_id("0f8fad5b-d9cb-469f-a165-70867728950e")
    .request_id(format!("req-{number:016x}"))
    .trace_parent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    .gateway_instance("edge-01")
    .location("plant-7")
    .ocsf_activity_id(1)
    .identity("AuthType", "ApiKey")
    .identity("KeyId", "team-a-01")
    .property("Route", "local")
    .property("Rule", "sensitive-stays-local")
    .property("Model", "smollm2-135m")
    .property("PromptTokens", 412)
    .property("CompletionTokens", 128)
    .property("TtftMs", 85)
    .property(
        "SensitiveEntityTypes",
        serde_json::json!(["EMAIL_ADDRESS", "IBAN_CODE"]),
    )
    .property(
        "PolicyHash",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    )
    .build()
}

fn durable_appends(criterion: &mut Criterion) {
    let Ok(state) = tempfile::tempdir() else {
        return;
    };
    let config = AuditConfig::new(state.path().to_owned());
    let Ok(log) = AuditLog::open(config) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
    else {
        return;
    };
    let mut group = criterion.benchmark_group("audit");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(5));
    for appenders in [1_u64, 64, 512] {
        group.bench_function(BenchmarkId::new("durable_append", appenders), |bencher| {
            bencher.iter_custom(|records| {
                let per_appender = records.div_ceil(appenders);
                runtime.block_on(async {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..appenders)
                        .map(|appender| {
                            let log = log.clone();
                            tokio::spawn(async move {
                                for number in 0..per_appender {
                                    let record = request(appender * per_appender + number);
                                    if log.append(record).await.is_err() {
                                        return;
                                    }
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        let _ = task.await;
                    }
                    // Scale back to the requested count (each appender did the ceiling).
                    start
                        .elapsed()
                        .mul_f64(records as f64 / (per_appender * appenders) as f64)
                })
            });
        });
    }
    group.finish();
    let _ = runtime.block_on(log.shutdown());
}

criterion_group!(benches, durable_appends);
criterion_main!(benches);
