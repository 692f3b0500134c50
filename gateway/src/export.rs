//! Audit export to Azure Monitor through the Logs Ingestion API, store and forward.
//!
//! The [`Exporter`] reads records from an [`ExportSource`] (the durable audit store, or
//! [`MemorySource`] in tests) after the source's export marker, packs them into JSON arrays of
//! at most `batch_bytes_max` uncompressed bytes, gzips each one and POSTs it to
//! `{endpoint}/dataCollectionRules/{dcr}/streams/{stream}?api-version=2023-01-01` with an Entra
//! bearer token for `https://monitor.azure.com` from [`crate::identity`]. Only after a 2xx does
//! it move the source's marker to the batch's last `Seq`, so:
//!
//! - delivery is at least once: unacknowledged records stay in the source, across link outages
//!   and restarts, and are sent again from the marker;
//! - an acknowledged record is never sent again;
//! - a duplicate happens only after an ambiguous failure (a timeout or a lost answer after the
//!   service took the batch, or a marker the source could not save) and is identifiable by its
//!   (`StreamId`, `Seq`).
//!
//! Failures are retried forever: after the `Retry-After` a 429 or 503 names, else after an
//! exponential back-off. Prompt and completion text leave the appliance only with records of
//! requests that went to the cloud ([`strip_content`]); the source keeps them. Stripping
//! changes the exported copy only: hashes are verified on the store and the files, never on
//! Log Analytics rows.
//!
//! Decisions (batch building, content stripping, retry delays) are pure functions; the
//! [`Exporter`] is the shell that calls the source, the token provider and the network.

mod memory;
#[cfg(test)]
mod tests;

pub use memory::MemorySource;

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use reqwest::Url;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{Notify, watch};

use crate::identity::{self, RawUpstreamAuth, UpstreamAuth};

/// The Logs Ingestion API version the exporter speaks.
pub const API_VERSION: &str = "2023-01-01";
/// The stream of the `IsthmusAudit_CL` table in `deploy/azure/`.
pub const STREAM_NAME_DEFAULT: &str = "Custom-IsthmusAudit_CL";
/// The Entra scope of the Logs Ingestion API in Azure's public cloud.
pub const MONITOR_SCOPE: &str = "https://monitor.azure.com/.default";
/// The Logs Ingestion API refuses calls over 1 MB: the uncompressed JSON of a batch stays
/// within this.
pub const BATCH_BYTES_MAX: usize = 1_000_000;
/// Smallest `batch_bytes_max`: room for any record the audit log writes (32 KiB at most).
pub const BATCH_BYTES_MIN: usize = 64 * 1024;
/// Records in one batch, at most, whatever their size.
pub const BATCH_RECORDS_MAX: usize = 10_000;
/// Records read from the source at a time.
const READ_RECORDS_MAX: usize = 1_000;
/// Default per-request deadline: connecting, sending the batch and reading the answer.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 30_000;
const REQUEST_TIMEOUT_MS_MIN: u64 = 100;
const REQUEST_TIMEOUT_MS_MAX: u64 = 300_000;
/// Default interval of the periodic look for records nobody woke the exporter for.
pub const POLL_INTERVAL_MS_DEFAULT: u64 = 5_000;
const POLL_INTERVAL_MS_MIN: u64 = 10;
const POLL_INTERVAL_MS_MAX: u64 = 3_600_000;
/// First wait after a failure without `Retry-After`; it doubles with each failure in a row.
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait after a failure without `Retry-After`.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Up to this fraction of a back-off is added at random, so appliances that lost the link
/// together do not come back together.
const BACKOFF_JITTER_FRACTION: f64 = 0.25;
/// Longest `Retry-After` honoured.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);
/// Bytes read of an error answer's body.
const ERROR_BODY_BYTES_MAX: usize = 4096;
/// Characters kept of an error answer's message.
const ERROR_MESSAGE_CHARS_MAX: usize = 300;
/// Largest CA file read.
const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `Properties` members holding content text (`[audit.content]`) and its flags.
pub use crate::audit::content::CONTENT_PROPERTIES;
const SEQ: &str = "Seq";

// ---------------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------------

