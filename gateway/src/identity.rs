//! Upstream authentication for cloud pools: the header each forwarded request carries.
//!
//! A pool's `[upstreams.NAME.auth]` table is read into [`RawUpstreamAuth`] and checked by
//! [`compile`] into an [`UpstreamAuth`], which answers [`UpstreamAuth::header`] for every
//! forwarded request. Static secrets (bearer tokens, API keys, client secrets) are read from
//! files or environment variables once, at compile time, so a missing or bad secret is a
//! configuration error. Entra ID tokens (Azure Arc managed identity, AKS workload identity,
//! client credentials) are fetched on demand, cached, refreshed before they expire by one
//! fetch shared between concurrent callers, and the old token is served while a refresh
//! fails. Files that rotate (the federated token) are read at each fetch.
//!
//! Secrets never reach logs, `Debug` output or error messages: values are wrapped in types
//! whose `Debug` redacts them, header values are marked sensitive, and descriptions returned
//! by token endpoints are scrubbed of the secrets sent to them.
//!
//! Token requests go out on this module's own `reqwest` client (no redirects, plain HTTP only
//! to loopback hosts, trust roots from the system bundle plus an optional `ca_file`); the
//! inference path never uses it.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header::AUTHORIZATION;
use http::{HeaderName, HeaderValue, StatusCode};
use reqwest::Url;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;
use tokio::io::AsyncReadExt;

/// How long one token fetch may take, every request of it (Arc's challenge round trip)
/// and reading the response included.
const TOKEN_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token endpoint response read.
const TOKEN_RESPONSE_BYTES_MAX: u64 = 64 * 1024;
/// Largest secret file the Arc agent may point its challenge at.
const ARC_SECRET_BYTES_MAX: u64 = 4096;
/// Largest federated token file read.
const FEDERATED_TOKEN_BYTES_MAX: u64 = 64 * 1024;
/// Largest static secret file (`token_file`, `key_file`, `client_secret_file`) read.
const STATIC_SECRET_BYTES_MAX: u64 = 64 * 1024;
/// Largest CA file read.
const CA_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// The longest a token is kept before it is fetched again, whatever its endpoint said.
const TOKEN_LIFETIME_MAX: Duration = Duration::from_secs(24 * 60 * 60);
/// A token is refreshed when this much of its life, or half of it if less, remains.
const REFRESH_MARGIN_MAX: Duration = Duration::from_secs(5 * 60);
/// After a failed fetch, callers get the cached token or the failure until this has passed.
const FETCH_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Longest error description kept from a token endpoint's answer.
const ERROR_DESCRIPTION_CHARS_MAX: usize = 300;
/// Headers a static key may not be sent in (lower case, as `HeaderName` spells them): those
/// the forwarder sets on every request and those that frame or route a connection.
const RESERVED_HEADERS: [&str; 15] = [
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept",
    "x-request-id",
    "traceparent",
    "tracestate",
];

/// The Arc agent's API version.
const ARC_API_VERSION: &str = "2020-06-01";
const ARC_ENDPOINT_DEFAULT: &str = "http://localhost:40342/metadata/identity/oauth2/token";
const ARC_TOKENS_DIR_DEFAULT: &str = "/var/opt/azcmagent/tokens";
const AUTHORITY_HOST_DEFAULT: &str = "https://login.microsoftonline.com/";
pub(crate) const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const ENTRA_SCOPE_SUFFIX: &str = "/.default";

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// `[upstreams.NAME.auth]` as written, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RawUpstreamAuth {
    /// `kind = "none"`: requests go out without credentials.
    None {},
    /// `kind = "bearer"`: `authorization: Bearer <token>`.
    Bearer(RawBearer),
    /// `kind = "api_key"`: `<header>: <key>`.
    ApiKey(RawApiKey),
    /// `kind = "arc_managed_identity"`: Entra tokens from the Azure Arc agent.
    ArcManagedIdentity(RawArcManagedIdentity),
    /// `kind = "workload_identity"`: Entra tokens for a federated (Kubernetes) token.
    WorkloadIdentity(RawWorkloadIdentity),
    /// `kind = "client_credentials"`: Entra tokens for an application's client secret.
    ClientCredentials(RawClientCredentials),
}

/// `kind = "bearer"`: exactly one of `token_file`, `token_env`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBearer {
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
}

/// `kind = "api_key"`: exactly one of `key_file`, `key_env`; `header` defaults to `api-key`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub key_env: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
}

/// `kind = "arc_managed_identity"`: exactly one of `resource`, `scope`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArcManagedIdentity {
    #[serde(default)]
    pub resource: Option<String>,
    /// An Entra scope (`https://cognitiveservices.azure.com/.default`); the resource is the
    /// scope without `/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Default: `IDENTITY_ENDPOINT`, else the agent's local endpoint.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Default: `/var/opt/azcmagent/tokens`.
    #[serde(default)]
    pub tokens_dir: Option<PathBuf>,
    /// A user-assigned identity's client id.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `kind = "workload_identity"`: unset keys come from the environment the workload identity
