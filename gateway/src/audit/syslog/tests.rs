//! Syslog messages from records: the RFC 5424 header, the JSON and CEF bodies, CEF escaping,
//! content removal for routes that stayed local, and the sink against real UDP and TCP
//! sockets on 127.0.0.1 (octet-counted framing, a collector that comes back).

use std::io::BufReader;
use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use expect_test::{Expect, expect};
use serde_json::{Map, Value, json};

use super::{
    Format, MessageSettings, SyslogConfig, SyslogSink, Transport, cef, escape_extension,
    escape_header, facility_code, frame, is_app_name, message,
};

fn settings(format: Format) -> MessageSettings {
    MessageSettings {
        format,
        facility: 16,
        app_name: "isthmus".to_owned(),
        process_id: 4242,
    }
}

fn record(route: &str) -> Map<String, Value> {
    let Value::Object(record) = json!({
        "TimeGenerated": "2026-05-01T12:34:56.789Z",
        "Category": "IsthmusAudit",
        "OperationName": "Isthmus/inference/chat/completions/action",
        "ResultType": "Succeeded",
        "ResultDescription": "answered | a=b\\c\nnext",
        "Level": "Informational",
        "CallerIpAddress": "10.0.0.7",
        "RequestId": "req-1",
        "GatewayInstance": "edge 1",
        "DurationMs": 184,
        "Identity": {"AuthType": "ApiKey", "KeyId": "team=a"},
        "Properties": {"Route": route, "Rule": "support|desk", "Method": "POST",
            "Path": "/v1/chat/completions", "Prompt": "[{\"content\":\"hi\"}]",
            "Completion": "hello", "PromptTruncated": false, "CompletionTruncated": false},
        "StreamId": "s-1",
        "Epoch": 2,
        "Seq": 17,
        "RecordHash": "ab12",
    }) else {
        unreachable!()
    };
    record
}

fn check(actual: &str, expect: Expect) {
    expect.assert_eq(actual);
}

fn line(record: &Map<String, Value>) -> Vec<u8> {
    serde_json::to_vec(record).unwrap()
}

