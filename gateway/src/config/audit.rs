//! `[audit]`: where the tamper-evident audit log keeps its files, how often it checkpoints,
//! what it retains, whether the gateway fails closed without it, whose prompt and completion
//! text it records (`[audit.content]`), the Azure export and the syslog copy.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};
use crate::audit::content::{self, ContentPolicy};
use crate::audit::syslog::{self, Format, SyslogConfig, Transport};

/// The validated `[audit]` section.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub enabled: bool,
    /// `audit-YYYYMMDD.jsonl` files; `<state_dir>/audit` when absent.
    pub directory: Option<PathBuf>,
    pub checkpoint_every_records: u64,
    pub checkpoint_every_ms: u64,
    pub retention_bytes_max: u64,
    pub retention_days: u32,
    /// Also write every record to standard output (containers: ContainerLogV2).
    pub stdout: bool,
    /// Refuse requests (503) while records cannot be made durable.
    pub fail_closed: bool,
    /// The Logs Ingestion export, when configured.
    pub azure: Option<crate::export::ExportConfig>,
    /// Whose prompt and completion text records carry; none when absent.
    pub content: Option<ContentPolicy>,
    /// The syslog copy, when configured.
    pub syslog: Option<SyslogConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    #[serde(default = "default_true")]
    enabled: bool,
    #[serde(default)]
    directory: Option<PathBuf>,
    #[serde(default = "default_checkpoint_every_records")]
    checkpoint_every_records: u64,
    #[serde(default = "default_checkpoint_every_ms")]
    checkpoint_every_ms: u64,
    #[serde(default = "default_retention_bytes_max")]
    retention_bytes_max: u64,
    #[serde(default = "default_retention_days")]
    retention_days: u32,
    #[serde(default)]
    stdout: bool,
    #[serde(default = "default_true")]
    fail_closed: bool,
    #[serde(default)]
    azure: Option<crate::export::RawExport>,
    #[serde(default)]
    content: Option<RawContent>,
    #[serde(default)]
    syslog: Option<RawSyslog>,
}

/// `[audit.content]`: record the text of requests whose route or rule is listed.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawContent {
    /// `local`, `cloud`, `rejected`.
    #[serde(default)]
    routes: Vec<String>,
    /// Policy rule names (`Properties.Rule`).
    #[serde(default)]
    rules: Vec<String>,
    #[serde(default)]
    text_bytes_max: Option<u64>,
}

/// `[audit.syslog]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSyslog {
    address: String,
    #[serde(default)]
    transport: Option<String>,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    facility: Option<String>,
    #[serde(default)]
    app_name: Option<String>,
    #[serde(default)]
    queue_records_max: Option<u64>,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            enabled: true,
            directory: None,
            checkpoint_every_records: default_checkpoint_every_records(),
            checkpoint_every_ms: default_checkpoint_every_ms(),
            retention_bytes_max: default_retention_bytes_max(),
            retention_days: default_retention_days(),
            stdout: false,
            fail_closed: true,
            azure: None,
            content: None,
            syslog: None,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_checkpoint_every_records() -> u64 {
    1_000
}
fn default_checkpoint_every_ms() -> u64 {
    60_000
}
fn default_retention_bytes_max() -> u64 {
    1 << 30
}
fn default_retention_days() -> u32 {
    30
}

