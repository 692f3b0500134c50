//! First-start TLS: a local certificate authority and a server certificate signed by it.
//!
//! On first start [`provision_tls`] creates, in `<state>/tls/` (mode 0700):
//!
//! | file             | what                                                      | mode |
//! |------------------|-----------------------------------------------------------|------|
//! | `ca.pem`         | the local CA certificate: what clients trust              | 0644 |
//! | `ca-key.pem`     | the CA's private key (PKCS #8)                            | 0600 |
//! | `server.pem`     | the server certificate, then the CA certificate (a chain) | 0644 |
//! | `server-key.pem` | the server's private key (PKCS #8)                        | 0600 |
//! | `.provision.lock`| held while provisioning, so two processes never interleave | 0600 |
//!
//! A replaced CA's files are kept once as `ca.pem.old` and `ca-key.pem.old`.
//!
//! On later starts it reuses them when they still hold, re-issues only the server certificate
//! when that alone is stale (so clients keep trusting the same `ca.pem`), and replaces the CA
//! only when the CA itself is unusable, saying so with a warning that names the files.
//!
//! The certificates follow the profile that strict verifiers require (OpenSSL 3 with
//! `-x509_strict`, Python 3.13's default `ssl` context which sets `VERIFY_X509_STRICT`,
//! rustls/webpki): ECDSA P-256 keys; a CA with critical `basicConstraints CA:TRUE, pathlen:0`,
//! critical `keyUsage` (keyCertSign, cRLSign, digitalSignature) and a subject key identifier; a
//! server certificate with `basicConstraints CA:FALSE`, critical `keyUsage digitalSignature`,
//! `extendedKeyUsage serverAuth`, every host in `subjectAltName` (IP literals as IP entries),
//! subject and authority key identifiers; random positive serial numbers; `notBefore` an hour
//! in the past for clock skew.
//!
//! The decision (reuse, renew or replace) is a pure function of the stored bytes, the requested
//! hosts and `now`: `assess_ca` and `assess_server_cert`. The stored chain is checked with
//! the same WebPKI verifier that rustls clients use, and freshly issued material goes through
//! the same checks before it is written, so what is written is what a later start reuses.
//! Key material is never logged.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SanType, SerialNumber,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::x509::X509Version;

use crate::files::{
    self, DirectoryLock, PRIVATE_DIRECTORY_MODE, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE, StagedFile,
    io_reason,
};
use crate::state::StateDir;

#[cfg(test)]
mod tests;

/// How long the local CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long a server certificate is valid (never beyond the CA's end of validity).
pub const SERVER_CERT_VALIDITY_DAYS: i64 = 365;
/// A certificate that expires in less than this is renewed (server) or replaced (CA).
pub const RENEWAL_MARGIN_DAYS: i64 = 30;
/// How far in the past `notBefore` is set, so that clients whose clock is a little behind
/// accept a certificate issued just now.
pub const NOT_BEFORE_BACKDATE_SECONDS: i64 = 3600;

/// File names inside `<state>/tls/`.
const CA_CERT_FILE_NAME: &str = "ca.pem";
const CA_KEY_FILE_NAME: &str = "ca-key.pem";
const SERVER_CERT_FILE_NAME: &str = "server.pem";
const SERVER_KEY_FILE_NAME: &str = "server-key.pem";
const LOCK_FILE_NAME: &str = ".provision.lock";
/// Suffix of the copy of a CA certificate or key kept when the CA is replaced.
const REPLACED_SUFFIX: &str = ".old";

/// Largest PEM file we read; ours are under 2 KiB.
const PEM_FILE_BYTES_MAX: u64 = 64 * 1024;
/// X.520 upper bound for a common name.
const COMMON_NAME_CHARS_MAX: usize = 64;
/// Serial numbers: 16 random bytes (126 bits of entropy once made positive and fixed-length).
const SERIAL_NUMBER_BYTES: usize = 16;
const ORGANIZATION_NAME: &str = "Isthmus";
const CA_COMMON_NAME_PREFIX: &str = "Isthmus local CA ";

/// Where the provisioned files are and what provisioning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedTls {
    /// `<tls>/ca.pem`: what clients trust.
    pub ca_cert_path: PathBuf,
    /// `<tls>/ca-key.pem`, mode 0600.
    pub ca_key_path: PathBuf,
    /// `<tls>/server.pem`: the server certificate, then the CA certificate.
    pub cert_path: PathBuf,
    /// `<tls>/server-key.pem`, mode 0600.
    pub key_path: PathBuf,
    /// SHA-256 of the CA certificate's DER, uppercase hex pairs joined by `:`, as browsers and
    /// `openssl x509 -fingerprint -sha256` show it.
    pub ca_fingerprint_sha256: String,
    pub outcome: ProvisionOutcome,
    /// Why the server certificate was renewed or the CA replaced; `None` when the files were
    /// reused or created on first start.
    pub reason: Option<RenewalReason>,
    /// When the server certificate expires (the gateway may schedule a restart before).
    pub server_cert_not_after: OffsetDateTime,
}