/// webhook injects.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkloadIdentity {
    #[serde(default)]
    pub scope: Option<String>,
    /// Default: `AZURE_CLIENT_ID`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Default: `AZURE_TENANT_ID`.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// The federated token, read at each fetch. Default: `AZURE_FEDERATED_TOKEN_FILE`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Default: `AZURE_AUTHORITY_HOST`, else `https://login.microsoftonline.com/`.
    #[serde(default)]
    pub authority_host: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `kind = "client_credentials"`: exactly one of `client_secret_file`, `client_secret_env`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientCredentials {
    #[serde(default)]
    pub tenant_id: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub client_secret_env: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    /// Default: `https://login.microsoftonline.com/`.
    #[serde(default)]
    pub authority_host: Option<String>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for RawUpstreamAuth {
    /// A pool with no `auth` table sends no credentials.
    fn default() -> Self {
        RawUpstreamAuth::None {}
    }
}

impl RawUpstreamAuth {
    /// Takes the relative paths written in the configuration relative to `base` (the
    /// configuration file's directory). Paths from environment variables are left alone.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |path: &mut Option<PathBuf>| {
            if let Some(relative) = path.as_ref().filter(|path| path.is_relative()) {
                *path = Some(base.join(relative));
            }
        };
        match self {
            RawUpstreamAuth::None {} => {}
            RawUpstreamAuth::Bearer(raw) => resolve(&mut raw.token_file),
            RawUpstreamAuth::ApiKey(raw) => resolve(&mut raw.key_file),
            RawUpstreamAuth::ArcManagedIdentity(raw) => {
                resolve(&mut raw.tokens_dir);
                resolve(&mut raw.ca_file);
            }
            RawUpstreamAuth::WorkloadIdentity(raw) => {
                resolve(&mut raw.token_file);
                resolve(&mut raw.ca_file);
            }
            RawUpstreamAuth::ClientCredentials(raw) => {
                resolve(&mut raw.client_secret_file);
                resolve(&mut raw.ca_file);
            }
        }
    }
}

/// Checks `raw` (found at key path `key`, such as `upstreams.aks.auth`) and reads its static
/// secrets; `env` reads environment variables. Every problem is reported, each message
/// starting with the key path it concerns.
pub fn compile(
    raw: RawUpstreamAuth,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamAuth, Vec<String>> {
    compile_with(raw, key, env, CacheOptions::default())
}

/// How Entra token caches tell time and how long they wait: tests pass their own.
#[derive(Clone)]
struct CacheOptions {
    clock: Clock,
    fetch_timeout: Duration,
}

type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            clock: Arc::new(Instant::now),
            fetch_timeout: TOKEN_FETCH_TIMEOUT,
        }
    }
}

fn compile_with(
    raw: RawUpstreamAuth,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    options: CacheOptions,
) -> Result<UpstreamAuth, Vec<String>> {
    // An empty variable counts as unset, as it does for the Azure SDKs.
    let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
    let source = raw.clone();
    let mut checker = Checker {
        key,
        env: &env,
        problems: Vec::new(),
        secret_files: Vec::new(),
    };
    let inner = match raw {
        RawUpstreamAuth::None {} => Some(Inner::None),
        RawUpstreamAuth::Bearer(raw) => checker.bearer(raw),
        RawUpstreamAuth::ApiKey(raw) => checker.api_key(raw),
        RawUpstreamAuth::ArcManagedIdentity(raw) => {
            checker.arc_managed_identity(raw).map(|(source, client)| {
                Inner::Entra(Arc::new(TokenCache::new(source, client, options)))
            })
        }
        RawUpstreamAuth::WorkloadIdentity(raw) => {
            checker.workload_identity(raw).map(|(source, client)| {
                Inner::Entra(Arc::new(TokenCache::new(source, client, options)))
            })
        }
        RawUpstreamAuth::ClientCredentials(raw) => {
            checker.client_credentials(raw).map(|(source, client)| {
                Inner::Entra(Arc::new(TokenCache::new(source, client, options)))
            })
        }
    };
    match inner {
        Some(inner) if checker.problems.is_empty() => Ok(UpstreamAuth {
            inner,
            secret_files: checker.secret_files.into(),
            source: Some(source),
        }),
        _ => Err(checker.problems),
    }
}

/// Collects every problem of one auth table.
struct Checker<'a> {
    key: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<String>,
    secret_files: Vec<(PathBuf, [u8; 32])>,
}

