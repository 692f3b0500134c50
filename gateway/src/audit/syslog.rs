//! The syslog copy of the audit log, for a local collector (a SIEM forwarder, rsyslog,
//! syslog-ng, the Azure Monitor Agent's CEF listener).
//!
//! Every record goes out once it is durable: the writer hands each committed batch's lines
//! to a bounded queue without waiting ([`SyslogSink::offer`]) and one sender thread formats
//! and sends them, so a slow or absent collector never holds up a request. Delivery is best
//! effort, at most once: a line that finds the queue full is dropped and counted, and so is
//! one UDP could not send. Over TCP the sender reconnects with back-off and sends the line it
//! was holding again (whole: a message cut by a broken connection is resent in full on the
//! next one); meanwhile the queue absorbs what it can. The store and the files stay the
//! durable copy; the counters ([`SyslogStatus`]) are in `GET /admin/api/audit`.
//!
//! Messages are RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, with the
//! record's `TimeGenerated`, `GatewayInstance` and `Category` (as MSGID), no structured data,
//! and as MSG either the JSON record itself (`rfc5424`; byte for byte the hashed line unless
//! content had to be removed) or one CEF event (`cef`). UDP sends one message per datagram
//! (RFC 5426); TCP frames them by octet counting, `LEN SP MSG` (RFC 6587 3.4.1). Content text
//! of records whose route is not `cloud` is removed first ([`super::content`]).

#[cfg(test)]
mod tests;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use serde_json::{Map, Value};

use super::content;
use super::record;

/// `queue_records_max` when not configured.
pub const QUEUE_RECORDS_MAX_DEFAULT: usize = 10_000;
/// The largest `queue_records_max`.
pub const QUEUE_RECORDS_MAX_LIMIT: usize = 1_000_000;
/// `app_name` when not configured.
pub const APP_NAME_DEFAULT: &str = "isthmus";
/// RFC 5424 caps APP-NAME at 48 printable ASCII characters.
pub const APP_NAME_CHARS_MAX: usize = 48;
/// RFC 5424 caps HOSTNAME at 255 and MSGID at 32.
const HOSTNAME_CHARS_MAX: usize = 255;
const MSGID_CHARS_MAX: usize = 32;
/// Connecting to a TCP collector gives up after this long.
const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// A write to a TCP collector that blocks this long counts as a broken connection.
const WRITE_TIMEOUT_MS: u64 = 5_000;
/// First wait before reconnecting; it doubles up to the maximum.
const RECONNECT_BACKOFF_INITIAL_MS: u64 = 100;
const RECONNECT_BACKOFF_MAX_MS: u64 = 5_000;
/// CEF's vendor and product.
const CEF_VENDOR: &str = "Isthmus";
const CEF_PRODUCT: &str = "Isthmus";

/// How messages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// One message per datagram (RFC 5426).
    Udp,
    /// Octet-counted messages on one connection (RFC 6587).
    Tcp,
}

/// What MSG holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The JSON record.
    Rfc5424,
    /// A CEF event.
    Cef,
}

/// `[audit.syslog]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    pub address: SocketAddr,
    pub transport: Transport,
    pub format: Format,
    /// 0..=23 (`local0` is 16).
    pub facility: u8,
    pub app_name: String,
    pub queue_records_max: usize,
}

/// Facility names and codes (RFC 5424 6.2.1).
pub const FACILITIES: [(&str, u8); 24] = [
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("ntp", 12),
    ("audit", 13),
    ("alert", 14),
    ("clock", 15),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

/// The code of a facility name.
pub fn facility_code(name: &str) -> Option<u8> {
    FACILITIES
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, code)| *code)
}

/// Whether `name` is a valid APP-NAME: 1 to 48 printable ASCII characters, no space.
pub fn is_app_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= APP_NAME_CHARS_MAX
        && name.bytes().all(|byte| (33..=126).contains(&byte))
}

/// What the sink has done since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyslogStatus {
    /// Messages handed to the socket.
    pub sent_total: u64,
    /// Records not sent: the queue was full, the record could not be read, or UDP failed.
    pub dropped_total: u64,
    /// Times a TCP connection failed or broke.
    pub connection_failures_total: u64,
    /// Whether a TCP connection is open (always true for UDP once the socket is bound).
    pub connected: bool,
}

