//! `[responses]`: whether the Responses API keeps responses for `previous_response_id` and
//! `GET /v1/responses/{id}`, and for how long.

use std::time::Duration;

use serde::Deserialize;

use super::Validator;

/// The validated `[responses]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsesConfig {
    /// Keep responses (unless a request says `"store": false`). Off: nothing is kept, every
    /// answer says `"store": false` and `previous_response_id` is refused.
    pub store: bool,
    /// How long a stored response can be read or continued.
    pub retention: Duration,
    /// The store's bound: the oldest responses go first beyond it.
    pub bytes_max: u64,
    /// A response (with the conversation it continued) larger than this is not kept.
    pub record_bytes_max: u64,
    /// Keep responses whose conversation the sensitivity scan found sensitive content in,
    /// or content it cannot read (attachments). Off: such answers say `"store": false` and
    /// nothing of them is written.
    pub keep_sensitive: bool,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        ResponsesConfig {
            store: false,
            retention: Duration::from_secs(u64::from(DEFAULT_RETENTION_HOURS) * 3_600),
            bytes_max: DEFAULT_BYTES_MAX,
            record_bytes_max: DEFAULT_RECORD_BYTES_MAX,
            keep_sensitive: false,
        }
    }
}

const DEFAULT_RETENTION_HOURS: u32 = 720;
const DEFAULT_BYTES_MAX: u64 = 256 << 20;
const DEFAULT_RECORD_BYTES_MAX: u64 = 8 << 20;
/// Ten years: anything longer is a typo.
const RETENTION_HOURS_MAX: u32 = 87_600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawResponses {
    store: bool,
    retention_hours: u32,
    bytes_max: u64,
    record_bytes_max: u64,
    keep_sensitive: bool,
}

impl Default for RawResponses {
    fn default() -> Self {
        RawResponses {
            store: false,
            retention_hours: DEFAULT_RETENTION_HOURS,
            bytes_max: DEFAULT_BYTES_MAX,
            record_bytes_max: DEFAULT_RECORD_BYTES_MAX,
            keep_sensitive: false,
        }
    }
}

impl Validator<'_> {
    pub(super) fn responses(&mut self, raw: RawResponses) -> ResponsesConfig {
        if !(1..=RETENTION_HOURS_MAX).contains(&raw.retention_hours) {
            self.error(
                "responses.retention_hours",
                format!(
                    "must be between 1 and {RETENTION_HOURS_MAX}, not {}",
                    raw.retention_hours
                ),
            );
        }
        if raw.bytes_max < 1 << 20 {
            self.error(
                "responses.bytes_max",
                format!("must be at least 1048576 (1 MiB), not {}", raw.bytes_max),
            );
        }
        if raw.record_bytes_max == 0 || raw.record_bytes_max > raw.bytes_max {
            self.error(
                "responses.record_bytes_max",
                format!(
                    "must be greater than 0 and at most responses.bytes_max ({}), not {}",
                    raw.bytes_max, raw.record_bytes_max
                ),
            );
        }
        ResponsesConfig {
            store: raw.store,
            retention: Duration::from_secs(u64::from(raw.retention_hours) * 3_600),
            bytes_max: raw.bytes_max,
            record_bytes_max: raw.record_bytes_max,
            keep_sensitive: raw.keep_sensitive,
        }
    }
}