/// Where records to export come from, and where the export marker is kept. Both live in the
/// source, so unexported records and the marker survive restarts together. Called from a
/// blocking thread: implementations may do blocking I/O.
///
/// Records are JSON objects with an unsigned integer `Seq`, increasing. The exporter sends
/// the records before one that is not (or that no batch can hold), then stops its pass there
/// with [`ExportError::InvalidRecord`] or [`ExportError::RecordTooLarge`] and retries it
/// later: nothing is skipped.
pub trait ExportSource: Send + Sync {
    /// Records with Seq > after, in order, up to `max` records.
    fn read_after(&self, after: u64, max: usize) -> Result<Vec<serde_json::Value>, ExportError>;
    /// The highest Seq acknowledged by the destination (persisted by the source).
    fn exported_up_to(&self) -> Result<u64, ExportError>;
    /// Records that everything up to `seq` was acknowledged; called only after a 2xx, with
    /// increasing values. It should be durable before it returns.
    fn mark_exported(&self, seq: u64) -> Result<(), ExportError>;
}

/// Why a pass of the exporter stopped before it caught up. No variant carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("audit source failed: {0}")]
    Source(String),
    #[error("audit record after Seq {after} is not exportable: {reason}")]
    InvalidRecord { after: u64, reason: String },
    #[error("audit record {seq} is {bytes} bytes, more than a batch may hold ({bytes_max} bytes)")]
    RecordTooLarge {
        seq: u64,
        bytes: usize,
        bytes_max: usize,
    },
    #[error("no token for the Logs Ingestion API: {0}")]
    Auth(#[from] identity::AuthError),
    #[error("request to {endpoint} failed: {reason}")]
    Request { endpoint: String, reason: String },
    #[error("request to {endpoint} timed out after {timeout_ms} ms")]
    Timeout { endpoint: String, timeout_ms: u64 },
    #[error("{endpoint} answered with status {status}{detail}",
        detail = status_detail(.code, .message))]
    Status {
        endpoint: String,
        status: u16,
        /// `x-ms-error-code`, or the error body's `error.code`.
        code: Option<String>,
        message: Option<String>,
        /// What `Retry-After` (or `retry-after-ms`) asked for, with a 429 or 503.
        retry_after: Option<Duration>,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

fn status_detail(code: &Option<String>, message: &Option<String>) -> String {
    let mut detail = String::new();
    if let Some(code) = code {
        detail.push_str(&format!(": {code}"));
    }
    if let Some(message) = message {
        detail.push_str(&format!(" ({message})"));
    }
    detail
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `[audit.azure]` as written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    /// The data collection endpoint's logs ingestion URL
    /// (`https://NAME.REGION.ingest.monitor.azure.com`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The DCR's immutable id (`dcr-` and 32 hex digits).
    #[serde(default)]
    pub dcr_immutable_id: Option<String>,
    /// Default: `Custom-IsthmusAudit_CL`.
    #[serde(default)]
    pub stream_name: Option<String>,
    /// Default and most: 1,000,000.
    #[serde(default)]
    pub batch_bytes_max: Option<u64>,
    /// Default: 30,000.
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    /// Default: 5,000.
    #[serde(default)]
    pub poll_interval_ms: Option<u64>,
    /// Extra trust roots (PEM) for the endpoint, beside the system bundle.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How the exporter gets its token; the scope defaults to `https://monitor.azure.com/.default`.
    #[serde(default)]
    pub auth: Option<RawUpstreamAuth>,
}

impl RawExport {
    /// Takes the relative paths written in the configuration relative to `base` (the
    /// configuration file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(relative) = self.ca_file.as_ref().filter(|path| path.is_relative()) {
            self.ca_file = Some(base.join(relative));
        }
        if let Some(auth) = &mut self.auth {
            auth.resolve_paths(base);
        }
    }
}

