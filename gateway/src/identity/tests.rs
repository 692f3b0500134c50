use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use expect_test::{Expect, expect};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{
    AuthError, CacheOptions, CacheState, CachedToken, Fetched, Plan, RawUpstreamAuth, UpstreamAuth,
    challenge_realm, check_endpoint, compile, compile_with, plan,
};

// ---------------------------------------------------------------------------------------------
// A token endpoint on 127.0.0.1 that records what it receives
// ---------------------------------------------------------------------------------------------

/// One request as the fake endpoint saw it.
#[derive(Debug, Clone)]
struct Received {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    fn query(&self) -> BTreeMap<String, String> {
        decode_pairs(self.target.split_once('?').map_or("", |(_, query)| query))
    }

    fn form(&self) -> BTreeMap<String, String> {
        decode_pairs(&self.body)
    }
}

fn decode_pairs(encoded: &str) -> BTreeMap<String, String> {
    let url = reqwest::Url::parse(&format!("http://decode/?{encoded}")).unwrap();
    url.query_pairs()
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.to_string(),
        }
    }

    fn token(token: &str, expires_in_seconds: u64) -> Reply {
        Reply::json(
            200,
            serde_json::json!({
                "token_type": "Bearer",
                "access_token": token,
                "expires_in": expires_in_seconds,
            }),
        )
    }
}

type Handler = dyn Fn(&Received, usize) -> Reply + Send + Sync;

/// A token endpoint: `handler` answers the request with its index (0 for the first).
struct FakeEndpoint {
    address: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl FakeEndpoint {
    async fn start(handler: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, handler.clone(), log.clone()));
            }
        });
        FakeEndpoint { address, received }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// Reads one HTTP/1.1 request, records it, answers it and closes the connection.
async fn answer(mut stream: TcpStream, handler: Arc<Handler>, log: Arc<Mutex<Vec<Received>>>) {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(position) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break position;
        }
        let mut chunk = [0_u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        if read == 0 || buffer.len() > 64 * 1024 {
            return;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap().split(' ');
    let method = request_line.next().unwrap().to_owned();
    let target = request_line.next().unwrap().to_owned();
    let headers: Vec<(String, String)> = lines
        .map(|line| {
            let (name, value) = line.split_once(':').unwrap();
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().unwrap());
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = [0_u8; 4096];
        let read = stream.read(&mut chunk).await.unwrap();
        assert!(read > 0, "client closed mid-body");
        body.extend_from_slice(&chunk[..read]);
    }
    let received = Received {
        method,
        target,
        headers,
        body: String::from_utf8(body).unwrap(),
    };
    let reply = {
        let mut log = log.lock().unwrap();
        let reply = handler(&received, log.len());
        log.push(received);
        reply
    };
    let mut response = format!(
        "HTTP/1.1 {} X\r\ncontent-length: {}\r\nconnection: close\r\n",
        reply.status,
        reply.body.len()
    );
    for (name, value) in &reply.headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    response.push_str(&reply.body);
    // The client may have gone (a timeout test); that is not this server's failure.
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A clock the test moves by hand.
#[derive(Clone)]
struct FakeClock(Arc<Mutex<Instant>>);

impl FakeClock {
    fn new() -> Self {
        FakeClock(Arc::new(Mutex::new(Instant::now())))
    }

    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }

    fn options(&self) -> CacheOptions {
        let now = self.0.clone();
        CacheOptions {
            clock: Arc::new(move || *now.lock().unwrap()),
            fetch_timeout: Duration::from_secs(10),
        }
    }
}

fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn raw(text: &str) -> RawUpstreamAuth {
    toml::from_str(text).unwrap()
}

/// Compiles `text` as `upstreams.aks.auth` with the fake clock, or panics with the errors.
fn compiled(text: &str, env: &[(&str, &str)], clock: &FakeClock) -> UpstreamAuth {
    match compile_with(
        raw(text),
        "upstreams.aks.auth",
        &environment(env),
        clock.options(),
    ) {
        Ok(auth) => auth,
        Err(errors) => panic!("compile failed: {errors:#?}"),
    }
}

/// The header value as text.
async fn header_text(auth: &UpstreamAuth) -> Result<String, AuthError> {
    let (name, value) = auth.header().await?.unwrap();
    assert_eq!(name, "authorization");
    assert!(value.is_sensitive());
    Ok(value.to_str().unwrap().to_owned())
}

/// Polls every future in turn until all are done, so they are all in flight together.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|context| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().map(Option::unwrap).collect()
}