impl Checker<'_> {
    /// A problem with the whole table (`field` empty) or with one of its keys.
    fn problem(&mut self, field: &str, message: impl fmt::Display) {
        if field.is_empty() {
            self.problems.push(format!("{}: {message}", self.key));
        } else {
            self.problems
                .push(format!("{}.{field}: {message}", self.key));
        }
    }

    fn bearer(&mut self, raw: RawBearer) -> Option<Inner> {
        let token = self.static_secret(
            ("token_file", raw.token_file.as_deref()),
            ("token_env", raw.token_env.as_deref()),
        )?;
        let field = if raw.token_file.is_some() {
            "token_file"
        } else {
            "token_env"
        };
        let value = self.header_value(field, &format!("Bearer {}", token.0))?;
        Some(Inner::Static {
            kind: "bearer",
            name: AUTHORIZATION,
            value,
        })
    }

    fn api_key(&mut self, raw: RawApiKey) -> Option<Inner> {
        let name = match raw.header.as_deref() {
            None => Some(HeaderName::from_static("api-key")),
            Some(name) => match HeaderName::from_bytes(name.as_bytes()) {
                Err(_) => {
                    self.problem("header", format!("`{name}` is not a valid header name"));
                    None
                }
                // The gateway writes these itself (framing, routing, tracing): a key in one
                // of them would replace the value the request needs, or break its framing.
                Ok(parsed) if RESERVED_HEADERS.contains(&parsed.as_str()) => {
                    self.problem(
                        "header",
                        format!(
                            "`{name}` is a header the gateway sets itself; name the header \
                             the backend reads the key from (e.g. api-key, x-api-key)"
                        ),
                    );
                    None
                }
                Ok(parsed) => Some(parsed),
            },
        };
        let key = self.static_secret(
            ("key_file", raw.key_file.as_deref()),
            ("key_env", raw.key_env.as_deref()),
        );
        let field = if raw.key_file.is_some() {
            "key_file"
        } else {
            "key_env"
        };
        let value = self.header_value(field, &key?.0)?;
        Some(Inner::Static {
            kind: "api_key",
            name: name?,
            value,
        })
    }

    fn arc_managed_identity(
        &mut self,
        raw: RawArcManagedIdentity,
    ) -> Option<(TokenSource, reqwest::Client)> {
        let resource = match (raw.resource, raw.scope) {
            (Some(resource), None) => self.non_empty("resource", resource),
            (None, Some(scope)) => match scope.strip_suffix(ENTRA_SCOPE_SUFFIX) {
                Some(resource) if !resource.trim().is_empty() => Some(resource.to_owned()),
                _ => {
                    self.problem(
                        "scope",
                        "must end in /.default (managed identity asks for a resource)",
                    );
                    None
                }
            },
            _ => {
                self.problem("", "set exactly one of resource or scope");
                None
            }
        };
        let client_id = raw
            .client_id
            .map(|client_id| self.non_empty("client_id", client_id));
        let (endpoint_text, origin) = match (raw.endpoint, (self.env)("IDENTITY_ENDPOINT")) {
            (Some(endpoint), _) => (endpoint, None),
            (None, Some(endpoint)) => (endpoint, Some("IDENTITY_ENDPOINT")),
            (None, None) => (ARC_ENDPOINT_DEFAULT.to_owned(), None),
        };
        let endpoint = self.endpoint("endpoint", &endpoint_text, origin);
        let tokens_dir = raw
            .tokens_dir
            .unwrap_or_else(|| PathBuf::from(ARC_TOKENS_DIR_DEFAULT));
        if tokens_dir.is_relative() {
            self.problem(
                "tokens_dir",
                format!("must be an absolute path: {}", tokens_dir.display()),
            );
        } else if !tokens_dir.is_dir() {
            self.problem(
                "tokens_dir",
                format!("directory not found: {}", tokens_dir.display()),
            );
        }
        let client = self.client(endpoint.as_ref(), raw.ca_file.as_deref());
        let source = ArcSource {
            endpoint_label: label(endpoint.as_ref()?),
            endpoint: endpoint?,
            resource: resource?,
            client_id: client_id.flatten(),
            tokens_dir,
        };
        Some((TokenSource::Arc(source), client?))
    }

    fn workload_identity(
        &mut self,
        raw: RawWorkloadIdentity,
    ) -> Option<(TokenSource, reqwest::Client)> {
        let scope = self.required("scope", raw.scope, None);
        let client_id = self.required("client_id", raw.client_id, Some("AZURE_CLIENT_ID"));
        let tenant_id = self.required("tenant_id", raw.tenant_id, Some("AZURE_TENANT_ID"));
        let tenant_id = tenant_id.and_then(|tenant_id| self.tenant_id(tenant_id));
        let token_file = match raw.token_file {
            Some(path) => Some(path),
            None => match (self.env)("AZURE_FEDERATED_TOKEN_FILE") {
                Some(path) => Some(PathBuf::from(path)),
                None => {
                    self.problem(
                        "token_file",
                        "missing (set it or AZURE_FEDERATED_TOKEN_FILE)",
                    );
                    None
                }
            },
        };
        if let Some(path) = &token_file
            && !path.is_file()
        {
            self.problem("token_file", format!("file not found: {}", path.display()));
        }
        let token_url = self.token_url(raw.authority_host, true, tenant_id.as_deref());
        let client = self.client(token_url.as_ref(), raw.ca_file.as_deref());
        let source = WorkloadSource {
            token_label: label(token_url.as_ref()?),
            token_url: token_url?,
            client_id: client_id?,
            scope: scope?,
            token_file: token_file?,
        };
        Some((TokenSource::Workload(source), client?))
    }

    fn client_credentials(
        &mut self,
        raw: RawClientCredentials,
    ) -> Option<(TokenSource, reqwest::Client)> {
        let tenant_id = self.required("tenant_id", raw.tenant_id, None);
        let tenant_id = tenant_id.and_then(|tenant_id| self.tenant_id(tenant_id));
        let client_id = self.required("client_id", raw.client_id, None);
        let scope = self.required("scope", raw.scope, None);
        let client_secret = self.static_secret(
            ("client_secret_file", raw.client_secret_file.as_deref()),
            ("client_secret_env", raw.client_secret_env.as_deref()),
        );
        let token_url = self.token_url(raw.authority_host, false, tenant_id.as_deref());
        let client = self.client(token_url.as_ref(), raw.ca_file.as_deref());
        let source = ClientCredentialsSource {
            token_label: label(token_url.as_ref()?),
            token_url: token_url?,
            client_id: client_id?,
            scope: scope?,
            client_secret: client_secret?,
        };
        Some((TokenSource::ClientCredentials(source), client?))
    }

    /// A secret from exactly one of a file and an environment variable, trimmed.
    fn static_secret(
        &mut self,
        (file_field, file): (&str, Option<&Path>),
        (env_field, name): (&str, Option<&str>),
    ) -> Option<Secret> {
        match (file, name) {
            (Some(path), None) => match read_capped_sync(path, STATIC_SECRET_BYTES_MAX) {
                Ok(bytes) => match String::from_utf8(bytes) {
                    Ok(text) if !text.trim().is_empty() => {
                        self.secret_files
                            .push((path.to_owned(), crate::config::sha256(text.trim())));
                        Some(Secret(text.trim().to_owned()))
                    }
                    Ok(_) => {
                        self.problem(file_field, format!("{} is empty", path.display()));
                        None
                    }
                    Err(_) => {
                        self.problem(file_field, format!("{} is not UTF-8", path.display()));
                        None
                    }
                },
                Err(error) => {
                    self.problem(file_field, error);
                    None
                }
            },
            (None, Some(name)) => match (self.env)(name) {
                Some(value) => Some(Secret(value.trim().to_owned())),
                None => {
                    self.problem(
                        env_field,
                        format!("environment variable {name} is not set or empty"),
                    );
                    None
                }
            },
            _ => {
                self.problem(
                    "",
                    format!("set exactly one of {file_field} or {env_field}"),
                );
                None
            }
        }
    }

    /// A sensitive header value; the message never repeats the text.
    fn header_value(&mut self, field: &str, text: &str) -> Option<HeaderValue> {
        match HeaderValue::from_str(text) {
            Ok(mut value) => {
                value.set_sensitive(true);
                Some(value)
            }
            Err(_) => {
                self.problem(field, "the secret holds characters not allowed in a header");
                None
            }
        }
    }

    fn non_empty(&mut self, field: &str, value: String) -> Option<String> {
        if value.trim().is_empty() {
            self.problem(field, "must not be empty");
            None
        } else {
            Some(value.trim().to_owned())
        }
    }

    /// A key that must be set, in the table or (where `variable` names one) the environment.
    fn required(
        &mut self,
        field: &str,
        value: Option<String>,
        variable: Option<&str>,
    ) -> Option<String> {
        match (value, variable) {
            (Some(value), _) => self.non_empty(field, value),
            (None, Some(variable)) => (self.env)(variable)
                .map(|value| value.trim().to_owned())
                .or_else(|| {
                    self.problem(field, format!("missing (set it or {variable})"));
                    None
                }),
            (None, None) => {
                self.problem(field, "missing");
                None
            }
        }
    }

    /// A tenant id or domain goes into the token URL's path, so it is held to those letters.
    fn tenant_id(&mut self, tenant_id: String) -> Option<String> {
        let valid = tenant_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            && !tenant_id.starts_with('.');
        if valid {
            Some(tenant_id)
        } else {
            self.problem(
                "tenant_id",
                "must be a tenant id or domain (letters, digits, '-', '.')",
            );
            None
        }
    }

    /// `{authority_host}{tenant_id}/oauth2/v2.0/token`.
    fn token_url(
        &mut self,
        authority_host: Option<String>,
        host_from_env: bool,
        tenant_id: Option<&str>,
    ) -> Option<Url> {
        let (text, origin) = match authority_host {
            Some(text) => (text, None),
            None => match host_from_env
                .then(|| (self.env)("AZURE_AUTHORITY_HOST"))
                .flatten()
            {
                Some(text) => (text, Some("AZURE_AUTHORITY_HOST")),
                None => (AUTHORITY_HOST_DEFAULT.to_owned(), None),
            },
        };
        let text = if text.ends_with('/') {
            text
        } else {
            format!("{text}/")
        };
        let host = self.endpoint("authority_host", &text, origin)?;
        host.join(&format!("{}/oauth2/v2.0/token", tenant_id?)).ok()
    }

    /// An endpoint URL: https, or plain http to a loopback host; no credentials in it.
    fn endpoint(&mut self, field: &str, text: &str, origin: Option<&str>) -> Option<Url> {
        let from = origin
            .map(|variable| format!(" (from {variable})"))
            .unwrap_or_default();
        match check_endpoint(text) {
            Ok(url) => Some(url),
            Err(reason) => {
                self.problem(field, format!("{reason}{from}"));
                None
            }
        }
    }

    /// The token client for `endpoint`: trust roots only where it speaks TLS. `ca_file` is
    /// checked even when the endpoint is not usable.
    fn client(
        &mut self,
        endpoint: Option<&Url>,
        ca_file: Option<&Path>,
    ) -> Option<reqwest::Client> {
        let mut roots = rustls::RootCertStore::empty();
        let mut usable = true;
        if let Some(path) = ca_file {
            match read_ca_file(path) {
                Ok(certificates) => {
                    for certificate in certificates {
                        if roots.add(certificate).is_err() {
                            self.problem(
                                "ca_file",
                                format!(
                                    "{} holds a certificate that is not a usable CA",
                                    path.display()
                                ),
                            );
                            usable = false;
                        }
                    }
                }
                Err(reason) => {
                    self.problem("ca_file", reason);
                    usable = false;
                }
            }
        }
        let endpoint = endpoint?;
        let tls = endpoint.scheme() == "https";
        if tls && let Ok(bundle) = std::fs::read(SYSTEM_CA_BUNDLE) {
            let certificates = CertificateDer::pem_slice_iter(&bundle).filter_map(Result::ok);
            roots.add_parsable_certificates(certificates);
        }
        if tls && usable && roots.is_empty() {
            self.problem(
                "",
                format!(
                    "no trust roots for {}: {SYSTEM_CA_BUNDLE} is missing; set ca_file",
                    label(endpoint)
                ),
            );
            return None;
        }
        if !usable {
            return None;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_config = match rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
            Err(error) => {
                self.problem("", format!("cannot configure TLS: {error}"));
                return None;
            }
        };
        let mut builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(TOKEN_FETCH_TIMEOUT)
            .timeout(TOKEN_FETCH_TIMEOUT)
            .user_agent(concat!("isthmus/", env!("CARGO_PKG_VERSION")));
        if is_loopback(endpoint) {
            builder = builder.no_proxy();
        }
        match builder.build() {
            Ok(client) => Some(client),
            Err(error) => {
                self.problem(
                    "",
                    format!("cannot build the token client: {}", chain(&error)),
                );
                None
            }
        }
    }
}