/// What [`provision_tls`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisionOutcome {
    /// There was no CA: a CA and a server certificate were created.
    Created,
    /// The CA and the server certificate were valid and were reused unchanged.
    Reused,
    /// The CA was kept and the server certificate (and its key) re-issued.
    ServerCertRenewed,
    /// A CA existed but was unusable: it was replaced (previous files kept with an `.old`
    /// suffix) and clients must trust the new `ca.pem`.
    CaReplaced,
}

impl fmt::Display for ProvisionOutcome {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            ProvisionOutcome::Created => "created",
            ProvisionOutcome::Reused => "reused",
            ProvisionOutcome::ServerCertRenewed => "server certificate renewed",
            ProvisionOutcome::CaReplaced => "ca replaced",
        })
    }
}

/// Why provisioning did not reuse what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewalReason {
    Ca(CaProblem),
    ServerCert(ServerCertProblem),
}

impl fmt::Display for RenewalReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenewalReason::Ca(problem) => problem.fmt(formatter),
            RenewalReason::ServerCert(problem) => problem.fmt(formatter),
        }
    }
}

/// Why a stored CA cannot be used (an outcome, not an error: the CA is then replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaProblem {
    CertificateMissing,
    KeyMissing,
    CertificateUnparseable(String),
    KeyUnparseable(String),
    KeyMismatch,
    NotUsableAsCa(String),
    Expired { not_after: OffsetDateTime },
    ExpiresSoon { not_after: OffsetDateTime },
}

impl fmt::Display for CaProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaProblem::CertificateMissing => write!(formatter, "the CA certificate is missing"),
            CaProblem::KeyMissing => write!(formatter, "the CA key is missing"),
            CaProblem::CertificateUnparseable(detail) => {
                write!(formatter, "the CA certificate cannot be parsed: {detail}")
            }
            CaProblem::KeyUnparseable(detail) => {
                write!(formatter, "the CA key cannot be parsed: {detail}")
            }
            CaProblem::KeyMismatch => {
                write!(formatter, "the CA key does not match the CA certificate")
            }
            CaProblem::NotUsableAsCa(detail) => {
                write!(
                    formatter,
                    "the CA certificate is not usable as a CA: {detail}"
                )
            }
            CaProblem::Expired { not_after } => {
                write!(
                    formatter,
                    "the CA certificate expired at {}",
                    rfc3339(*not_after)
                )
            }
            CaProblem::ExpiresSoon { not_after } => write!(
                formatter,
                "the CA certificate expires at {}, within {RENEWAL_MARGIN_DAYS} days",
                rfc3339(*not_after)
            ),
        }
    }
}

/// Why a stored server certificate is not reused (an outcome: it is then re-issued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCertProblem {
    CertificateMissing,
    KeyMissing,
    CertificateUnparseable(String),
    KeyUnparseable(String),
    KeyMismatch,
    /// The certificates after the first in `server.pem` are not exactly the current CA.
    ChainOutdated,
    /// It lacks something strict verifiers require (made by an older version, or edited).
    ProfileOutdated(String),
    NotYetValid {
        not_before: OffsetDateTime,
    },
    Expired {
        not_after: OffsetDateTime,
    },
    ExpiresSoon {
        not_after: OffsetDateTime,
    },
    HostNotCovered {
        host: String,
    },
    Rejected {
        host: String,
        reason: String,
    },
}

impl fmt::Display for ServerCertProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerCertProblem::CertificateMissing => {
                write!(formatter, "the server certificate is missing")
            }
            ServerCertProblem::KeyMissing => write!(formatter, "the server key is missing"),
            ServerCertProblem::CertificateUnparseable(detail) => {
                write!(
                    formatter,
                    "the server certificate cannot be parsed: {detail}"
                )
            }
            ServerCertProblem::KeyUnparseable(detail) => {
                write!(formatter, "the server key cannot be parsed: {detail}")
            }
            ServerCertProblem::KeyMismatch => {
                write!(
                    formatter,
                    "the server key does not match the server certificate"
                )
            }
            ServerCertProblem::ChainOutdated => write!(
                formatter,
                "the chain in {SERVER_CERT_FILE_NAME} does not end with the current CA certificate"
            ),
            ServerCertProblem::ProfileOutdated(detail) => write!(
                formatter,
                "the server certificate lacks what strict verifiers require: {detail}"
            ),
            ServerCertProblem::NotYetValid { not_before } => write!(
                formatter,
                "the server certificate is not valid before {}",
                rfc3339(*not_before)
            ),
            ServerCertProblem::Expired { not_after } => write!(
                formatter,
                "the server certificate expired at {}",
                rfc3339(*not_after)
            ),
            ServerCertProblem::ExpiresSoon { not_after } => write!(
                formatter,
                "the server certificate expires at {}, within {RENEWAL_MARGIN_DAYS} days",
                rfc3339(*not_after)
            ),
            ServerCertProblem::HostNotCovered { host } => {
                write!(
                    formatter,
                    "the server certificate does not cover host `{host}`"
                )
            }
            ServerCertProblem::Rejected { host, reason } => write!(
                formatter,
                "the server certificate fails verification for `{host}`: {reason}"
            ),
        }
    }
}

