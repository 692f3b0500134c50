use super::{TraceContext, operation, parse_traceparent};

#[test]
fn only_well_formed_trace_contexts_parse() {
    let (trace, parent, flags) =
        parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("well formed");
    assert_eq!(hex::encode(trace), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex::encode(parent), "00f067aa0ba902b7");
    assert_eq!(flags, 1);
    // A later version keeps the trace (its first four fields; more after a `-` ignored);
    // flags other than `sampled` are dropped, as version 00 defines none.
    for later in [
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff",
    ] {
        let (trace, _, flags) = parse_traceparent(later).expect(later);
        assert_eq!(hex::encode(trace), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(flags, 1, "{later}");
    }
    for bad in [
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-00",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        "garbage",
    ] {
        assert!(parse_traceparent(bad).is_none(), "{bad}");
    }
}

#[test]
fn the_gateway_span_is_a_child_of_the_clients() {
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let context = TraceContext::from_header(Some(given));
    assert_eq!(
        hex::encode(context.trace_id),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    assert_eq!(
        context.parent_span_id.map(hex::encode).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_ne!(hex::encode(context.span_id), "00f067aa0ba902b7");
    // The client's sampling decision is kept: not sampled stays not sampled.
    assert!(!context.sampled());
    let header = context.traceparent();
    assert!(
        header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{header}"
    );
    assert!(header.ends_with("-00"), "{header}");
    assert_eq!(
        parse_traceparent(&header).map(|(_, span, _)| span),
        Some(context.span_id)
    );
}

#[test]
fn without_a_valid_header_a_new_sampled_trace_starts() {
    for given in [None, Some("garbage")] {
        let first = TraceContext::from_header(given);
        let second = TraceContext::from_header(given);
        assert!(first.parent_span_id.is_none());
        assert!(first.sampled());
        assert_ne!(first.trace_id, second.trace_id);
        assert!(parse_traceparent(&first.traceparent()).is_some());
    }
}

#[test]
fn api_paths_name_their_operation() {
    for (path, expected) in [
        ("/v1/chat/completions", "chat"),
        ("/openai/deployments/gpt/chat/completions", "chat"),
        ("/v1/completions", "text_completion"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/models", "models"),
        ("/v1/models/smollm2", "models"),
        ("/elsewhere", "http"),
    ] {
        assert_eq!(operation(path), expected, "{path}");
    }
}