/// A validated `[audit.azure]`.
#[derive(Clone)]
pub struct ExportConfig {
    /// Where batches go: `{endpoint}/dataCollectionRules/{dcr}/streams/{stream}`.
    pub endpoint: Url,
    pub dcr_immutable_id: String,
    pub stream_name: String,
    /// Uncompressed bytes of one batch's JSON array, at most.
    pub batch_bytes_max: usize,
    /// Deadline of one request, answer included.
    pub request_timeout: Duration,
    /// How often the exporter looks for records without being woken.
    pub poll_interval: Duration,
    /// Trust roots added to the system bundle.
    pub ca_certificates: Vec<CertificateDer<'static>>,
    pub auth: UpstreamAuth,
}

impl ExportConfig {
    /// Everything a running exporter was built from, secrets as digests: `Debug` counts the
    /// CA certificates and redacts the credentials, so a reload could not tell a rotated
    /// client secret or a replaced CA bundle from no change.
    pub fn identity(&self) -> String {
        use sha2::Digest as _;
        let mut roots = sha2::Sha256::new();
        for certificate in &self.ca_certificates {
            roots.update(certificate.as_ref());
        }
        format!(
            "{self:?} roots={} auth={}",
            hex::encode(roots.finalize()),
            self.auth.identity()
        )
    }

    /// The URL batches are POSTed to, `api-version` included.
    pub fn ingestion_url(&self) -> Url {
        let mut url = self.endpoint.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!(
            "{base}/dataCollectionRules/{}/streams/{}",
            self.dcr_immutable_id, self.stream_name
        ));
        url.set_query(Some(&format!("api-version={API_VERSION}")));
        url
    }
}

impl fmt::Debug for ExportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportConfig")
            .field("endpoint", &self.endpoint.as_str())
            .field("dcr_immutable_id", &self.dcr_immutable_id)
            .field("stream_name", &self.stream_name)
            .field("batch_bytes_max", &self.batch_bytes_max)
            .field("request_timeout", &self.request_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("ca_certificates", &self.ca_certificates.len())
            .field("auth", &self.auth)
            .finish()
    }
}

