//! Edits of the configuration file made through the admin API (the console's canary
//! controls): the file stays the one source of truth, so an edit rewrites it in place, keeping
//! its comments, order and layout, and is validated as a whole before anything is written.

use std::path::Path;

use super::{Config, Environment};

/// The largest weight the admin API sets (Gateway API's HTTPRoute allows the same).
pub const WEIGHT_MAX: u32 = 1_000_000;

/// Why an edit was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("pool `{pool}` has no backend `{backend}`")]
    UnknownBackend { pool: String, backend: String },
    #[error("weight {0} is out of range (0 to {WEIGHT_MAX})")]
    WeightOutOfRange(u64),
    /// The file as it stands, or as edited, does not validate; every error, with its key path.
    #[error("the configuration would be invalid: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The file cannot be read or written (a read-only mount such as a ConfigMap).
    #[error("{0}")]
    Unwritable(String),
    /// The file changed since the editor read it.
    #[error("{0}")]
    Conflict(String),
}

/// Returns `text` with the weight of backend `backend` of pool `pool` set to `weight`, and the
/// configuration it validates to. Backends are found by the names the gateway gives them
/// (`name`, or `host:port` of the URL when unnamed), in both TOML spellings of the list
/// (`[[upstreams.NAME.backends]]` tables and an inline array).
pub fn set_backend_weight(
    text: &str,
    source: &Path,
    environment: &dyn Environment,
    pool: &str,
    backend: &str,
    weight: u32,
) -> Result<(String, Config), EditError> {
    if weight > WEIGHT_MAX {
        return Err(EditError::WeightOutOfRange(u64::from(weight)));
    }
    let unknown = || EditError::UnknownBackend {
        pool: pool.to_owned(),
        backend: backend.to_owned(),
    };
    let current = super::parse(text, source, environment).map_err(invalid)?;
    let index = current
        .upstreams
        .iter()
        .find(|candidate| candidate.name == pool)
        .and_then(|candidate| {
            candidate
                .backends
                .iter()
                .position(|entry| entry.name == backend)
        })
        .ok_or_else(unknown)?;
    let mut document: toml_edit::DocumentMut = text
        .parse()
        .map_err(|error: toml_edit::TomlError| EditError::Invalid(vec![error.to_string()]))?;
    let backends = document
        .get_mut("upstreams")
        .and_then(|upstreams| upstreams.get_mut(pool))
        .and_then(|entry| entry.get_mut("backends"))
        .ok_or_else(unknown)?;
    let new_weight = i64::from(weight);
    match backends {
        toml_edit::Item::ArrayOfTables(tables) => {
            let table = tables.get_mut(index).ok_or_else(unknown)?;
            match table
                .get_mut("weight")
                .and_then(toml_edit::Item::as_value_mut)
            {
                Some(value) => replace_keeping_decor(value, new_weight),
                None => {
                    table.insert("weight", toml_edit::value(new_weight));
                }
            }
        }
        toml_edit::Item::Value(toml_edit::Value::Array(array)) => {
            let entry = array
                .get_mut(index)
                .and_then(toml_edit::Value::as_inline_table_mut)
                .ok_or_else(unknown)?;
            match entry.get_mut("weight") {
                Some(value) => replace_keeping_decor(value, new_weight),
                None => {
                    entry.insert("weight", toml_edit::Value::from(new_weight));
                }
            }
        }
        _ => return Err(unknown()),
    }
    let edited = document.to_string();
    let config = super::parse(&edited, source, environment).map_err(invalid)?;
    Ok((edited, config))
}

/// SHA-256 of a configuration text, in hex: names the version an editor read, so a save
/// over someone else's change is refused.
pub fn text_sha256(text: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

fn replace_keeping_decor(value: &mut toml_edit::Value, weight: i64) {
    let decor = value.decor().clone();
    *value = toml_edit::Value::from(weight);
    *value.decor_mut() = decor;
}

fn invalid(errors: Vec<super::ConfigError>) -> EditError {
    EditError::Invalid(errors.iter().map(ToString::to_string).collect())
}

#[cfg(test)]
mod tests;
