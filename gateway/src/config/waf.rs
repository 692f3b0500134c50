//! `[waf]`: the web application firewall's mode, anomaly threshold, disabled rules and the
//! callers it reports but never blocks (`router_policies::waf`). Absent, the firewall blocks at the default threshold with every
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
    #[serde(default)]
    exempt_callers: Vec<String>,
}

impl Default for RawWaf {
    fn default() -> Self {
        RawWaf {
            mode: default_mode(),
            inbound_threshold: default_threshold(),
            disabled_rules: Vec::new(),
            exempt_callers: Vec::new(),
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
    /// `api_key_ids`: the configured keys, which `exempt_callers` must name (`None` when
    /// `[auth]` did not validate: its own errors say why).
    pub(super) fn waf(&mut self, raw: RawWaf, api_key_ids: Option<&[&str]>) -> Option<Arc<Waf>> {
        let mut valid = true;
        for (index, caller) in raw.exempt_callers.iter().enumerate() {
            if api_key_ids.is_some_and(|ids| !ids.contains(&caller.as_str())) {
                self.errors.push(ConfigError::new(
                    format!("waf.exempt_callers[{index}]"),
                    format!("`{caller}` is not the id of an [auth] API key"),
                ));
                valid = false;
            }
        }
        let Some(mode) = WafMode::parse(&raw.mode) else {
            self.errors.push(ConfigError::new(
                "waf.mode",
                format!("`{}` is not one of off, detect, block", raw.mode),
            ));
            return None;
        };
        match Waf::new(mode, raw.inbound_threshold, &raw.disabled_rules) {
            Ok(waf) if valid => Some(Arc::new(waf.with_exempt_callers(&raw.exempt_callers))),
            Ok(_) => None,
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