/// Why TLS could not be provisioned.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("no hosts to put in the server certificate")]
    NoHosts,
    #[error("host `{host}` is neither an IP address nor a valid DNS name")]
    InvalidHost { host: String },
    #[error("{} exists and is not a directory", .path.display())]
    NotADirectory { path: PathBuf },
    #[error("creating {}: {}", .path.display(), io_reason(.io))]
    CreateDirectory { path: PathBuf, io: io::Error },
    #[error("locking {}: {}", .path.display(), io_reason(.io))]
    Lock { path: PathBuf, io: io::Error },
    #[error("reading {}: {}", .path.display(), io_reason(.io))]
    Read { path: PathBuf, io: io::Error },
    #[error("writing {}: {}", .path.display(), io_reason(.io))]
    Write { path: PathBuf, io: io::Error },
    #[error("setting permissions of {}: {}", .path.display(), io_reason(.io))]
    Permissions { path: PathBuf, io: io::Error },
    #[error("keeping {} as {}: {}", .path.display(), .kept_path.display(), io_reason(.io))]
    KeepReplaced {
        path: PathBuf,
        kept_path: PathBuf,
        io: io::Error,
    },
    #[error("generating {what}: {reason}")]
    Generate {
        what: &'static str,
        reason: rcgen::Error,
    },
    #[error("drawing random bytes for a certificate serial number failed")]
    Random,
    #[error("the newly issued {what} fails its own check: {problem}")]
    SelfCheck { what: &'static str, problem: String },
}

/// Provisions (first start) or reuses (later starts) a local CA and a server certificate signed
/// by it, for `hosts`: DNS names and IP literals; the caller passes e.g.
/// `["localhost", "127.0.0.1", "::1", <host name>]` (see [`default_tls_hosts`]).
///
/// Hosts are normalised (trimmed, DNS names lowercased without a trailing dot, `[v6]` brackets
/// removed, duplicates dropped); one that is neither an IP address nor a valid DNS name is an
/// error. `now` decides validity; this function reads no clock ([`provision_tls_now`] does).
///
/// Reuse needs: the CA certificate and key parse and match, the CA has the CA profile and is
/// valid for at least [`RENEWAL_MARGIN_DAYS`] more; the server chain verifies against the CA
/// for every host at `now` (webpki), its key matches, it has the strict profile and stays valid
/// for at least [`RENEWAL_MARGIN_DAYS`] more. A CA that is not yet valid at `now` is kept (the
/// clock is behind, which replacing the CA would not fix) and a warning is logged.
pub fn provision_tls(
    state: &StateDir,
    hosts: &[String],
    now: OffsetDateTime,
) -> Result<ProvisionedTls, ProvisionError> {
    let hosts = normalize_hosts(hosts)?;
    let paths = TlsPaths::new(state.tls_dir());
    prepare_tls_directory(&paths.directory)?;
    let _lock = DirectoryLock::acquire(&paths.lock).map_err(|io| ProvisionError::Lock {
        path: paths.lock.clone(),
        io,
    })?;

    let stored = StoredTls::read(&paths)?;
    let label = host_label(&hosts);
    let (outcome, reason, ca, server_cert_not_after) = match assess_ca(
        stored.ca_cert.as_deref(),
        stored.ca_key.as_deref(),
        now,
    ) {
        CaAssessment::Absent => {
            let (ca, not_after) = create_all(&paths, &hosts, &label, now)?;
            (ProvisionOutcome::Created, None, ca, not_after)
        }
        CaAssessment::Unusable(problem) => {
            tracing::warn!(
                ca_cert_path = %paths.ca_cert.display(),
                ca_key_path = %paths.ca_key.display(),
                problem = %problem,
                "replacing the local CA; the previous files are kept with an `{REPLACED_SUFFIX}` \
                 suffix and clients must trust the new CA certificate"
            );
            keep_replaced(&paths.ca_cert)?;
            keep_replaced(&paths.ca_key)?;
            let (ca, not_after) = create_all(&paths, &hosts, &label, now)?;
            (
                ProvisionOutcome::CaReplaced,
                Some(RenewalReason::Ca(problem)),
                ca,
                not_after,
            )
        }
        CaAssessment::Usable(ca) => {
            let ca = *ca;
            if now < ca.not_before {
                tracing::warn!(
                    ca_cert_path = %paths.ca_cert.display(),
                    ca_not_before = %rfc3339(ca.not_before),
                    now = %rfc3339(now),
                    "the clock is behind the local CA's start of validity; keeping the CA"
                );
            }
            let (outcome, reason, not_after) =
                reuse_or_renew_server_cert(&paths, &stored, &ca, &hosts, &label, now)?;
            (outcome, reason, ca, not_after)
        }
    };

    let provisioned = ProvisionedTls {
        ca_fingerprint_sha256: fingerprint_sha256(&ca.cert_der),
        ca_cert_path: paths.ca_cert,
        ca_key_path: paths.ca_key,
        cert_path: paths.server_cert,
        key_path: paths.server_key,
        outcome,
        reason,
        server_cert_not_after,
    };
    log_provisioned(&provisioned, &hosts);
    Ok(provisioned)
}