/// Parses an endpoint and holds it to https, or plain http to a loopback host.
fn check_endpoint(text: &str) -> Result<Url, String> {
    let url = Url::parse(text.trim()).map_err(|error| format!("not a URL ({error}): {text}"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not hold credentials".to_owned());
    }
    if url.host().is_none() {
        return Err(format!("has no host: {text}"));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(format!(
            "plain http is allowed only to loopback hosts (localhost, 127.0.0.0/8, ::1): {text}"
        )),
        scheme => Err(format!("scheme {scheme} is not http or https: {text}")),
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

/// An endpoint as errors and `Debug` name it: no query.
fn label(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.set_fragment(None);
    url.to_string()
}

pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_capped_sync(path, CA_FILE_BYTES_MAX)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{} is not PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certificates)
}

/// Reads at most `bytes_max` bytes of a file; the messages name the file, never its content.
fn read_capped_sync(path: &Path, bytes_max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|error| match error.kind() {
        std::io::ErrorKind::NotFound => format!("file not found: {}", path.display()),
        _ => format!("cannot read {}: {error}", path.display()),
    })?;
    let mut bytes = Vec::new();
    file.take(bytes_max + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    if bytes.len() as u64 > bytes_max {
        return Err(format!(
            "{} is larger than {bytes_max} bytes",
            path.display()
        ));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Runtime
// ---------------------------------------------------------------------------------------------

/// A pool's upstream credentials: cheap to clone, shared by every request to the pool.
#[derive(Clone, Default)]
pub struct UpstreamAuth {
    inner: Inner,
    /// The secret files read, with the SHA-256 of the secret each held: the configuration
    /// watcher reloads when one changes (a rotated Kubernetes Secret).
    secret_files: Arc<[(PathBuf, [u8; 32])]>,
    /// The table as written, to tell whether a reload changed it.
    source: Option<RawUpstreamAuth>,
}

#[derive(Clone, Default)]
enum Inner {
    #[default]
    None,
    Static {
        kind: &'static str,
        name: HeaderName,
        value: HeaderValue,
    },
    Entra(Arc<TokenCache>),
}

impl UpstreamAuth {
    /// The header to add to each forwarded request, `None` for `kind = "none"`. Entra kinds
    /// fetch a token when none is cached or the cached one is due for refresh.
    pub async fn header(&self) -> Result<Option<(HeaderName, HeaderValue)>, AuthError> {
        match &self.inner {
            Inner::None => Ok(None),
            Inner::Static { name, value, .. } => Ok(Some((name.clone(), value.clone()))),
            Inner::Entra(cache) => Ok(Some((AUTHORIZATION, cache.token().await?))),
        }
    }

    /// A backend refused the credentials sent (401, 403): a cached Entra token is dropped,
    /// so that the next request fetches a new one (at most once per [`FETCH_RETRY_DELAY`],
    /// whatever the rate of refusals). A static secret changes only with its file, which the
    /// configuration watcher follows.
    pub fn rejected(&self) {
        if let Inner::Entra(cache) = &self.inner {
            cache.forget();
        }
    }

    /// These credentials, or `previous` when a reload left the table and its secrets as they
    /// were: an Entra token cached a moment ago stays in use instead of a fetch for every
    /// reload (a console's canary change reloads too), which would also fail every request
    /// while the token endpoint is out of reach.
    pub fn carried_over(self, previous: &UpstreamAuth) -> UpstreamAuth {
        let unchanged = self.source.is_some()
            && self.source == previous.source
            && self.secret_files == previous.secret_files;
        if unchanged { previous.clone() } else { self }
    }

    /// The secret files read, each with the SHA-256 of the trimmed secret it held.
    pub fn secret_files(&self) -> impl Iterator<Item = (&Path, [u8; 32])> {
        self.secret_files
            .iter()
            .map(|(path, sha256)| (path.as_path(), *sha256))
    }

    /// The table as written and the digests of the secrets its files held: what tells
    /// whether a reload changed these credentials (`Debug` shows no secret, so it cannot).
    pub fn identity(&self) -> String {
        let digests: Vec<String> = self
            .secret_files
            .iter()
            .map(|(path, sha256)| format!("{}={}", path.display(), hex::encode(sha256)))
            .collect();
        format!("{:?} {digests:?}", self.source)
    }

    /// The configured kind, as `kind` spells it.
    pub fn kind(&self) -> &'static str {
        match &self.inner {
            Inner::None => "none",
            Inner::Static { kind, .. } => kind,
            Inner::Entra(cache) => cache.source.kind(),
        }
    }
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("UpstreamAuth");
        debug.field("kind", &self.kind());
        match &self.inner {
            Inner::None => {}
            Inner::Static { name, .. } => {
                debug.field("header", name).field("value", &"[redacted]");
            }
            Inner::Entra(cache) => {
                debug.field("source", &cache.source);
            }
        }
        debug.finish()
    }
}

/// Why no upstream credential could be had. No variant carries a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token request to {endpoint} failed: {reason}")]
    Request { endpoint: String, reason: String },
    #[error("token request to {endpoint} timed out after {timeout_ms} ms")]
    Timeout { endpoint: String, timeout_ms: u64 },
    #[error("token endpoint {endpoint} refused the request with status {status}: {code}{detail}",
        detail = description_suffix(.description))]
    Refused {
        endpoint: String,
        status: u16,
        /// The OAuth error code (`invalid_client`).
        code: String,
        description: Option<String>,
    },
    #[error("token endpoint {endpoint} answered with status {status}")]
    Status { endpoint: String, status: u16 },
    #[error("token response from {endpoint} is larger than {bytes_max} bytes")]
    ResponseTooLarge { endpoint: String, bytes_max: u64 },
    #[error("unexpected token response from {endpoint}: {reason}")]
    InvalidResponse { endpoint: String, reason: String },
    #[error("managed identity challenge from {endpoint} refused: {reason}")]
    Challenge { endpoint: String, reason: String },
    #[error("cannot read federated token file {path}: {reason}")]
    FederatedToken { path: String, reason: String },
}

