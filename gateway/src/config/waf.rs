//! `[waf]`: the web application firewall's mode, anomaly threshold and disabled rules
//! (`router_policies::waf`). Absent, the firewall blocks at the default threshold with every
//! rule on.

use serde::Deserialize;
use std::sync::Arc;

use router_policies::waf::{INBOUND_THRESHOLD_DEFAULT, Waf, WafError, WafMode};

use super::{ConfigError, Validator};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWaf {
    #[serde(default = "default_mode")]
    mode: String,
    #[serde(default = "default_threshold")]
    inbound_threshold: u32,
    #[serde(default)]
    disabled_rules: Vec<u32>,
}

impl Default for RawWaf {
    fn default() -> Self {
        RawWaf {
            mode: default_mode(),
            inbound_threshold: default_threshold(),
            disabled_rules: Vec::new(),
        }
    }
}

fn default_mode() -> String {
    "block".to_owned()
}

fn default_threshold() -> u32 {
    INBOUND_THRESHOLD_DEFAULT
}

impl Validator<'_> {
    /// The compiled firewall, or `None` with every problem recorded.
    pub(super) fn waf(&mut self, raw: RawWaf) -> Option<Arc<Waf>> {
        let Some(mode) = WafMode::parse(&raw.mode) else {
            self.errors.push(ConfigError::new(
                "waf.mode",
                format!("`{}` is not one of off, detect, block", raw.mode),
            ));
            return None;
        };
        match Waf::new(mode, raw.inbound_threshold, &raw.disabled_rules) {
            Ok(waf) => Some(Arc::new(waf)),
            Err(errors) => {
                for error in errors {
                    let path = match error {
                        WafError::UnknownRule(_) => "waf.disabled_rules",
                        WafError::Threshold => "waf.inbound_threshold",
                    };
                    self.errors.push(ConfigError::new(path, error.to_string()));
                }
                None
            }
        }
    }
}
