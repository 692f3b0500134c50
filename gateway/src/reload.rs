//! Configuration reload (SIGHUP, `POST /admin/api/reload`, and a change of the file's text
//! when `server.config_watch_interval_ms` is set): read and validate the file again, compile
//! its policy, build its pools, and put them in force at once. An invalid
//! file changes nothing and reports all its errors. Requests in flight keep the routing they
//! started with; backends that stay (same pool, name and URL) keep their observed health and
//! connections are not dropped. Listeners, limits, models, the engine, the audit log, the
//! response store, logging and telemetry are set up once per process: changes there are reported as needing
//! a restart and are not applied.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::cloud::Pools;
use crate::config::{self, Config, ProcessEnvironment};
use crate::state::{AppState, Routing};

/// What a successful reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    pub reloaded: bool,
    pub pools: Vec<String>,
    /// Sections that changed but only take effect after a restart.
    pub restart_required: Vec<String>,
}

/// The process environment as a reload sees it: its variables, and as the memory available
/// what is free now plus what the loaded models' KV caches take — what a restart with the
/// new file would have for them. The models are start-up sections; checked against the
/// memory free now, with the loaded caches counted against it, every reload of a gateway
/// whose caches took more than half of what was free at start would be refused. A model
/// section changed so that it would not fit is still refused, so that the file written is
/// one the next start accepts.
struct ReloadEnvironment {
    loaded_kv_bytes: u64,
}

impl ReloadEnvironment {
    fn of(state: &AppState) -> Self {
        ReloadEnvironment {
            loaded_kv_bytes: state
                .config
                .models
                .iter()
                .map(|model| model.kv_plan.bytes)
                .sum(),
        }
    }
}

impl config::Environment for ReloadEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        ProcessEnvironment.var(name)
    }

    fn memory_available_bytes(&self) -> Option<u64> {
        ProcessEnvironment
            .memory_available_bytes()
            .map(|available| available.saturating_add(self.loaded_kv_bytes))
    }
}

/// Reloads the configuration from the file the process started with. Blocks (it resolves
/// backend host names), so async callers run it on a blocking thread.
pub fn reload(state: &AppState, trigger: &str) -> Result<ReloadReport, Vec<String>> {
    let _reloading = state
        .reloading
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = state.config.source.clone();
    let outcome = config::load(&source, &ReloadEnvironment::of(state))
        .and_then(|mut config| {
            config
                .override_listen(state.config.listen_overrides)
                .map_err(|error| vec![error])?;
            Ok(config)
        })
        .map_err(|errors| errors.iter().map(ToString::to_string).collect())
        .and_then(|config| apply(state, config));
    state.metrics.record_config_load(true, outcome.is_ok());
    match &outcome {
        Ok(report) => tracing::info!(
            trigger,
            file = %source.display(),
            pools = ?report.pools,
            restart_required = ?report.restart_required,
            "configuration reloaded"
        ),
        Err(errors) => tracing::error!(
            trigger,
            file = %source.display(),
            errors = ?errors,
            "configuration not reloaded; the previous one stays in force"
        ),
    }
    outcome
}

/// Builds everything routing needs from a validated configuration: the compiled policy,
/// the pools (keeping the health of `previous` pools' backends), the recognizers and the
/// complexity model. Blocks (host names resolve).
pub fn build_routing(config: Config, previous: Option<&Pools>) -> Result<Routing, Vec<String>> {
    let policy = crate::policy::compile(&config);
    let pools = Pools::build(&config.upstreams, previous);
    let sensitivity = crate::sensitivity::SensitivityScanner::compile(&config.policy);
    let complexity = crate::sensitivity::ComplexityScorer::load(&config.policy);
    match (policy, pools, sensitivity, complexity) {
        (Ok(policy), Ok(pools), Ok(sensitivity), Ok(complexity)) => Ok(Routing {
            config: std::sync::Arc::new(config),
            policy,
            pools,
            sensitivity: std::sync::Arc::new(sensitivity),
            complexity: std::sync::Arc::new(complexity),
        }),
        (policy, pools, sensitivity, complexity) => Err(policy
            .err()
            .into_iter()
            .chain(pools.err())
            .chain(sensitivity.err())
            .chain(complexity.err())
            .flatten()
            .collect()),
    }
}

