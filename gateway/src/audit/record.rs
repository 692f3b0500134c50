//! One audit record: the DESIGN.md columns as a JSON object, built by [`RecordBuilder`] and
//! capped in size.
//!
//! The chain fields (`StreamId`, `Epoch`, `Seq`, `PrevHash`, `RecordHash`) are not settable
//! here: the log's writer assigns them. A record never exceeds [`RECORD_BYTES_MAX`]: oversized
//! `Properties` values are cut and marked `"Truncated": true`, oversized text columns are cut,
//! and the record is kept whatever it carried.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

/// The schema version every record carries.
pub const SCHEMA_VERSION: &str = "1.0";
/// OCSF class of every record: API Activity.
pub const OCSF_CLASS_UID: u32 = 6003;
/// A record's size, serialised with its chain fields, never exceeds this.
pub const RECORD_BYTES_MAX: usize = 32 * 1024;
/// Room kept for the chain fields the writer adds (stream id, epoch, seq and two hashes).
const CHAIN_FIELDS_BYTES_RESERVED: usize = 512;
/// A top-level text column (request id, caller address, description...) is cut to this.
pub const TEXT_FIELD_BYTES_MAX: usize = 2 * 1024;
/// `Identity` is replaced by `{"Truncated": true}` beyond this.
pub const IDENTITY_BYTES_MAX: usize = 4 * 1024;
/// A cut `Properties` value keeps at least this many bytes of its text.
const PROPERTY_VALUE_BYTES_MIN: usize = 64;

/// The names of the columns the writer fills in.
pub const STREAM_ID: &str = "StreamId";
pub const EPOCH: &str = "Epoch";
pub const SEQ: &str = "Seq";
pub const PREV_HASH: &str = "PrevHash";
pub const RECORD_HASH: &str = "RecordHash";
pub const CATEGORY: &str = "Category";
pub const OPERATION_NAME: &str = "OperationName";
pub const PROPERTIES: &str = "Properties";
pub const TIME_GENERATED: &str = "TimeGenerated";
/// Marker set in `Properties` (or `Identity`) when values were cut to fit the size cap.
pub const TRUNCATED: &str = "Truncated";

/// The kind of record (`Category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// A request: intent or outcome.
    Audit,
    /// A signed checkpoint over the chain so far.
    Checkpoint,
    /// Start, stop or recovery of the log.
    Lifecycle,
    /// A web application firewall event.
    Waf,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Audit => "IsthmusAudit",
            Category::Checkpoint => "IsthmusCheckpoint",
            Category::Lifecycle => "IsthmusLifecycle",
            Category::Waf => "IsthmusWaf",
        }
    }
}

/// `ResultType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultType {
    Succeeded,
    Failed,
    Rejected,
    Cancelled,
    /// The intent record written before a response's first byte.
    Started,
}

impl ResultType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResultType::Succeeded => "Succeeded",
            ResultType::Failed => "Failed",
            ResultType::Rejected => "Rejected",
            ResultType::Cancelled => "Cancelled",
            ResultType::Started => "Started",
        }
    }
}

/// `Level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Informational,
    Warning,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Informational => "Informational",
            Level::Warning => "Warning",
            Level::Error => "Error",
        }
    }
}

/// An audit record without its chain fields, ready to append.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    fields: Map<String, Value>,
}

impl Record {
    /// Starts a record of `category` for `operation_name` (e.g.
    /// `Isthmus/inference/chat/completions/action`) generated at `time`.
    pub fn builder(
        category: Category,
        operation_name: impl Into<String>,
        time: SystemTime,
    ) -> RecordBuilder {
        let mut fields = Map::new();
        fields.insert(TIME_GENERATED.into(), Value::String(format_time(time)));
        fields.insert("SchemaVersion".into(), SCHEMA_VERSION.into());
        fields.insert(CATEGORY.into(), category.as_str().into());
        fields.insert(OPERATION_NAME.into(), Value::String(operation_name.into()));
        fields.insert("Level".into(), Level::Informational.as_str().into());
        fields.insert("OcsfClassUid".into(), OCSF_CLASS_UID.into());
        fields.insert("OcsfActivityId".into(), 0.into());
        fields.insert("Identity".into(), Value::Object(Map::new()));
        fields.insert(PROPERTIES.into(), Value::Object(Map::new()));
        RecordBuilder { fields }
    }

