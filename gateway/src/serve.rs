//! `isthmus serve`: start-up, the listeners, signals and draining.
//!
//! Start-up order: open the state directory, make sure there is a TLS certificate
//! (provisioning one on first start), probe the hardware, bind every listener (so
//! `/healthz` answers and the ports are known at once), then load the models; `/readyz`
//! turns ready when they are loaded. Each bound listener is announced on stdout as one JSON
//! line, so that supervisors and tests can find ports that were asked for as `:0`.
//!
//! Signals: SIGHUP reloads the TLS certificate and the configuration (`reload.rs`). SIGTERM and SIGINT drain: every listener
//! stops accepting at once, in-flight requests run to completion (keep-alive connections close
//! after their current response), and the process exits when none are left or when the drain
//! timeout passes.
//!
//! Under systemd (`Type=notify`, `deploy/systemd/isthmus.service`) the gateway says `READY=1`
//! when `/readyz` turns ready, `RELOADING=1` and `READY=1` around a SIGHUP reload,
//! `STOPPING=1` when it drains, and pings the watchdog from the async runtime, so a runtime
//! that stops turning gets the process restarted (`firmware::service`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pingora_core::apps::http_app::HttpServer;
use pingora_core::listeners::tls::Acceptor;
use pingora_core::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};

use crate::admin::Admin;
use crate::config::{Config, TlsFiles};
use crate::data_plane::DataPlane;
use crate::listener::{ListenerSettings, accept_loop};
use crate::state::AppState;
use crate::tls::ReloadingCertResolver;
use firmware::{Notice, ServiceManager};

/// Open connections the admin listener accepts; probes and scrapes need few.
const ADMIN_CONNECTIONS_MAX: usize = 64;
/// Admin connections only this machine (health probes, `isthmus probe`) may open beyond
/// [`ADMIN_CONNECTIONS_MAX`].
const ADMIN_LOOPBACK_RESERVE: usize = 8;

/// How long an admin HTTP/2 connection with no open stream stays open: the time Pingora
/// keeps an idle admin HTTP/1 connection.
const ADMIN_HTTP2_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often draining checks whether requests are still in flight.
const DRAIN_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Runs the gateway until it is told to stop. Returns the process exit code.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let manager = ServiceManager::from_environment()
        .context("the service manager's environment (NOTIFY_SOCKET, WATCHDOG_USEC)")?;
    let hardware = firmware::probe();
    let worker_threads = config
        .server
        .worker_threads
        .unwrap_or(hardware.logical_cpus)
        .max(1);
    // With one thread, a current-thread runtime serves connections on the thread that also
    // polls the sockets, without the work-stealing scheduler's queues and wake-ups: 13% more
    // forwarded requests/s in `bench/cloud/compare.sh`'s closed loop.
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(worker_threads);
        builder
    };
    let runtime = builder
        .thread_name("isthmus-io")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The signals are taken before the slow parts of start-up (TLS provisioning, resolving
    // backends, opening the audit log): a SIGHUP then would otherwise end the process (its
    // default action), and a SIGTERM is acted on as soon as serving begins.
    let signals = {
        let _entered = runtime.enter();
        Signals::listen()?
    };
    let state_dir = firmware::StateDir::open(&config.server.state_dir)
        .with_context(|| format!("server.state_dir: {}", config.server.state_dir.display()))?;
    let tls_files = match &config.server.tls.files {
        Some(files) => files.clone(),
        None => {
            let provisioned =
                firmware::provision_tls_now(&state_dir, &firmware::default_tls_hosts())
                    .context("provisioning the TLS certificate")?;
            tracing::info!(
                ca = %provisioned.ca_cert_path.display(),
                ca_sha256 = %provisioned.ca_fingerprint_sha256,
                outcome = %provisioned.outcome,
                "clients verify this gateway with the CA certificate above"
            );
            TlsFiles {
                cert: provisioned.cert_path,
                key: provisioned.key_path,
            }
        }
    };
    let resolver = ReloadingCertResolver::load(tls_files).context("loading the TLS certificate")?;
    tracing::info!(
        logical_cpus = hardware.logical_cpus,
        physical_cores = hardware.physical_cores,
        cpu = hardware.cpu_model.as_deref().unwrap_or("unknown"),
        x86_64_level = hardware.x86_64_level,
        memory_total_bytes = hardware.memory_total_bytes,
        features = %hardware.cpu_features.join(" "),
        "hardware probed"
    );
    let routing = crate::reload::build_routing(config.clone(), None)
        .map_err(|errors| anyhow::anyhow!(errors.join("; ")))?;
    let audit = open_audit(&config)?;
    // The OTLP exporters run on threads of their own with a blocking HTTP client, which is
    // built here, outside the async runtime.
    let telemetry = match &config.telemetry.otlp {
        Some(otlp) => {
            let instance = match &audit {
                Some(trail) => trail.log.stream_id().to_owned(),
                None => firmware::host_name().unwrap_or_else(|| "isthmus".to_owned()),
            };
            Some(crate::telemetry::Telemetry::start(otlp, &instance)?)
        }
        None => None,
    };
    let responses = open_responses(&config)?;
    let daily_usage = crate::daily_usage::DailyUsage::open(
        &config.server.state_dir,
        std::time::SystemTime::now(),
    )
    .map_err(|error| {
        anyhow::anyhow!(
            "reading the day's token counts: {error} (delete the file to start the day's counts again)"
        )
    })?;
    let mut state = AppState::new(config, routing);
    state.audit = audit;
    state.responses = responses;
    state.daily_usage = Some(Arc::new(daily_usage));
    state.telemetry = telemetry;
    state.gpu = crate::gpu::GpuMonitor::probe();
    let state = Arc::new(state);
    if let Some(telemetry) = &state.telemetry {
        telemetry.observe(Arc::downgrade(&state));
    }
    let manager = Arc::new(manager);
    let result = runtime.block_on(run(
        Arc::clone(&state),
        resolver,
        hardware,
        Arc::clone(&manager),
        signals,
    ));
    // A model still loading (a stop during start-up) is not waited for: dropping the
    // runtime would join its blocking thread, minutes on a large model, past the service
    // manager's stop timeout.
    runtime.shutdown_timeout(BLOCKING_TASKS_WAIT);
    if let Err(error) = &result {
        notify(&manager, &[Notice::Status(format!("failed: {error:#}"))]);
    }
    if let Some(telemetry) = &state.telemetry {
        telemetry.shutdown();
    }
    result
}