/// Checks `raw` (found at key path `key`, such as `audit.azure`) and compiles its `auth`;
/// `env` reads environment variables. Every problem is reported, each message starting with
/// the key path it concerns.
pub fn compile(
    raw: RawExport,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ExportConfig, Vec<String>> {
    let mut problems = Vec::new();
    let mut problem =
        |field: &str, message: String| problems.push(format!("{key}.{field}: {message}"));

    let endpoint = match raw.endpoint.as_deref() {
        None => {
            problem(
                "endpoint",
                "missing (the data collection endpoint's logs ingestion URL)".to_owned(),
            );
            None
        }
        Some(text) => check_endpoint(text)
            .map_err(|reason| problem("endpoint", reason))
            .ok(),
    };
    let dcr_immutable_id = match raw.dcr_immutable_id {
        None => {
            problem("dcr_immutable_id", "missing".to_owned());
            None
        }
        Some(id) if is_dcr_immutable_id(id.trim()) => Some(id.trim().to_owned()),
        Some(id) => {
            problem(
                "dcr_immutable_id",
                format!("must be `dcr-` and 32 hexadecimal digits: {id}"),
            );
            None
        }
    };
    let stream_name = match raw.stream_name {
        None => Some(STREAM_NAME_DEFAULT.to_owned()),
        Some(name) if is_stream_name(&name) => Some(name),
        Some(name) => {
            problem(
                "stream_name",
                format!(
                    "must be `Custom-` or `Microsoft-` and letters, digits, '_' or '-': {name}"
                ),
            );
            None
        }
    };
    let batch_bytes_max = match raw.batch_bytes_max {
        None => Some(BATCH_BYTES_MAX),
        Some(bytes) => match usize::try_from(bytes) {
            Ok(bytes) if (BATCH_BYTES_MIN..=BATCH_BYTES_MAX).contains(&bytes) => Some(bytes),
            _ => {
                problem(
                    "batch_bytes_max",
                    format!("must be between {BATCH_BYTES_MIN} and {BATCH_BYTES_MAX}: {bytes}"),
                );
                None
            }
        },
    };
    let mut milliseconds =
        |field: &str, value: Option<u64>, default: u64, min: u64, max: u64| match value
            .unwrap_or(default)
        {
            value if (min..=max).contains(&value) => Some(Duration::from_millis(value)),
            value => {
                problem(field, format!("must be between {min} and {max}: {value}"));
                None
            }
        };
    let request_timeout = milliseconds(
        "request_timeout_ms",
        raw.request_timeout_ms,
        REQUEST_TIMEOUT_MS_DEFAULT,
        REQUEST_TIMEOUT_MS_MIN,
        REQUEST_TIMEOUT_MS_MAX,
    );
    let poll_interval = milliseconds(
        "poll_interval_ms",
        raw.poll_interval_ms,
        POLL_INTERVAL_MS_DEFAULT,
        POLL_INTERVAL_MS_MIN,
        POLL_INTERVAL_MS_MAX,
    );
    let ca_certificates = match raw.ca_file.as_deref().map(read_ca_file) {
        None => Some(Vec::new()),
        Some(Ok(certificates)) => Some(certificates),
        Some(Err(reason)) => {
            problem("ca_file", reason);
            None
        }
    };
    let auth = match raw.auth {
        None => {
            problem(
                "auth",
                "missing (kind = \"arc_managed_identity\", \"workload_identity\", \
                 \"client_credentials\" or \"bearer\")"
                    .to_owned(),
            );
            None
        }
        Some(RawUpstreamAuth::None {} | RawUpstreamAuth::ApiKey(_)) => {
            problem(
                "auth.kind",
                "the Logs Ingestion API takes an Entra bearer token: use \
                 arc_managed_identity, workload_identity, client_credentials or bearer"
                    .to_owned(),
            );
            None
        }
        Some(auth) => {
            match identity::compile(with_monitor_audience(auth), &format!("{key}.auth"), env) {
                Ok(auth) => Some(auth),
                Err(auth_problems) => {
                    problems.extend(auth_problems);
                    None
                }
            }
        }
    };
    match (
        endpoint,
        dcr_immutable_id,
        stream_name,
        batch_bytes_max,
        request_timeout,
        poll_interval,
        ca_certificates,
        auth,
    ) {
        (
            Some(endpoint),
            Some(dcr_immutable_id),
            Some(stream_name),
            Some(batch_bytes_max),
            Some(request_timeout),
            Some(poll_interval),
            Some(ca_certificates),
            Some(auth),
        ) if problems.is_empty() => Ok(ExportConfig {
            endpoint,
            dcr_immutable_id,
            stream_name,
            batch_bytes_max,
            request_timeout,
            poll_interval,
            ca_certificates,
            auth,
        }),
        _ => Err(problems),
    }
}

/// Entra kinds with no audience ask for the Logs Ingestion API's.
fn with_monitor_audience(auth: RawUpstreamAuth) -> RawUpstreamAuth {
    match auth {
        RawUpstreamAuth::ArcManagedIdentity(mut raw)
            if raw.resource.is_none() && raw.scope.is_none() =>
        {
            raw.scope = Some(MONITOR_SCOPE.to_owned());
            RawUpstreamAuth::ArcManagedIdentity(raw)
        }
        RawUpstreamAuth::WorkloadIdentity(mut raw) if raw.scope.is_none() => {
            raw.scope = Some(MONITOR_SCOPE.to_owned());
            RawUpstreamAuth::WorkloadIdentity(raw)
        }
        RawUpstreamAuth::ClientCredentials(mut raw) if raw.scope.is_none() => {
            raw.scope = Some(MONITOR_SCOPE.to_owned());
            RawUpstreamAuth::ClientCredentials(raw)
        }
        other => other,
    }
}

/// `dcr-` and 32 hexadecimal digits.
fn is_dcr_immutable_id(id: &str) -> bool {
    id.strip_prefix("dcr-")
        .is_some_and(|hex| hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `Custom-NAME` or `Microsoft-NAME`, in letters, digits, `_` and `-` (it goes into the path).
fn is_stream_name(name: &str) -> bool {
    let rest = name
        .strip_prefix("Custom-")
        .or_else(|| name.strip_prefix("Microsoft-"));
    rest.is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 200
            && rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

/// An endpoint: https, or plain http to a loopback host; no credentials, query or path.
fn check_endpoint(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|error| format!("not a URL ({error}): {text}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold credentials".to_owned());
    }
    if url.host().is_none() {
        return Err(format!("has no host: {text}"));
    }
    if url.query().is_some() || url.fragment().is_some() || url.path() != "/" {
        return Err(format!(
            "must be the endpoint alone, with no path or query: {text}"
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        _ => Err(format!(
            "must be https://... (plain http only to loopback hosts): {text}"
        )),
    }
}

/// `localhost`, 127.0.0.0/8 or ::1.
fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(CA_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if bytes.len() as u64 > CA_FILE_BYTES_MAX {
        return Err(format!(
            "{} is larger than {CA_FILE_BYTES_MAX} bytes",
            path.display()
        ));
    }
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{} is not PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certificates)
}

// ---------------------------------------------------------------------------------------------
// The functional core: records to batches, retry delays
// ---------------------------------------------------------------------------------------------

/// Removes content text ([`CONTENT_PROPERTIES`]) unless the record's `Properties.Route` is
/// `cloud`: text of requests that ran locally, were rejected or name no route never leaves the
/// appliance. Returns whether anything was removed.
pub fn strip_content(record: &mut Value) -> bool {
    match record {
        Value::Object(fields) => crate::audit::content::strip_off_appliance(fields),
        _ => false,
    }
}

/// A record ready for a batch: its `Seq` and its JSON text, content stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Prepared {
    seq: u64,
    json: Vec<u8>,
}

/// Checks that `record` is an object whose `Seq` follows `after`, strips its content and
/// serialises it.
fn prepare(mut record: Value, after: u64) -> Result<Prepared, ExportError> {
    let invalid = |reason: String| ExportError::InvalidRecord { after, reason };
    if !record.is_object() {
        return Err(invalid("not a JSON object".to_owned()));
    }
    let seq = record
        .get(SEQ)
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid("no unsigned integer Seq".to_owned()))?;
    if seq <= after {
        return Err(invalid(format!("Seq {seq} does not follow {after}")));
    }
    strip_content(&mut record);
    let json = serde_json::to_vec(&record).map_err(|error| invalid(error.to_string()))?;
    Ok(Prepared { seq, json })
}

/// One request's worth of records: a JSON array, uncompressed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Batch {
    body: Vec<u8>,
    first_seq: u64,
    last_seq: u64,
    records: usize,
}

/// Packs records, in order, into batches of at most `bytes_max` bytes and
/// [`BATCH_RECORDS_MAX`] records.
#[derive(Debug)]
struct Batcher {
    bytes_max: usize,
    current: Option<Batch>,
}

impl Batcher {
    fn new(bytes_max: usize) -> Self {
        Batcher {
            bytes_max,
            current: None,
        }
    }

    /// Adds a record; returns the batch it closed when it did not fit.
    fn push(&mut self, record: Prepared) -> Result<Option<Batch>, ExportError> {
        // `[` and `]` around a lone record.
        if record.json.len() + 2 > self.bytes_max {
            return Err(ExportError::RecordTooLarge {
                seq: record.seq,
                bytes: record.json.len(),
                bytes_max: self.bytes_max,
            });
        }
        let closed = match &self.current {
            Some(batch)
                if batch.records >= BATCH_RECORDS_MAX
                    // The comma and the record replace nothing: `]` is counted already.
                    || batch.body.len() + 1 + record.json.len() > self.bytes_max =>
            {
                self.finish()
            }
            _ => None,
        };
        match &mut self.current {
            Some(batch) => {
                // Drop the closing bracket, add `,record]`.
                batch.body.pop();
                batch.body.push(b',');
                batch.body.extend_from_slice(&record.json);
                batch.body.push(b']');
                batch.last_seq = record.seq;
                batch.records += 1;
            }
            None => {
                let mut body = Vec::with_capacity(self.bytes_max.min(record.json.len() * 64));
                body.push(b'[');
                body.extend_from_slice(&record.json);
                body.push(b']');
                self.current = Some(Batch {
                    body,
                    first_seq: record.seq,
                    last_seq: record.seq,
                    records: 1,
                });
            }
        }
        Ok(closed)
    }

    /// The batch being filled, if any.
    fn finish(&mut self) -> Option<Batch> {
        self.current.take()
    }
}

/// How long to wait before retrying after `failures` failures in a row, the last being
/// `error`. `jitter` is a draw in [0, 1).
fn retry_delay(error: &ExportError, failures: u32, backoff: Backoff, jitter: f64) -> Duration {
    if let ExportError::Status {
        retry_after: Some(retry_after),
        ..
    } = error
    {
        return (*retry_after).clamp(backoff.initial.min(RETRY_AFTER_MAX), RETRY_AFTER_MAX);
    }
    let doublings = failures.saturating_sub(1).min(30);
    let base = backoff
        .initial
        .saturating_mul(1_u32 << doublings)
        .min(backoff.max);
    base + base.mul_f64(jitter.clamp(0.0, 1.0) * BACKOFF_JITTER_FRACTION)
}

/// The wait a 429 or 503 asks for: `retry-after-ms`, `x-ms-retry-after-ms` or `Retry-After`
/// in seconds. (An HTTP date is not honoured; the back-off applies instead.)
fn retry_after(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    if status != StatusCode::TOO_MANY_REQUESTS && status != StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    number("retry-after-ms")
        .or_else(|| number("x-ms-retry-after-ms"))
        .map(Duration::from_millis)
        .or_else(|| number("retry-after").map(Duration::from_secs))
}

/// The exponential back-off between failed attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    initial: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: BACKOFF_INITIAL,
            max: BACKOFF_MAX,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The shell
// ---------------------------------------------------------------------------------------------

/// Where the exporter stands, for the admin API and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStatus {
    /// The source's marker as last seen or moved.
    pub exported_up_to: u64,
    /// Batches acknowledged since start.
    pub batches_total: u64,
    /// Records acknowledged since start.
    pub records_total: u64,
    /// Failures since the last pass that caught up.
    pub consecutive_failures: u32,
    /// The last failure, while `consecutive_failures > 0`.
    pub last_error: Option<String>,
}