/// With a usable CA: reuses the stored server certificate, or re-issues it (and its key).
fn reuse_or_renew_server_cert(
    paths: &TlsPaths,
    stored: &StoredTls,
    ca: &LoadedCa,
    hosts: &[Host],
    label: &str,
    now: OffsetDateTime,
) -> Result<(ProvisionOutcome, Option<RenewalReason>, OffsetDateTime), ProvisionError> {
    let assessment = assess_server_cert(
        stored.server_cert.as_deref(),
        stored.server_key.as_deref(),
        ca,
        hosts,
        now,
    );
    match assessment {
        Ok(server) => {
            restrict_key_file(&paths.ca_key)?;
            restrict_key_file(&paths.server_key)?;
            Ok((ProvisionOutcome::Reused, None, server.not_after))
        }
        Err(problem) => {
            let issued = issue_server_cert(ca, hosts, label, now)?;
            write_files(
                &paths.directory,
                &[
                    (
                        &paths.server_key,
                        issued.key_pem.as_bytes(),
                        PRIVATE_FILE_MODE,
                    ),
                    (
                        &paths.server_cert,
                        issued.chain_pem.as_bytes(),
                        PUBLIC_FILE_MODE,
                    ),
                ],
            )?;
            Ok((
                ProvisionOutcome::ServerCertRenewed,
                Some(RenewalReason::ServerCert(problem)),
                issued.not_after,
            ))
        }
    }
}

/// [`provision_tls`] at the current time of the system clock.
pub fn provision_tls_now(
    state: &StateDir,
    hosts: &[String],
) -> Result<ProvisionedTls, ProvisionError> {
    provision_tls(state, hosts, OffsetDateTime::now_utc())
}

/// The local host name (from `/proc/sys/kernel/hostname`, else `/etc/hostname`), if any.
pub fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .into_iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .find_map(|text| parse_host_name(&text))
}

/// The hosts the gateway's certificate should cover by default: `localhost`, `127.0.0.1`,
/// `::1` and the host name when it is a valid DNS name.
pub fn default_tls_hosts() -> Vec<String> {
    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if let Some(name) = host_name() {
        let name = name.to_ascii_lowercase();
        if name != "localhost" && DnsName::try_from(name.as_str()).is_ok() {
            hosts.push(name);
        }
    }
    hosts
}

/// The first non-empty, non-comment line of a host name file; `(none)` is the kernel's "unset".
fn parse_host_name(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .filter(|line| *line != "(none)")
        .map(str::to_owned)
}

/// A host the server certificate must cover.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Dns(DnsName<'static>),
    Ip(IpAddr),
}

impl Host {
    fn server_name(&self) -> ServerName<'static> {
        match self {
            Host::Dns(name) => ServerName::DnsName(name.clone()),
            Host::Ip(address) => ServerName::IpAddress((*address).into()),
        }
    }

    fn subject_alt_name(&self) -> Result<SanType, rcgen::Error> {
        Ok(match self {
            Host::Dns(name) => SanType::DnsName(name.as_ref().to_owned().try_into()?),
            Host::Ip(address) => SanType::IpAddress(*address),
        })
    }
}

impl fmt::Display for Host {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Dns(name) => formatter.write_str(name.as_ref()),
            Host::Ip(address) => address.fmt(formatter),
        }
    }
}

/// Validates and normalises the requested hosts, keeping their order.
fn normalize_hosts(hosts: &[String]) -> Result<Vec<Host>, ProvisionError> {
    let mut normalized: Vec<Host> = Vec::with_capacity(hosts.len());
    for raw in hosts {
        let trimmed = raw.trim();
        let unbracketed = trimmed
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(trimmed);
        let host = match unbracketed.parse::<IpAddr>() {
            Ok(address) => Host::Ip(address),
            Err(_) => {
                let name = trimmed.strip_suffix('.').unwrap_or(trimmed);
                let name = DnsName::try_from(name.to_ascii_lowercase())
                    .map_err(|_| ProvisionError::InvalidHost { host: raw.clone() })?;
                Host::Dns(name)
            }
        };
        if !normalized.contains(&host) {
            normalized.push(host);
        }
    }
    if normalized.is_empty() {
        return Err(ProvisionError::NoHosts);
    }
    Ok(normalized)
}

