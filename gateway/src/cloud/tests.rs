use super::*;

fn rewritten(body: &str, model: &str, stream: bool) -> String {
    match rewrite_body(body.as_bytes(), model, stream) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => format!("error: {error}"),
    }
}

#[test]
fn only_the_model_value_changes() {
    let body = r#"{ "messages": [{"role":"user","content":"a \"model\": {x}"}],
  "model" : "gpt-4o" , "temperature":0.5}"#;
    assert_eq!(
        rewritten(body, "llama-70b", false),
        body.replace(r#""gpt-4o""#, r#""llama-70b""#)
    );
}

#[test]
fn streams_get_include_usage_added_or_set() {
    assert_eq!(
        rewritten(r#"{"model":"a","stream":true}"#, "b", true),
        r#"{"model":"b","stream":true,"stream_options":{"include_usage":true}}"#
    );
    assert_eq!(
        rewritten(
            r#"{"stream_options": {"include_usage": false}, "model":"a","stream":true}"#,
            "b",
            true
        ),
        r#"{"stream_options": {"include_usage":true}, "model":"b","stream":true}"#
    );
    // Already asked for: untouched.
    assert_eq!(
        rewritten(
            r#"{"model":"a","stream":true,"stream_options":{"include_usage":true}}"#,
            "b",
            true
        ),
        r#"{"model":"b","stream":true,"stream_options":{"include_usage":true}}"#
    );
    // `null` is absent, as on the local path.
    assert_eq!(
        rewritten(
            r#"{"model":"a","stream":true,"stream_options":null}"#,
            "b",
            true
        ),
        r#"{"model":"b","stream":true,"stream_options":{"include_usage":true}}"#
    );
}

#[test]
fn a_missing_model_is_added_and_odd_bodies_are_refused() {
    assert_eq!(rewritten(r#"{}"#, "b", false), r#"{"model":"b"}"#);
    assert_eq!(
        rewritten(r#"{"n":1}"#, "b\"c", false),
        r#"{"n":1,"model":"b\"c"}"#
    );
    assert!(rewritten("[1]", "b", false).starts_with("error"));
    assert!(rewritten(r#"{"model":"a","stream_options":3}"#, "b", true).starts_with("error"));
}

#[test]
fn sse_events_pass_whole_and_split_events_wait_for_their_end() {
    let mut splitter = SseSplitter::default();
    let mut seen = Vec::new();
    let first = splitter.push(b"data: {\"a\":1}\n\ndata: {\"b\"", |event, raw| {
        seen.push(String::from_utf8_lossy(event).into_owned());
        Some(Bytes::copy_from_slice(raw))
    });
    assert_eq!(&first[..], b"data: {\"a\":1}\n\n");
    let second = splitter.push(b":2}\r\n\r\ndata: [DONE]\n\n", |event, raw| {
        seen.push(String::from_utf8_lossy(event).into_owned());
        (!event.starts_with(b"data: [DONE]")).then(|| Bytes::copy_from_slice(raw))
    });
    assert_eq!(&second[..], b"data: {\"b\":2}\r\n\r\n");
    assert_eq!(seen, ["data: {\"a\":1}", "data: {\"b\":2}", "data: [DONE]"]);
    assert!(splitter.finish().is_empty());
}

#[test]
fn the_usage_chunk_is_recognised() {
    let usage_only = br#"data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
    let (usage, only) = event_usage(usage_only).unwrap_or_default();
    assert!(only);
    assert_eq!(usage["completion_tokens"], 5);
    let with_text =
        br#"data: {"choices":[{"delta":{"content":"hi"}}],"usage":{"prompt_tokens":3}}"#;
    assert_eq!(event_usage(with_text).map(|(_, only)| only), Some(false));
    assert!(event_usage(br#"data: {"choices":[],"usage":null}"#).is_none());
    assert!(event_usage(b"data: [DONE]").is_none());
}

#[test]
fn event_streams_are_recognised_whatever_the_case() {
    assert!(super::is_event_stream("text/event-stream"));
    assert!(super::is_event_stream("Text/Event-Stream; charset=utf-8"));
    assert!(!super::is_event_stream("application/json"));
    assert!(!super::is_event_stream("text/event-streams"));
}

#[test]
fn an_unfinished_event_is_held_and_counted() {
    let mut splitter = SseSplitter::default();
    let out = splitter.push(b"data: {\"a\":", |_, raw| Some(Bytes::copy_from_slice(raw)));
    assert!(out.is_empty());
    assert_eq!(splitter.pending_bytes(), 11);
}

proptest::proptest! {
    /// However a stream is cut into chunks (a byte at a time, a CRLF blank line split
    /// across two), the splitter finds the same events as in one piece.
    #[test]
    fn events_do_not_depend_on_how_the_stream_is_chunked(
        cuts in proptest::collection::vec(0usize..64, 0..12),
    ) {
        let stream: &[u8] = b"data: {\"a\":1}\n\ndata: {\"b\":2}\r\n\r\n: note\n\ndata: [DONE]\n\n";
        let mut cuts: Vec<usize> = cuts.into_iter().map(|cut| cut % stream.len()).collect();
        cuts.sort_unstable();
        let mut splitter = SseSplitter::default();
        let mut events = Vec::new();
        let mut out = Vec::new();
        let mut start = 0;
        for end in cuts.into_iter().chain([stream.len()]) {
            let sent = splitter.push(&stream[start..end.max(start)], |event, raw| {
                events.push(event.to_vec());
                Some(Bytes::copy_from_slice(raw))
            });
            out.extend_from_slice(&sent);
            start = end.max(start);
        }
        proptest::prop_assert_eq!(out.as_slice(), stream);
        proptest::prop_assert_eq!(events.len(), 4);
        proptest::prop_assert!(splitter.finish().is_empty());
    }

    /// Whatever the strings around it hold (quotes, backslashes, braces, escapes), the
    /// rewrite changes the model and nothing else.
    #[test]
    fn the_rewrite_changes_only_the_model(
        texts in proptest::collection::vec("[a-z\"\\\\{}\\[\\]:, \u{e9}\u{1f600}]{0,12}", 1..6),
        nested in proptest::bool::ANY,
    ) {
        let mut body = serde_json::Map::new();
        for (index, text) in texts.iter().enumerate() {
            let value = if nested {
                serde_json::json!([{ "content": text, "k": [text, {"x": text}] }])
            } else {
                serde_json::Value::from(text.as_str())
            };
            body.insert(format!("{text}{index}"), value);
        }
        body.insert("model".to_owned(), "gpt-4o".into());
        let original = serde_json::Value::Object(body);
        let rewritten = rewrite_body(original.to_string().as_bytes(), "served-70b", false).unwrap();
        let mut expected = original.clone();
        expected["model"] = "served-70b".into();
        let parsed: serde_json::Value = serde_json::from_slice(&rewritten).unwrap();
        proptest::prop_assert_eq!(parsed, expected);
    }
}

#[test]
fn retry_after_is_read_as_seconds_or_as_a_date() {
    let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(
        retry_after_wait(" 120 ", now),
        Some(Duration::from_secs(120))
    );
    let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
    assert_eq!(retry_after_wait(&later, now), Some(Duration::from_secs(30)));
    let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
    assert_eq!(retry_after_wait(&past, now), Some(Duration::ZERO));
    assert_eq!(retry_after_wait("soon", now), None);
    assert_eq!(retry_after_wait("-5", now), None);
}

/// The pools of one pool `aks` with `backends` (a TOML array), built from configuration text.
fn pools_with(backends: &str) -> Pools {
    struct NoEnvironment;
    impl crate::config::Environment for NoEnvironment {
        fn var(&self, _: &str) -> Option<String> {
            None
        }
        fn memory_available_bytes(&self) -> Option<u64> {
            Some(8 << 30)
        }
    }
    let text = format!(
        "[auth]\nallow_anonymous = true\n[upstreams.aks]\nmodels = {{ \"gpt-4o\" = \"m\" }}\n\
         backends = {backends}\n"
    );
    let config = crate::config::parse(&text, std::path::Path::new("isthmus.toml"), &NoEnvironment)
        .unwrap_or_else(|errors| panic!("{errors:?}"));
    Pools::build(&config.upstreams, None).unwrap_or_else(|errors| panic!("{errors:?}"))
}

/// A pool `aks` of three backends of weight 1.
fn three_backend_pool() -> Arc<Pool> {
    let pools = pools_with(
        r#"[
  { url = "http://127.0.0.1:9", name = "a" },
  { url = "http://127.0.0.1:10", name = "b" },
  { url = "http://127.0.0.1:11", name = "c" },
]"#,
    );
    Arc::clone(pools.get("aks").unwrap())
}

#[test]
fn a_rebuild_carries_each_backends_counters_so_its_in_flight_limit_holds() {
    let backends = r#"[{ url = "http://127.0.0.1:9", name = "a" }]"#;
    let before = pools_with(backends);
    let old = &before.get("aks").unwrap().backends[0];
    old.counters.in_flight.fetch_add(3, Ordering::Relaxed);
    old.counters.requests.fetch_add(7, Ordering::Relaxed);
    let config = before.get("aks").unwrap().config.clone();
    let after = Pools::build(&[config], Some(&before)).unwrap();
    let status = &after.status()[0];
    assert_eq!((status.in_flight, status.requests), (3, 7));
    // A request that began on the old build ends on the counter the new one reads.
    old.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    assert_eq!(after.status()[0].in_flight, 2);
}

#[test]
fn a_backend_whose_name_does_not_resolve_is_kept_out_of_traffic_not_refused() {
    // `.invalid` never resolves (RFC 6761).
    let pools = pools_with(
        r#"[
  { url = "http://127.0.0.1:9", name = "a" },
  { url = "http://backend.invalid:8000", name = "gone" },
]"#,
    );
    let unresolved = pools.unresolved();
    assert_eq!(unresolved.len(), 1, "{unresolved:?}");
    assert!(
        unresolved[0].starts_with("upstreams.aks.backends[1].url: cannot resolve backend.invalid"),
        "{unresolved:?}"
    );
    let statuses = pools.status();
    let gone = statuses
        .iter()
        .find(|status| status.backend == "gone")
        .unwrap();
    assert!(!gone.resolved && !gone.takes_traffic(), "{gone:?}");
    assert_eq!(pools.availability(), [("aks".to_owned(), true)]);
    let pool = pools.get("aks").unwrap();
    let facts = |exclude| BalanceFacts {
        variant: None,
        sticky_key: None,
        exclude,
    };
    assert!(
        !pool.could_choose(&facts(&[0])),
        "only the unresolved one is left"
    );
    for _ in 0..4 {
        assert_eq!(pool.choose(&facts(&[])).map(|(index, _)| index), Ok(0));
    }
}

#[test]
fn looking_ahead_for_another_backend_neither_admits_nor_takes_a_turn() {
    let pool = three_backend_pool();
    let facts = |exclude| BalanceFacts {
        variant: None,
        sticky_key: None,
        exclude,
    };
    let picks = |count: usize| -> Vec<usize> {
        (0..count)
            .map(|_| pool.choose(&facts(&[])).map(|(index, _)| index).unwrap())
            .collect()
    };
    let first = picks(3);
    // Looking ahead between the picks leaves the rotation as it was.
    let mut with_look_ahead = Vec::new();
    for _ in 0..3 {
        assert!(pool.could_choose(&facts(&[0])));
        with_look_ahead.push(pool.choose(&facts(&[])).map(|(index, _)| index).unwrap());
    }
    assert_eq!(with_look_ahead, first);
    // An open circuit: nothing to look ahead to.
    let open_for = |back_off_ms: u64| router_policies::CircuitSettings {
        failures_to_open: 1,
        open_base_ms: back_off_ms,
        open_max_ms: back_off_ms,
    };
    let only_b = facts(&[0, 2]);
    lock(&pool.backends[1].health)
        .circuit
        .record(false, None, now_ms(), &open_for(60_000));
    assert!(!pool.could_choose(&only_b), "an open circuit");
    // Half-open (a back-off that has passed): the look-ahead sees the trial and leaves it to
    // the request that chooses.
    let mut circuit = Circuit::default();
    circuit.record(false, None, now_ms(), &open_for(0));
    lock(&pool.backends[1].health).circuit = circuit;
    assert!(pool.could_choose(&only_b));
    assert!(pool.could_choose(&only_b));
    assert!(matches!(pool.choose(&only_b), Ok((1, Some(_)))));
    assert!(!pool.could_choose(&only_b), "the trial is taken");
    assert!(
        !pool.could_choose(&facts(&[0, 1, 2])),
        "every backend excluded"
    );
}

#[test]
fn a_backend_keeps_its_address_while_its_name_gives_it_or_does_not_resolve() {
    let address = |text: &str| text.parse::<SocketAddr>().unwrap();
    let (a, b) = (address("10.0.0.1:443"), address("10.0.0.2:443"));
    // New: the first address.
    assert_eq!(backend_address(Ok(vec![b, a]), None), Ok(b));
    // Rotating order: the one in use stays.
    assert_eq!(backend_address(Ok(vec![b, a]), Some(a)), Ok(a));
    // Moved: the name no longer gives it.
    assert_eq!(backend_address(Ok(vec![b]), Some(a)), Ok(b));
    // A DNS blip: kept, or for a backend that never resolved, the error (the backend is then
    // built without an address).
    assert_eq!(backend_address(Err("no".to_owned()), Some(a)), Ok(a));
    assert_eq!(
        backend_address(Err("no".to_owned()), None),
        Err("no".to_owned())
    );
}

#[test]
fn the_prompt_estimate_counts_text_not_attachments() {
    let text =
        br#"{"model":"m","messages":[{"role":"user","content":"How are you today, friend?"}]}"#;
    let estimate = estimated_prompt_tokens(text);
    assert!((10..=40).contains(&estimate), "{estimate}");
    // The same message with a 1 MB image: the image is the backend's to count.
    let image = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"How are you today, friend?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{}"}}}}]}}]}}"#,
        "A".repeat(1 << 20)
    );
    assert!(estimated_prompt_tokens(image.as_bytes()) < 100);
    let raw_audio = format!(
        r#"{{"input_audio":{{"data":"{}","format":"wav"}}}}"#,
        "QUJD".repeat(4096)
    );
    assert!(estimated_prompt_tokens(raw_audio.as_bytes()) < 20);
    // Text that merely looks like an attachment is text.
    let disguised = format!(
        r#"{{"messages":[{{"role":"user","content":"data: {}"}}]}}"#,
        "word ".repeat(2000)
    );
    assert!(estimated_prompt_tokens(disguised.as_bytes()) > 2000);
    let unspaced = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "Q".repeat(8000)
    );
    assert!(estimated_prompt_tokens(unspaced.as_bytes()) >= 2000);
}

#[test]
fn a_backend_failure_is_described_without_the_bytes_pingora_read() {
    let io = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad header");
    let error = pingora_error::Error::because(
        pingora_error::ErrorType::InvalidHTTPHeader,
        "buf: HTTP/1.1 200 OK\r\nSet-Cookie: session=secret\r\n\r\nThe answer is 42",
        io,
    );
    assert_eq!(without_context(&error), "InvalidHTTPHeader: bad header");
    // A wrapped chain keeps its short contexts (what tells faults apart) and loses the
    // bytes of any level.
    let wrapped = error.more_context("reading the answer of backend a");
    let text = without_context(&wrapped);
    assert_eq!(
        text,
        "InvalidHTTPHeader (reading the answer of backend a): bad header"
    );
    let timed_out = pingora_error::Error::explain(
        pingora_error::ErrorType::WriteTimedout,
        "while writing the request",
    );
    assert_eq!(
        without_context(&timed_out),
        "WriteTimedout (while writing the request)"
    );
}