/// Wakes the exporter when records were appended, so they go out promptly.
#[derive(Debug, Clone)]
pub struct ExportWaker {
    notify: Arc<Notify>,
}

impl ExportWaker {
    /// Asks for a pass soon; cheap, and wakes that are not yet served collapse into one.
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

/// How the exporter waits after failures: tests shorten it.
#[derive(Debug, Clone, Copy)]
struct ExportOptions {
    backoff: Backoff,
    jitter: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            backoff: Backoff::default(),
            jitter: true,
        }
    }
}

/// Sends a source's records to the Logs Ingestion API; see the module documentation.
pub struct Exporter {
    config: ExportConfig,
    url: Url,
    /// The URL as errors name it: no query.
    label: String,
    source: Arc<dyn ExportSource>,
    client: reqwest::Client,
    notify: Arc<Notify>,
    status: watch::Sender<ExportStatus>,
    options: ExportOptions,
}

impl fmt::Debug for Exporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exporter")
            .field("url", &self.label)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Exporter {
    /// An exporter of `source`'s records; it sends nothing until [`Exporter::run`].
    pub fn new(config: ExportConfig, source: Arc<dyn ExportSource>) -> Result<Self, ExportError> {
        Self::with_options(config, source, ExportOptions::default())
    }

    fn with_options(
        config: ExportConfig,
        source: Arc<dyn ExportSource>,
        options: ExportOptions,
    ) -> Result<Self, ExportError> {
        let url = config.ingestion_url();
        let mut label_url = url.clone();
        label_url.set_query(None);
        let client = build_client(&config, &url)?;
        Ok(Exporter {
            label: label_url.to_string(),
            url,
            config,
            source,
            client,
            notify: Arc::new(Notify::new()),
            status: watch::Sender::new(ExportStatus::default()),
            options,
        })
    }

    /// A handle that wakes this exporter.
    pub fn waker(&self) -> ExportWaker {
        ExportWaker {
            notify: self.notify.clone(),
        }
    }

    /// Where the exporter stands, updated after every pass and batch.
    pub fn status(&self) -> watch::Receiver<ExportStatus> {
        self.status.subscribe()
    }

    /// Exports until `shutdown` turns true (or its sender goes): a pass whenever woken or
    /// every `poll_interval`, and after a failure a retry once its delay has passed. A
    /// request in flight at shutdown is abandoned; its records go out after the next start.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut failures: u32 = 0;
        loop {
            let outcome = tokio::select! {
                outcome = self.export_pending() => outcome,
                () = stopped(&mut shutdown) => return,
            };
            let delay = match outcome {
                Ok(_) => {
                    failures = 0;
                    None
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    let jitter = if self.options.jitter {
                        rand::random::<f64>()
                    } else {
                        0.0
                    };
                    let delay = retry_delay(&error, failures, self.options.backoff, jitter);
                    tracing::warn!(
                        %error,
                        failures,
                        retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                        "audit export failed; records stay queued"
                    );
                    self.status.send_modify(|status| {
                        status.consecutive_failures = failures;
                        status.last_error = Some(error.to_string());
                    });
                    Some(delay)
                }
            };
            match delay {
                // Wakes during a retry delay wait for it: records keep, the service asked.
                Some(delay) => tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut shutdown) => return,
                },
                None => tokio::select! {
                    () = self.notify.notified() => {}
                    () = tokio::time::sleep(self.config.poll_interval) => {}
                    () = stopped(&mut shutdown) => return,
                },
            }
        }
    }

    /// One pass: sends every record after the marker, batch by batch, moving the marker
    /// after each acknowledged batch. Returns the marker reached once caught up.
    pub async fn export_pending(&self) -> Result<u64, ExportError> {
        let marker = self.blocking(|source| source.exported_up_to()).await?;
        self.status
            .send_if_modified(|status| replace(&mut status.exported_up_to, marker));
        let mut after = marker;
        let mut batcher = Batcher::new(self.config.batch_bytes_max);
        loop {
            let records = self
                .blocking(move |source| source.read_after(after, READ_RECORDS_MAX))
                .await?;
            let exhausted = records.len() < READ_RECORDS_MAX;
            for record in records {
                let pushed = prepare(record, after).and_then(|prepared| {
                    let seq = prepared.seq;
                    Ok((seq, batcher.push(prepared)?))
                });
                match pushed {
                    Ok((seq, closed)) => {
                        after = seq;
                        if let Some(batch) = closed {
                            self.deliver(batch).await?;
                        }
                    }
                    // The records before one that cannot go still go; the pass stops there
                    // and is retried, so the problem stays visible.
                    Err(error) => {
                        if let Some(batch) = batcher.finish() {
                            self.deliver(batch).await?;
                        }
                        return Err(error);
                    }
                }
            }
            if exhausted {
                if let Some(batch) = batcher.finish() {
                    self.deliver(batch).await?;
                }
                self.status.send_if_modified(|status| {
                    let changed = status.consecutive_failures != 0 || status.last_error.is_some();
                    status.consecutive_failures = 0;
                    status.last_error = None;
                    changed
                });
                return Ok(after);
            }
        }
    }

    /// Sends a batch and, once acknowledged, moves the marker to its last record.
    async fn deliver(&self, batch: Batch) -> Result<(), ExportError> {
        let Batch {
            body,
            first_seq,
            last_seq,
            records,
        } = batch;
        let uncompressed_bytes = body.len();
        let compressed = tokio::task::spawn_blocking(move || gzip(&body))
            .await
            .map_err(|error| {
                ExportError::Client(format!(
                    "gzip did not finish: {}",
                    crate::error::join_failure(&error)
                ))
            })?
            .map_err(|error| ExportError::Client(format!("gzip failed: {error}")))?;
        self.send(compressed).await?;
        self.blocking(move |source| source.mark_exported(last_seq))
            .await?;
        tracing::debug!(
            first_seq,
            last_seq,
            records,
            uncompressed_bytes,
            "audit batch exported"
        );
        self.status.send_modify(|status| {
            status.exported_up_to = last_seq;
            status.batches_total += 1;
            status.records_total += records as u64;
        });
        Ok(())
    }

    /// POSTs one gzipped batch with a fresh (or cached) token.
    async fn send(&self, body: Vec<u8>) -> Result<(), ExportError> {
        let authorization = self.config.auth.header().await?;
        let mut request = self
            .client
            .post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_ENCODING, "gzip")
            .header(
                "x-ms-client-request-id",
                uuid::Uuid::new_v4().hyphenated().to_string(),
            )
            .timeout(self.config.request_timeout)
            .body(body);
        if let Some((name, value)) = authorization {
            request = request.header(name, value);
        }
        let request_error = |error: reqwest::Error| {
            if error.is_timeout() {
                ExportError::Timeout {
                    endpoint: self.label.clone(),
                    timeout_ms: u64::try_from(self.config.request_timeout.as_millis())
                        .unwrap_or(u64::MAX),
                }
            } else {
                ExportError::Request {
                    endpoint: self.label.clone(),
                    reason: chain(&error.without_url()),
                }
            }
        };
        let mut response = request.send().await.map_err(request_error)?;
        let status = response.status();
        if status.is_success() {
            // Read the (empty) answer to the end so the connection can be reused.
            while response.chunk().await.map_err(request_error)?.is_some() {}
            return Ok(());
        }
        if matches!(status.as_u16(), 401 | 403) {
            // A refused token (its identity changed, a role was removed) is fetched anew on
            // the next try, not sent again until it would have expired.
            self.config.auth.rejected();
        }
        let retry_after = retry_after(status, response.headers());
        let header_code = response
            .headers()
            .get("x-ms-error-code")
            .and_then(|value| value.to_str().ok())
            .map(|code| cut(code, ERROR_MESSAGE_CHARS_MAX));
        let mut body = Vec::new();
        while body.len() < ERROR_BODY_BYTES_MAX {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                // The status says what matters; a body cut short is not worse.
                Ok(None) | Err(_) => break,
            }
        }
        let (body_code, message) = error_body(&body);
        Err(ExportError::Status {
            endpoint: self.label.clone(),
            status: status.as_u16(),
            code: header_code.or(body_code),
            message,
            retry_after,
        })
    }

    /// Runs a source call on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn ExportSource) -> Result<T, ExportError> + Send + 'static,
    ) -> Result<T, ExportError> {
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || call(source.as_ref()))
            .await
            .map_err(|error| {
                ExportError::Source(format!(
                    "source call did not finish: {}",
                    crate::error::join_failure(&error)
                ))
            })?
    }
}