fn description_suffix(description: &Option<String>) -> String {
    description
        .as_ref()
        .map(|description| format!(" ({description})"))
        .unwrap_or_default()
}

/// A secret string whose `Debug` says nothing.
#[derive(Clone)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where Entra tokens come from.
enum TokenSource {
    Arc(ArcSource),
    Workload(WorkloadSource),
    ClientCredentials(ClientCredentialsSource),
}

struct ArcSource {
    endpoint: Url,
    endpoint_label: String,
    resource: String,
    client_id: Option<String>,
    tokens_dir: PathBuf,
}

struct WorkloadSource {
    token_url: Url,
    token_label: String,
    client_id: String,
    scope: String,
    token_file: PathBuf,
}

struct ClientCredentialsSource {
    token_url: Url,
    token_label: String,
    client_id: String,
    scope: String,
    client_secret: Secret,
}

/// Names what the token is for and where it comes from; the client secret only as redacted.
impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Arc(source) => f
                .debug_struct("ArcManagedIdentity")
                .field("endpoint", &source.endpoint_label)
                .field("resource", &source.resource)
                .field("client_id", &source.client_id)
                .field("tokens_dir", &source.tokens_dir)
                .finish(),
            TokenSource::Workload(source) => f
                .debug_struct("WorkloadIdentity")
                .field("token_url", &source.token_label)
                .field("client_id", &source.client_id)
                .field("scope", &source.scope)
                .field("token_file", &source.token_file)
                .finish(),
            TokenSource::ClientCredentials(source) => f
                .debug_struct("ClientCredentials")
                .field("token_url", &source.token_label)
                .field("client_id", &source.client_id)
                .field("scope", &source.scope)
                .field("client_secret", &source.client_secret)
                .finish(),
        }
    }
}