impl Validator<'_> {
    pub(super) fn audit(&mut self, raw: RawAudit) -> Option<AuditSettings> {
        self.positive(
            "audit.checkpoint_every_records",
            raw.checkpoint_every_records,
        );
        if raw.checkpoint_every_records > crate::audit::CHECKPOINT_EVERY_RECORDS_MAX {
            self.error(
                "audit.checkpoint_every_records",
                format!(
                    "must be at most {} (`audit verify` refuses longer runs without a checkpoint)",
                    crate::audit::CHECKPOINT_EVERY_RECORDS_MAX
                ),
            );
        }
        self.positive("audit.checkpoint_every_ms", raw.checkpoint_every_ms);
        self.positive("audit.retention_bytes_max", raw.retention_bytes_max);
        if raw.retention_days < 2 {
            self.error(
                "audit.retention_days",
                "must be at least 2 (records are kept two days at least)",
            );
        }
        let azure = match raw.azure {
            None => Some(None),
            Some(mut azure) => {
                azure.resolve_paths(self.base_dir);
                let environment = self.environment;
                match crate::export::compile(azure, "audit.azure", &|name| environment.var(name)) {
                    Ok(config) => Some(Some(config)),
                    Err(errors) => {
                        for error in errors {
                            let (path, message) = error.split_once(": ").map_or(
                                ("audit.azure".to_owned(), error.clone()),
                                |(path, message)| (path.to_owned(), message.to_owned()),
                            );
                            self.errors.push(ConfigError::new(path, message));
                        }
                        None
                    }
                }
            }
        };
        let content = raw.content.map(|raw| self.audit_content(raw));
        let syslog = raw.syslog.map(|raw| self.audit_syslog(raw));
        Some(AuditSettings {
            enabled: raw.enabled,
            directory: raw.directory.map(|directory| self.resolve(&directory)),
            checkpoint_every_records: raw.checkpoint_every_records,
            checkpoint_every_ms: raw.checkpoint_every_ms,
            retention_bytes_max: raw.retention_bytes_max,
            retention_days: raw.retention_days,
            stdout: raw.stdout,
            fail_closed: raw.fail_closed,
            azure: azure?,
            content: content.flatten(),
            syslog: syslog.flatten(),
        })
    }

    fn audit_content(&mut self, raw: RawContent) -> Option<ContentPolicy> {
        let mut valid = true;
        for (index, route) in raw.routes.iter().enumerate() {
            if !content::ROUTES.contains(&route.as_str()) {
                self.error(
                    format!("audit.content.routes[{index}]"),
                    format!("unknown route `{route}` (expected local, cloud or rejected)"),
                );
                valid = false;
            }
        }
        for (index, rule) in raw.rules.iter().enumerate() {
            if rule.trim().is_empty() {
                self.error(
                    format!("audit.content.rules[{index}]"),
                    "must be a policy rule name",
                );
                valid = false;
            }
        }
        let limit = content::TEXT_BYTES_MAX_LIMIT as u64;
        let text_bytes_max = raw
            .text_bytes_max
            .unwrap_or(content::TEXT_BYTES_MAX_DEFAULT as u64);
        if !(1..=limit).contains(&text_bytes_max) {
            self.error(
                "audit.content.text_bytes_max",
                format!(
                    "must be between 1 and {limit} (two texts must fit a record): {text_bytes_max}"
                ),
            );
            valid = false;
        }
        valid.then_some(ContentPolicy {
            routes: raw.routes,
            rules: raw.rules,
            text_bytes_max: text_bytes_max as usize,
        })
    }

    fn audit_syslog(&mut self, raw: RawSyslog) -> Option<SyslogConfig> {
        let address = self.address("audit.syslog.address", &raw.address);
        let transport = match raw.transport.as_deref().unwrap_or("udp") {
            "udp" => Some(Transport::Udp),
            "tcp" => Some(Transport::Tcp),
            other => {
                self.error(
                    "audit.syslog.transport",
                    format!("unknown transport `{other}` (expected udp or tcp)"),
                );
                None
            }
        };
        let format = match raw.format.as_deref().unwrap_or("rfc5424") {
            "rfc5424" => Some(Format::Rfc5424),
            "cef" => Some(Format::Cef),
            other => {
                self.error(
                    "audit.syslog.format",
                    format!("unknown format `{other}` (expected rfc5424 or cef)"),
                );
                None
            }
        };
        let facility_name = raw.facility.as_deref().unwrap_or("local0");
        let facility = syslog::facility_code(facility_name);
        if facility.is_none() {
            self.error(
                "audit.syslog.facility",
                format!(
                    "unknown facility `{facility_name}` (expected one of {})",
                    syslog::FACILITIES
                        .iter()
                        .map(|(name, _)| *name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
        let app_name = raw
            .app_name
            .unwrap_or_else(|| syslog::APP_NAME_DEFAULT.to_owned());
        if !syslog::is_app_name(&app_name) {
            self.error(
                "audit.syslog.app_name",
                format!(
                    "must be 1 to {} printable ASCII characters without spaces: {app_name:?}",
                    syslog::APP_NAME_CHARS_MAX
                ),
            );
        }
        let limit = syslog::QUEUE_RECORDS_MAX_LIMIT as u64;
        let queue_records_max = raw
            .queue_records_max
            .unwrap_or(syslog::QUEUE_RECORDS_MAX_DEFAULT as u64);
        if !(1..=limit).contains(&queue_records_max) {
            self.error(
                "audit.syslog.queue_records_max",
                format!("must be between 1 and {limit}: {queue_records_max}"),
            );
        }
        Some(SyslogConfig {
            address: address?,
            transport: transport?,
            format: format?,
            facility: facility?,
            app_name: syslog::is_app_name(&app_name).then_some(app_name)?,
            queue_records_max: usize::try_from(queue_records_max)
                .ok()
                .filter(|records| (1..=syslog::QUEUE_RECORDS_MAX_LIMIT).contains(records))?,
        })
    }
}