/// Opens the response store when `[responses] store = true`.
fn open_responses(
    config: &Config,
) -> anyhow::Result<Option<Arc<crate::response_store::ResponseStore>>> {
    let settings = &config.responses;
    if !settings.store {
        return Ok(None);
    }
    let directory = config
        .server
        .state_dir
        .join(crate::response_store::STORE_DIR);
    let store = crate::response_store::ResponseStore::open(&directory, settings)
        .with_context(|| format!("opening the response store in {}", directory.display()))?;
    let (count, bytes) = store.usage();
    tracing::info!(
        directory = %directory.display(),
        responses = count,
        bytes,
        retention_hours = settings.retention.as_secs() / 3_600,
        sealed_with_key = settings.encryption_key.as_ref().map_or("none (JSON in the clear)", |key| key.id()),
        "stored responses on: the Responses API keeps prompt and completion text at rest"
    );
    Ok(Some(Arc::new(store)))
}

/// Writes the day's token counts every few seconds while they change.
async fn save_daily_usage(usage: Arc<crate::daily_usage::DailyUsage>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let saving = Arc::clone(&usage);
        match tokio::task::spawn_blocking(move || saving.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "writing the day's token counts"),
            Err(error) => tracing::error!(
                error = crate::error::join_failure(&error),
                "writing the day's token counts did not finish"
            ),
        }
    }
}

/// Deletes expired stored responses every minute.
async fn expire_responses(store: Arc<crate::response_store::ResponseStore>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(60));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let expiring = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || expiring.expire(std::time::SystemTime::now()))
            .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => tracing::debug!(removed, "expired stored responses deleted"),
            Ok(Err(error)) => tracing::error!(%error, "deleting expired stored responses"),
            Err(error) => tracing::error!(
                error = crate::error::join_failure(&error),
                "deleting expired stored responses did not finish"
            ),
        }
    }
}

