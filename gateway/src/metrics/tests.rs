use std::time::Duration;

use super::{Metrics, ModelGauges, RequestRecord};

#[test]
fn requests_and_tokens_are_counted_by_route_and_status() {
    let metrics = Metrics::default();
    let local = RequestRecord {
        route: "local",
        status: 200,
        duration: Duration::from_millis(30),
        prompt_tokens: 12,
        completion_tokens: 5,
        first_token: Some(("smollm2", Duration::from_millis(20))),
    };
    metrics.record(&local);
    metrics.record(&local);
    metrics.record(&RequestRecord {
        route: "rejected",
        status: 404,
        duration: Duration::from_millis(1),
        prompt_tokens: 0,
        completion_tokens: 0,
        first_token: None,
    });
    let gauges = [ModelGauges {
        model: "smollm2".to_owned(),
        queue_depth: 1,
        active_sequences: 2,
        decode_steps: 7,
        batched_tokens: 40,
    }];
    let text = metrics.render(&gauges, 3, true);
    for line in [
        "isthmus_requests_total{route=\"local\",status=\"200\"} 2",
        "isthmus_requests_total{route=\"rejected\",status=\"404\"} 1",
        "isthmus_prompt_tokens_total{route=\"local\"} 24",
        "isthmus_completion_tokens_total{route=\"local\"} 10",
        "isthmus_request_duration_seconds_bucket{route=\"local\",le=\"0.05\"} 2",
        "isthmus_request_duration_seconds_bucket{route=\"local\",le=\"0.025\"} 0",
        "isthmus_request_duration_seconds_count{route=\"local\"} 2",
        "isthmus_time_to_first_token_seconds_count{model=\"smollm2\"} 2",
        "isthmus_local_active_sequences{model=\"smollm2\"} 2",
        "isthmus_open_connections 3",
        "isthmus_ready 1",
    ] {
        assert!(
            text.lines().any(|candidate| candidate == line),
            "missing `{line}` in:\n{text}"
        );
    }
}