fn client_credentials_table(endpoint: &FakeEndpoint) -> String {
    format!(
        r#"
        kind = "client_credentials"
        tenant_id = "contoso.onmicrosoft.com"
        client_id = "app-client-id"
        client_secret_env = "ISTHMUS_CLIENT_SECRET"
        scope = "https://cognitiveservices.azure.com/.default"
        authority_host = "{}"
        "#,
        endpoint.url("/")
    )
}

const CLIENT_SECRET: &str = "cc-secret-value-0123456789";
const CLIENT_SECRET_ENV: (&str, &str) = ("ISTHMUS_CLIENT_SECRET", CLIENT_SECRET);

// ---------------------------------------------------------------------------------------------
// Azure Arc managed identity
// ---------------------------------------------------------------------------------------------

const ARC_SECRET: &str = "arc-challenge-secret-4f9a";

fn arc_table(endpoint: &FakeEndpoint, tokens_dir: &Path) -> String {
    format!(
        r#"
        kind = "arc_managed_identity"
        scope = "https://cognitiveservices.azure.com/.default"
        endpoint = "{}"
        tokens_dir = "{}"
        client_id = "mi-client-id"
        "#,
        endpoint.url("/metadata/identity/oauth2/token"),
        tokens_dir.display()
    )
}

/// The agent: a challenge naming `realm` first, a token for any request with credentials.
async fn arc_agent(realm: PathBuf) -> FakeEndpoint {
    FakeEndpoint::start(move |request, _| {
        if request.header("authorization").is_none() {
            return Reply {
                status: 401,
                headers: vec![(
                    "www-authenticate".to_owned(),
                    format!("Basic realm={}", realm.display()),
                )],
                body: String::new(),
            };
        }
        let expires_on = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        Reply::json(
            200,
            serde_json::json!({
                "access_token": "arc-token",
                "expires_on": expires_on.to_string(),
                "expires_in": "3599",
                "resource": "https://cognitiveservices.azure.com",
                "token_type": "Bearer",
            }),
        )
    })
    .await
}

#[tokio::test]
async fn arc_challenge_flow_sends_the_secret_and_caches_the_token() {
    let tokens = tempfile::tempdir().unwrap();
    let secret_file = tokens.path().join("3e1a.key");
    std::fs::write(&secret_file, ARC_SECRET).unwrap();
    let agent = arc_agent(secret_file).await;
    let auth = compiled(&arc_table(&agent, tokens.path()), &[], &FakeClock::new());

    assert_eq!(header_text(&auth).await.unwrap(), "Bearer arc-token");
    let received = agent.received();
    assert_eq!(received.len(), 2);
    let query = BTreeMap::from(
        [
            ("api-version", "2020-06-01"),
            ("resource", "https://cognitiveservices.azure.com"),
            ("client_id", "mi-client-id"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned())),
    );
    for request in &received {
        assert_eq!(request.method, "GET");
        assert_eq!(request.path(), "/metadata/identity/oauth2/token");
        assert_eq!(request.query(), query);
        assert_eq!(request.header("metadata"), Some("true"));
    }
    assert_eq!(received[0].header("authorization"), None);
    assert_eq!(
        received[1].header("authorization"),
        Some(format!("Basic {ARC_SECRET}").as_str())
    );

    // Cached: no new request.
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer arc-token");
    assert_eq!(agent.count(), 2);
    assert!(!format!("{auth:?}").contains(ARC_SECRET));
}

/// Runs the challenge flow with the agent naming `realm`; returns the error and the number
/// of requests the agent saw.
async fn arc_refusal(realm: PathBuf, tokens_dir: &Path) -> (AuthError, usize) {
    let agent = arc_agent(realm).await;
    let auth = compiled(&arc_table(&agent, tokens_dir), &[], &FakeClock::new());
    let error = auth.header().await.unwrap_err();
    (error, agent.count())
}

/// A tokens directory and, beside it, a directory holding a secret that must not be read.
fn tokens_and_outside() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let tokens = root.path().join("tokens");
    let outside = root.path().join("outside");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let secret = outside.join("stolen.key");
    std::fs::write(&secret, "outside-secret-do-not-send").unwrap();
    (root, tokens, secret)
}

fn assert_refused(error: &AuthError, reason: &str) {
    let text = error.to_string();
    assert!(
        matches!(error, AuthError::Challenge { .. }),
        "unexpected error: {text}"
    );
    assert!(text.contains(reason), "{text:?} does not say {reason:?}");
    assert!(!text.contains("outside-secret"), "{text}");
}