#[derive(Debug, Default)]
struct Counters {
    sent: AtomicU64,
    dropped: AtomicU64,
    connection_failures: AtomicU64,
    connected: AtomicBool,
}

/// The writer's end: a bounded queue to the sender thread.
#[derive(Debug)]
pub struct SyslogSink {
    sender: SyncSender<Vec<u8>>,
    counters: Arc<Counters>,
}

/// Reads a [`SyslogSink`]'s counters from anywhere.
#[derive(Debug, Clone)]
pub struct SyslogMonitor {
    counters: Arc<Counters>,
}

impl SyslogMonitor {
    pub fn status(&self) -> SyslogStatus {
        let counters = &self.counters;
        SyslogStatus {
            sent_total: counters.sent.load(Ordering::Relaxed),
            dropped_total: counters.dropped.load(Ordering::Relaxed),
            connection_failures_total: counters.connection_failures.load(Ordering::Relaxed),
            connected: counters.connected.load(Ordering::Relaxed),
        }
    }
}

impl SyslogSink {
    /// Starts the sender thread. A UDP socket is bound here, so a bad address fails start-up;
    /// a TCP collector that is not listening yet is retried in the background.
    pub fn start(config: SyslogConfig) -> std::io::Result<SyslogSink> {
        let counters = Arc::new(Counters::default());
        let (sender, receiver) = mpsc::sync_channel(config.queue_records_max.max(1));
        let connection = match config.transport {
            Transport::Udp => {
                let local: SocketAddr = if config.address.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0_u16; 8], 0).into()
                };
                let socket = UdpSocket::bind(local)?;
                counters.connected.store(true, Ordering::Relaxed);
                Connection::Udp(socket)
            }
            Transport::Tcp => Connection::Tcp(None),
        };
        let sender_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("isthmus-syslog".into())
            .spawn(move || {
                Sender {
                    settings: MessageSettings {
                        format: config.format,
                        facility: config.facility,
                        app_name: config.app_name.clone(),
                        process_id: std::process::id(),
                    },
                    address: config.address,
                    connection,
                    counters: sender_counters,
                }
                .run(receiver);
            })?;
        Ok(SyslogSink { sender, counters })
    }

    /// Queues committed records' lines without waiting; what does not fit is dropped and
    /// counted.
    pub fn offer<'a>(&self, lines: impl IntoIterator<Item = &'a [u8]>) {
        for line in lines {
            match self.sender.try_send(line.to_vec()) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    pub fn monitor(&self) -> SyslogMonitor {
        SyslogMonitor {
            counters: Arc::clone(&self.counters),
        }
    }
}

/// What every message's header and body depend on besides the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSettings {
    pub format: Format,
    pub facility: u8,
    pub app_name: String,
    pub process_id: u32,
}

enum Connection {
    Udp(UdpSocket),
    Tcp(Option<TcpStream>),
}

/// The sender thread's state.
struct Sender {
    settings: MessageSettings,
    address: SocketAddr,
    connection: Connection,
    counters: Arc<Counters>,
}

impl Sender {
    fn run(mut self, receiver: Receiver<Vec<u8>>) {
        let mut backoff_ms = RECONNECT_BACKOFF_INITIAL_MS;
        let mut warned = false;
        while let Ok(line) = receiver.recv() {
            let Some(message) = message(&line, &self.settings) else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            loop {
                match self.send(&message) {
                    Ok(()) => {
                        self.counters.sent.fetch_add(1, Ordering::Relaxed);
                        if warned {
                            tracing::info!(address = %self.address, "syslog collector reachable again");
                            warned = false;
                        }
                        backoff_ms = RECONNECT_BACKOFF_INITIAL_MS;
                        break;
                    }
                    Err(error) => {
                        if !warned {
                            tracing::warn!(address = %self.address, %error, "sending audit records to syslog failed");
                            warned = true;
                        }
                        if let Connection::Udp(_) = self.connection {
                            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        self.counters
                            .connection_failures
                            .fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(backoff_ms));
                        backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MAX_MS);
                    }
                }
            }
        }
    }

    /// Sends one message, connecting first when TCP has no connection; a TCP failure drops
    /// the connection.
    fn send(&mut self, message: &[u8]) -> std::io::Result<()> {
        match &mut self.connection {
            Connection::Udp(socket) => socket.send_to(message, self.address).map(|_| ()),
            Connection::Tcp(stream) => {
                let result = match stream {
                    Some(stream) => stream.write_all(&frame(message)),
                    None => connect(self.address).and_then(|mut connected| {
                        connected.write_all(&frame(message))?;
                        *stream = Some(connected);
                        Ok(())
                    }),
                };
                if result.is_err() {
                    *stream = None;
                }
                self.counters
                    .connected
                    .store(stream.is_some(), Ordering::Relaxed);
                result
            }
        }
    }
}

