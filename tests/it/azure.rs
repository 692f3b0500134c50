//! `deploy/azure/`: the `IsthmusAudit_CL` table and the data collection rule agree with the
//! audit record columns of DESIGN.md ("Audit records") and with each other, and a record of
//! the gateway's shape type-checks against them, so Azure Monitor Agent and the Logs
//! Ingestion API take records unchanged. The column list is written out here from DESIGN.md,
//! not read from the templates, so a template that drifts fails.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value, json};
use tests::workspace_root;

/// DESIGN.md's audit record columns and their Log Analytics types.
const DESIGN_COLUMNS: [(&str, &str); 25] = [
    ("TimeGenerated", "datetime"),
    ("SchemaVersion", "string"),
    ("Category", "string"),
    ("OperationName", "string"),
    ("ResultType", "string"),
    ("ResultSignature", "string"),
    ("ResultDescription", "string"),
    ("DurationMs", "long"),
    ("Level", "string"),
    ("CallerIpAddress", "string"),
    ("CorrelationId", "string"),
    ("RequestId", "string"),
    ("TraceParent", "string"),
    ("GatewayResourceId", "string"),
    ("GatewayInstance", "string"),
    ("Location", "string"),
    ("Identity", "dynamic"),
    ("Properties", "dynamic"),
    ("OcsfClassUid", "int"),
    ("OcsfActivityId", "int"),
    ("StreamId", "string"),
    ("Epoch", "int"),
    ("Seq", "long"),
    ("PrevHash", "string"),
    ("RecordHash", "string"),
];

/// Column names Log Analytics reserves for itself.
const RESERVED_COLUMNS: [&str; 4] = ["Type", "id", "TenantId", "_ResourceId"];

const TABLE: &str = "IsthmusAudit_CL";
const STREAM: &str = "Custom-IsthmusAudit_CL";
const FILE_PATTERN: &str = "/var/lib/isthmus/audit/audit-*.jsonl";

fn read_json(relative: &str) -> Value {
    let path = workspace_root().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The one resource of type `kind` in an ARM template.
fn resource<'a>(template: &'a Value, kind: &str) -> &'a Value {
    let matching: Vec<&Value> = template["resources"]
        .as_array()
        .expect("an ARM template has resources")
        .iter()
        .filter(|resource| resource["type"].as_str() == Some(kind))
        .collect();
    assert_eq!(matching.len(), 1, "one {kind} resource");
    matching[0]
}

/// `[{name, type}]` as (name, type); types in lower case (tables say `dateTime`, DCR streams
/// `datetime`).
fn columns_of(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .expect("a column list")
        .iter()
        .map(|column| {
            let name = column["name"].as_str().expect("a column name").to_owned();
            let kind = column["type"].as_str().expect("a column type");
            (name, kind.to_ascii_lowercase())
        })
        .collect()
}

/// What is wrong with `columns` against DESIGN.md: missing, extra, mistyped, duplicated,
/// reserved or badly named columns.
fn column_problems(columns: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, kind) in columns {
        if !seen.insert(name.to_ascii_lowercase()) {
            problems.push(format!("{name}: listed twice"));
        }
        if RESERVED_COLUMNS
            .iter()
            .any(|reserved| reserved.eq_ignore_ascii_case(name))
        {
            problems.push(format!("{name}: reserved by Log Analytics"));
        }
        let well_formed = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= 45;
        if !well_formed {
            problems.push(format!("{name}: not a valid column name"));
        }
        match DESIGN_COLUMNS.iter().find(|(design, _)| design == name) {
            None => problems.push(format!("{name}: not a DESIGN.md column")),
            Some((_, design_kind)) if design_kind != kind => {
                problems.push(format!("{name}: type {kind}, DESIGN.md says {design_kind}"));
            }
            Some(_) => {}
        }
    }
    for (name, _) in DESIGN_COLUMNS {
        if !columns.iter().any(|(column, _)| column == name) {
            problems.push(format!("{name}: missing"));
        }
    }
    problems
}

