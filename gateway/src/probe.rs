//! `isthmus probe`: one GET (or, with `--post`, one empty POST such as a reload) to the
//! loopback admin listener, for Kubernetes `exec` probes and scripts in images that carry no
//! HTTP client.
//!
//! A sidecar keeps its admin listener on loopback (no token needed, nothing exposed), where
//! the kubelet's `httpGet` probes, sent to the pod's address, cannot reach it; the probe runs
//! inside the container instead and exits 0 on a 200, 1 on any other answer or no answer.
//! An admin listener bound off loopback (for Prometheus in the cluster) speaks TLS and wants
//! a token on every endpoint: the probe, still sent over loopback, then presents the token
//! from an environment variable (`--token-env`) and speaks TLS to the server whose
//! certificate is the one in a file (`--tls-cert`: the gateway's own certificate, pinned, so
//! no CA or host name is involved and nothing else is trusted with the token).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// The most of an answer read, in bytes (status line, headers and body).
const RESPONSE_BYTES_MAX: u64 = 64 * 1024;

/// What went wrong with a probe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error("{0} is not a loopback address: the probe runs beside the gateway it asks")]
    NotLoopback(SocketAddr),
    #[error("path `{0}` must start with `/` and hold no spaces or control characters")]
    Path(String),
    #[error("--token-env {0}: the variable is unset, empty or not valid in a header")]
    Token(String),
    #[error("--tls-cert {}: {reason}", .path.display())]
    Certificate { path: PathBuf, reason: String },
    #[error("{address}: {reason}")]
    Io { address: SocketAddr, reason: String },
    #[error("not an HTTP/1.x answer: `{0}`")]
    Answer(String),
}

/// The answer to a probe.
#[derive(Debug, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub status: u16,
    pub body: String,
}

/// How a probe reaches an admin listener bound off loopback: the bearer token it presents,
/// and the certificate the listener must present (TLS); neither for a loopback listener.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    pub token: Option<String>,
    pub certificate: Option<CertificateDer<'static>>,
}

impl Credentials {
    /// The token from the variable `token_env`, the certificate from the first one in the
    /// PEM file `tls_cert`.
    pub fn load(token_env: Option<&str>, tls_cert: Option<&Path>) -> Result<Self, ProbeError> {
        let token = token_env
            .map(|name| {
                std::env::var(name)
                    .ok()
                    .map(|token| token.trim().to_owned())
                    .filter(|token| {
                        !token.is_empty()
                            && token
                                .bytes()
                                .all(|byte| byte.is_ascii_graphic() || byte == b' ')
                    })
                    .ok_or_else(|| ProbeError::Token(name.to_owned()))
            })
            .transpose()?;
        let certificate = tls_cert
            .map(|path| {
                let failed = |reason: String| ProbeError::Certificate {
                    path: path.to_owned(),
                    reason,
                };
                let bytes = std::fs::read(path).map_err(|error| failed(error.to_string()))?;
                CertificateDer::pem_slice_iter(&bytes)
                    .next()
                    .ok_or_else(|| failed("no PEM certificate in the file".to_owned()))?
                    .map_err(|error| failed(format!("not a PEM certificate: {error}")))
            })
            .transpose()?;
        Ok(Credentials { token, certificate })
    }
}

/// Sends `GET path` (`POST` with an empty body when `post`) to `address` and reads the
/// answer, each step within `timeout`.
pub fn probe(
    address: SocketAddr,
    path: &str,
    post: bool,
    timeout: Duration,
    credentials: &Credentials,
) -> Result<ProbeAnswer, ProbeError> {
    if !address.ip().is_loopback() {
        return Err(ProbeError::NotLoopback(address));
    }
    if !path.starts_with('/')
        || path
            .chars()
            .any(|character| character.is_whitespace() || character.is_control())
    {
        return Err(ProbeError::Path(path.to_owned()));
    }
    let io = |error: std::io::Error| ProbeError::Io {
        address,
        reason: error.to_string(),
    };
    let stream = TcpStream::connect_timeout(&address, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = if post { "POST" } else { "GET" };
    let length = if post { "Content-Length: 0\r\n" } else { "" };
    let authorization = credentials
        .token
        .as_ref()
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{request} {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: isthmus-probe\r\n{authorization}{length}Connection: close\r\n\r\n"
    );
    let bytes = match &credentials.certificate {
        None => exchange(stream, head.as_bytes()).map_err(io)?,
        Some(certificate) => {
            let config =
                pinned_client_config(certificate.clone()).map_err(|reason| ProbeError::Io {
                    address,
                    reason: format!("TLS set-up: {reason}"),
                })?;
            let connection =
                rustls::ClientConnection::new(config, ServerName::IpAddress(address.ip().into()))
                    .map_err(|error| ProbeError::Io {
                    address,
                    reason: format!("TLS set-up: {error}"),
                })?;
            exchange(
                rustls::StreamOwned::new(connection, stream),
                head.as_bytes(),
            )
            .map_err(io)?
        }
    };
    parse_answer(&String::from_utf8_lossy(&bytes))
}

/// Writes `request` and reads the answer until the server closes, at most
/// [`RESPONSE_BYTES_MAX`]. A TLS peer that closes without a close_notify has still answered.
fn exchange(mut stream: impl Read + Write, request: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.write_all(request)?;
    stream.flush()?;
    let mut bytes = Vec::new();
    match stream.take(RESPONSE_BYTES_MAX).read_to_end(&mut bytes) {
        Ok(_) => Ok(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof && !bytes.is_empty() => {
            Ok(bytes)
        }
        Err(error) => Err(error),
    }
}

/// A client configuration that trusts exactly the server presenting `certificate`.
fn pinned_client_config(
    certificate: CertificateDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned {
        certificate,
        provider: Arc::clone(&provider),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Accepts the one server certificate it was given (its key must sign the handshake), and no
/// other: the probe talks to its own gateway over loopback, whose certificate it reads from
/// the file the gateway serves.
#[derive(Debug)]
struct Pinned {
    certificate: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.certificate.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the admin listener presented another certificate than the --tls-cert file's"
                    .to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The status and body of an HTTP/1.x answer (the body as sent: the admin listener's probe
/// answers carry a length, not chunks).
pub fn parse_answer(answer: &str) -> Result<ProbeAnswer, ProbeError> {
    let status_line = answer.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse().ok(),
        _ => None,
    }
    .filter(|status| (100..=599).contains(status))
    .ok_or_else(|| ProbeError::Answer(status_line.chars().take(80).collect()))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim_end().to_owned())
        .unwrap_or_default();
    Ok(ProbeAnswer { status, body })
}

/// `isthmus probe`: 0 on a 200 (a POST's answer printed on stdout); otherwise 1, with the
/// answer or the problem on stderr.
pub fn run(
    address: SocketAddr,
    path: &str,
    post: bool,
    timeout: Duration,
    token_env: Option<&str>,
    tls_cert: Option<&Path>,
) -> ExitCode {
    let answer = Credentials::load(token_env, tls_cert)
        .and_then(|credentials| probe(address, path, post, timeout, &credentials));
    match answer {
        Ok(answer) if answer.status == 200 => {
            if post {
                println!("{}", answer.body);
            }
            ExitCode::SUCCESS
        }
        Ok(answer) => {
            eprintln!(
                "isthmus probe: {path} answered {}: {}",
                answer.status, answer.body
            );
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("isthmus probe: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests;