    /// The record's columns.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    pub(crate) fn into_fields(self) -> Map<String, Value> {
        self.fields
    }

    /// Sets one `Properties` member after building (the log marks intents this way). The size
    /// cap is applied again.
    pub(crate) fn set_property(&mut self, name: &str, value: Value) {
        if let Some(Value::Object(properties)) = self.fields.get_mut(PROPERTIES) {
            properties.insert(name.to_owned(), value);
        }
        cap_size(&mut self.fields);
    }
}

/// Builds a [`Record`]; [`RecordBuilder::build`] applies the size cap.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    fields: Map<String, Value>,
}

impl RecordBuilder {
    /// `ResultType`, `ResultSignature` (the HTTP status) and `ResultDescription`.
    pub fn result(
        mut self,
        result_type: ResultType,
        signature: impl Into<String>,
        description: impl Into<String>,
    ) -> Self {
        self.fields
            .insert("ResultType".into(), result_type.as_str().into());
        self.text("ResultSignature", signature.into());
        self.text("ResultDescription", description.into());
        self
    }

    pub fn duration_ms(mut self, duration_ms: u64) -> Self {
        self.fields.insert("DurationMs".into(), duration_ms.into());
        self
    }

    pub fn level(mut self, level: Level) -> Self {
        self.fields.insert("Level".into(), level.as_str().into());
        self
    }

    pub fn caller_ip_address(mut self, address: impl Into<String>) -> Self {
        self.text("CallerIpAddress", address.into());
        self
    }

    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.text("CorrelationId", id.into());
        self
    }

    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.text("RequestId", id.into());
        self
    }

    pub fn trace_parent(mut self, trace_parent: impl Into<String>) -> Self {
        self.text("TraceParent", trace_parent.into());
        self
    }

    pub fn gateway_resource_id(mut self, id: impl Into<String>) -> Self {
        self.text("GatewayResourceId", id.into());
        self
    }

    pub fn gateway_instance(mut self, instance: impl Into<String>) -> Self {
        self.text("GatewayInstance", instance.into());
        self
    }

    pub fn location(mut self, location: impl Into<String>) -> Self {
        self.text("Location", location.into());
        self
    }

    /// `OcsfActivityId` of class 6003 (1 create, 2 read, 3 update, 4 delete, 99 other).
    pub fn ocsf_activity_id(mut self, activity_id: u32) -> Self {
        self.fields
            .insert("OcsfActivityId".into(), activity_id.into());
        self
    }

    /// One `Identity` member (auth type, key id, tenant, mTLS subject; never a secret).
    pub fn identity(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        if let Some(Value::Object(identity)) = self.fields.get_mut("Identity") {
            identity.insert(name.into(), value.into());
        }
        self
    }

    /// One `Properties` member. Prefer integers (milliseconds, counts) and strings.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        if let Some(Value::Object(properties)) = self.fields.get_mut(PROPERTIES) {
            properties.insert(name.into(), value.into());
        }
        self
    }

    /// Bytes of JSON the record can still take before [`RecordBuilder::build`] would cut it.
    pub fn room_bytes(&self) -> usize {
        let used = serde_json::to_vec(&self.fields).map_or(usize::MAX, |bytes| bytes.len());
        (RECORD_BYTES_MAX - CHAIN_FIELDS_BYTES_RESERVED).saturating_sub(used)
    }

    /// The record, cut to [`RECORD_BYTES_MAX`] where needed.
    pub fn build(mut self) -> Record {
        cap_size(&mut self.fields);
        Record {
            fields: self.fields,
        }
    }

    fn text(&mut self, name: &str, text: String) {
        self.fields.insert(name.to_owned(), Value::String(text));
    }
}