/// Opens the audit log (a new epoch of the stream, durably) unless it is turned off.
fn open_audit(config: &Config) -> anyhow::Result<Option<crate::audit_trail::Trail>> {
    let settings = &config.audit;
    if !settings.enabled {
        tracing::warn!("AUDIT LOG DISABLED: requests leave no record");
        return Ok(None);
    }
    let mut audit = crate::audit::AuditConfig::new(config.server.state_dir.clone());
    if let Some(directory) = &settings.directory {
        audit.directory = Some(directory.clone());
    }
    audit.checkpoint_every_records = settings.checkpoint_every_records;
    audit.checkpoint_every_ms = settings.checkpoint_every_ms;
    audit.retention_bytes_max = settings.retention_bytes_max;
    audit.retention_days = settings.retention_days;
    audit.stdout = settings.stdout;
    audit.fail_closed = settings.fail_closed;
    audit.retention_requires_export = settings.azure.is_some();
    audit.syslog = settings.syslog.clone();
    let instance = audit.gateway_instance.clone();
    let log = crate::audit::AuditLog::open(audit).context("opening the audit log")?;
    tracing::info!(stream_id = log.stream_id(), "audit log open");
    if settings.content.is_some() {
        tracing::warn!("audit records carry prompt and completion text where [audit.content] says");
    }
    Ok(Some(crate::audit_trail::Trail {
        log: Arc::new(log),
        instance,
        content: settings.content.clone().map(Arc::new),
    }))
}

/// The audit store as the Logs Ingestion exporter reads it.
#[derive(Debug)]
struct StoreSource {
    log: Arc<crate::audit::AuditLog>,
    runtime: tokio::runtime::Handle,
}

impl crate::export::ExportSource for StoreSource {
    fn read_after(
        &self,
        after: u64,
        max: usize,
    ) -> Result<Vec<serde_json::Value>, crate::export::ExportError> {
        // The exporter calls sources from blocking threads.
        let records = self
            .runtime
            .block_on(self.log.read(after.saturating_add(1), max))
            .map_err(|error| crate::export::ExportError::Source(error.to_string()))?;
        records
            .into_iter()
            .map(|(seq, bytes)| {
                serde_json::from_slice(&bytes).map_err(|error| {
                    crate::export::ExportError::Source(format!("record {seq}: {error}"))
                })
            })
            .collect()
    }

    fn exported_up_to(&self) -> Result<u64, crate::export::ExportError> {
        Ok(self.log.exported_up_to())
    }

    fn mark_exported(&self, seq: u64) -> Result<(), crate::export::ExportError> {
        self.runtime
            .block_on(self.log.mark_exported(seq))
            .map_err(|error| crate::export::ExportError::Source(error.to_string()))
    }
}

async fn bind(address: SocketAddr, name: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the {name} listener to {address}"))?;
    Ok(listener)
}

/// Announces a bound listener on stdout, one JSON object per line.
fn announce(name: &str, scheme: &str, listener: &TcpListener) -> anyhow::Result<SocketAddr> {
    use std::io::Write as _;
    let address = listener.local_addr()?;
    let line = serde_json::json!({"listening": name, "address": address.to_string(), "url": format!("{scheme}://{address}")});
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    tracing::info!(listener = name, url = %format!("{scheme}://{address}"), "listening");
    Ok(address)
}

/// How long the end of `serve` waits for blocking tasks still running (a model load).
const BLOCKING_TASKS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The signals `serve` acts on, taken at start.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Listens for SIGTERM, SIGINT and SIGHUP; call within the runtime.
    fn listen() -> anyhow::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("handling SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("handling SIGINT")?,
            hangup: signal(SignalKind::hangup()).context("handling SIGHUP")?,
        })
    }
}

