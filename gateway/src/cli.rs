//! The command line: `isthmus serve`, `check-config`, `explain`, `bench`, `audit verify`,
//! `probe`, `build-info` and `update`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, ProcessEnvironment};

#[derive(Debug, Parser)]
#[command(
    name = "isthmus",
    version,
    about = "Edge-to-cloud LLM inference gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// Override server.listen (the HTTPS data plane), e.g. 127.0.0.1:0.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override server.admin_listen.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Validate a configuration file; report every error with its key path.
    CheckConfig {
        /// The configuration file (TOML).
        #[arg(
            required_unless_present = "config_flag",
            conflicts_with = "config_flag"
        )]
        config: Option<PathBuf>,
        /// The configuration file, named as `serve` and `explain` take it.
        #[arg(
            long = "config",
            short = 'c',
            id = "config_flag",
            value_name = "CONFIG"
        )]
        config_flag: Option<PathBuf>,
    },
    /// Explain routing: one JSON line per request (an OpenAI chat body per input line) with
    /// the decision, the rule, complexity, sensitive entity types and each rule's verdict.
    Explain {
        #[arg(long)]
        config: PathBuf,
        /// JSON Lines of request bodies (standard input when absent).
        #[arg(long)]
        jsonl: Option<PathBuf>,
        /// The data-plane path the requests are sent to, with its query for the Azure form;
        /// `/v1/responses` reads Responses API bodies.
        #[arg(long, default_value = crate::facts::EXPLAIN_TARGET_DEFAULT)]
        path: String,
    },
    /// Load-test any OpenAI-compatible endpoint: TTFT, TPOT, latency percentiles, tokens/s.
    Bench(BenchArgs),
    /// GET a path of the admin listener over loopback; exit 0 on a 200 (Kubernetes exec
    /// probes). Off loopback the listener wants `--token-env` and `--tls-cert`.
    /// `--post /admin/api/reload` reloads the configuration and prints the report.
    Probe {
        /// The admin listener (loopback only).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// The path to GET.
        #[arg(default_value = "/readyz")]
        path: String,
        /// Send an empty POST instead of a GET, and print the answer.
        #[arg(long)]
        post: bool,
        /// Connect, send and read deadlines, each.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Present the bearer token in this environment variable (an admin listener bound
        /// off loopback wants one of `server.admin_tokens`).
        #[arg(long, value_name = "NAME")]
        token_env: Option<String>,
        /// Speak TLS, trusting only a server that presents the first certificate in this
        /// PEM file: the gateway's own (an admin listener bound off loopback speaks TLS).
        #[arg(long, value_name = "FILE")]
        tls_cert: Option<PathBuf>,
    },
    /// Print what this binary was built with, as JSON: version, the llama.cpp source
    /// fingerprint, and the CPU backend modules (with their SHA-256) that must ship beside it.
    BuildInfo,
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Signed updates into A/B slots with rollback: keygen, pack, verify, apply, boot,
    /// commit, rollback, status.
    Update {
        #[command(subcommand)]
        command: crate::update::UpdateCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and checkpoint signatures of a JSONL file, a directory of
    /// audit-YYYYMMDD.jsonl files, or the audit store; name the first bad Seq (exit 1).
    Verify {
        /// A JSONL file, a directory of audit files, or the store directory.
        path: PathBuf,
        /// The device public key, kept apart from the records (default: audit-device.pub
        /// beside PATH or one level up, which proves only consistency). Give it again for each
        /// key a chain was signed with (a device key made anew); checkpoints name theirs.
        #[arg(long)]
        pubkey: Vec<PathBuf>,
    },
    /// Verify like `verify`, then report what the records show: requests by route, where
    /// every request with sensitive content went (exit 1 if any left the premises
    /// unredacted), firewall events, tokens and TTFT.
    Report {
        /// A JSONL file, a directory of audit files, or the store directory.
        path: PathBuf,
        #[arg(long)]
        pubkey: Vec<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Base URL of the server, e.g. https://127.0.0.1:8443.
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// API key (or set ISTHMUS_API_KEY).
    #[arg(long, env = "ISTHMUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub concurrency: u32,
    /// Requests to send in all (default: 8 per unit of concurrency; with --duration-s, no
    /// limit but the time).
    #[arg(long)]
    pub requests: Option<u32>,
    /// Start no request after this many seconds (the requests in flight then finish), in
    /// either loop, so that a slow and a fast server get the same time; --requests, when
    /// given, still caps the count.
    #[arg(long)]
    pub duration_s: Option<f64>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: u32,
    /// Approximate prompt length in tokens, shared prefix included.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: u32,
    /// Tokens of a system prompt common to every request.
    #[arg(long, default_value_t = 0)]
    pub shared_prefix_tokens: u32,
    /// Stream responses (SSE); needed for TTFT, TPOT and gaps between tokens.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub stream: bool,
    /// Ask the server to ignore end-of-text so each request yields exactly --max-tokens.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ignore_eos: bool,
    /// Unmeasured warm-up requests, at most one per unit of concurrency (default: one per
    /// unit, so that no measured request pays for opening a connection).
    #[arg(long)]
    pub warmup: Option<u32>,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Each worker starts a request at most this often, in milliseconds (0: back to back).
    #[arg(long, default_value_t = 0)]
    pub interval_ms: u64,
    /// Open loop: start requests at this fixed rate (per second) whatever the answers do,
    /// with at most --concurrency in flight; latency counts from each request's scheduled
    /// start, so a server that falls behind is not flattered (0: closed loop).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Seed of the prompt text; by default a new one per run, so no run hits the prompt
    /// cache another run filled.
    #[arg(long)]
    pub seed: Option<u64>,
    /// A JSON object merged into every request body, e.g.
    /// '{"response_format": {"type": "json_object"}}' or '{"logprobs": true}'.
    #[arg(long, value_parser = parse_extra_body)]
    pub extra_body: Option<serde_json::Map<String, serde_json::Value>>,
    /// The API the requests speak: `chat` (`/v1/chat/completions`) or `responses`
    /// (`/v1/responses`).
    #[arg(long, value_enum, default_value = "chat")]
    pub api: crate::bench::BenchApi,
}

fn parse_extra_body(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(fields)) => Ok(fields),
        Ok(_) => Err("must be a JSON object".to_owned()),
        Err(error) => Err(format!("not JSON: {error}")),
    }
}