/// The name shown in the certificates' common names: the first DNS name other than
/// `localhost` (the machine's name), else the first host.
fn host_label(hosts: &[Host]) -> String {
    hosts
        .iter()
        .find(|host| matches!(host, Host::Dns(name) if name.as_ref() != "localhost"))
        .or(hosts.first())
        .map(ToString::to_string)
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Paths of the files in `<state>/tls/`.
#[derive(Debug)]
struct TlsPaths {
    directory: PathBuf,
    ca_cert: PathBuf,
    ca_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    lock: PathBuf,
}

impl TlsPaths {
    fn new(directory: PathBuf) -> TlsPaths {
        TlsPaths {
            ca_cert: directory.join(CA_CERT_FILE_NAME),
            ca_key: directory.join(CA_KEY_FILE_NAME),
            server_cert: directory.join(SERVER_CERT_FILE_NAME),
            server_key: directory.join(SERVER_KEY_FILE_NAME),
            lock: directory.join(LOCK_FILE_NAME),
            directory,
        }
    }
}

/// The stored files' contents; `None` for a missing file.
#[derive(Debug)]
struct StoredTls {
    ca_cert: Option<Vec<u8>>,
    ca_key: Option<Vec<u8>>,
    server_cert: Option<Vec<u8>>,
    server_key: Option<Vec<u8>>,
}

impl StoredTls {
    fn read(paths: &TlsPaths) -> Result<StoredTls, ProvisionError> {
        let read = |path: &Path| {
            files::read_optional_capped(path, PEM_FILE_BYTES_MAX).map_err(|io| {
                ProvisionError::Read {
                    path: path.to_owned(),
                    io,
                }
            })
        };
        Ok(StoredTls {
            ca_cert: read(&paths.ca_cert)?,
            ca_key: read(&paths.ca_key)?,
            server_cert: read(&paths.server_cert)?,
            server_key: read(&paths.server_key)?,
        })
    }
}

/// Creates `tls/` with mode 0700, or tightens an existing one to 0700.
fn prepare_tls_directory(path: &Path) -> Result<(), ProvisionError> {
    match fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => {
            let mode = files::mode_of(path).map_err(|io| ProvisionError::Read {
                path: path.to_owned(),
                io,
            })?;
            if mode != PRIVATE_DIRECTORY_MODE {
                tracing::warn!(
                    path = %path.display(),
                    mode = format!("{mode:o}"),
                    "restricting the TLS directory to mode 700"
                );
                files::set_mode(path, PRIVATE_DIRECTORY_MODE).map_err(|io| {
                    ProvisionError::Permissions {
                        path: path.to_owned(),
                        io,
                    }
                })?;
            }
            Ok(())
        }
        Ok(_) => Err(ProvisionError::NotADirectory {
            path: path.to_owned(),
        }),
        Err(io) if io.kind() == io::ErrorKind::NotFound => files::create_private_directory(path)
            .map_err(|io| ProvisionError::CreateDirectory {
                path: path.to_owned(),
                io,
            }),
        Err(io) => Err(ProvisionError::Read {
            path: path.to_owned(),
            io,
        }),
    }
}

/// Tightens a reused key file that others can read to mode 0600, with a warning.
fn restrict_key_file(path: &Path) -> Result<(), ProvisionError> {
    let mode = files::mode_of(path).map_err(|io| ProvisionError::Read {
        path: path.to_owned(),
        io,
    })?;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "private key was readable by others; restricting it to mode 600"
        );
        files::set_mode(path, PRIVATE_FILE_MODE).map_err(|io| ProvisionError::Permissions {
            path: path.to_owned(),
            io,
        })?;
    }
    Ok(())
}