fn serialized_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// Cuts a record to [`RECORD_BYTES_MAX`]: text columns first, then `Identity`, then the largest
/// `Properties` values (marking `Truncated`), finally `Properties` as a whole.
fn cap_size(fields: &mut Map<String, Value>) {
    let budget = RECORD_BYTES_MAX - CHAIN_FIELDS_BYTES_RESERVED;
    // Nearly every record is a few hundred bytes: the bound says so without writing it.
    if object_len_bound(fields) <= budget {
        return;
    }
    let total = serde_json::to_vec(&*fields).map_or(usize::MAX, |bytes| bytes.len());
    if total <= budget {
        return;
    }
    for value in fields.values_mut() {
        if let Value::String(text) = value
            && text.len() > TEXT_FIELD_BYTES_MAX
        {
            truncate_text(text, TEXT_FIELD_BYTES_MAX);
        }
    }
    if let Some(identity) = fields.get_mut("Identity")
        && serialized_len(identity) > IDENTITY_BYTES_MAX
    {
        *identity = serde_json::json!({ TRUNCATED: true });
    }
    let Some(Value::Object(mut properties)) = fields.remove(PROPERTIES) else {
        return;
    };
    let others = serde_json::to_vec(&*fields).map_or(usize::MAX, |bytes| bytes.len());
    // `,"Properties":` and the braces.
    let properties_budget = budget.saturating_sub(others + PROPERTIES.len() + 8);
    let mut properties_len = serialized_len(&Value::Object(properties.clone()));
    if properties_len > properties_budget {
        properties.insert(TRUNCATED.into(), Value::Bool(true));
        let mut sizes: Vec<(String, usize)> = properties
            .iter()
            .map(|(name, value)| (name.clone(), serialized_len(value)))
            .collect();
        sizes.sort_by(|left, right| right.1.cmp(&left.1).then_with(|| left.0.cmp(&right.0)));
        properties_len = serialized_len(&Value::Object(properties.clone()));
        for (name, size) in sizes {
            if properties_len <= properties_budget || size <= PROPERTY_VALUE_BYTES_MIN {
                break;
            }
            let excess = properties_len - properties_budget;
            let keep = size
                .saturating_sub(excess + 16)
                .max(PROPERTY_VALUE_BYTES_MIN);
            if let Some(value) = properties.get_mut(&name) {
                let mut text = match &mut *value {
                    Value::String(text) => std::mem::take(text),
                    other => other.to_string(),
                };
                truncate_text(&mut text, keep);
                *value = Value::String(text);
            }
            properties_len = serialized_len(&Value::Object(properties.clone()));
        }
        if properties_len > properties_budget {
            properties = Map::new();
            properties.insert(TRUNCATED.into(), Value::Bool(true));
        }
    }
    fields.insert(PROPERTIES.into(), Value::Object(properties));
}

/// The longest a JSON number is written (`-1.7976931348623157e+308` and the like).
const NUMBER_BYTES_MAX: usize = 32;

/// At least the length of `fields` written as compact JSON, by `serde_json` or in canonical
/// form, counted without writing it: each string byte as its longest escape (`\u00XX`),
/// each number as [`NUMBER_BYTES_MAX`].
pub(super) fn object_len_bound(fields: &Map<String, Value>) -> usize {
    2 + fields
        .iter()
        .map(|(name, value)| string_len_bound(name) + 2 + value_len_bound(value))
        .sum::<usize>()
}

fn value_len_bound(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => NUMBER_BYTES_MAX,
        Value::String(text) => string_len_bound(text),
        Value::Array(items) => {
            2 + items
                .iter()
                .map(|item| value_len_bound(item) + 1)
                .sum::<usize>()
        }
        Value::Object(members) => object_len_bound(members),
    }
}

fn string_len_bound(text: &str) -> usize {
    2 + 6 * text.len()
}

/// Cuts `text` to at most `bytes_max` bytes at a character boundary.
fn truncate_text(text: &mut String, bytes_max: usize) {
    if text.len() <= bytes_max {
        return;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
}

/// `time` as RFC 3339 UTC with millisecond precision: `2026-05-01T12:34:56.789Z`.
pub fn format_time(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let millis = since_epoch.as_millis();
    let seconds_total = u64::try_from(millis / 1000).unwrap_or(u64::MAX);
    let (year, month, day) = civil_from_days(seconds_total / 86_400);
    let seconds_of_day = seconds_total % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        seconds_of_day / 3600,
        seconds_of_day % 3600 / 60,
        seconds_of_day % 60,
        millis % 1000
    )
}

/// `YYYYMMDD` of `time` in UTC (the JSONL file of that day).
pub fn format_day(time: SystemTime) -> String {
    let days = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}{month:02}{day:02}")
}

/// Days since 1970-01-01 of `YYYY-MM-DD...` (the start of a `TimeGenerated` value) or of
/// `YYYYMMDD` (a file's day); `None` when it is neither.
pub fn parse_day(text: &str) -> Option<u64> {
    let digits = |range: std::ops::Range<usize>| -> Option<u64> {
        let part = text.get(range)?;
        if !part.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = if text.as_bytes().get(4) == Some(&b'-') {
        (digits(0..4)?, digits(5..7)?, digits(8..10)?)
    } else {
        (digits(0..4)?, digits(4..6)?, digits(6..8)?)
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    Some(days_from_civil(year, month, day))
}

/// Howard Hinnant's `civil_from_days` for days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_index = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}