fn connect(address: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, Duration::from_millis(CONNECT_TIMEOUT_MS))?;
    stream.set_write_timeout(Some(Duration::from_millis(WRITE_TIMEOUT_MS)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// RFC 6587 octet counting: `LEN SP MSG`.
pub fn frame(message: &[u8]) -> Vec<u8> {
    let mut framed = format!("{} ", message.len()).into_bytes();
    framed.extend_from_slice(message);
    framed
}

/// The syslog message of a stored record's JSON `line`, content removed where it must not
/// leave; `None` when the line is not a JSON object.
pub fn message(line: &[u8], settings: &MessageSettings) -> Option<Vec<u8>> {
    let mut record: Map<String, Value> = serde_json::from_slice(line).ok()?;
    let stripped = content::strip_off_appliance(&mut record);
    let mut message = header(&record, settings).into_bytes();
    match settings.format {
        Format::Rfc5424 if stripped => {
            message.extend_from_slice(&serde_json::to_vec(&record).ok()?)
        }
        Format::Rfc5424 => message.extend_from_slice(line),
        Format::Cef => message.extend_from_slice(cef(&record).as_bytes()),
    }
    Some(message)
}

/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - ` (structured data nil, then MSG).
pub fn header(record: &Map<String, Value>, settings: &MessageSettings) -> String {
    let text = |name: &str| record.get(name).and_then(Value::as_str).unwrap_or("");
    let severity = match text("Level") {
        "Error" => 3,
        "Warning" => 4,
        "Informational" => 6,
        _ => 5,
    };
    let priority = u32::from(settings.facility) * 8 + severity;
    let timestamp = text(record::TIME_GENERATED);
    let timestamp =
        if record::parse_day(timestamp).is_some() && header_token(timestamp, 64) == timestamp {
            timestamp
        } else {
            "-"
        };
    format!(
        "<{priority}>1 {timestamp} {} {} {} {} - ",
        header_token(text("GatewayInstance"), HOSTNAME_CHARS_MAX),
        header_token(&settings.app_name, APP_NAME_CHARS_MAX),
        settings.process_id,
        header_token(text(record::CATEGORY), MSGID_CHARS_MAX),
    )
}

/// A header field: printable ASCII without spaces, cut to `chars_max`; `-` when empty.
fn header_token(text: &str, chars_max: usize) -> String {
    let token: String = text
        .chars()
        .filter(|character| ('!'..='~').contains(character))
        .take(chars_max)
        .collect();
    if token.is_empty() {
        "-".to_owned()
    } else {
        token
    }
}

/// A CEF event: `CEF:0|Isthmus|Isthmus|VERSION|OperationName|Category ResultType|SEVERITY|`
/// and the extension.
pub fn cef(record: &Map<String, Value>) -> String {
    let text = |name: &str| record.get(name).and_then(Value::as_str).unwrap_or("");
    let properties = record.get(record::PROPERTIES).and_then(Value::as_object);
    let property = |name: &str| {
        properties
            .and_then(|properties| properties.get(name))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    let severity = match text("Level") {
        "Error" => 8,
        "Warning" => 6,
        "Informational" => 3,
        _ => 5,
    };
    let name = format!("{} {}", text(record::CATEGORY), text("ResultType"));
    let mut event = format!(
        "CEF:0|{}|{}|{}|{}|{}|{severity}|",
        escape_header(CEF_VENDOR),
        escape_header(CEF_PRODUCT),
        escape_header(env!("CARGO_PKG_VERSION")),
        escape_header(text(record::OPERATION_NAME)),
        escape_header(name.trim()),
    );
    let mut extension: Vec<(&str, String)> = Vec::new();
    if let Some(millis) = epoch_millis(text(record::TIME_GENERATED)) {
        extension.push(("rt", millis.to_string()));
    }
    let identity = record.get("Identity").and_then(Value::as_object);
    let caller = identity
        .and_then(|identity| identity.get("KeyId").or_else(|| identity.get("Subject")))
        .and_then(Value::as_str)
        .unwrap_or("");
    let number = |value: Option<&Value>| value.and_then(Value::as_u64).map(|n| n.to_string());
    let pairs: [(&str, &str, Option<String>); 17] = [
        ("cat", "", Some(text(record::CATEGORY).to_owned())),
        ("outcome", "", Some(text("ResultType").to_owned())),
        ("reason", "", Some(text("ResultDescription").to_owned())),
        ("src", "", Some(text("CallerIpAddress").to_owned())),
        ("suser", "", Some(caller.to_owned())),
        ("dvchost", "", Some(text("GatewayInstance").to_owned())),
        ("externalId", "", Some(text("RequestId").to_owned())),
        ("requestMethod", "", Some(property("Method").to_owned())),
        ("request", "", Some(property("Path").to_owned())),
        ("act", "", Some(property("Route").to_owned())),
        ("cs1", "Rule", Some(property("Rule").to_owned())),
        ("cs2", "Target", Some(property("Target").to_owned())),
        ("cs3", "StreamId", Some(text(record::STREAM_ID).to_owned())),
        (
            "cs4",
            "RecordHash",
            Some(text(record::RECORD_HASH).to_owned()),
        ),
        ("cn1", "Seq", number(record.get(record::SEQ))),
        ("cn2", "Epoch", number(record.get(record::EPOCH))),
        ("cn3", "DurationMs", number(record.get("DurationMs"))),
    ];
    let mut labels: Vec<(String, String)> = Vec::new();
    for (key, label, value) in pairs {
        let Some(value) = value.filter(|value| !value.is_empty()) else {
            continue;
        };
        if !label.is_empty() {
            labels.push((format!("{key}Label"), label.to_owned()));
        }
        extension.push((key, value));
    }
    if let Some(properties) = properties {
        labels.push(("cs6Label".to_owned(), "Properties".to_owned()));
        extension.push(("cs6", Value::Object(properties.clone()).to_string()));
    }
    let mut first = true;
    for (key, value) in extension
        .iter()
        .map(|(key, value)| (*key, value.as_str()))
        .chain(
            labels
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
    {
        if !first {
            event.push(' ');
        }
        first = false;
        event.push_str(key);
        event.push('=');
        event.push_str(&escape_extension(value));
    }
    event
}

/// A CEF header field: `\` and `|` escaped with a backslash; line breaks (not allowed in the
/// header) become spaces.
pub fn escape_header(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '|' => escaped.push_str("\\|"),
            '\r' | '\n' => escaped.push(' '),
            other => escaped.push(other),
        }
    }
    escaped
}

/// A CEF extension value: `\` and `=` escaped with a backslash, line breaks as `\n` and `\r`.
pub fn escape_extension(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '\\' => escaped.push_str("\\\\"),
            '=' => escaped.push_str("\\="),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Milliseconds since 1970 of a `TimeGenerated` value (`YYYY-MM-DDTHH:MM:SS[.mmm]Z`).
fn epoch_millis(text: &str) -> Option<u64> {
    let days = record::parse_day(text)?;
    let time = text.get(11..19)?;
    let mut parts = time.split(':').map(|part| part.parse::<u64>().ok());
    let (hours, minutes, seconds) = (parts.next()??, parts.next()??, parts.next()??);
    let millis = text
        .get(20..23)
        .filter(|_| text.as_bytes().get(19) == Some(&b'.'))
        .and_then(|digits| digits.parse::<u64>().ok())
        .unwrap_or(0);
    Some(((days * 86_400 + hours * 3600 + minutes * 60 + seconds) * 1000) + millis)
}
