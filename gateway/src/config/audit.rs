//! `[audit]`: where the tamper-evident audit log keeps its files, how often it checkpoints,
//! what it retains, whether the gateway fails closed without it, and the Azure export.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Validator};

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
        })
    }
}