fn apply(state: &AppState, config: Config) -> Result<ReloadReport, Vec<String>> {
    let current = state.routing();
    let restart_required = restart_sections(&state.config, &config)
        .into_iter()
        .map(str::to_owned)
        .collect();
    let routing = build_reloaded(state, config, &current.pools)?;
    let config = std::sync::Arc::clone(&routing.config);
    let mut names: Vec<String> = config
        .upstreams
        .iter()
        .map(|pool| pool.name.clone())
        .collect();
    names.sort();
    state.replace_routing(routing);
    Ok(ReloadReport {
        reloaded: true,
        pools: names,
        restart_required,
    })
}

/// `config` with the models loaded at start-up in place of the file's: `[models]` take
/// effect at a restart, and until then the policy routes to the models that are there (a
/// rule or default naming a model still to load is refused, saying so).
fn with_loaded_models(state: &AppState, mut config: Config) -> Config {
    if format!("{:?}", config.models) != format!("{:?}", state.config.models) {
        config.models = state.config.models.clone();
        config.models_awaiting_restart = true;
    }
    config
}

/// `build_routing` of a reloaded configuration, its errors saying when `[models]` waits for
/// a restart.
fn build_reloaded(
    state: &AppState,
    config: Config,
    previous: &Pools,
) -> Result<Routing, Vec<String>> {
    let config = with_loaded_models(state, config);
    let awaiting = config.models_awaiting_restart;
    build_routing(config, Some(previous)).map_err(|mut errors| {
        if awaiting {
            errors.push(
                "models: [models] changed; the policy is checked against the models loaded \
                 at start-up until a restart loads the new ones"
                    .to_owned(),
            );
        }
        errors
    })
}

/// The sections of the configuration in force that differ from those the process started
/// with and wait for a restart.
pub fn restart_required(state: &AppState) -> Vec<&'static str> {
    restart_sections(&state.config, &state.routing().config)
}

/// The sections of `next` that differ from `started` and take effect only after a restart.
fn restart_sections(started: &Config, next: &Config) -> Vec<&'static str> {
    start_up_sections(started)
        .into_iter()
        .zip(start_up_sections(next))
        .filter(|((_, before), (_, after))| before != after)
        .map(|((name, _), _)| name)
        .collect()
}