#[test]
fn rfc5424_carries_the_record_as_msg_and_strips_local_content() {
    let cloud = line(&record("cloud"));
    let text = String::from_utf8(message(&cloud, &settings(Format::Rfc5424)).unwrap()).unwrap();
    let (header, msg) = text.split_at(text.find('{').unwrap());
    check(
        header,
        expect![[r#"<134>1 2026-05-01T12:34:56.789Z edge1 isthmus 4242 IsthmusAudit - "#]],
    );
    // A cloud record goes byte for byte, content included.
    assert_eq!(msg.as_bytes(), cloud.as_slice());

    let local = line(&record("local"));
    let text = String::from_utf8(message(&local, &settings(Format::Rfc5424)).unwrap()).unwrap();
    let msg: Value = serde_json::from_str(&text[text.find('{').unwrap()..]).unwrap();
    check(
        &msg["Properties"].to_string(),
        expect![[
            r#"{"Method":"POST","Path":"/v1/chat/completions","Route":"local","Rule":"support|desk"}"#
        ]],
    );
    assert_eq!(msg["Seq"], 17);

    let mut warning = record("rejected");
    warning.insert("Level".into(), json!("Warning"));
    warning.insert("GatewayInstance".into(), json!(""));
    warning.insert("TimeGenerated".into(), json!("yesterday"));
    let text =
        String::from_utf8(message(&line(&warning), &settings(Format::Rfc5424)).unwrap()).unwrap();
    check(
        &text[..text.find('{').unwrap()],
        expect![[r#"<132>1 - - isthmus 4242 IsthmusAudit - "#]],
    );
    assert!(!text.contains("hello"));
    assert!(message(b"not json", &settings(Format::Rfc5424)).is_none());
}

#[test]
fn cef_maps_the_columns_and_escapes_pipes_backslashes_equals_and_newlines() {
    check(
        &cef(&record("cloud")),
        expect![[
            r#"CEF:0|Isthmus|Isthmus|0.1.0|Isthmus/inference/chat/completions/action|IsthmusAudit Succeeded|3|rt=1777638896789 cat=IsthmusAudit outcome=Succeeded reason=answered | a\=b\\c\nnext src=10.0.0.7 suser=team\=a dvchost=edge 1 externalId=req-1 requestMethod=POST request=/v1/chat/completions act=cloud cs1=support|desk cs3=s-1 cs4=ab12 cn1=17 cn2=2 cn3=184 cs6={"Completion":"hello","CompletionTruncated":false,"Method":"POST","Path":"/v1/chat/completions","Prompt":"[{\\"content\\":\\"hi\\"}]","PromptTruncated":false,"Route":"cloud","Rule":"support|desk"} cs1Label=Rule cs3Label=StreamId cs4Label=RecordHash cn1Label=Seq cn2Label=Epoch cn3Label=DurationMs cs6Label=Properties"#
        ]],
    );
    let text = String::from_utf8(message(&line(&record("local")), &settings(Format::Cef)).unwrap())
        .unwrap();
    assert!(
        text.starts_with(
            "<134>1 2026-05-01T12:34:56.789Z edge1 isthmus 4242 IsthmusAudit - CEF:0|"
        )
    );
    assert!(
        !text.contains("hello") && !text.contains("Prompt"),
        "{text}"
    );

    let mut odd = record("cloud");
    odd.insert("OperationName".into(), json!("a|b\\c\nd=e"));
    odd.insert("Level".into(), json!("Error"));
    let event = cef(&odd);
    check(
        &event[..event.find("rt=").unwrap()],
        expect![[r#"CEF:0|Isthmus|Isthmus|0.1.0|a\|b\\c d=e|IsthmusAudit Succeeded|8|"#]],
    );
}

#[test]
fn escaping_and_names() {
    check(
        &escape_header("a|b\\c\r\nd=e"),
        expect![[r#"a\|b\\c  d=e"#]],
    );
    check(
        &escape_extension("a|b\\c\r\nd=e"),
        expect![[r#"a|b\\c\r\nd\=e"#]],
    );
    assert_eq!(facility_code("local0"), Some(16));
    assert_eq!(facility_code("audit"), Some(13));
    assert_eq!(facility_code("local8"), None);
    assert!(is_app_name("isthmus-gw"));
    assert!(!is_app_name("two words"));
    assert!(!is_app_name(""));
    assert!(!is_app_name(&"x".repeat(49)));
    check(
        &String::from_utf8(frame(b"<134>1 - - - - - - hi")).unwrap(),
        expect!["21 <134>1 - - - - - - hi"],
    );
}

fn wait_for(deadline: Duration, mut check: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn the_sink_sends_datagrams_over_udp() {
    let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
    collector
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sink = SyslogSink::start(SyslogConfig {
        address: collector.local_addr().unwrap(),
        transport: Transport::Udp,
        format: Format::Rfc5424,
        facility: 13,
        app_name: "gw".to_owned(),
        queue_records_max: 16,
    })
    .unwrap();
    let cloud = line(&record("cloud"));
    sink.offer([cloud.as_slice(), b"not json".as_slice()]);
    let mut buffer = vec![0; 65_536];
    let length = collector.recv(&mut buffer).unwrap();
    let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
    assert!(
        text.starts_with("<110>1 2026-05-01T12:34:56.789Z edge1 gw "),
        "{text}"
    );
    assert!(text.ends_with(&String::from_utf8(cloud).unwrap()));
    let monitor = sink.monitor();
    assert!(wait_for(Duration::from_secs(10), || {
        let status = monitor.status();
        status.sent_total == 1 && status.dropped_total == 1
    }));
}

/// Reads one octet-counted message.
fn read_framed(reader: &mut impl std::io::BufRead) -> String {
    let mut length = Vec::new();
    reader.read_until(b' ', &mut length).unwrap();
    let length: usize = String::from_utf8(length).unwrap().trim().parse().unwrap();
    let mut message = vec![0; length];
    reader.read_exact(&mut message).unwrap();
    String::from_utf8(message).unwrap()
}

#[test]
fn the_sink_frames_over_tcp_and_reconnects_when_the_collector_comes_back() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let sink = SyslogSink::start(SyslogConfig {
        address,
        transport: Transport::Tcp,
        format: Format::Cef,
        facility: 16,
        app_name: "isthmus".to_owned(),
        queue_records_max: 16,
    })
    .unwrap();
    let first = line(&record("cloud"));
    sink.offer([first.as_slice()]);
    let (connection, _) = listener.accept().unwrap();
    connection
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(connection);
    let text = read_framed(&mut reader);
    assert!(text.contains(" - CEF:0|Isthmus|Isthmus|"), "{text}");
    // The collector goes away; the sink reconnects and still delivers the next records.
    drop(reader);
    drop(listener);
    let listener = TcpListener::bind(address).unwrap();
    let mut second = record("cloud");
    second.insert("Seq".into(), json!(18));
    let second = line(&second);
    let mut third = record("cloud");
    third.insert("Seq".into(), json!(19));
    let third = line(&third);
    sink.offer([second.as_slice()]);
    // The first write after the peer left may still succeed; offer until one lands anew.
    let monitor = sink.monitor();
    listener.set_nonblocking(false).unwrap();
    let accepted = std::thread::spawn(move || {
        let (connection, _) = listener.accept().unwrap();
        connection
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(connection);
        let mut seen = Vec::new();
        while !seen.iter().any(|text: &String| text.contains("cn1=19")) {
            seen.push(read_framed(&mut reader));
        }
        seen
    });
    std::thread::sleep(Duration::from_millis(50));
    sink.offer([third.as_slice()]);
    let seen = accepted.join().unwrap();
    assert!(
        seen.iter().all(|text| text.contains(" - CEF:0|")),
        "{seen:?}"
    );
    assert!(monitor.status().sent_total >= 2);
}