/// A token as fetched: the header value and how long it lives from the fetch.
struct Fetched {
    value: HeaderValue,
    lifetime: Duration,
}

impl TokenSource {
    fn kind(&self) -> &'static str {
        match self {
            TokenSource::Arc(_) => "arc_managed_identity",
            TokenSource::Workload(_) => "workload_identity",
            TokenSource::ClientCredentials(_) => "client_credentials",
        }
    }

    fn endpoint_label(&self) -> &str {
        match self {
            TokenSource::Arc(source) => &source.endpoint_label,
            TokenSource::Workload(source) => &source.token_label,
            TokenSource::ClientCredentials(source) => &source.token_label,
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Fetched, AuthError> {
        match self {
            TokenSource::Arc(source) => fetch_arc(source, client).await,
            TokenSource::Workload(source) => {
                let assertion = read_federated_token(&source.token_file).await?;
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", source.client_id.as_str()),
                    ("scope", source.scope.as_str()),
                    ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                    ("client_assertion", assertion.0.as_str()),
                ];
                let request = client.post(source.token_url.clone()).form(&form);
                let response = send(request, &source.token_label).await?;
                token_from(response, &source.token_label, &[&assertion]).await
            }
            TokenSource::ClientCredentials(source) => {
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", source.client_id.as_str()),
                    ("scope", source.scope.as_str()),
                    ("client_secret", source.client_secret.0.as_str()),
                ];
                let request = client.post(source.token_url.clone()).form(&form);
                let response = send(request, &source.token_label).await?;
                token_from(response, &source.token_label, &[&source.client_secret]).await
            }
        }
    }
}

/// The Arc agent's flow: a GET answered by a challenge naming a secret file under the
/// agent's tokens directory, then the same GET with that secret as Basic credentials.
async fn fetch_arc(source: &ArcSource, client: &reqwest::Client) -> Result<Fetched, AuthError> {
    let request = || {
        let mut query = vec![
            ("api-version", ARC_API_VERSION),
            ("resource", source.resource.as_str()),
        ];
        if let Some(client_id) = &source.client_id {
            query.push(("client_id", client_id.as_str()));
        }
        client
            .get(source.endpoint.clone())
            .query(&query)
            .header("metadata", "true")
    };
    let endpoint = &source.endpoint_label;
    let response = send(request(), endpoint).await?;
    if response.status() != StatusCode::UNAUTHORIZED {
        return token_from(response, endpoint, &[]).await;
    }
    let challenge = |reason: String| AuthError::Challenge {
        endpoint: endpoint.clone(),
        reason,
    };
    let realm = response
        .headers()
        .get(http::header::WWW_AUTHENTICATE)
        .and_then(|value| value.to_str().ok())
        .and_then(challenge_realm)
        .ok_or_else(|| challenge("401 without a basic realm challenge".to_owned()))?;
    let secret = read_challenge_secret(Path::new(&realm), &source.tokens_dir)
        .await
        .map_err(challenge)?;
    let mut credentials = HeaderValue::from_str(&format!("Basic {}", secret.0)).map_err(|_| {
        challenge("the secret file holds characters not allowed in a header".to_owned())
    })?;
    credentials.set_sensitive(true);
    let response = send(request().header(AUTHORIZATION, credentials), endpoint).await?;
    token_from(response, endpoint, &[&secret]).await
}

/// The path in `Basic realm=<path>` (quotes allowed).
fn challenge_realm(header: &str) -> Option<String> {
    let (scheme, rest) = header.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let (name, value) = rest.trim().split_once('=')?;
    if !name.trim().eq_ignore_ascii_case("realm") {
        return None;
    }
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|value| value.strip_suffix('"'))
        .unwrap_or(value);
    (!value.is_empty()).then(|| value.to_owned())
}