/// Returns once `shutdown` is true or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sets `*slot` to `value`; whether it changed.
fn replace(slot: &mut u64, value: u64) -> bool {
    let changed = *slot != value;
    *slot = value;
    changed
}

/// The client batches go out on: no redirects, trust roots from the system bundle plus
/// `ca_file`, no proxy for loopback endpoints.
fn build_client(config: &ExportConfig, url: &Url) -> Result<reqwest::Client, ExportError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.request_timeout)
        .user_agent(concat!("isthmus/", env!("CARGO_PKG_VERSION")));
    if url.scheme() == "https" {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in &config.ca_certificates {
            roots.add(certificate.clone()).map_err(|error| {
                ExportError::Client(format!("ca_file holds an unusable CA: {error}"))
            })?;
        }
        if let Ok(bundle) = std::fs::read(SYSTEM_CA_BUNDLE) {
            let certificates = CertificateDer::pem_slice_iter(&bundle).filter_map(Result::ok);
            roots.add_parsable_certificates(certificates);
        }
        if roots.is_empty() {
            return Err(ExportError::Client(format!(
                "no trust roots: {SYSTEM_CA_BUNDLE} is missing; set ca_file"
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| ExportError::Client(error.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        builder = builder.use_preconfigured_tls(tls);
    }
    if is_loopback(url) {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .map_err(|error| ExportError::Client(chain(&error)))
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// The code and message of an Azure error body (`{"error":{"code","message"}}`), cut short.
fn error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(document) = serde_json::from_slice::<Value>(body) else {
        return (None, None);
    };
    let field = |name: &str| {
        document
            .get("error")?
            .get(name)?
            .as_str()
            .map(|text| cut(text, ERROR_MESSAGE_CHARS_MAX))
    };
    (field("code"), field("message"))
}

fn cut(text: &str, chars_max: usize) -> String {
    text.chars().take(chars_max).collect()
}

/// An error with its causes, which is where reqwest says what went wrong.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
