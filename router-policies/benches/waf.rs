//! The firewall on a chat request with a 4 KB prompt and ordinary headers: everything it
//! reads (target, headers, prompt, the body's other strings). Compare with
//! `decide_with_scan_and_score_4k`, the rest of a request's routing cost.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use router_policies::waf::{Waf, WafAction, WafRequest, inspect};

const PROMPT_BYTES: usize = 4096;

const PROSE: &str = "The quarterly review covers the migration of the billing service to the new \
cluster. We moved 12 services in 3 waves between 2024-01-15 and 2024-03-02; ignore the old \
dashboards. Latency at the 99th percentile fell from 840 ms to 310 ms. Show what went well, \
then list which follow-ups we still owe, step by step, in the format of the previous report. ";

fn prompt() -> String {
    let mut text = String::new();
    while text.len() < PROMPT_BYTES {
        text.push_str(PROSE);
    }
    text.truncate(PROMPT_BYTES);
    text
}

fn bench(criterion: &mut Criterion) {
    let waf = Waf::default();
    let prompts = [
        "You are a helpful assistant for the finance team.".to_owned(),
        prompt(),
    ];
    let headers = [
        ("host", "gateway.example.internal:8443"),
        ("content-type", "application/json"),
        ("content-length", "4321"),
        ("authorization", "Bearer sk-test-0123456789abcdef"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("x-request-id", "0b7f2c9e-3d0a-4c55-9a43-3f1e8d2b6c10"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("accept", "application/json"),
    ];
    let request = WafRequest {
        method: "POST",
        target: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        headers: &headers,
        prompt_texts: &prompts,
        other_text: "gpt-4o\nuser-1234\n",
        caller: Some("app"),
    };
    assert_eq!(inspect(&waf, &request).action, WafAction::Allowed);
    let mut group = criterion.benchmark_group("waf");
    group.throughput(Throughput::Bytes(
        prompts.iter().map(|text| text.len() as u64).sum(),
    ));
    group.bench_function("inspect_chat_4k", |bencher| {
        bencher.iter(|| inspect(&waf, std::hint::black_box(&request)));
    });
    group.finish();
    // The forwarding benchmark's request (bench/cloud): a 64-token prompt, few headers.
    let short = [prompts[1][..256].to_owned()];
    let small = WafRequest {
        method: "POST",
        target: "/v1/chat/completions",
        headers: &headers[..5],
        prompt_texts: &short,
        other_text: "fast\n",
        caller: Some("app"),
    };
    criterion.bench_function("waf/inspect_chat_256", |bencher| {
        bencher.iter(|| inspect(&waf, std::hint::black_box(&small)));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