/// The sections read once at start-up, each as text to compare. Admin tokens take effect
/// with a reload, unless none are left (then the start-up ones stay until a restart).
fn start_up_sections(config: &Config) -> [(&'static str, String); 7] {
    let server = crate::config::ServerConfig {
        admin_tokens: Vec::new(),
        ..config.server.clone()
    };
    [
        (
            "server",
            format!("{server:?} {}", config.server.admin_tokens.is_empty()),
        ),
        (
            "models",
            format!("{:?} {}", config.models, config.models_awaiting_restart),
        ),
        ("engine", format!("{:?}", config.engine)),
        (
            "audit",
            format!(
                "{:?} {:?}",
                config.audit,
                config
                    .audit
                    .azure
                    .as_ref()
                    .map(crate::export::ExportConfig::identity)
            ),
        ),
        ("responses", format!("{:?}", config.responses)),
        ("logging", format!("{:?}", config.logging)),
        ("telemetry", format!("{:?}", config.telemetry)),
    ]
}

/// Resolves the cloud backends' host names every `interval` and, when one no longer gives
/// the address its connections go to, rebuilds the pools of the configuration in force
/// (health, circuits and cached tokens carried over) so that new connections go to where
/// the name points now.
pub async fn follow_backend_addresses(state: Arc<AppState>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let checking = Arc::clone(&state);
        // Resolving blocks.
        let outcome = tokio::task::spawn_blocking(move || {
            let seen = checking.routing();
            if !seen.pools.moved() {
                return Ok(false);
            }
            let _reloading = checking
                .reloading
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let current = checking.routing();
            if !Arc::ptr_eq(&seen, &current) {
                // A reload came first, and resolved every name afresh.
                return Ok(false);
            }
            // Only the pools: the policy, scanners and weights in force stay as they are (a
            // weights file edited since takes effect with a reload, under its own digest).
            let routing = Routing {
                config: Arc::clone(&current.config),
                policy: current.policy.clone(),
                pools: Pools::build(&current.config.upstreams, Some(&current.pools))?,
                sensitivity: Arc::clone(&current.sensitivity),
                complexity: Arc::clone(&current.complexity),
            };
            checking.replace_routing(routing);
            Ok::<_, Vec<String>>(true)
        })
        .await;
        match outcome {
            Ok(Ok(true)) => tracing::info!("a backend's host name moved: pools rebuilt"),
            Ok(Ok(false)) => {}
            Ok(Err(errors)) => {
                tracing::warn!(errors = ?errors, "rebuilding the pools for moved backends failed; the pools in force stay")
            }
            Err(error) => tracing::error!(
                error = crate::error::join_failure(&error),
                "checking the backends' addresses did not finish"
            ),
        }
    }
}

/// Reads the configuration file every `interval` and reloads it when its text differs from
/// the text in force, or when an API key's `key_file` holds another key: how an edited file,
/// a Kubernetes ConfigMap the kubelet updated in place, or a rotated key Secret takes effect
/// without a signal. A change is put in force once the same state has been read on two
/// ticks in a row. A state that was refused is not tried again until it changes (SIGHUP and
/// the admin API still retry at once). Other files the configuration names (dictionaries,
/// CA bundles) are read at every reload but not watched.
pub async fn watch_file(state: Arc<AppState>, interval: Duration) {
    let source = state.config.source.clone();
    tracing::info!(
        file = %source.display(),
        interval_ms = interval.as_millis() as u64,
        "watching the configuration file for changes"
    );
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut refused: Option<String> = None;
    let mut settling: Option<String> = None;
    let mut unreadable: Option<String> = None;
    loop {
        ticker.tick().await;
        let text = match tokio::fs::read_to_string(&source).await {
            Ok(text) => {
                unreadable = None;
                text
            }
            Err(error) => {
                // Logged once per distinct error: a file being replaced reads as missing for
                // a moment, and a file gone for good should not fill the log.
                let error = error.to_string();
                if unreadable.as_ref() != Some(&error) {
                    tracing::warn!(file = %source.display(), %error, "cannot read the configuration file to check it for changes");
                    unreadable = Some(error);
                }
                continue;
            }
        };
        let in_force = state.routing();
        let digest = fingerprint(
            &hex::encode(config::sha256(&text)),
            key_files(&in_force.config).map(|(file, _)| {
                std::fs::read_to_string(file)
                    .map(|secret| config::sha256(secret.trim()))
                    .unwrap_or_default()
            }),
        );
        let in_force_digest = fingerprint(
            &in_force.config.digest,
            key_files(&in_force.config).map(|(_, sha256)| sha256),
        );
        drop(in_force);
        if digest == in_force_digest || refused.as_ref() == Some(&digest) {
            settling = None;
            continue;
        }
        // A new text takes effect once it has read the same twice, one interval apart, so
        // that a file caught half-written (which may even be valid) is never put in force.
        if settling.as_ref() != Some(&digest) {
            settling = Some(digest);
            continue;
        }
        settling = None;
        let reloading = Arc::clone(&state);
        // Resolving backend host names blocks.
        let outcome =
            tokio::task::spawn_blocking(move || reload(&reloading, "configuration file changed"))
                .await;
        refused = match outcome {
            Ok(Ok(_)) => None,
            Ok(Err(_)) => Some(digest),
            Err(error) => {
                tracing::error!(
                    error = crate::error::join_failure(&error),
                    "reloading the changed configuration file did not finish"
                );
                Some(digest)
            }
        };
    }
}

