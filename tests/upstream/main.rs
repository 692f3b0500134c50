//! `fake-upstream`: a fast OpenAI-compatible server that stands in for a cloud upstream in
//! end-to-end tests and in the gateway-overhead benchmark.
//!
//! It answers chat and text completions with a fixed number of words (as JSON or as
//! server-sent events), over HTTP/1.1 and HTTP/2, plain or TLS (optionally requiring a client
//! certificate), answers embeddings with vectors made from its inputs' hashes, and records
//! what it received. With `--control`, tests read that record and
//! change its behaviour (injected error statuses, held streams, slow first bytes, requests on
//! a used connection dropped unanswered) through
//! `/_control/*`. No model, no inference: every answer is made of constants, so the gateway's
//! own overhead is what a benchmark against it measures.
//!
//! On start it prints one JSON line, `{"listening":"ADDR","name":"NAME"}`, to stdout, and then
//! serves until SIGTERM or SIGINT (exit status 0).

mod control;
mod openai;
mod service;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::control::State;
use crate::service::Connection;

/// Longest a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Longest an HTTP/1 client may take to send a request's headers.
const HEADER_READ_TIMEOUT_MS: u64 = 30_000;
/// Concurrent HTTP/2 streams per connection.
const H2_STREAMS_MAX: u32 = 1024;
/// Pause after a failed `accept` (out of file descriptors, say) before trying again.
const ACCEPT_RETRY_MS: u64 = 10;
/// Most completion tokens an answer may have.
const TOKENS_MAX: u32 = 100_000;

/// A fake OpenAI-compatible upstream for tests and benchmarks.
#[derive(Debug, Parser)]
#[command(name = "fake-upstream")]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed on start).
    #[arg(long)]
    listen: SocketAddr,
    /// Name reported in `x-upstream-name` and in the start line.
    #[arg(long)]
    name: String,
    /// Server certificate chain (PEM): serve HTTPS, ALPN h2 and http/1.1.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM): require a client certificate signed by one of them (mTLS).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Accept plain-text HTTP/2 with prior knowledge as well as HTTP/1.1.
    #[arg(long, conflicts_with = "tls_cert")]
    h2c: bool,
    /// Completion tokens (words) per answer.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=i64::from(TOKENS_MAX)))]
    tokens: u32,
    /// Enable the `/_control/*` endpoints (request log, behaviour, release, stats).
    #[arg(long)]
    control: bool,
}

/// How connections are served, fixed at start.
#[derive(Clone)]
enum Transport {
    /// Plain text; `h2c` also accepts HTTP/2 with prior knowledge.
    Plain {
        h2c: bool,
    },
    Tls(tokio_rustls::TlsAcceptor),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let transport = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let config = tls::server_config(cert, key, args.client_ca.as_deref())?;
            Transport::Tls(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        }
        _ => Transport::Plain { h2c: args.h2c },
    };
    let state: &'static State =
        Box::leak(Box::new(State::new(&args.name, args.tokens, args.control)?));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    // Handlers first: a SIGTERM right after the start line must stop it cleanly.
    let mut shutdown = std::pin::pin!(shutdown_signal()?);
    announce(address, &args.name)?;

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    tokio::spawn(serve(stream, state, transport.clone()));
                }
                Err(error) => {
                    eprintln!("fake-upstream: accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    Ok(())
}

/// Prints the start line that harnesses wait for.
fn announce(address: SocketAddr, name: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let line = serde_json::json!({"listening": address.to_string(), "name": name});
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").context("writing the start line")?;
    stdout.flush().context("flushing the start line")
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

/// Serves one accepted connection until the client closes it.
async fn serve(stream: TcpStream, state: &'static State, transport: Transport) {
    let open = state.stats.connection_opened();
    let id = open.id;
    // Answers are small and often streamed a chunk at a time: send each at once.
    let _ = stream.set_nodelay(true);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS));
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(H2_STREAMS_MAX);
    // Errors on a connection (a client that resets, a bad request line) end that connection
    // and concern nobody else; the client sees them.
    match transport {
        Transport::Plain { h2c } => {
            let builder = if h2c { builder } else { builder.http1_only() };
            let connection = Arc::new(Connection {
                id,
                tls: false,
                client_common_name: None,
                answered: AtomicU64::new(0),
                served: AtomicBool::new(false),
            });
            let service = service::service(state, connection);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
        Transport::Tls(acceptor) => {
            let handshake = tokio::time::timeout(
                Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS),
                acceptor.accept(stream),
            );
            let stream = match handshake.await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    eprintln!("fake-upstream: TLS handshake failed: {error}");
                    return;
                }
                Err(_) => {
                    eprintln!("fake-upstream: TLS handshake timed out");
                    return;
                }
            };
            let session = stream.get_ref().1;
            let h2 = session.alpn_protocol() == Some(b"h2".as_slice());
            let connection = Arc::new(Connection {
                id,
                tls: true,
                client_common_name: session
                    .peer_certificates()
                    .and_then(|certificates| certificates.first())
                    .and_then(tls::common_name),
                answered: AtomicU64::new(0),
                served: AtomicBool::new(false),
            });
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let service = service::service(state, connection);
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    }
}