/// Keeps a copy of a file about to be replaced as `<file>.old` (a hard link, so the original
/// stays in place until the new file is renamed over it).
fn keep_replaced(path: &Path) -> Result<(), ProvisionError> {
    if !path.exists() {
        return Ok(());
    }
    let mut kept_name = path.as_os_str().to_owned();
    kept_name.push(REPLACED_SUFFIX);
    let kept_path = PathBuf::from(kept_name);
    let keep = || -> io::Result<()> {
        match fs::remove_file(&kept_path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        fs::hard_link(path, &kept_path)
    };
    keep().map_err(|io| ProvisionError::KeepReplaced {
        path: path.to_owned(),
        kept_path: kept_path.clone(),
        io,
    })
}

/// Writes a batch of files atomically one by one: all are staged (written and synced under a
/// temporary name with their final mode) before any is renamed into place, then the directory
/// is synced.
fn write_files(directory: &Path, batch: &[(&PathBuf, &[u8], u32)]) -> Result<(), ProvisionError> {
    let mut staged = Vec::with_capacity(batch.len());
    for (path, contents, mode) in batch {
        let file =
            StagedFile::write(path, contents, *mode).map_err(|io| ProvisionError::Write {
                path: (*path).clone(),
                io,
            })?;
        staged.push(file);
    }
    for file in staged {
        let path = file.final_path().to_owned();
        file.commit()
            .map_err(|io| ProvisionError::Write { path, io })?;
    }
    files::sync_directory(directory).map_err(|io| ProvisionError::Write {
        path: directory.to_owned(),
        io,
    })
}

/// Creates a CA and a server certificate and writes all four files.
fn create_all(
    paths: &TlsPaths,
    hosts: &[Host],
    label: &str,
    now: OffsetDateTime,
) -> Result<(LoadedCa, OffsetDateTime), ProvisionError> {
    let (ca, ca_key_pem) = create_ca(label, now)?;
    let issued = issue_server_cert(&ca, hosts, label, now)?;
    write_files(
        &paths.directory,
        &[
            (&paths.ca_key, ca_key_pem.as_bytes(), PRIVATE_FILE_MODE),
            (&paths.ca_cert, ca.cert_pem.as_bytes(), PUBLIC_FILE_MODE),
            (
                &paths.server_key,
                issued.key_pem.as_bytes(),
                PRIVATE_FILE_MODE,
            ),
            (
                &paths.server_cert,
                issued.chain_pem.as_bytes(),
                PUBLIC_FILE_MODE,
            ),
        ],
    )?;
    Ok((ca, issued.not_after))
}

/// A usable CA: its certificate and an issuer holding its key.
#[derive(Debug)]
struct LoadedCa {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    subject_key_identifier: Vec<u8>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// What the stored CA files amount to.
#[derive(Debug)]
enum CaAssessment {
    /// Neither file exists: first start.
    Absent,
    Unusable(CaProblem),
    Usable(Box<LoadedCa>),
}

/// Decides whether the stored CA (certificate and key, as read from disk) can be kept at `now`.
fn assess_ca(cert_pem: Option<&[u8]>, key_pem: Option<&[u8]>, now: OffsetDateTime) -> CaAssessment {
    match (cert_pem, key_pem) {
        (None, None) => CaAssessment::Absent,
        (None, Some(_)) => CaAssessment::Unusable(CaProblem::CertificateMissing),
        (Some(_), None) => CaAssessment::Unusable(CaProblem::KeyMissing),
        (Some(cert_pem), Some(key_pem)) => match load_ca(cert_pem, key_pem, now) {
            Ok(ca) => CaAssessment::Usable(Box::new(ca)),
            Err(problem) => CaAssessment::Unusable(problem),
        },
    }
}

fn load_ca(cert_pem: &[u8], key_pem: &[u8], now: OffsetDateTime) -> Result<LoadedCa, CaProblem> {
    let certificates =
        parse_pem_certificates(cert_pem).map_err(CaProblem::CertificateUnparseable)?;
    let [cert_der] = <[CertificateDer<'static>; 1]>::try_from(certificates).map_err(|found| {
        CaProblem::CertificateUnparseable(format!(
            "expected one certificate, found {}",
            found.len()
        ))
    })?;
    let cert_pem = String::from_utf8(cert_pem.to_vec())
        .map_err(|_| CaProblem::CertificateUnparseable("not UTF-8 text".to_owned()))?;
    let certificate = parse_certificate(&cert_der).map_err(CaProblem::CertificateUnparseable)?;
    let key = parse_key(key_pem).map_err(CaProblem::KeyUnparseable)?;
    if key.subject_public_key_info() != certificate.public_key().raw {
        return Err(CaProblem::KeyMismatch);
    }
    let subject_key_identifier =
        check_ca_profile(&certificate).map_err(CaProblem::NotUsableAsCa)?;
    let (not_before, not_after) =
        validity(&certificate).map_err(CaProblem::CertificateUnparseable)?;
    if now > not_after {
        return Err(CaProblem::Expired { not_after });
    }
    if not_after - now < Duration::days(RENEWAL_MARGIN_DAYS) {
        return Err(CaProblem::ExpiresSoon { not_after });
    }
    let issuer = Issuer::from_ca_cert_der(&cert_der, key)
        .map_err(|error| CaProblem::NotUsableAsCa(error.to_string()))?;
    Ok(LoadedCa {
        cert_der,
        cert_pem,
        issuer,
        subject_key_identifier,
        not_before,
        not_after,
    })
}

/// Checks what a CA certificate needs for strict verifiers and for re-issuing from it; returns
/// its subject key identifier.
fn check_ca_profile(certificate: &X509Certificate<'_>) -> Result<Vec<u8>, String> {
    if certificate.version() != X509Version::V3 {
        return Err("not an X.509 v3 certificate".to_owned());
    }
    if certificate.subject().as_raw() != certificate.issuer().as_raw() {
        return Err("not self-issued".to_owned());
    }
    // rcgen re-creates the issuer name from the subject and supports one attribute per RDN.
    if certificate
        .subject()
        .iter_rdn()
        .any(|rdn| rdn.iter().count() != 1)
    {
        return Err(
            "the subject has a relative distinguished name with other than one attribute"
                .to_owned(),
        );
    }
    match certificate.basic_constraints() {
        Ok(Some(constraints)) if constraints.critical && constraints.value.ca => {}
        Ok(_) => return Err("basicConstraints is not critical CA:TRUE".to_owned()),
        Err(error) => return Err(format!("basicConstraints: {error}")),
    }
    match certificate.key_usage() {
        Ok(Some(usage)) if usage.critical && usage.value.key_cert_sign() => {}
        Ok(_) => return Err("keyUsage is not critical with keyCertSign".to_owned()),
        Err(error) => return Err(format!("keyUsage: {error}")),
    }
    subject_key_identifier(certificate).ok_or_else(|| "subjectKeyIdentifier is missing".to_owned())
}

/// A server certificate that can be reused.
#[derive(Debug)]
struct ReusableServerCert {
    not_after: OffsetDateTime,
}

/// Decides whether the stored server chain and key can be reused with `ca` for `hosts` at `now`.
fn assess_server_cert(
    chain_pem: Option<&[u8]>,
    key_pem: Option<&[u8]>,
    ca: &LoadedCa,
    hosts: &[Host],
    now: OffsetDateTime,
) -> Result<ReusableServerCert, ServerCertProblem> {
    let chain_pem = chain_pem.ok_or(ServerCertProblem::CertificateMissing)?;
    let key_pem = key_pem.ok_or(ServerCertProblem::KeyMissing)?;
    let chain =
        parse_pem_certificates(chain_pem).map_err(ServerCertProblem::CertificateUnparseable)?;
    let (leaf_der, intermediates) = chain.split_first().ok_or_else(|| {
        ServerCertProblem::CertificateUnparseable("no certificate found".to_owned())
    })?;
    if intermediates != std::slice::from_ref(&ca.cert_der) {
        return Err(ServerCertProblem::ChainOutdated);
    }
    let leaf = parse_certificate(leaf_der).map_err(ServerCertProblem::CertificateUnparseable)?;
    let key = parse_key(key_pem).map_err(ServerCertProblem::KeyUnparseable)?;
    if key.subject_public_key_info() != leaf.public_key().raw {
        return Err(ServerCertProblem::KeyMismatch);
    }
    check_server_profile(&leaf, &ca.subject_key_identifier)
        .map_err(ServerCertProblem::ProfileOutdated)?;
    let (not_before, not_after) =
        validity(&leaf).map_err(ServerCertProblem::CertificateUnparseable)?;
    if now < not_before {
        return Err(ServerCertProblem::NotYetValid { not_before });
    }
    if now > not_after {
        return Err(ServerCertProblem::Expired { not_after });
    }
    if not_after - now < Duration::days(RENEWAL_MARGIN_DAYS) {
        return Err(ServerCertProblem::ExpiresSoon { not_after });
    }
    verify_chain(leaf_der, intermediates, &ca.cert_der, hosts, now)?;
    Ok(ReusableServerCert { not_after })
}

/// Checks what strict verifiers require of a server certificate beyond webpki's checks.
fn check_server_profile(
    certificate: &X509Certificate<'_>,
    ca_subject_key_identifier: &[u8],
) -> Result<(), String> {
    if certificate.version() != X509Version::V3 {
        return Err("not an X.509 v3 certificate".to_owned());
    }
    match certificate.basic_constraints() {
        Ok(Some(constraints)) if !constraints.value.ca => {}
        Ok(Some(_)) => return Err("basicConstraints says CA:TRUE".to_owned()),
        Ok(None) => return Err("basicConstraints is missing".to_owned()),
        Err(error) => return Err(format!("basicConstraints: {error}")),
    }
    match certificate.key_usage() {
        Ok(Some(usage)) if usage.critical && usage.value.digital_signature() => {}
        Ok(_) => return Err("keyUsage is not critical with digitalSignature".to_owned()),
        Err(error) => return Err(format!("keyUsage: {error}")),
    }
    match certificate.extended_key_usage() {
        Ok(Some(usage)) if usage.value.server_auth => {}
        Ok(_) => return Err("extendedKeyUsage lacks serverAuth".to_owned()),
        Err(error) => return Err(format!("extendedKeyUsage: {error}")),
    }
    match certificate.subject_alternative_name() {
        Ok(Some(names)) if !names.value.general_names.is_empty() => {}
        Ok(_) => return Err("subjectAltName is missing".to_owned()),
        Err(error) => return Err(format!("subjectAltName: {error}")),
    }
    if subject_key_identifier(certificate).is_none() {
        return Err("subjectKeyIdentifier is missing".to_owned());
    }
    match authority_key_identifier(certificate) {
        Some(identifier) if identifier == ca_subject_key_identifier => Ok(()),
        Some(_) => Err("authorityKeyIdentifier does not match the CA".to_owned()),
        None => Err("authorityKeyIdentifier is missing".to_owned()),
    }
}

/// Verifies the chain for every host with rustls's WebPKI verifier at `now`.
fn verify_chain(
    leaf_der: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    ca_der: &CertificateDer<'static>,
    hosts: &[Host],
    now: OffsetDateTime,
) -> Result<(), ServerCertProblem> {
    // A CA that passed `check_ca_profile` is a valid trust anchor; should building the verifier
    // fail all the same, report it against the first host, for which verification cannot pass.
    let first_host = hosts.first().map(ToString::to_string).unwrap_or_default();
    let rejected = |reason: String| ServerCertProblem::Rejected {
        host: first_host.clone(),
        reason,
    };
    let mut roots = RootCertStore::empty();
    roots
        .add(ca_der.clone())
        .map_err(|error| rejected(format!("the CA is not a usable trust anchor: {error}")))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|error| rejected(error.to_string()))?;
    let seconds = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(seconds));
    for host in hosts {
        let result =
            verifier.verify_server_cert(leaf_der, intermediates, &host.server_name(), &[], at);
        match result {
            Ok(_) => {}
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {
                return Err(ServerCertProblem::HostNotCovered {
                    host: host.to_string(),
                });
            }
            Err(error) => {
                return Err(ServerCertProblem::Rejected {
                    host: host.to_string(),
                    reason: error.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// A freshly issued server certificate: the chain (server then CA) and the key, as PEM.
#[derive(Debug)]
struct IssuedServerCert {
    chain_pem: String,
    key_pem: String,
    not_after: OffsetDateTime,
}

/// Creates a CA for `label` valid from an hour before `now` for [`CA_VALIDITY_DAYS`]. Returns it
/// as loaded back through [`load_ca`] (so that it is exactly what a later start will reuse)
/// and its key as PEM.
fn create_ca(label: &str, now: OffsetDateTime) -> Result<(LoadedCa, String), ProvisionError> {
    let generate = |what: &'static str| move |reason| ProvisionError::Generate { what, reason };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("the CA key"))?;
    let key_pem = key.serialize_pem();
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(&format!("{CA_COMMON_NAME_PREFIX}{label}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial_number()?);
    params.not_before = now - Duration::seconds(NOT_BEFORE_BACKDATE_SECONDS);
    params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    let certified =
        CertifiedIssuer::self_signed(params, key).map_err(generate("the CA certificate"))?;
    let ca = load_ca(certified.pem().as_bytes(), key_pem.as_bytes(), now).map_err(|problem| {
        ProvisionError::SelfCheck {
            what: "CA certificate",
            problem: problem.to_string(),
        }
    })?;
    Ok((ca, key_pem))
}

/// Issues a server certificate for `hosts` from `ca`, valid from an hour before `now` for
/// [`SERVER_CERT_VALIDITY_DAYS`] or until the CA expires, whichever is first, and checks it with
/// [`assess_server_cert`] before returning it.
fn issue_server_cert(
    ca: &LoadedCa,
    hosts: &[Host],
    label: &str,
    now: OffsetDateTime,
) -> Result<IssuedServerCert, ProvisionError> {
    let generate = |what: &'static str| move |reason| ProvisionError::Generate { what, reason };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate("the server key"))?;
    let key_pem = key.serialize_pem();
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(label);
    params.subject_alt_names = hosts
        .iter()
        .map(Host::subject_alt_name)
        .collect::<Result<_, _>>()
        .map_err(generate("the server certificate's names"))?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial_number()?);
    params.not_before = now - Duration::seconds(NOT_BEFORE_BACKDATE_SECONDS);
    params.not_after = (now + Duration::days(SERVER_CERT_VALIDITY_DAYS)).min(ca.not_after);
    let certificate = params
        .signed_by(&key, &ca.issuer)
        .map_err(generate("the server certificate"))?;
    let mut chain_pem = certificate.pem();
    if !chain_pem.ends_with('\n') {
        chain_pem.push('\n');
    }
    chain_pem.push_str(&ca.cert_pem);
    let reusable = assess_server_cert(
        Some(chain_pem.as_bytes()),
        Some(key_pem.as_bytes()),
        ca,
        hosts,
        now,
    )
    .map_err(|problem| ProvisionError::SelfCheck {
        what: "server certificate",
        problem: problem.to_string(),
    })?;
    Ok(IssuedServerCert {
        chain_pem,
        key_pem,
        not_after: reusable.not_after,
    })
}

/// `O=Isthmus, CN=<common name>` (the common name cut to the X.520 bound).
fn distinguished_name(common_name: &str) -> DistinguishedName {
    let common_name: String = common_name.chars().take(COMMON_NAME_CHARS_MAX).collect();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION_NAME);
    name.push(DnType::CommonName, common_name);
    name
}

/// A random positive serial number of exactly [`SERIAL_NUMBER_BYTES`] bytes.
fn random_serial_number() -> Result<SerialNumber, ProvisionError> {
    let mut bytes = [0_u8; SERIAL_NUMBER_BYTES];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| ProvisionError::Random)?;
    // Clear the sign bit (positive) and set the next (no leading zero octet to drop).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// All `CERTIFICATE` blocks of a PEM file.
fn parse_pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| error.to_string())
}

fn parse_certificate<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((rest, _)) if !rest.is_empty() => Err("trailing data after the certificate".to_owned()),
        Ok((_, certificate)) => Ok(certificate),
        Err(error) => Err(error.to_string()),
    }
}

fn parse_key(pem: &[u8]) -> Result<KeyPair, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not UTF-8 text".to_owned())?;
    KeyPair::from_pem(text).map_err(|error| error.to_string())
}