/// The API keys, admin tokens, cloud pools' and the audit exporter's secrets read from
/// files, with the digest of the secret in force.
fn key_files(config: &Config) -> impl Iterator<Item = (&std::path::Path, [u8; 32])> {
    config
        .auth
        .api_keys
        .iter()
        .chain(&config.server.admin_tokens)
        .filter_map(|key| key.file.as_deref().map(|file| (file, key.sha256)))
        .chain(
            config
                .upstreams
                .iter()
                .flat_map(|pool| pool.auth.secret_files()),
        )
        .chain(
            config
                .audit
                .azure
                .iter()
                .flat_map(|export| export.auth.secret_files()),
        )
}

/// What the watcher compares: the configuration's text and the keys its key files hold.
fn fingerprint(text_digest: &str, keys: impl Iterator<Item = [u8; 32]>) -> String {
    let mut fingerprint = text_digest.to_owned();
    for key in keys {
        fingerprint.push(':');
        fingerprint.push_str(&hex::encode(key));
    }
    fingerprint
}

/// Serialises edits made through the admin API, so two at once cannot lose one another.
static EDITS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Sets a backend's weight in the configuration file and reloads it (the console's canary
/// control). The file is rewritten in place, comments and layout kept, by writing a sibling
/// and renaming it over the original (so a reader never sees half a file), with the
/// original's permissions. Nothing is written unless the edited file validates; if the
/// reload still fails, the original text is put back. Any other change already saved in the
/// file takes effect with it, as with any reload. Blocks.
pub fn set_backend_weight(
    state: &AppState,
    pool: &str,
    backend: &str,
    weight: u32,
) -> Result<ReloadReport, config::edit::EditError> {
    use config::edit::EditError;
    let _edit = EDITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = state.config.source.clone();
    let file = source.display().to_string();
    let original = std::fs::read_to_string(&source)
        .map_err(|error| EditError::Unwritable(format!("cannot read {file}: {error}")))?;
    let (edited, _) = config::edit::set_backend_weight(
        &original,
        &source,
        &ReloadEnvironment::of(state),
        pool,
        backend,
        weight,
    )?;
    tracing::info!(
        pool,
        backend,
        weight,
        file = %source.display(),
        "setting a backend weight through the admin API"
    );
    write_and_reload(state, &source, &original, &edited, "admin API weight edit")
}

/// An edited configuration text as a reload reads it: parsed whole, with the listen
/// addresses the command line gave kept.
fn parse_edited(
    state: &AppState,
    text: &str,
    source: &std::path::Path,
) -> Result<Config, config::edit::EditError> {
    config::parse(text, source, &ReloadEnvironment::of(state))
        .and_then(|mut config| {
            config
                .override_listen(state.config.listen_overrides)
                .map_err(|error| vec![error])?;
            Ok(config)
        })
        .map_err(|errors| {
            config::edit::EditError::Invalid(errors.iter().map(ToString::to_string).collect())
        })
}