/// What is wrong with `record` against `columns`: every member must be a column, hold a
/// value of its type (string → string, long/int → integer in range, datetime → RFC 3339 UTC
/// string, dynamic → object), and `TimeGenerated` must be there. Absent columns are fine.
fn record_problems(record: &Map<String, Value>, columns: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    if !record.contains_key("TimeGenerated") {
        problems.push("TimeGenerated: missing".to_owned());
    }
    for (name, value) in record {
        let Some((_, kind)) = columns.iter().find(|(column, _)| column == name) else {
            problems.push(format!("{name}: no such column"));
            continue;
        };
        let fits = match kind.as_str() {
            "string" => value.is_string(),
            "long" => value.is_i64() || value.is_u64() && value.as_u64() <= Some(i64::MAX as u64),
            "int" => value
                .as_i64()
                .is_some_and(|number| i32::try_from(number).is_ok()),
            "datetime" => value.as_str().is_some_and(is_rfc3339_utc),
            "dynamic" => value.is_object(),
            other => panic!("{name}: unexpected column type {other}"),
        };
        if !fits {
            problems.push(format!("{name}: {value} is not a {kind}"));
        }
    }
    problems
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|+00:00)` with a real date and time.
fn is_rfc3339_utc(text: &str) -> bool {
    let Some(rest) = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))
    else {
        return false;
    };
    let (main, fraction) = match rest.split_once('.') {
        Some((main, fraction)) => (main, Some(fraction)),
        None => (rest, None),
    };
    if fraction
        .is_some_and(|digits| digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let bytes = main.as_bytes();
    let shape = bytes.len() == 19
        && bytes.iter().enumerate().all(|(index, byte)| match index {
            4 | 7 => *byte == b'-',
            10 => *byte == b'T',
            13 | 16 => *byte == b':',
            _ => byte.is_ascii_digit(),
        });
    if !shape {
        return false;
    }
    let number = |range: std::ops::Range<usize>| main[range].parse::<u32>().unwrap_or(u32::MAX);
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let (hour, minute, second) = (number(11..13), number(14..16), number(17..19));
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&day) && hour <= 23 && minute <= 59 && second <= 60
}

fn table_columns() -> Vec<(String, String)> {
    let template = read_json("deploy/azure/table.json");
    let table = resource(&template, "Microsoft.OperationalInsights/workspaces/tables");
    let name = table["name"].as_str().unwrap();
    assert!(
        name.contains(TABLE),
        "the table resource is {TABLE}: {name}"
    );
    let schema = &table["properties"]["schema"];
    assert_eq!(schema["name"], TABLE);
    columns_of(&schema["columns"])
}

fn stream_columns() -> Vec<(String, String)> {
    let template = read_json("deploy/azure/dcr.json");
    let rule = resource(&template, "Microsoft.Insights/dataCollectionRules");
    columns_of(&rule["properties"]["streamDeclarations"][STREAM]["columns"])
}

/// A record as the gateway writes it: every column, typed as the record builder types them.
fn sample_record() -> Map<String, Value> {
    let record = json!({
        "TimeGenerated": "2026-05-01T12:34:56.789Z",
        "SchemaVersion": "1.0",
        "Category": "IsthmusAudit",
        "OperationName": "Isthmus/inference/chat/completions/action",
        "ResultType": "Succeeded",
        "ResultSignature": "200",
        "ResultDescription": "answered locally",
        "DurationMs": 184,
        "Level": "Informational",
        "CallerIpAddress": "10.20.0.7",
        "CorrelationId": "0f8fad5b-d9cb-469f-a165-70867728950e",
        "RequestId": "req-7d1c",
        "TraceParent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "GatewayResourceId": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/edge/providers/Microsoft.HybridCompute/machines/edge-appliance-1",
        "GatewayInstance": "edge-appliance-1",
        "Location": "plant-7",
        "Identity": {"AuthType": "api_key", "KeyId": "team-a"},
        "Properties": {
            "Route": "local",
            "Rule": "sensitive-local",
            "Target": "smollm2",
            "Attempts": 1,
            "Usage": {"PromptTokens": 31, "CompletionTokens": 12},
            "TtftMs": 41,
            "SensitiveEntityTypes": ["PERSON", "IBAN"],
        },
        "OcsfClassUid": 6003,
        "OcsfActivityId": 1,
        "StreamId": "5c1e0d7a-3f7b-4d7e-9a51-0e2b8f1c6a90",
        "Epoch": 3,
        "Seq": 1_234_567_u64,
        "PrevHash": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "RecordHash": "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752",
    });
    let Value::Object(record) = record else {
        unreachable!()
    };
    record
}

#[test]
fn the_table_has_every_audit_column_with_its_type() {
    let columns = table_columns();
    assert_eq!(column_problems(&columns), Vec::<String>::new());
    let template = read_json("deploy/azure/table.json");
    let table = resource(&template, "Microsoft.OperationalInsights/workspaces/tables");
    assert_eq!(table["properties"]["plan"], "Analytics");
}

#[test]
fn the_rule_declares_the_stream_collects_the_files_and_flows_into_the_table() {
    assert_eq!(column_problems(&stream_columns()), Vec::<String>::new());
    // The stream and the table have the same columns, in the same order.
    assert_eq!(stream_columns(), table_columns());

    let template = read_json("deploy/azure/dcr.json");
    let endpoint = resource(&template, "Microsoft.Insights/dataCollectionEndpoints");
    let rule = resource(&template, "Microsoft.Insights/dataCollectionRules");
    let properties = &rule["properties"];
    // The name is an ARM expression; the reference must use the same one.
    let endpoint_name = endpoint["name"]
        .as_str()
        .unwrap()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let endpoint_reference = properties["dataCollectionEndpointId"].as_str().unwrap();
    assert!(
        endpoint_reference.contains(endpoint_name)
            && endpoint_reference.contains("Microsoft.Insights/dataCollectionEndpoints"),
        "the rule uses the template's endpoint: {endpoint_reference}"
    );
    assert_eq!(
        properties["streamDeclarations"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        [STREAM]
    );

    let files = properties["dataSources"]["logFiles"].as_array().unwrap();
    assert_eq!(files.len(), 1);
    let files = &files[0];
    assert_eq!(files["format"], "json");
    assert_eq!(files["filePatterns"], json!([FILE_PATTERN]));
    assert_eq!(files["streams"], json!([STREAM]));
    assert!(files["name"].as_str().is_some_and(|name| !name.is_empty()));

    let destinations = properties["destinations"]["logAnalytics"]
        .as_array()
        .unwrap();
    assert_eq!(destinations.len(), 1);
    let destination = destinations[0]["name"].as_str().unwrap();
    assert!(
        destinations[0]["workspaceResourceId"]
            .as_str()
            .is_some_and(|id| id.contains("workspaceResourceId"))
    );
    let flows = properties["dataFlows"].as_array().unwrap();
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0]["streams"], json!([STREAM]));
    assert_eq!(flows[0]["destinations"], json!([destination]));
    assert_eq!(flows[0]["transformKql"], "source");
    assert_eq!(flows[0]["outputStream"], STREAM);
    // What the exporter's configuration needs comes out of the deployment.
    let outputs = template["outputs"].as_object().unwrap();
    assert!(
        outputs["dataCollectionRuleImmutableId"]["value"]
            .as_str()
            .is_some_and(|value| value.contains("immutableId"))
    );
    assert!(
        outputs["logsIngestionEndpoint"]["value"]
            .as_str()
            .is_some_and(|value| value.contains("logsIngestion.endpoint"))
    );
}

#[test]
fn a_record_of_the_gateway_shape_type_checks_against_the_columns() {
    let record = sample_record();
    assert_eq!(
        record.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        DESIGN_COLUMNS
            .iter()
            .map(|(name, _)| *name)
            .collect::<BTreeSet<_>>(),
        "the sample has every column"
    );
    assert_eq!(
        record_problems(&record, &table_columns()),
        Vec::<String>::new()
    );
    assert_eq!(
        record_problems(&record, &stream_columns()),
        Vec::<String>::new()
    );
}

#[test]
fn the_type_check_catches_each_kind_of_mismatch() {
    let columns = table_columns();
    let cases: [(&str, Value, &str); 12] = [
        (
            "DurationMs",
            json!("184"),
            "DurationMs: \"184\" is not a long",
        ),
        ("DurationMs", json!(1.5), "DurationMs: 1.5 is not a long"),
        (
            "Seq",
            json!(u64::MAX),
            "Seq: 18446744073709551615 is not a long",
        ),
        (
            "Epoch",
            json!(1_u64 << 40),
            "Epoch: 1099511627776 is not a int",
        ),
        (
            "OcsfClassUid",
            json!("6003"),
            "OcsfClassUid: \"6003\" is not a int",
        ),
        (
            "ResultSignature",
            json!(200),
            "ResultSignature: 200 is not a string",
        ),
        (
            "Properties",
            json!("route=local"),
            "Properties: \"route=local\" is not a dynamic",
        ),
        ("Identity", json!(null), "Identity: null is not a dynamic"),
        (
            "TimeGenerated",
            json!("2026-05-01 12:34:56Z"),
            "TimeGenerated: \"2026-05-01 12:34:56Z\" is not a datetime",
        ),
        (
            "TimeGenerated",
            json!("2026-02-30T12:34:56Z"),
            "TimeGenerated: \"2026-02-30T12:34:56Z\" is not a datetime",
        ),
        (
            "TimeGenerated",
            json!("2026-05-01T12:34:56+02:00"),
            "TimeGenerated: \"2026-05-01T12:34:56+02:00\" is not a datetime",
        ),
        ("Type", json!("x"), "Type: no such column"),
    ];
    for (name, value, expected) in cases {
        let mut record = sample_record();
        record.insert(name.to_owned(), value);
        assert_eq!(record_problems(&record, &columns), [expected], "{name}");
    }
    let mut record = sample_record();
    record.remove("TimeGenerated");
    assert_eq!(
        record_problems(&record, &columns),
        ["TimeGenerated: missing"]
    );
    // Accepted forms.
    for time in [
        "2024-02-29T00:00:00Z",
        "2026-05-01T12:34:56.123456789Z",
        "2026-12-31T23:59:60+00:00",
    ] {
        assert!(is_rfc3339_utc(time), "{time}");
    }
    for time in [
        "2023-02-29T00:00:00Z",
        "2026-05-01T24:00:00Z",
        "2026-05-01T12:34:56.Z",
        "2026-05-01T12:34:56",
    ] {
        assert!(!is_rfc3339_utc(time), "{time}");
    }
}

#[test]
fn the_column_check_catches_drift() {
    let mut columns = table_columns();
    columns.retain(|(name, _)| name != "Seq");
    if let Some(column) = columns.iter_mut().find(|(name, _)| name == "DurationMs") {
        column.1 = "int".to_owned();
    }
    for (name, kind) in [
        ("TenantId", "string"),
        ("Epoch", "long"),
        ("_ResourceId", "string"),
    ] {
        columns.push((name.to_owned(), kind.to_owned()));
    }
    assert_eq!(
        column_problems(&columns),
        [
            "DurationMs: type int, DESIGN.md says long",
            "TenantId: reserved by Log Analytics",
            "TenantId: not a DESIGN.md column",
            "Epoch: listed twice",
            "Epoch: type long, DESIGN.md says int",
            "_ResourceId: reserved by Log Analytics",
            "_ResourceId: not a valid column name",
            "_ResourceId: not a DESIGN.md column",
            "Seq: missing",
        ]
    );
}

/// The README's `az monitor log-analytics workspace table create --columns` matches too.
#[test]
fn the_readme_table_command_lists_the_same_columns() {
    let path = workspace_root().join("deploy/azure/README.md");
    let readme = std::fs::read_to_string(Path::new(&path)).unwrap();
    let line = readme
        .lines()
        .find(|line| line.trim_start().starts_with("--columns "))
        .expect("a --columns line");
    let columns: Vec<(String, String)> = line
        .split_whitespace()
        .skip(1)
        .map(|pair| {
            let (name, kind) = pair.split_once('=').expect("name=type");
            (name.to_owned(), kind.to_ascii_lowercase())
        })
        .collect();
    assert_eq!(columns, table_columns());
}