#[tokio::test]
async fn arc_realm_outside_the_tokens_dir_is_refused() {
    let (_root, tokens, secret) = tokens_and_outside();
    let (error, requests) = arc_refusal(secret, &tokens).await;
    assert_refused(&error, "is outside the tokens directory");
    assert_eq!(requests, 1, "no second request may be made");
}

#[tokio::test]
async fn arc_realm_escaping_through_dot_dot_is_refused() {
    let (_root, tokens, _secret) = tokens_and_outside();
    let (error, requests) = arc_refusal(tokens.join("../outside/stolen.key"), &tokens).await;
    assert_refused(&error, "is outside the tokens directory");
    assert_eq!(requests, 1);
}

#[tokio::test]
async fn arc_realm_escaping_through_a_symlink_is_refused() {
    let (_root, tokens, secret) = tokens_and_outside();
    let link = tokens.join("link.key");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let (error, requests) = arc_refusal(link, &tokens).await;
    assert_refused(&error, "is outside the tokens directory");
    assert_eq!(requests, 1);
}

#[tokio::test]
async fn arc_secret_over_4_kib_is_refused() {
    let (_root, tokens, _secret) = tokens_and_outside();
    let big = tokens.join("big.key");
    std::fs::write(&big, "b".repeat(4097)).unwrap();
    let (error, requests) = arc_refusal(big, &tokens).await;
    assert_refused(&error, "is larger than 4096 bytes");
    assert_eq!(requests, 1);
}

#[tokio::test]
async fn arc_realm_without_key_extension_is_refused() {
    let (_root, tokens, _secret) = tokens_and_outside();
    let other = tokens.join("secret.txt");
    std::fs::write(&other, "not-a-key").unwrap();
    let (error, requests) = arc_refusal(other, &tokens).await;
    assert_refused(&error, "does not end in .key");
    assert_eq!(requests, 1);
}

#[test]
fn challenge_realms_are_parsed() {
    assert_eq!(
        challenge_realm("Basic realm=/var/opt/azcmagent/tokens/a.key").as_deref(),
        Some("/var/opt/azcmagent/tokens/a.key")
    );
    assert_eq!(
        challenge_realm(r#"basic  realm="/tmp/a b.key""#).as_deref(),
        Some("/tmp/a b.key")
    );
    assert_eq!(challenge_realm("Bearer realm=/tmp/a.key"), None);
    assert_eq!(challenge_realm("Basic charset=utf-8"), None);
    assert_eq!(challenge_realm("Basic realm="), None);
}

// ---------------------------------------------------------------------------------------------
// Workload identity and client credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn workload_identity_posts_the_federated_assertion_and_reads_the_rotated_file() {
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("azure-identity-token");
    std::fs::write(&token_file, "federated-assertion-one\n").unwrap();
    let entra =
        FakeEndpoint::start(|_, index| Reply::token(&format!("wi-token-{index}"), 600)).await;
    let clock = FakeClock::new();
    let authority = entra.url("/authority"); // no trailing slash, as the webhook may set it
    let env = [
        ("AZURE_CLIENT_ID", "wi-client-id"),
        ("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47"),
        ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", authority.as_str()),
    ];
    let auth = compiled(
        r#"
        kind = "workload_identity"
        scope = "https://cognitiveservices.azure.com/.default"
        "#,
        &env,
        &clock,
    );

    assert_eq!(header_text(&auth).await.unwrap(), "Bearer wi-token-0");
    let form = |assertion: &str| {
        BTreeMap::from(
            [
                ("client_id", "wi-client-id"),
                ("scope", "https://cognitiveservices.azure.com/.default"),
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion),
            ]
            .map(|(key, value)| (key.to_owned(), value.to_owned())),
        )
    };
    let first = &entra.received()[0];
    assert_eq!(first.method, "POST");
    assert_eq!(
        first.target,
        "/authority/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token"
    );
    assert_eq!(
        first.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(first.form(), form("federated-assertion-one"));

    // The kubelet rotates the file; the refresh (5 minutes before expiry) sends the new one.
    std::fs::write(&token_file, "federated-assertion-two").unwrap();
    clock.advance(Duration::from_secs(299));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer wi-token-0");
    assert_eq!(entra.count(), 1);
    clock.advance(Duration::from_secs(2));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer wi-token-1");
    assert_eq!(entra.received()[1].form(), form("federated-assertion-two"));
}