/// Reads the secret the challenge points at, only if it is a `.key` file of at most
/// [`ARC_SECRET_BYTES_MAX`] bytes inside `tokens_dir` once both are canonicalised (so `..`
/// and symbolic links cannot lead out of it).
async fn read_challenge_secret(realm: &Path, tokens_dir: &Path) -> Result<Secret, String> {
    if realm.is_relative() {
        return Err(format!(
            "secret file {} is not an absolute path",
            realm.display()
        ));
    }
    let directory = tokio::fs::canonicalize(tokens_dir).await.map_err(|error| {
        format!(
            "cannot resolve tokens directory {}: {error}",
            tokens_dir.display()
        )
    })?;
    let path = tokio::fs::canonicalize(realm)
        .await
        .map_err(|error| format!("cannot resolve secret file {}: {error}", realm.display()))?;
    if !path.starts_with(&directory) || path == directory {
        return Err(format!(
            "secret file {} is outside the tokens directory {}",
            realm.display(),
            tokens_dir.display()
        ));
    }
    if path.extension().is_none_or(|extension| extension != "key") {
        return Err(format!(
            "secret file {} does not end in .key",
            realm.display()
        ));
    }
    let metadata = tokio::fs::metadata(&path)
        .await
        .map_err(|error| format!("cannot read secret file {}: {error}", realm.display()))?;
    if !metadata.is_file() {
        return Err(format!(
            "secret file {} is not a regular file",
            realm.display()
        ));
    }
    if metadata.len() > ARC_SECRET_BYTES_MAX {
        return Err(format!(
            "secret file {} is larger than {ARC_SECRET_BYTES_MAX} bytes",
            realm.display()
        ));
    }
    let bytes = read_capped(&path, ARC_SECRET_BYTES_MAX)
        .await
        .map_err(|error| format!("cannot read secret file {}: {error}", realm.display()))?
        .ok_or_else(|| {
            format!(
                "secret file {} is larger than {ARC_SECRET_BYTES_MAX} bytes",
                realm.display()
            )
        })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("secret file {} is not UTF-8", realm.display()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("secret file {} is empty", realm.display()));
    }
    Ok(Secret(text.to_owned()))
}

async fn read_federated_token(path: &Path) -> Result<Secret, AuthError> {
    let error = |reason: String| AuthError::FederatedToken {
        path: path.display().to_string(),
        reason,
    };
    let bytes = read_capped(path, FEDERATED_TOKEN_BYTES_MAX)
        .await
        .map_err(|io| error(io.to_string()))?
        .ok_or_else(|| error(format!("larger than {FEDERATED_TOKEN_BYTES_MAX} bytes")))?;
    let text = String::from_utf8(bytes).map_err(|_| error("not UTF-8".to_owned()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(error("empty".to_owned()));
    }
    Ok(Secret(text.to_owned()))
}

/// A file's bytes, or `None` if it is longer than `bytes_max`.
async fn read_capped(path: &Path, bytes_max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(bytes_max + 1).read_to_end(&mut bytes).await?;
    Ok((bytes.len() as u64 <= bytes_max).then_some(bytes))
}

async fn send(
    request: reqwest::RequestBuilder,
    endpoint: &str,
) -> Result<reqwest::Response, AuthError> {
    request.send().await.map_err(|error| AuthError::Request {
        endpoint: endpoint.to_owned(),
        reason: chain(&error.without_url()),
    })
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

/// Reads a token endpoint's answer: the token and its lifetime, or the refusal with any
/// of `secrets` scrubbed from its description.
async fn token_from(
    mut response: reqwest::Response,
    endpoint: &str,
    secrets: &[&Secret],
) -> Result<Fetched, AuthError> {
    let status = response.status();
    if response
        .content_length()
        .is_some_and(|length| length > TOKEN_RESPONSE_BYTES_MAX)
    {
        return Err(AuthError::ResponseTooLarge {
            endpoint: endpoint.to_owned(),
            bytes_max: TOKEN_RESPONSE_BYTES_MAX,
        });
    }
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|error| AuthError::Request {
            endpoint: endpoint.to_owned(),
            reason: chain(&error.without_url()),
        })?;
        let Some(chunk) = chunk else { break };
        if (body.len() + chunk.len()) as u64 > TOKEN_RESPONSE_BYTES_MAX {
            return Err(AuthError::ResponseTooLarge {
                endpoint: endpoint.to_owned(),
                bytes_max: TOKEN_RESPONSE_BYTES_MAX,
            });
        }
        body.extend_from_slice(&chunk);
    }
    let document = serde_json::from_slice::<serde_json::Value>(&body).ok();
    if !status.is_success() {
        let code = document
            .as_ref()
            .and_then(|document| document.get("error")?.as_str());
        return Err(match code {
            Some(code) => AuthError::Refused {
                endpoint: endpoint.to_owned(),
                status: status.as_u16(),
                code: scrub(code, secrets),
                description: document
                    .as_ref()
                    .and_then(|document| document.get("error_description")?.as_str())
                    .map(|description| scrub(description, secrets)),
            },
            None => AuthError::Status {
                endpoint: endpoint.to_owned(),
                status: status.as_u16(),
            },
        });
    }
    let invalid = |reason: &str| AuthError::InvalidResponse {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let document = document.ok_or_else(|| invalid("not JSON"))?;
    let token = document
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|token| !token.is_empty())
        .ok_or_else(|| invalid("no access_token"))?;
    let seconds = |name: &str| {
        let value = document.get(name)?;
        value
            .as_u64()
            .or_else(|| value.as_str()?.trim().parse::<u64>().ok())
    };
    let lifetime = match (seconds("expires_in"), seconds("expires_on")) {
        (Some(expires_in), _) => Duration::from_secs(expires_in),
        (None, Some(expires_on)) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            Duration::from_secs(expires_on).saturating_sub(now)
        }
        (None, None) => return Err(invalid("no expires_in or expires_on")),
    };
    // A lifetime past any real token's (an endpoint's error, `u64::MAX`) is refreshed a day
    // on, as if it said so, instead of overflowing the clock.
    let lifetime = lifetime.min(TOKEN_LIFETIME_MAX);
    if lifetime.is_zero() {
        return Err(invalid("the token has already expired"));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| invalid("the access token holds characters not allowed in a header"))?;
    value.set_sensitive(true);
    Ok(Fetched { value, lifetime })
}