/// Checks `text` as a reload would take it (parsed whole, policy, scanners and pools built),
/// then writes it over the configuration file and reloads it; if the reload still fails (the
/// file's secrets changed in between), puts `original` back. Nothing is written for a text
/// that could not be served: a crash before the original is back would leave the gateway a
/// file it refuses at its next start. The caller holds `EDITS`.
fn write_and_reload(
    state: &AppState,
    source: &std::path::Path,
    original: &str,
    text: &str,
    trigger: &str,
) -> Result<ReloadReport, config::edit::EditError> {
    use config::edit::EditError;
    let config = parse_edited(state, text, source)?;
    build_reloaded(state, config, &state.routing().pools).map_err(EditError::Invalid)?;
    replace_file(source, text).map_err(|error| {
        EditError::Unwritable(format!("cannot write {}: {error}", source.display()))
    })?;
    reload(state, trigger).map_err(|errors| match replace_file(source, original) {
        Ok(()) => EditError::Invalid(errors),
        Err(error) => {
            tracing::error!(
                file = %source.display(),
                %error,
                "the edited configuration did not reload and the original could not be put back"
            );
            EditError::Unwritable(format!(
                "the edited configuration did not reload ({}) and the original could not be \
                 put back: {error}; {} holds the edited text, which the next start refuses",
                errors.join("; "),
                source.display()
            ))
        }
    })
}

/// What a whole-file edit did (or, for a dry run, would do).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigurationReport {
    /// Whether the new text is in force (false for a dry run).
    pub reloaded: bool,
    pub pools: Vec<String>,
    /// Sections that changed but take effect only after a restart.
    pub restart_required: Vec<String>,
    /// SHA-256 of the file now (the new text unless this was a dry run).
    pub sha256: String,
}

/// Replaces the whole configuration file with `text` and reloads it (the console's
/// configuration editor). `base_sha256`, when given, must be the hash of the file as the
/// editor read it: a file changed since is not overwritten. The text is validated whole
/// (every error with its key path) and its pools built before anything is written; with
/// `dry_run` nothing is written. Blocks.
pub fn replace_configuration(
    state: &AppState,
    text: &str,
    base_sha256: Option<&str>,
    dry_run: bool,
) -> Result<ConfigurationReport, config::edit::EditError> {
    use config::edit::{EditError, text_sha256};
    let _edit = EDITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let source = state.config.source.clone();
    let file = source.display().to_string();
    let original = std::fs::read_to_string(&source)
        .map_err(|error| EditError::Unwritable(format!("cannot read {file}: {error}")))?;
    if let Some(base) = base_sha256
        && base != text_sha256(&original)
    {
        return Err(EditError::Conflict(format!(
            "{file} changed since it was read: load it again and redo the edit"
        )));
    }
    let config = parse_edited(state, text, &source)?;
    let restart_required = restart_sections(&state.config, &config)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if dry_run {
        let current = state.routing();
        let routing = build_reloaded(state, config, &current.pools).map_err(EditError::Invalid)?;
        let mut pools: Vec<String> = routing
            .config
            .upstreams
            .iter()
            .map(|pool| pool.name.clone())
            .collect();
        pools.sort();
        return Ok(ConfigurationReport {
            reloaded: false,
            pools,
            restart_required,
            sha256: text_sha256(&original),
        });
    }
    tracing::info!(file = %source.display(), "replacing the configuration through the admin API");
    let report = write_and_reload(
        state,
        &source,
        &original,
        text,
        "admin API configuration edit",
    )?;
    Ok(ConfigurationReport {
        reloaded: true,
        pools: report.pools,
        restart_required: report.restart_required,
        sha256: text_sha256(text),
    })
}

/// Replaces `path` with `text` atomically: a sibling file, flushed, renamed over it. A
/// symbolic link is followed, so the file it points to is the one replaced.
fn replace_file(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = &std::fs::canonicalize(path)?;
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => std::path::Path::new("."),
    };
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let sibling = directory.join(format!(".{name}.isthmus-edit"));
    let permissions = std::fs::metadata(path)?.permissions();
    let outcome = (|| {
        let mut file = std::fs::File::create(&sibling)?;
        file.write_all(text.as_bytes())?;
        file.set_permissions(permissions)?;
        file.sync_all()?;
        std::fs::rename(&sibling, path)?;
        // The rename itself is durable once the directory is.
        std::fs::File::open(directory)?.sync_all()
    })();
    if outcome.is_err() {
        let _ = std::fs::remove_file(&sibling);
    }
    outcome
}