#[tokio::test]
async fn client_credentials_fetches_a_token_with_the_client_secret() {
    let entra = FakeEndpoint::start(|_, _| Reply::token("cc-token", 3599)).await;
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &FakeClock::new(),
    );
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer cc-token");
    let request = &entra.received()[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.target, "/contoso.onmicrosoft.com/oauth2/v2.0/token");
    let expected = BTreeMap::from(
        [
            ("client_id", "app-client-id"),
            ("scope", "https://cognitiveservices.azure.com/.default"),
            ("grant_type", "client_credentials"),
            ("client_secret", CLIENT_SECRET),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned())),
    );
    assert_eq!(request.form(), expected);
}

#[tokio::test]
async fn client_credentials_invalid_client_surfaces_its_code() {
    let entra = FakeEndpoint::start(|_, _| {
        Reply::json(
            401,
            serde_json::json!({
                "error": "invalid_client",
                "error_description": format!("AADSTS7000215: Invalid client secret provided: {CLIENT_SECRET}"),
                "error_codes": [7000215],
            }),
        )
    })
    .await;
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &FakeClock::new(),
    );
    let error = auth.header().await.unwrap_err();
    let AuthError::Refused {
        status,
        code,
        description,
        ..
    } = &error
    else {
        panic!("unexpected error: {error}");
    };
    assert_eq!(*status, 401);
    assert_eq!(code, "invalid_client");
    assert_eq!(
        description.as_deref(),
        Some("AADSTS7000215: Invalid client secret provided: [redacted]")
    );
    let text = error.to_string();
    assert!(
        text.contains("invalid_client") && text.contains("status 401"),
        "{text}"
    );
    assert!(!text.contains(CLIENT_SECRET), "{text}");
    assert!(!format!("{error:?}").contains(CLIENT_SECRET));
}

// ---------------------------------------------------------------------------------------------
// The cache
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn token_is_refreshed_before_it_expires() {
    let entra = FakeEndpoint::start(|_, index| Reply::token(&format!("token-{index}"), 2)).await;
    let clock = FakeClock::new();
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &clock,
    );

    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    // Lifetime 2 s: the margin is half of it, so the refresh is due after 1 s.
    clock.advance(Duration::from_millis(900));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    assert_eq!(entra.count(), 1);
    clock.advance(Duration::from_millis(200));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-1");
    assert_eq!(entra.count(), 2);
}

#[tokio::test]
async fn a_token_a_backend_refused_is_fetched_anew_at_most_once_per_retry_delay() {
    let entra = FakeEndpoint::start(|_, index| Reply::token(&format!("token-{index}"), 3600)).await;
    let clock = FakeClock::new();
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &clock,
    );
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    auth.rejected();
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-1");
    // Refusals in a burst (every request of a busy pool) do not each cost a fetch.
    auth.rejected();
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-1");
    assert_eq!(entra.count(), 2);
    clock.advance(super::FETCH_RETRY_DELAY);
    auth.rejected();
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-2");
    assert_eq!(entra.count(), 3);
}

#[tokio::test]
async fn a_reload_that_leaves_the_table_as_it_was_keeps_the_cached_token() {
    let entra = FakeEndpoint::start(|_, index| Reply::token(&format!("token-{index}"), 3600)).await;
    let clock = FakeClock::new();
    let table = client_credentials_table(&entra);
    let running = compiled(&table, &[CLIENT_SECRET_ENV], &clock);
    assert_eq!(header_text(&running).await.unwrap(), "Bearer token-0");
    // The same table compiled again (any reload): the token cached a moment ago serves.
    let reloaded = compiled(&table, &[CLIENT_SECRET_ENV], &clock).carried_over(&running);
    assert_eq!(header_text(&reloaded).await.unwrap(), "Bearer token-0");
    assert_eq!(entra.count(), 1);
    // A changed table (another scope) gets its own token.
    let changed = compiled(
        &table.replace("/.default", "/other/.default"),
        &[CLIENT_SECRET_ENV],
        &clock,
    )
    .carried_over(&running);
    assert_eq!(header_text(&changed).await.unwrap(), "Bearer token-1");
}

#[test]
fn static_secret_files_are_named_with_their_digest_for_the_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "sk-secret\n").unwrap();
    let auth = compile(
        raw(&format!("kind = \"api_key\"\nkey_file = {file:?}\n")),
        "upstreams.aks.auth",
        &|_| None,
    )
    .unwrap();
    let files: Vec<_> = auth.secret_files().collect();
    assert_eq!(
        files,
        [(file.as_path(), crate::config::sha256("sk-secret"))]
    );
}