fn validity(certificate: &X509Certificate<'_>) -> Result<(OffsetDateTime, OffsetDateTime), String> {
    let convert = |timestamp: i64| {
        OffsetDateTime::from_unix_timestamp(timestamp).map_err(|error| error.to_string())
    };
    let validity = certificate.validity();
    Ok((
        convert(validity.not_before.timestamp())?,
        convert(validity.not_after.timestamp())?,
    ))
}

fn subject_key_identifier(certificate: &X509Certificate<'_>) -> Option<Vec<u8>> {
    certificate
        .iter_extensions()
        .find_map(|extension| match extension.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(identifier) => Some(identifier.0.to_vec()),
            _ => None,
        })
}

fn authority_key_identifier(certificate: &X509Certificate<'_>) -> Option<Vec<u8>> {
    certificate
        .iter_extensions()
        .find_map(|extension| match extension.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(identifier) => identifier
                .key_identifier
                .as_ref()
                .map(|identifier| identifier.0.to_vec()),
            _ => None,
        })
}

/// SHA-256 of `der`, uppercase hex pairs joined by `:`.
fn fingerprint_sha256(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|byte| hex::encode_upper([*byte]))
        .collect::<Vec<_>>()
        .join(":")
}

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339)
        .unwrap_or_else(|_| format!("@{}", at.unix_timestamp()))
}

fn log_provisioned(provisioned: &ProvisionedTls, hosts: &[Host]) {
    let hosts = hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let reason = provisioned
        .reason
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    tracing::info!(
        outcome = %provisioned.outcome,
        reason = %reason,
        ca_cert_path = %provisioned.ca_cert_path.display(),
        ca_fingerprint_sha256 = %provisioned.ca_fingerprint_sha256,
        cert_path = %provisioned.cert_path.display(),
        server_cert_not_after = %rfc3339(provisioned.server_cert_not_after),
        hosts = %hosts,
        "tls provisioned; clients trust the CA certificate at ca_cert_path"
    );
}
