//! `isthmus probe`: one GET (or, with `--post`, one empty POST such as a reload) to the
//! loopback admin listener, for Kubernetes `exec` probes and scripts in images that carry no
//! HTTP client.
//!
//! A sidecar keeps its admin listener on loopback (no token needed, nothing exposed), where
//! the kubelet's `httpGet` probes, sent to the pod's address, cannot reach it; the probe runs
//! inside the container instead and exits 0 on a 200, 1 on any other answer or no answer.
//! Plain HTTP only: off loopback the admin listener speaks TLS and wants a token, so such an
//! address is refused with a message.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// The most of an answer read, in bytes (status line, headers and body).
const RESPONSE_BYTES_MAX: u64 = 64 * 1024;

/// What went wrong with a probe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    #[error(
        "{0} is not a loopback address: off loopback the admin listener speaks TLS and needs a token"
    )]
    NotLoopback(SocketAddr),
    #[error("path `{0}` must start with `/` and hold no spaces or control characters")]
    Path(String),
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

/// Sends `GET path` (`POST` with an empty body when `post`) to `address` and reads the
/// answer, each step within `timeout`.
pub fn probe(
    address: SocketAddr,
    path: &str,
    post: bool,
    timeout: Duration,
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
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = if post { "POST" } else { "GET" };
    let length = if post { "Content-Length: 0\r\n" } else { "" };
    write!(
        stream,
        "{request} {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: isthmus-probe\r\n{length}Connection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut bytes = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    parse_answer(&String::from_utf8_lossy(&bytes))
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
pub fn run(address: SocketAddr, path: &str, post: bool, timeout: Duration) -> ExitCode {
    match probe(address, path, post, timeout) {
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