#[tokio::test]
async fn a_lifetime_past_any_clock_is_kept_a_day() {
    let entra =
        FakeEndpoint::start(|_, index| Reply::token(&format!("token-{index}"), u64::MAX)).await;
    let clock = FakeClock::new();
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &clock,
    );
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    clock.advance(Duration::from_secs(23 * 60 * 60));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    // A day less the refresh margin: fetched again.
    clock.advance(Duration::from_secs(60 * 60));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-1");
    assert_eq!(entra.count(), 2);
}

#[tokio::test]
async fn failed_refresh_serves_the_cached_token_until_it_expires() {
    let entra = FakeEndpoint::start(|_, index| match index {
        0 => Reply::token("token-0", 2),
        _ => Reply::json(503, serde_json::json!({"error": "temporarily_unavailable"})),
    })
    .await;
    let clock = FakeClock::new();
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &clock,
    );
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");

    clock.advance(Duration::from_millis(1500));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    assert_eq!(entra.count(), 2, "the refresh was tried");

    // Within the retry delay, no new attempt.
    clock.advance(Duration::from_millis(100));
    assert_eq!(header_text(&auth).await.unwrap(), "Bearer token-0");
    assert_eq!(entra.count(), 2);

    // Expired: the failure is the answer until the retry delay has passed.
    clock.advance(Duration::from_millis(500));
    let error = auth.header().await.unwrap_err();
    assert!(
        matches!(&error, AuthError::Refused { code, status: 503, .. } if code == "temporarily_unavailable"),
        "{error}"
    );
    assert_eq!(entra.count(), 2);
    clock.advance(Duration::from_secs(5));
    assert!(auth.header().await.is_err());
    assert_eq!(entra.count(), 3);
}

#[tokio::test]
async fn concurrent_callers_share_one_fetch() {
    let entra = FakeEndpoint::start(|_, index| Reply::token(&format!("token-{index}"), 3600)).await;
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &FakeClock::new(),
    );
    let results = join_all((0..10).map(|_| header_text(&auth)).collect()).await;
    for result in results {
        assert_eq!(result.unwrap(), "Bearer token-0");
    }
    assert_eq!(entra.count(), 1);
}

#[tokio::test]
async fn concurrent_callers_share_one_failed_fetch() {
    let entra = FakeEndpoint::start(|_, _| {
        Reply::json(400, serde_json::json!({"error": "invalid_client"}))
    })
    .await;
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &FakeClock::new(),
    );
    let results = join_all((0..10).map(|_| auth.header()).collect()).await;
    for result in results {
        assert!(matches!(result, Err(AuthError::Refused { code, .. }) if code == "invalid_client"));
    }
    assert_eq!(entra.count(), 1);
}