/// Loads the file and checks what the running gateway would also build from it: the routing
/// policy and the cloud pools (TLS files load; a host name that does not resolve is a
/// warning).
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    let loaded = config::load(path, &ProcessEnvironment).map_err(|errors| {
        report(path, &errors);
        ExitCode::from(2)
    })?;
    let problems = match crate::reload::build_routing(loaded.clone(), None) {
        Ok(routing) => {
            // Not errors: the gateway starts without them and takes them in once they resolve.
            for problem in routing.pools.unresolved() {
                eprintln!(
                    "{}: warning: {problem} (the backend takes no traffic until it resolves)",
                    path.display()
                );
            }
            return Ok(loaded);
        }
        Err(problems) => problems,
    };
    let errors: Vec<ConfigError> = problems
        .into_iter()
        .map(|problem| match problem.split_once(": ") {
            Some((key, message)) => ConfigError {
                path: key.to_owned(),
                message: message.to_owned(),
            },
            None => ConfigError {
                path: path.display().to_string(),
                message: problem,
            },
        })
        .collect();
    report(path, &errors);
    Err(ExitCode::from(2))
}

/// `isthmus explain`: decides every request of the input without running it. Signals are
/// those of an idle gateway (empty queues, every pool available).
fn explain(
    config_path: &std::path::Path,
    jsonl: Option<&std::path::Path>,
    target: &str,
) -> ExitCode {
    use std::io::{BufRead as _, Write as _};
    let loaded = match load_config(config_path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let routing = match crate::reload::build_routing(loaded, None) {
        Ok(routing) => routing,
        Err(errors) => {
            for error in errors {
                eprintln!("{}: {error}", config_path.display());
            }
            return ExitCode::from(2);
        }
    };
    let input: Box<dyn std::io::BufRead> = match jsonl {
        Some(path) => match std::fs::File::open(path) {
            Ok(file) => Box::new(std::io::BufReader::new(file)),
            Err(error) => {
                eprintln!("{}: cannot read: {error}", path.display());
                return ExitCode::from(2);
            }
        },
        None => Box::new(std::io::stdin().lock()),
    };
    let source = jsonl.map_or_else(|| "stdin".to_owned(), |path| path.display().to_string());
    let mut stdout = std::io::stdout().lock();
    let mut failed = false;
    for (index, line) in input.lines().enumerate() {
        let number = index + 1;
        let line = match line {
            Ok(line) => line,
            Err(error) => {
                eprintln!("{source}:{number}: cannot read: {error}");
                return ExitCode::from(2);
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let result = crate::facts::explain(
            &routing,
            target,
            &[("content-type", "application/json")],
            line.as_bytes(),
            &[],
            router_policies::RouteState::default(),
        );
        let mut record = match result {
            Ok(explanation) => explanation,
            Err(error) => {
                failed = true;
                eprintln!("{source}:{number}: {error}");
                serde_json::json!({"error": error.to_string()})
            }
        };
        record["line"] = serde_json::json!(number);
        if writeln!(stdout, "{record}").is_err() {
            return ExitCode::from(1);
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn report(path: &std::path::Path, errors: &[ConfigError]) {
    eprintln!(
        "{}: {} error{}",
        path.display(),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for error in errors {
        eprintln!("  {error}");
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    // A year bounds every length of time the bench computes from these (no overflow).
    const YEAR_S: f64 = 365.0 * 86_400.0;
    let duration = match args.duration_s {
        None => None,
        Some(seconds) if seconds > 0.0 && seconds <= YEAR_S => {
            Some(std::time::Duration::from_secs_f64(seconds))
        }
        Some(seconds) => {
            eprintln!(
                "isthmus bench: --duration-s must be a number of seconds above 0 and at most \
                 {YEAR_S}, not {seconds}"
            );
            return ExitCode::from(2);
        }
    };
    if !(args.rate == 0.0 || (args.rate >= 1.0 / YEAR_S && args.rate <= 1e9)) {
        eprintln!(
            "isthmus bench: --rate must be 0 (closed loop) or a rate from one a year to 1e9 \
             requests per second, not {}",
            args.rate
        );
        return ExitCode::from(2);
    }
    let requests = match (args.requests, duration) {
        (Some(requests), _) => requests,
        (None, Some(_)) => u32::MAX,
        (None, None) => args.concurrency.saturating_mul(8),
    };
    let options = crate::bench::BenchOptions {
        url: args.url,
        model: args.model,
        api_key: args.api_key,
        ca_file: args.cacert,
        concurrency: args.concurrency,
        requests,
        duration,
        max_tokens: args.max_tokens,
        prompt_tokens: args.prompt_tokens,
        shared_prefix_tokens: args.shared_prefix_tokens,
        stream: args.stream,
        ignore_eos: args.ignore_eos,
        warmup_requests: args.warmup.unwrap_or(args.concurrency),
        request_timeout: std::time::Duration::from_secs(args.timeout_s),
        salt: args.seed.unwrap_or_else(rand::random),
        interval: std::time::Duration::from_millis(args.interval_ms),
        rate_per_s: args.rate,
        extra_body: args.extra_body.unwrap_or_default(),
        api: args.api,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("isthmus bench: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::bench::run(options)) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{}", crate::bench::render(&report));
            }
            if report.succeeded == 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("isthmus bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Bench(args) => bench(args),
        Command::Update { command } => crate::update::run(command),
        Command::Audit {
            command: AuditCommand::Verify { path, pubkey },
        } => crate::audit::verify::run(&path, &pubkey),
        Command::Audit {
            command: AuditCommand::Report { path, pubkey, json },
        } => crate::audit::report::run(&path, &pubkey, json),
        Command::Explain {
            config,
            jsonl,
            path,
        } => explain(&config, jsonl.as_deref(), &path),
        Command::Probe {
            admin,
            path,
            post,
            timeout_ms,
            token_env,
            tls_cert,
        } => crate::probe::run(
            admin,
            &path,
            post,
            std::time::Duration::from_millis(timeout_ms),
            token_env.as_deref(),
            tls_cert.as_deref(),
        ),
        Command::BuildInfo => {
            println!("{:#}", build_info());
            ExitCode::SUCCESS
        }
        Command::CheckConfig {
            config,
            config_flag,
        } => {
            // clap requires one of the two.
            let Some(config) = config.or(config_flag) else {
                eprintln!("isthmus check-config: name the configuration file");
                return ExitCode::from(2);
            };
            check_config(&config)
        }
        Command::Serve {
            config,
            listen,
            admin_listen,
        } => {
            let mut loaded = match load_config(&config) {
                Ok(loaded) => loaded,
                Err(code) => return code,
            };
            let overrides = config::ListenOverrides {
                listen,
                admin_listen,
            };
            if let Err(error) = loaded.override_listen(overrides) {
                report(&config, &[error]);
                return ExitCode::from(2);
            }
            init_logging(&loaded.logging);
            match crate::serve::serve(loaded) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("isthmus: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `isthmus check-config`: every error of the file, or what it sets up.
fn check_config(config: &std::path::Path) -> ExitCode {
    match load_config(config) {
        Ok(loaded) => {
            println!(
                "{}: ok ({} model{}, {} upstream pool{})",
                config.display(),
                loaded.models.len(),
                if loaded.models.len() == 1 { "" } else { "s" },
                loaded.upstreams.len(),
                if loaded.upstreams.len() == 1 { "" } else { "s" }
            );
            for model in &loaded.models {
                println!("  {}", model.kv_summary());
            }
            for line in plan_summary(&loaded) {
                println!("  {line}");
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// llama.cpp reports every step of loading at info level; operators see its warnings unless
/// they ask for more by naming it in the filter.
const LLAMA_CPP_DEFAULT_FILTER: &str = "llama-cpp-2=warn";

/// Pingora's debug and trace messages print the bytes of requests it could not parse
/// (headers with `Authorization` and `api-key` among them, a chunked body): left at info
/// when the gateway's default level is `debug` or `trace`, unless the filter names Pingora
/// itself.
const PINGORA_DEFAULT_FILTER: &str = "pingora_core=info,pingora_proxy=info,pingora_http=info";

fn init_logging(logging: &config::LoggingConfig) {
    let directive = std::env::var("ISTHMUS_LOG").unwrap_or_else(|_| logging.level.clone());
    let directive = if directive.contains("llama") {
        directive
    } else {
        format!("{directive},{LLAMA_CPP_DEFAULT_FILTER}")
    };
    // Only where the default level is below info: a target directive sets a level both ways,
    // and Pingora must not log at info under a default of warn.
    let verbose = directive
        .split(',')
        .filter(|part| !part.contains('='))
        .any(|level| matches!(level.trim(), "debug" | "trace"));
    let directive = if verbose && !directive.contains("pingora") {
        format!("{directive},{PINGORA_DEFAULT_FILTER}")
    } else {
        directive
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directive)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log write that fails (a full disk under a redirected stderr) is dropped: reporting
    // it on stderr would fail the same way, and that report panics the thread that logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match logging.format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
    report_panics_without_data(std::env::var_os(PANIC_MESSAGES_VARIABLE).is_some_and(|v| v == "1"));
}

/// Set to `1`, panics are logged with every message, data included.
const PANIC_MESSAGES_VARIABLE: &str = "ISTHMUS_PANIC_MESSAGES";

/// Reports a panic as an error log line: the thread, where, and the message only when it is
/// text written into the program (`panic!("...")`, `expect("...")`). A message formatted
/// while running can quote what the code failed on — a string slice out of bounds quotes the
/// string, which may be a prompt — so it is withheld unless `show_formatted`.
fn report_panics_without_data(show_formatted: bool) {
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let location = info.location().map_or_else(String::new, |location| {
            format!(
                "{}:{}:{}",
                location.file(),
                location.line(),
                location.column()
            )
        });
        let message = panic_message(info.payload(), show_formatted);
        tracing::error!(thread, location, message, "a thread panicked");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            eprintln!("{backtrace}");
        }
    }));
}

/// What of a panic's message may be logged (see [`report_panics_without_data`]).
fn panic_message(payload: &(dyn std::any::Any + Send), show_formatted: bool) -> &str {
    if let Some(message) = payload.downcast_ref::<&'static str>() {
        return message;
    }
    match payload.downcast_ref::<String>() {
        Some(message) if show_formatted => message,
        Some(_) => PANIC_MESSAGE_WITHHELD,
        None => "(not text)",
    }
}

const PANIC_MESSAGE_WITHHELD: &str = "(withheld: formatted at run time, it may quote request data; ISTHMUS_PANIC_MESSAGES=1 shows it)";

/// `isthmus build-info`: what packaging needs to know about this binary.
/// What `check-config` says beyond the models: callers and their limits, stored responses,
/// browser origins, trusted proxies, and how the file reloads.
fn plan_summary(config: &Config) -> Vec<String> {
    let auth = &config.auth;
    let limited = auth
        .api_keys
        .iter()
        .filter(|key| key.limits.is_limited())
        .count();
    let rotating = auth
        .api_keys
        .iter()
        .filter(|key| key.file.is_some())
        .count();
    let mut lines = vec![format!(
        "callers: {} API key{} ({limited} with rate limits or a daily budget, {rotating} read from files){}",
        auth.api_keys.len(),
        if auth.api_keys.len() == 1 { "" } else { "s" },
        if auth.allow_anonymous {
            if auth.anonymous_limits_per_client {
                "; anonymous callers allowed, with limits for each client address"
            } else if auth.anonymous_limits.is_limited() {
                "; anonymous callers allowed, with limits"
            } else {
                "; anonymous callers allowed, without limits"
            }
        } else {
            ""
        }
    )];
    let responses = &config.responses;
    if responses.store {
        lines.push(format!(
            "stored responses: on, {} h, up to {} MiB ({}; {}) in {}",
            responses.retention.as_secs() / 3_600,
            responses.bytes_max >> 20,
            if responses.keep_sensitive {
                "sensitive conversations kept too"
            } else {
                "sensitive conversations not kept"
            },
            responses.encryption_key.as_ref().map_or_else(
                || "kept as JSON, unencrypted".to_owned(),
                |key| format!("sealed with AES-256-GCM key {}", key.id())
            ),
            config
                .server
                .state_dir
                .join(crate::response_store::STORE_DIR)
                .display()
        ));
    }
    let cors = &config.cors;
    if cors.any_origin {
        lines.push("browsers: pages of any origin may call the gateway (cors)".to_owned());
    } else if !cors.allow_origins.is_empty() {
        lines.push(format!(
            "browsers: pages of {} may call the gateway (cors); other origins get 403",
            cors.allow_origins.join(", ")
        ));
    }
    let proxies = &config.server.trusted_proxies;
    if !proxies.is_empty() {
        let blocks: Vec<String> = proxies.iter().map(ToString::to_string).collect();
        let header = match config.server.forwarded_header {
            crate::client_address::ForwardedHeader::XForwardedFor => "X-Forwarded-For",
            crate::client_address::ForwardedHeader::Forwarded => "Forwarded (for=)",
        };
        lines.push(format!(
            "clients: {header} believed from {} (server.trusted_proxies)",
            blocks.join(", ")
        ));
    }
    lines.push(match config.server.config_watch_interval {
        Some(interval) => format!(
            "reload: SIGHUP, the admin API, and this file (and key files) read every {} ms",
            interval.as_millis()
        ),
        None => {
            "reload: SIGHUP or the admin API (server.config_watch_interval_ms is off)".to_owned()
        }
    });
    lines
}

fn build_info() -> serde_json::Value {
    let modules: Vec<serde_json::Value> = edge_runtime::backends::cpu_modules()
        .into_iter()
        .map(|(file, sha256)| serde_json::json!({"file": file, "sha256": sha256}))
        .collect();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "llama_source_fingerprint": edge_runtime::backends::source_fingerprint(),
        "cpu_backend_modules": modules,
        "build_backends_dir": edge_runtime::backends::build_dir(),
    })
}

#[cfg(test)]
mod tests;