/// `text` cut to [`ERROR_DESCRIPTION_CHARS_MAX`] with every secret replaced.
fn scrub(text: &str, secrets: &[&Secret]) -> String {
    let mut text: String = text.chars().take(ERROR_DESCRIPTION_CHARS_MAX).collect();
    for secret in secrets {
        if !secret.0.is_empty() {
            text = text.replace(&secret.0, "[redacted]");
        }
    }
    text
}

/// The cached Entra token of one pool, with single-flight fetching.
struct TokenCache {
    source: TokenSource,
    client: reqwest::Client,
    options: CacheOptions,
    state: Mutex<CacheState>,
    /// Held by the one caller fetching; the others wait on it or serve the old token.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    token: Option<CachedToken>,
    failure: Option<Failure>,
    /// When a backend's refusal last dropped the token.
    forgotten_at: Option<Instant>,
    /// Fetches finished, so a caller that waited for the fetch lock knows one happened.
    fetches: u64,
}

#[derive(Clone)]
struct CachedToken {
    value: HeaderValue,
    refresh_at: Instant,
    expires_at: Instant,
}

impl CachedToken {
    /// A token fetched at `fetched_at` (taken before the request, so it errs early).
    fn new(fetched: Fetched, fetched_at: Instant) -> Self {
        let margin = REFRESH_MARGIN_MAX.min(fetched.lifetime / 2);
        let expires_at = fetched_at + fetched.lifetime;
        CachedToken {
            value: fetched.value,
            refresh_at: expires_at - margin,
            expires_at,
        }
    }
}

struct Failure {
    at: Instant,
    error: AuthError,
}

/// What a caller does, given the cache and the time.
enum Plan {
    Use(HeaderValue),
    Fail(AuthError),
    /// Fetch a token; `fallback` is the still-valid token to serve if that fails.
    Fetch {
        fallback: Option<HeaderValue>,
    },
}

fn plan(state: &CacheState, now: Instant) -> Plan {
    let valid = state.token.as_ref().filter(|token| now < token.expires_at);
    if let Some(token) = valid
        && now < token.refresh_at
    {
        return Plan::Use(token.value.clone());
    }
    if let Some(failure) = &state.failure
        && now < failure.at + FETCH_RETRY_DELAY
    {
        return match valid {
            Some(token) => Plan::Use(token.value.clone()),
            None => Plan::Fail(failure.error.clone()),
        };
    }
    Plan::Fetch {
        fallback: valid.map(|token| token.value.clone()),
    }
}

impl TokenCache {
    fn new(source: TokenSource, client: reqwest::Client, options: CacheOptions) -> Self {
        TokenCache {
            source,
            client,
            options,
            state: Mutex::new(CacheState::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn now(&self) -> Instant {
        (self.options.clock)()
    }

    /// Drops the cached token (a backend refused it), at most once per
    /// [`FETCH_RETRY_DELAY`].
    fn forget(&self) {
        let now = self.now();
        let mut state = self.state();
        if state
            .forgotten_at
            .is_some_and(|at| now < at + FETCH_RETRY_DELAY)
        {
            return;
        }
        state.forgotten_at = Some(now);
        if state.token.take().is_some() {
            tracing::warn!(
                kind = self.source.kind(),
                endpoint = self.source.endpoint_label(),
                "a backend refused the upstream token: fetching a new one"
            );
        }
    }

    fn state(&self) -> MutexGuard<'_, CacheState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn token(&self) -> Result<HeaderValue, AuthError> {
        let (first, seen) = {
            let state = self.state();
            (plan(&state, self.now()), state.fetches)
        };
        let fallback = match first {
            Plan::Use(value) => return Ok(value),
            Plan::Fail(error) => return Err(error),
            Plan::Fetch { fallback } => fallback,
        };
        // A still-valid token is served while another caller refreshes it; without one,
        // callers queue behind the fetch in flight and take its outcome.
        let _fetching = match fallback {
            Some(old) => match self.fetching.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(old),
            },
            None => self.fetching.lock().await,
        };
        {
            let state = self.state();
            if state.fetches != seen {
                match plan(&state, self.now()) {
                    Plan::Use(value) => return Ok(value),
                    Plan::Fail(error) => return Err(error),
                    Plan::Fetch { .. } => {}
                }
            }
        }
        let started = self.now();
        let fetched =
            tokio::time::timeout(self.options.fetch_timeout, self.source.fetch(&self.client))
                .await
                .unwrap_or_else(|_| {
                    Err(AuthError::Timeout {
                        endpoint: self.source.endpoint_label().to_owned(),
                        timeout_ms: u64::try_from(self.options.fetch_timeout.as_millis())
                            .unwrap_or(u64::MAX),
                    })
                });
        let now = self.now();
        let mut state = self.state();
        state.fetches += 1;
        match fetched {
            Ok(fetched) => {
                tracing::debug!(
                    kind = self.source.kind(),
                    endpoint = self.source.endpoint_label(),
                    lifetime_seconds = fetched.lifetime.as_secs(),
                    "fetched an upstream token"
                );
                let token = CachedToken::new(fetched, started);
                let value = token.value.clone();
                state.token = Some(token);
                state.failure = None;
                Ok(value)
            }
            Err(error) => {
                state.failure = Some(Failure {
                    at: now,
                    error: error.clone(),
                });
                match state.token.as_ref().filter(|token| now < token.expires_at) {
                    Some(token) => {
                        tracing::warn!(
                            kind = self.source.kind(),
                            %error,
                            "upstream token refresh failed; serving the cached token until it expires"
                        );
                        Ok(token.value.clone())
                    }
                    None => Err(error),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