#[tokio::test]
async fn token_fetch_times_out() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let table = format!(
        r#"
        kind = "client_credentials"
        tenant_id = "contoso"
        client_id = "app"
        client_secret_env = "ISTHMUS_CLIENT_SECRET"
        scope = "api://x/.default"
        authority_host = "http://{address}"
        "#
    );
    let mut options = FakeClock::new().options();
    options.fetch_timeout = Duration::from_millis(50);
    let auth = compile_with(
        raw(&table),
        "upstreams.aks.auth",
        &environment(&[CLIENT_SECRET_ENV]),
        options,
    )
    .unwrap();
    let error = auth.header().await.unwrap_err();
    assert!(
        matches!(error, AuthError::Timeout { timeout_ms: 50, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn oversized_token_response_is_refused() {
    let entra = FakeEndpoint::start(|_, _| Reply::token(&"x".repeat(70 * 1024), 3600)).await;
    let auth = compiled(
        &client_credentials_table(&entra),
        &[CLIENT_SECRET_ENV],
        &FakeClock::new(),
    );
    let error = auth.header().await.unwrap_err();
    assert!(
        matches!(
            error,
            AuthError::ResponseTooLarge {
                bytes_max: 65536,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn refresh_margin_is_five_minutes_or_half_the_lifetime() {
    let fetched_at = Instant::now();
    let token = |lifetime_seconds: u64| {
        CachedToken::new(
            Fetched {
                value: http::HeaderValue::from_static("Bearer t"),
                lifetime: Duration::from_secs(lifetime_seconds),
            },
            fetched_at,
        )
    };
    let hour = token(3600);
    assert_eq!(hour.expires_at - fetched_at, Duration::from_secs(3600));
    assert_eq!(hour.refresh_at - fetched_at, Duration::from_secs(3300));
    let short = token(2);
    assert_eq!(short.refresh_at - fetched_at, Duration::from_secs(1));
}

#[test]
fn plan_uses_fresh_tokens_and_fetches_stale_ones() {
    let start = Instant::now();
    let mut state = CacheState::default();
    let describe = |plan: Plan| match plan {
        Plan::Use(_) => "use",
        Plan::Fail(_) => "fail",
        Plan::Fetch { fallback: Some(_) } => "fetch, old token as fallback",
        Plan::Fetch { fallback: None } => "fetch",
    };
    assert_eq!(describe(plan(&state, start)), "fetch");
    state.token = Some(CachedToken::new(
        Fetched {
            value: http::HeaderValue::from_static("Bearer t"),
            lifetime: Duration::from_secs(3600),
        },
        start,
    ));
    let at = |seconds: u64| start + Duration::from_secs(seconds);
    assert_eq!(describe(plan(&state, at(3299))), "use");
    assert_eq!(
        describe(plan(&state, at(3300))),
        "fetch, old token as fallback"
    );
    assert_eq!(describe(plan(&state, at(3600))), "fetch");
    state.failure = Some(super::Failure {
        at: at(3300),
        error: AuthError::Status {
            endpoint: "e".to_owned(),
            status: 500,
        },
    });
    assert_eq!(describe(plan(&state, at(3301))), "use");
    assert_eq!(
        describe(plan(&state, at(3305))),
        "fetch, old token as fallback"
    );
    state.token = None;
    assert_eq!(describe(plan(&state, at(3301))), "fail");
    assert_eq!(describe(plan(&state, at(3305))), "fetch");
}

// ---------------------------------------------------------------------------------------------
// Static kinds, configuration and secrecy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn static_kinds_give_sensitive_headers() {
    let directory = tempfile::tempdir().unwrap();
    let token_file = directory.path().join("token");
    std::fs::write(&token_file, "bearer-secret-1\n").unwrap();
    let env = environment(&[("ISTHMUS_KEY", " api-key-secret-2 ")]);
    let compile_text = |text: &str| compile(raw(text), "upstreams.aks.auth", &env).unwrap();

    let none = compile_text(r#"kind = "none""#);
    assert_eq!(none.header().await.unwrap(), None);
    assert_eq!(UpstreamAuth::default().header().await.unwrap(), None);

    let bearer = compile_text(&format!(
        "kind = \"bearer\"\ntoken_file = \"{}\"",
        token_file.display()
    ));
    let (name, value) = bearer.header().await.unwrap().unwrap();
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("authorization", "Bearer bearer-secret-1")
    );
    assert!(value.is_sensitive());

    let api_key = compile_text("kind = \"api_key\"\nkey_env = \"ISTHMUS_KEY\"");
    let (name, value) = api_key.header().await.unwrap().unwrap();
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("api-key", "api-key-secret-2")
    );
    assert!(value.is_sensitive());

    let custom =
        compile_text("kind = \"api_key\"\nkey_env = \"ISTHMUS_KEY\"\nheader = \"X-Api-Key\"");
    let (name, _) = custom.header().await.unwrap().unwrap();
    assert_eq!(name.as_str(), "x-api-key");
    assert_eq!(custom.kind(), "api_key");
}

fn check_errors(text: &str, env: &[(&str, &str)], expect: Expect) {
    let errors = compile(raw(text), "upstreams.aks.auth", &environment(env)).unwrap_err();
    expect.assert_eq(&errors.join("\n"));
}

#[test]
fn compile_reports_every_problem_with_its_key_path() {
    check_errors(
        r#"
        kind = "bearer"
        token_file = "/nonexistent/token"
        token_env = "TOKEN"
        "#,
        &[],
        expect![[r#"upstreams.aks.auth: set exactly one of token_file or token_env"#]],
    );
    check_errors(
        r#"
        kind = "bearer"
        token_file = "/nonexistent/token"
        "#,
        &[],
        expect![[r#"upstreams.aks.auth.token_file: file not found: /nonexistent/token"#]],
    );
    check_errors(
        r#"
        kind = "api_key"
        key_env = "MISSING"
        header = "bad header"
        "#,
        &[],
        expect![[r#"
            upstreams.aks.auth.header: `bad header` is not a valid header name
            upstreams.aks.auth.key_env: environment variable MISSING is not set or empty"#]],
    );
    check_errors(
        r#"
        kind = "api_key"
        key_env = "MISSING"
        header = "Content-Length"
        "#,
        &[],
        expect![[r#"
            upstreams.aks.auth.header: `Content-Length` is a header the gateway sets itself; name the header the backend reads the key from (e.g. api-key, x-api-key)
            upstreams.aks.auth.key_env: environment variable MISSING is not set or empty"#]],
    );
    check_errors(
        r#"
        kind = "workload_identity"
        "#,
        &[],
        expect![[r#"
            upstreams.aks.auth.scope: missing
            upstreams.aks.auth.client_id: missing (set it or AZURE_CLIENT_ID)
            upstreams.aks.auth.tenant_id: missing (set it or AZURE_TENANT_ID)
            upstreams.aks.auth.token_file: missing (set it or AZURE_FEDERATED_TOKEN_FILE)"#]],
    );
    check_errors(
        r#"
        kind = "workload_identity"
        scope = "api://x/.default"
        "#,
        &[
            ("AZURE_CLIENT_ID", "id"),
            ("AZURE_TENANT_ID", "tenant/../evil"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/nonexistent/azure-identity-token",
            ),
            ("AZURE_AUTHORITY_HOST", "http://login.example.com/"),
        ],
        expect![[r#"
            upstreams.aks.auth.tenant_id: must be a tenant id or domain (letters, digits, '-', '.')
            upstreams.aks.auth.token_file: file not found: /nonexistent/azure-identity-token
            upstreams.aks.auth.authority_host: plain http is allowed only to loopback hosts (localhost, 127.0.0.0/8, ::1): http://login.example.com/ (from AZURE_AUTHORITY_HOST)"#]],
    );
    check_errors(
        r#"
        kind = "client_credentials"
        client_id = ""
        client_secret_file = "/nonexistent/secret"
        client_secret_env = "SECRET"
        authority_host = "http://10.0.0.1"
        ca_file = "/nonexistent/ca.pem"
        "#,
        &[],
        expect![[r#"
            upstreams.aks.auth.tenant_id: missing
            upstreams.aks.auth.client_id: must not be empty
            upstreams.aks.auth.scope: missing
            upstreams.aks.auth: set exactly one of client_secret_file or client_secret_env
            upstreams.aks.auth.authority_host: plain http is allowed only to loopback hosts (localhost, 127.0.0.0/8, ::1): http://10.0.0.1/
            upstreams.aks.auth.ca_file: file not found: /nonexistent/ca.pem"#]],
    );
    check_errors(
        r#"
        kind = "arc_managed_identity"
        resource = "https://cognitiveservices.azure.com"
        scope = "https://cognitiveservices.azure.com/.default"
        tokens_dir = "relative/tokens"
        "#,
        &[("IDENTITY_ENDPOINT", "http://example.com/token")],
        expect![[r#"
            upstreams.aks.auth: set exactly one of resource or scope
            upstreams.aks.auth.endpoint: plain http is allowed only to loopback hosts (localhost, 127.0.0.0/8, ::1): http://example.com/token (from IDENTITY_ENDPOINT)
            upstreams.aks.auth.tokens_dir: must be an absolute path: relative/tokens"#]],
    );
    check_errors(
        r#"
        kind = "arc_managed_identity"
        scope = "https://graph.microsoft.com/User.Read"
        endpoint = "https://localhost:40342/token"
        tokens_dir = "/nonexistent/tokens"
        ca_file = "/nonexistent/ca.pem"
        "#,
        &[],
        expect![[r#"
            upstreams.aks.auth.scope: must end in /.default (managed identity asks for a resource)
            upstreams.aks.auth.tokens_dir: directory not found: /nonexistent/tokens
            upstreams.aks.auth.ca_file: file not found: /nonexistent/ca.pem"#]],
    );
}

#[test]
fn client_credentials_authority_host_defaults_to_entra() {
    // Builds the https client with the system roots, outside any runtime.
    let auth = compile(
        raw(r#"
            kind = "client_credentials"
            tenant_id = "contoso"
            client_id = "app"
            client_secret_env = "ISTHMUS_CLIENT_SECRET"
            scope = "api://x/.default"
        "#),
        "upstreams.aks.auth",
        &environment(&[CLIENT_SECRET_ENV]),
    )
    .unwrap();
    let debug = format!("{auth:?}");
    expect![[r#"UpstreamAuth { kind: "client_credentials", source: ClientCredentials { token_url: "https://login.microsoftonline.com/contoso/oauth2/v2.0/token", client_id: "app", scope: "api://x/.default", client_secret: [redacted] } }"#]]
        .assert_eq(&debug);
    assert!(!debug.contains(CLIENT_SECRET), "{debug}");
}

#[test]
fn secrets_never_appear_in_debug_or_errors() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("secret");
    std::fs::write(&file, "file-secret-abc").unwrap();
    let env = environment(&[
        ("GOOD", "env-secret-def"),
        ("BAD", "bad-secret\u{7f}-ghi"),
        CLIENT_SECRET_ENV,
    ]);
    let tables = [
        format!("kind = \"bearer\"\ntoken_file = \"{}\"", file.display()),
        "kind = \"bearer\"\ntoken_env = \"GOOD\"".to_owned(),
        format!("kind = \"api_key\"\nkey_file = \"{}\"", file.display()),
        "kind = \"api_key\"\nkey_env = \"GOOD\"".to_owned(),
        r#"
        kind = "client_credentials"
        tenant_id = "contoso"
        client_id = "app"
        client_secret_env = "ISTHMUS_CLIENT_SECRET"
        scope = "api://x/.default"
        authority_host = "http://127.0.0.1:9/"
        "#
        .to_owned(),
    ];
    for table in &tables {
        let raw = raw(table);
        let raw_debug = format!("{raw:?}");
        let auth = compile(raw, "upstreams.aks.auth", &env).unwrap();
        for text in [format!("{auth:?}"), format!("{auth:#?}"), raw_debug] {
            for secret in ["file-secret-abc", "env-secret-def", CLIENT_SECRET] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }
    // A secret that cannot be a header value is a configuration error that does not quote it.
    for table in [
        "kind = \"bearer\"\ntoken_env = \"BAD\"",
        "kind = \"api_key\"\nkey_env = \"BAD\"",
    ] {
        let errors = compile(raw(table), "upstreams.aks.auth", &env).unwrap_err();
        let text = errors.join("\n");
        assert!(text.contains("not allowed in a header"), "{text}");
        assert!(!text.contains("bad-secret"), "{text}");
    }
}

#[test]
fn toml_kinds_parse_and_unknown_keys_are_refused() {
    assert_eq!(raw(r#"kind = "none""#), RawUpstreamAuth::None {});
    for text in [
        "kind = \"none\"\ntoken_env = \"X\"",
        "kind = \"bearer\"\ntoken_envv = \"X\"",
        "kind = \"api_key\"\nkey_env = \"X\"\nheaders = \"x\"",
        "kind = \"arc_managed_identity\"\nresource = \"r\"\nidentity = \"x\"",
        "kind = \"workload_identity\"\nscope = \"s\"\nclient_secret_env = \"X\"",
        "kind = \"client_credentials\"\nclient_secret = \"inline\"",
        "kind = \"kerberos\"",
        "token_env = \"X\"",
    ] {
        assert!(
            toml::from_str::<RawUpstreamAuth>(text).is_err(),
            "accepted: {text}"
        );
    }
    let parsed = raw(r#"
        kind = "arc_managed_identity"
        resource = "https://cognitiveservices.azure.com"
        endpoint = "http://localhost:40342/metadata/identity/oauth2/token"
        tokens_dir = "/var/opt/azcmagent/tokens"
        client_id = "c"
        ca_file = "ca.pem"
        "#);
    let mut resolved = parsed.clone();
    resolved.resolve_paths(Path::new("/etc/isthmus"));
    let RawUpstreamAuth::ArcManagedIdentity(arc) = resolved else {
        panic!("{resolved:?}");
    };
    assert_eq!(
        arc.ca_file.as_deref(),
        Some(Path::new("/etc/isthmus/ca.pem"))
    );
    assert_eq!(
        arc.tokens_dir.as_deref(),
        Some(Path::new("/var/opt/azcmagent/tokens"))
    );
}

#[test]
fn plain_http_is_allowed_only_to_loopback_hosts() {
    for accepted in [
        "http://localhost:40342/metadata/identity/oauth2/token",
        "http://LOCALHOST/",
        "http://127.0.0.1:8080/",
        "http://127.10.0.1/",
        "http://[::1]:9/",
        "https://login.microsoftonline.com/",
        "https://10.0.0.1/",
    ] {
        assert!(check_endpoint(accepted).is_ok(), "{accepted}");
    }
    for refused in [
        "http://login.microsoftonline.com/",
        "http://10.0.0.1/",
        "http://[::2]/",
        "http://localhost.example.com/",
        "ftp://localhost/",
        "http://user:password@localhost/",
        "not a url",
    ] {
        let error = check_endpoint(refused).unwrap_err();
        assert!(!error.contains("password"), "{error}");
    }
}