async fn run(
    state: Arc<AppState>,
    resolver: Arc<ReloadingCertResolver>,
    hardware: firmware::HardwareProfile,
    manager: Arc<ServiceManager>,
    signals: Signals,
) -> anyhow::Result<()> {
    let config = &state.config;
    let (shutdown_sender, shutdown) = watch::channel(false);
    let acceptor = Arc::new(Acceptor::from_server_config(Arc::new(
        resolver.server_config()?,
    )));
    let connections = Arc::new(Semaphore::new(
        config.server.limits.connections_max as usize,
    ));
    let pingora_conf = Arc::new(ServerConf::default());

    let admin_listener = bind(config.server.admin_listen, "admin").await?;
    let data_listener = bind(config.server.listen, "data").await?;
    let plain_listener = match config.server.plain_listen {
        Some(address) => Some(bind(address, "plain-http").await?),
        None => None,
    };

    // An HTTP/2 connection with no stream open is closed after the time an idle HTTP/1
    // connection is kept (`keepalive_timeout_ms` on the data plane): otherwise it would hold
    // one of `connections_max` for ever.
    let mut server_options = pingora_core::apps::HttpServerOptions::default();
    server_options.h2_idle_timeout = Some(ADMIN_HTTP2_IDLE_TIMEOUT);
    let mut admin_app = HttpServer::new_app(Admin::new(Arc::clone(&state)));
    admin_app.server_options = Some(server_options.clone());
    let admin_app = Arc::new(admin_app);
    let mut data_proxy =
        pingora_proxy::http_proxy(&pingora_conf, DataPlane::new(Arc::clone(&state)));
    server_options.h2_idle_timeout = Some(config.server.limits.keepalive_timeout);
    data_proxy.server_options = Some(server_options);
    // HTTP/2 requests get the same header cap as HTTP/1 ones (h2 answers 431 above it),
    // instead of Pingora's fixed 64 KiB.
    let mut h2_options = pingora_core::protocols::http::v2::server::default_h2_options();
    h2_options.max_header_list_size(
        u32::try_from(config.server.limits.header_bytes_max).unwrap_or(u32::MAX),
    );
    data_proxy.h2_options = Some(h2_options);
    let data_app = Arc::new(data_proxy);
    // The data listener is announced last: once it is, every listener is.
    let admin_scheme = if config.server.admin_listen.ip().is_loopback() {
        "http"
    } else {
        "https"
    };
    announce("admin", admin_scheme, &admin_listener)?;
    if let Some(listener) = &plain_listener {
        tracing::warn!(
            "PLAIN-HTTP DATA LISTENER ENABLED: prompts, completions and API keys cross the \
             network unencrypted; use it only on a trusted local link"
        );
        announce("plain-http", "http", listener)?;
    }
    announce("data", "https", &data_listener)?;
    // Off loopback, the admin listener serves TLS with the data plane's certificate (and
    // requires a token, which configuration validation enforces).
    let admin_tls = (!config.server.admin_listen.ip().is_loopback()).then(|| Arc::clone(&acceptor));
    let admin_settings = ListenerSettings {
        name: "admin",
        tls: admin_tls,
        limits: config.server.limits,
        connections: Arc::new(Semaphore::new(ADMIN_CONNECTIONS_MAX)),
        loopback_reserve: Some(Arc::new(Semaphore::new(ADMIN_LOOPBACK_RESERVE))),
        open: Arc::default(),
        refusals: Arc::default(),
    };
    tokio::spawn(accept_loop(
        admin_listener,
        admin_app,
        admin_settings,
        shutdown.clone(),
    ));
    tokio::spawn(accept_loop(
        data_listener,
        Arc::clone(&data_app),
        ListenerSettings {
            name: "data",
            tls: Some(acceptor),
            limits: config.server.limits,
            connections: Arc::clone(&connections),
            loopback_reserve: None,
            open: Arc::clone(&state.open_connections),
            refusals: Arc::clone(&state.connection_refusals),
        },
        shutdown.clone(),
    ));
    if let Some(listener) = plain_listener {
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&data_app),
            ListenerSettings {
                name: "plain-http",
                tls: None,
                limits: config.server.limits,
                connections,
                loopback_reserve: None,
                open: Arc::clone(&state.open_connections),
                refusals: Arc::clone(&state.connection_refusals),
            },
            shutdown.clone(),
        ));
    }
    state.listeners_bound.store(true, Ordering::Release);
    state.routing().pools.start_probes();
    if let (Some(trail), Some(azure)) = (&state.audit, &config.audit.azure) {
        let source = Arc::new(StoreSource {
            log: Arc::clone(&trail.log),
            runtime: tokio::runtime::Handle::current(),
        });
        let exporter = crate::export::Exporter::new(azure.clone(), source)
            .map_err(|error| anyhow::anyhow!("audit.azure: {error}"))?;
        tokio::spawn(exporter.run(shutdown.clone()));
        tracing::info!(endpoint = %azure.endpoint, "audit export to Azure Monitor on");
    }

    tokio::spawn(watch_certificate(
        Arc::clone(&resolver),
        config.server.tls.reload_interval,
    ));
    if let Some(store) = &state.responses {
        tokio::spawn(expire_responses(Arc::clone(store)));
    }
    if let Some(usage) = &state.daily_usage {
        tokio::spawn(save_daily_usage(Arc::clone(usage)));
    }
    if let Some(interval) = config.server.config_watch_interval {
        tokio::spawn(crate::reload::watch_file(Arc::clone(&state), interval));
    }
    tokio::spawn(crate::reload::follow_backend_addresses(
        Arc::clone(&state),
        crate::cloud::BACKEND_RESOLVE_INTERVAL,
    ));
    if let Some(interval) = manager.watchdog_interval() {
        tokio::spawn(ping_watchdog(Arc::clone(&manager), interval));
    }
    notify(
        &manager,
        &[Notice::Status(format!(
            "loading {} local model(s); listeners bound",
            config.models.len()
        ))],
    );
    let loading = tokio::task::spawn_blocking({
        let state = Arc::clone(&state);
        move || {
            if state.config.models.is_empty() {
                tracing::info!("no local models configured: serving cloud pools only");
                return Ok(());
            }
            load_models(&state, &hardware)
        }
    });

    let Signals {
        mut terminate,
        mut interrupt,
        mut hangup,
    } = signals;
    let mut loading = Some(loading);
    // Reloads run beside the loop (resolving backend host names blocks, for seconds when DNS
    // is down), so that a SIGTERM meanwhile still starts the drain at once.
    let mut reloads: tokio::task::JoinSet<bool> = tokio::task::JoinSet::new();
    let mut failed_to_load = None;
    loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: draining"); break; }
            _ = hangup.recv() => {
                notify(&manager, &[Notice::Reloading, Notice::Status("reloading the configuration".to_owned())]);
                match resolver.reload() {
                    Ok(()) => {}
                    Err(error) => tracing::error!(%error, "SIGHUP: TLS certificate not reloaded; the previous one stays in use"),
                }
                let reloading_state = Arc::clone(&state);
                reloads.spawn_blocking(move || crate::reload::reload(&reloading_state, "SIGHUP").is_ok());
            }
            Some(reloaded) = reloads.join_next(), if !reloads.is_empty() => {
                let status = match reloaded {
                    Ok(true) => "configuration reloaded",
                    _ => "configuration NOT reloaded (see the log); the previous one stays in force",
                };
                // Still loading models: READY comes when they are loaded.
                let mut notices = vec![Notice::Status(serving_status(&state, status))];
                if loading.is_none() {
                    notices.insert(0, Notice::Ready);
                }
                notify(&manager, &notices);
            }
            loaded = async { match loading.as_mut() { Some(task) => task.await, None => std::future::pending().await } } => {
                loading = None;
                match loaded {
                    Ok(Ok(())) => {
                        tracing::info!("ready");
                        notify(&manager, &[Notice::Ready, Notice::Status(serving_status(&state, "ready"))]);
                    }
                    // Stopped like any other stop (the audit log closed, counts saved),
                    // then the error is the process's.
                    Ok(Err(error)) => { failed_to_load = Some(error); break; }
                    Err(error) => {
                        failed_to_load = Some(anyhow::anyhow!("model loading did not finish: {}", crate::error::join_failure(&error)));
                        break;
                    }
                }
            }
        }
    }
    notify(
        &manager,
        &[
            Notice::Stopping,
            Notice::Status("draining in-flight requests".to_owned()),
        ],
    );
    drain(&state, &shutdown_sender, data_app.as_ref()).await;
    if let Some(trail) = &state.audit
        && let Err(error) = trail.log.shutdown().await
    {
        tracing::error!(%error, "closing the audit log");
    }
    if let Some(usage) = &state.daily_usage
        && let Err(error) = usage.save()
    {
        tracing::error!(%error, "writing the day's token counts");
    }
    if let Some(store) = &state.responses
        && let Err(error) = store.flush()
    {
        tracing::error!(%error, "writing the stored responses to disk");
    }
    // Free the inference contexts (and any GPU context) before the process tears down.
    // Joining the inference threads blocks, so it runs on a blocking thread (a current-thread
    // runtime has no `block_in_place`).
    if state.engine.get().is_some() {
        let state = Arc::clone(&state);
        let stopped = tokio::task::spawn_blocking(move || {
            if let Some(engine) = state.engine.get() {
                engine.shutdown();
            }
        })
        .await;
        if let Err(error) = stopped {
            tracing::error!(
                error = crate::error::join_failure(&error),
                "stopping the inference threads did not finish"
            );
        }
    }
    match failed_to_load {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

fn load_models(state: &AppState, hardware: &firmware::HardwareProfile) -> anyhow::Result<()> {
    let config = &state.config;
    let default_threads = u32::try_from(hardware.default_inference_threads()).unwrap_or(1);
    let specs: Vec<edge_runtime::ModelSpec> = config
        .models
        .iter()
        .map(|model| edge_runtime::ModelSpec {
            name: model.name.clone(),
            path: model.path.clone(),
            context_tokens: model.context_tokens,
            parallel_sequences: model.parallel_sequences,
            batch_tokens: model.batch_tokens,
            prefill_chunk_tokens: model.prefill_chunk_tokens,
            threads: model.threads.unwrap_or(default_threads),
            gpu_layers: model.gpu_layers,
            queue_depth_max: model.queue_depth_max,
            queue_timeout_ms: u64::try_from(model.queue_timeout.as_millis()).unwrap_or(u64::MAX),
            kv_unified: model.kv_unified,
            kv_cache_type: model.kv_cache_type,
            prefix_cache_entries: model.prefix_cache_entries,
            prefix_cache_tokens_max: model.prefix_cache_tokens_max,
            park_prefixes_when_idle: model.park_prefixes_when_idle,
            overlap_token_delivery: model.overlap_token_delivery,
            lanes: model.lanes,
            chat_template: model.chat_template.clone(),
        })
        .collect();
    for model in &config.models {
        tracing::info!(
            model = %model.name,
            kv_cells = model.kv_plan.cells,
            kv_bytes_per_token = model.kv_plan.bytes_per_token,
            kv_bytes = model.kv_plan.bytes,
            kv_unified = model.kv_unified,
            kv_cache_type = model.kv_cache_type.name(),
            "KV cache planned: 2 x layers x KV heads x head dim x tokens x bytes per element"
        );
    }
    let options = edge_runtime::EngineOptions {
        backends_dir: config.engine.backends_dir.clone(),
    };
    let engine = edge_runtime::Engine::start(&options, &specs).context("loading models")?;
    let _ = state.engine.set(engine);
    Ok(())
}

async fn watch_certificate(resolver: Arc<ReloadingCertResolver>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) = resolver.reload_if_changed() {
            tracing::error!(%error, "TLS certificate files changed but could not be loaded; the previous certificate stays in use");
        }
    }
}

/// Tells the service manager, logging (not failing) when it cannot be told: the gateway
/// serves either way, and systemd's own start timeout reports a `READY` that never came.
fn notify(manager: &ServiceManager, notices: &[Notice]) {
    if let Err(error) = manager.notify(notices) {
        tracing::error!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The `STATUS=` line while serving: what happened last and what is loaded.
fn serving_status(state: &AppState, what: &str) -> String {
    format!(
        "{what}; {} local model(s), {} cloud pool(s)",
        state.config.models.len(),
        state.routing().config.upstreams.len()
    )
}

/// Pings the watchdog from the async runtime: when the runtime stops running tasks, the pings
/// stop and systemd restarts the gateway after `WatchdogSec`.
async fn ping_watchdog(manager: Arc<ServiceManager>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        notify(&manager, &[Notice::Watchdog]);
    }
}

/// Stops accepting, closes idle keep-alive connections (each would otherwise take one more
/// request during the drain, and the last might arrive just as the process exits), then waits
/// for in-flight requests up to the drain timeout.
async fn drain(
    state: &AppState,
    shutdown: &watch::Sender<bool>,
    data_app: &(impl pingora_core::apps::ServerApp + Sync),
) {
    let _ = shutdown.send(true);
    data_app.cleanup().await;
    let timeout = state.config.server.drain_timeout;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    while state.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL_INTERVAL).await;
    }
    let remaining = state.in_flight();
    if remaining > 0 {
        tracing::warn!(
            in_flight = remaining,
            timeout_ms = timeout.as_millis() as u64,
            "drain timeout passed; exiting with requests still in flight"
        );
    } else {
        tracing::info!(
            drain_ms = started.elapsed().as_millis() as u64,
            "drained; exiting"
        );
    }
}
