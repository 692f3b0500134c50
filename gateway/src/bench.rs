//! `isthmus bench`: a closed-loop load generator for any OpenAI-compatible chat endpoint
//! (Isthmus, llama-server, vLLM, ...), measuring what operators judge a server by.
//!
//! `concurrency` workers each send requests back to back until `requests` have been sent.
//! Prompts are built from a fixed word list so that every request has its own text (no
//! accidental prefix-cache hits) after an optional shared prefix of `shared_prefix_tokens`
//! (a system prompt common to all requests, which a prefix cache should serve). With
//! `ignore_eos` every request generates exactly `max_tokens`.
//!
//! Reported: time to first token (TTFT), time per output token after the first (TPOT), the
//! gaps between consecutive tokens (ITL), end-to-end latency (p50/p95/p99 each), aggregate
//! output tokens/s and errors. This is a tool, not part of the inference path.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Value, json};

/// Words that are one token each in common BPE vocabularies (a leading space included).
const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
];

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Base URL of the server, e.g. `https://127.0.0.1:8443` (the `/v1/...` path is added).
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// A CA certificate (PEM) to trust for HTTPS, in addition to none other.
    pub ca_file: Option<PathBuf>,
    pub concurrency: u32,
    /// Requests to start at most.
    pub requests: u32,
    /// No request starts later than this after the measured run began.
    pub duration: Option<Duration>,
    pub max_tokens: u32,
    pub prompt_tokens: u32,
    pub shared_prefix_tokens: u32,
    pub stream: bool,
    pub ignore_eos: bool,
    /// Requests sent (one per worker) before measuring, to warm caches and connections.
    pub warmup_requests: u32,
    pub request_timeout: Duration,
    /// Each worker starts a request at most this often (0: back to back).
    pub interval: Duration,
    /// Open loop: requests start at this rate whatever the answers do (0: closed loop).
    pub rate_per_s: f64,
    /// Mixed into every prompt; a fresh value per run keeps servers' prompt caches from
    /// serving one run with another's prompts.
    pub salt: u64,
    /// Fields merged into every request body last (they override the bench's own).
    pub extra_body: serde_json::Map<String, Value>,
    /// The API the requests speak.
    pub api: BenchApi,
}

/// The API a bench speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchApi {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/responses`: the shared prefix as `instructions`, the prompt as `input`,
    /// `max_output_tokens`; a stream's tokens are its `response.output_text.delta` events.
    Responses,
}

/// One finished request.
#[derive(Debug, Clone)]
struct Sample {
    /// Time to the first content chunk; `None` for an answer that was not streamed.
    ttft: Option<Duration>,
    end_to_end: Duration,
    output_tokens: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    /// Gaps between consecutive content chunks (streaming only).
    gaps: Vec<Duration>,
    /// Sent a second time after a reused connection closed under the first attempt (the
    /// latency includes both).
    resent: bool,
}

/// Percentiles of one quantity, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut values: Vec<f64>) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(f64::total_cmp);
        let at = |quantile: f64| {
            // Nearest rank.
            let rank = ((quantile * values.len() as f64).ceil() as usize).clamp(1, values.len());
            values[rank - 1]
        };
        Percentiles {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub url: String,
    pub model: String,
    pub concurrency: u32,
    /// Requests started; with `--duration-s`, those started in time, plus (open loop) those
    /// due in time that found every slot busy, which count as errors.
    pub requests: u32,
    pub succeeded: u32,
    pub errors: u32,
    /// Requests sent a second time because a reused connection closed under the first
    /// attempt (their latency counts from the first); many point at a server that drops
    /// connections under load.
    pub resent: u32,
    pub first_error: Option<String>,
    pub stream: bool,
    pub max_tokens: u32,
    pub wall_s: f64,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub prompt_tokens_mean: f64,
    pub cached_tokens_mean: f64,
    /// Time to first token and per output token after it: `None` (JSON `null`) when the
    /// answers were not streamed, which measures neither.
    pub ttft_ms: Option<Percentiles>,
    pub tpot_ms: Option<Percentiles>,
    pub itl_ms: Percentiles,
    pub end_to_end_ms: Percentiles,
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

/// A prompt of about `tokens` words, different for every `seed`.
fn words(tokens: u32, seed: u64) -> String {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut text = String::new();
    for _ in 0..tokens {
        // xorshift64: cheap, deterministic, good enough to make prompts differ.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let word = WORDS[(state % WORDS.len() as u64) as usize];
        text.push(' ');
        text.push_str(word);
    }
    text
}

fn request_body(options: &BenchOptions, index: u64) -> Value {
    let mut messages = Vec::new();
    if options.shared_prefix_tokens > 0 {
        messages.push(json!({
            "role": "system",
            "content": format!("You are a helpful assistant. Context:{}", words(options.shared_prefix_tokens, 0xC0FFEE)),
        }));
    }
    let own = options
        .prompt_tokens
        .saturating_sub(options.shared_prefix_tokens)
        .max(1);
    messages.push(json!({
        "role": "user",
        "content": format!("Continue this text:{}", words(own, options.salt ^ (index + 1))),
    }));
    let mut body = match options.api {
        BenchApi::Chat => {
            let mut body = json!({
                "model": options.model,
                "messages": messages,
                "max_tokens": options.max_tokens,
                "temperature": 0,
                "stream": options.stream,
            });
            if options.stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            body
        }
        BenchApi::Responses => {
            let mut body = json!({
                "model": options.model,
                "max_output_tokens": options.max_tokens,
                "temperature": 0,
                "stream": options.stream,
            });
            // The same texts as the chat messages: a system message is `instructions`.
            for message in messages {
                match message["role"].as_str() {
                    Some("system") => body["instructions"] = message["content"].clone(),
                    _ => body["input"] = message["content"].clone(),
                }
            }
            body
        }
    };
    if options.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Some(fields) = body.as_object_mut() {
        fields.extend(options.extra_body.clone());
    }
    body
}

fn client(options: &BenchOptions) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(options.request_timeout)
        .pool_max_idle_per_host(options.concurrency as usize);
    if let Some(ca_file) = &options.ca_file {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
        let certificate = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("{}: not a PEM certificate", ca_file.display()))?;
        builder = builder
            .tls_built_in_root_certs(false)
            .add_root_certificate(certificate);
    }
    builder.build().context("building the HTTP client")
}

async fn one_request(
    client: &reqwest::Client,
    options: &BenchOptions,
    index: u64,
    scheduled: Option<Instant>,
) -> Result<Sample, String> {
    let path = match options.api {
        BenchApi::Chat => "/v1/chat/completions",
        BenchApi::Responses => "/v1/responses",
    };
    let url = format!("{}{path}", options.url.trim_end_matches('/'));
    let body = request_body(options, index);
    let send = || {
        let mut request = client.post(&url).json(&body);
        if let Some(key) = &options.api_key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    // Open loop: latency counts from when the request was due, not when it could be sent.
    let started = scheduled.unwrap_or_else(Instant::now);
    let mut resent = false;
    let mut response = match send().await {
        Ok(response) => response,
        // A pooled connection the server closed while idle (some servers close after a few
        // requests) fails the request before any answer: send it once more on a new
        // connection, counted as resent and with its latency from the first attempt. A
        // refused connection or a timeout is the server's failure, not the pool's.
        Err(error)
            if error.is_request()
                && error.status().is_none()
                && !error.is_connect()
                && !error.is_timeout() =>
        {
            resent = true;
            send().await.map_err(|error| describe(&error))?
        }
        Err(error) => return Err(describe(&error)),
    };
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        return Err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            body.chars().take(300).collect::<String>()
        ));
    }
    if !options.stream {
        let body: Value = response.json().await.map_err(|error| error.to_string())?;
        let end_to_end = started.elapsed();
        // A 200 that carries an error, or no answer, is a failed request, not a fast one.
        let answered = match options.api {
            BenchApi::Chat => body["choices"]
                .as_array()
                .is_some_and(|choices| !choices.is_empty()),
            BenchApi::Responses => {
                matches!(body["status"].as_str(), Some("completed" | "incomplete"))
            }
        };
        if !body["error"].is_null() || !answered {
            return Err(format!(
                "HTTP 200 without an answer: {}",
                body.to_string().chars().take(300).collect::<String>()
            ));
        }
        let usage = Usage::of(&body["usage"]);
        return Ok(Sample {
            ttft: None,
            end_to_end,
            output_tokens: usage.output,
            prompt_tokens: usage.prompt,
            cached_tokens: usage.cached,
            gaps: Vec::new(),
            resent,
        });
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut gaps = Vec::new();
    let mut chunks = 0_u32;
    let mut usage = Value::Null;
    // Whether the stream said it was complete: `[DONE]` or a finish reason (chat),
    // `response.completed` or `response.incomplete` (Responses). A stream cut off before
    // that is a failed request, however many tokens it carried.
    let mut finished = false;
    while let Some(bytes) = response.chunk().await.map_err(|error| error.to_string())? {
        let now = Instant::now();
        // Lines may end in CRLF (servers built on sse-starlette send them); a raw CR never
        // occurs inside a JSON event, so dropping every CR leaves LF-terminated lines.
        buffer.extend(bytes.iter().copied().filter(|byte| *byte != b'\r'));
        while let Some(end) = buffer.windows(2).position(|window| window == b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(data) = event_data(&event) else {
                continue;
            };
            if data == b"[DONE]" {
                finished = true;
                continue;
            }
            let Ok(chunk) = serde_json::from_slice::<Value>(&data) else {
                return Err(format!("not JSON: {}", String::from_utf8_lossy(&data)));
            };
            let content = match options.api {
                BenchApi::Chat => {
                    if !chunk["error"].is_null() {
                        return Err(format!("the stream failed: {chunk}"));
                    }
                    if !chunk["usage"].is_null() {
                        usage = chunk["usage"].clone();
                    }
                    let choice = &chunk["choices"][0];
                    finished |= choice["finish_reason"].is_string();
                    chat_delta_has_token(&choice["delta"])
                }
                BenchApi::Responses => match chunk["type"].as_str() {
                    Some(
                        "response.output_text.delta"
                        | "response.reasoning_text.delta"
                        | "response.reasoning_summary_text.delta"
                        | "response.function_call_arguments.delta",
                    ) => chunk["delta"].as_str().is_some_and(|text| !text.is_empty()),
                    Some("response.completed" | "response.incomplete") => {
                        usage = chunk["response"]["usage"].clone();
                        finished = true;
                        false
                    }
                    Some("error" | "response.failed") => {
                        return Err(format!("the stream failed: {chunk}"));
                    }
                    _ => false,
                },
            };
            if !content {
                continue;
            }
            chunks += 1;
            if let Some(previous) = last {
                gaps.push(now.duration_since(previous));
            }
            first.get_or_insert(now);
            last = Some(now);
        }
    }
    if !finished {
        return Err(format!(
            "the stream ended before it said it was complete, after {chunks} chunks with tokens"
        ));
    }
    let end_to_end = started.elapsed();
    let first = first.ok_or_else(|| "the stream carried no content".to_owned())?;
    let counted = Usage::of(&usage);
    Ok(Sample {
        ttft: Some(first.duration_since(started)),
        end_to_end,
        output_tokens: if usage.is_null() {
            chunks
        } else {
            counted.output
        },
        prompt_tokens: counted.prompt,
        cached_tokens: counted.cached,
        gaps,
        resent,
    })
}

/// The data of one server-sent event: its `data:` lines (one optional space after the colon)
/// joined by newlines, or `None` when it has none (a comment, or only an `event:` line).
fn event_data(event: &[u8]) -> Option<Vec<u8>> {
    let mut data: Option<Vec<u8>> = None;
    for line in event.split(|byte| *byte == b'\n') {
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        match &mut data {
            None => data = Some(value.to_vec()),
            Some(data) => {
                data.push(b'\n');
                data.extend_from_slice(value);
            }
        }
    }
    data
}

/// Whether a chat stream's delta carries a generated token: visible text, reasoning text
/// (`reasoning_content` or `reasoning`, as vLLM and llama-server send it) or a tool call.
/// An empty string (a server holding text back, e.g. a possible stop string) is none.
fn chat_delta_has_token(delta: &Value) -> bool {
    let text = |key: &str| delta[key].as_str().is_some_and(|text| !text.is_empty());
    text("content")
        || text("reasoning_content")
        || text("reasoning")
        || delta["tool_calls"]
            .as_array()
            .is_some_and(|calls| !calls.is_empty())
}

/// Token counts of a usage object of either API.
struct Usage {
    prompt: u32,
    output: u32,
    cached: u32,
}

impl Usage {
    fn of(usage: &Value) -> Usage {
        let count = |chat: &str, responses: &str| {
            usage
                .pointer(chat)
                .or_else(|| usage.pointer(responses))
                .and_then(Value::as_u64)
                .map_or(0, |count| u32::try_from(count).unwrap_or(u32::MAX))
        };
        Usage {
            prompt: count("/prompt_tokens", "/input_tokens"),
            output: count("/completion_tokens", "/output_tokens"),
            cached: count(
                "/prompt_tokens_details/cached_tokens",
                "/input_tokens_details/cached_tokens",
            ),
        }
    }
}

/// An error with its causes, which is where reqwest says what actually went wrong.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Set on SIGINT or SIGTERM: no more requests start, those in flight finish, and the report
/// covers what ran (so a script can stop a background load and still read its errors).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether a request may still start `elapsed` after the run began.
fn may_start(options: &BenchOptions, elapsed: Duration) -> bool {
    !STOPPING.load(Ordering::Relaxed) && options.duration.is_none_or(|duration| elapsed < duration)
}

/// Sets [`STOPPING`] on the first SIGINT or SIGTERM; a second one ends the process at once
/// (exit status 130), for requests in flight that would take too long.
fn stop_on_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            if STOPPING.swap(true, Ordering::Relaxed) {
                eprintln!("isthmus bench: stopped before the requests in flight finished");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

/// `--concurrency` workers, each sending its next request when the last one ended.
async fn closed_loop(
    client: &reqwest::Client,
    options: &Arc<BenchOptions>,
    started: Instant,
) -> anyhow::Result<Vec<Result<Sample, String>>> {
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..options.concurrency)
        .map(|_| {
            let client = client.clone();
            let options = Arc::clone(options);
            let next = Arc::clone(&next);
            tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    if !may_start(&options, started.elapsed()) {
                        break;
                    }
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= u64::from(options.requests) {
                        break;
                    }
                    let begun = tokio::time::Instant::now();
                    results.push(one_request(&client, &options, index, None).await);
                    // No wait once there is nothing left to start: the run's wall time
                    // (the tokens/s window) would otherwise end an interval late.
                    let next_start = begun + options.interval;
                    if next.load(Ordering::Relaxed) >= u64::from(options.requests)
                        || !may_start(&options, next_start.into_std().duration_since(started))
                    {
                        break;
                    }
                    tokio::time::sleep_until(next_start).await;
                }
                results
            })
        })
        .collect();
    let mut results = Vec::new();
    for worker in workers {
        results.extend(worker.await?);
    }
    Ok(results)
}

/// Requests due at a fixed rate, each in its own task, at most `--concurrency` in flight.
/// With `--duration-s`, a request due in time that cannot start before the deadline, because
/// the server still holds every slot, counts as an error: a server that fell behind is not
/// let off the requests it could not take.
async fn open_loop(
    client: &reqwest::Client,
    options: &Arc<BenchOptions>,
    started: Instant,
) -> anyhow::Result<Vec<Result<Sample, String>>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(options.concurrency as usize));
    let period = Duration::from_secs_f64(1.0 / options.rate_per_s);
    let deadline = options.duration.map(|duration| started + duration);
    let mut tasks = Vec::new();
    let mut unsent = 0_u64;
    // A thread of its own hands out each request when it is due: the system's sleep wakes
    // within tens of microseconds, where tokio's timer rounds up to its next millisecond
    // (latency counts from the due time, so that would be charged to the server), and it
    // spins on no core the server under test may need.
    let (due_sender, mut due_indices) = tokio::sync::mpsc::channel::<u64>(1024);
    let pacing = Arc::clone(options);
    std::thread::Builder::new()
        .name("bench-pacer".to_owned())
        .spawn(move || {
            for index in 0..u64::from(pacing.requests) {
                let at = started + period.mul_f64(index as f64);
                if !may_start(&pacing, at.duration_since(started)) {
                    break;
                }
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                if due_sender.blocking_send(index).is_err() {
                    break;
                }
            }
        })
        .context("starting the pacing thread")?;
    while let Some(index) = due_indices.recv().await {
        let due = started + period.mul_f64(index as f64);
        if unsent > 0 {
            unsent += 1;
            continue;
        }
        if STOPPING.load(Ordering::Relaxed) {
            break;
        }
        let acquire = Arc::clone(&slots).acquire_owned();
        let slot = match deadline {
            None => acquire.await?,
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), acquire).await {
                Ok(slot) => slot?,
                Err(_) => {
                    unsent = 1;
                    continue;
                }
            },
        };
        let client = client.clone();
        let options = Arc::clone(options);
        tasks.push(tokio::spawn(async move {
            let result = one_request(&client, &options, index, Some(due)).await;
            drop(slot);
            result
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await?);
    }
    let concurrency = options.concurrency;
    results.extend((0..unsent).map(|_| {
        Err(format!(
            "not sent: all {concurrency} slots were still busy at the end of --duration-s"
        ))
    }));
    Ok(results)
}

/// Runs the benchmark.
pub async fn run(options: BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(options.concurrency >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(options.requests >= 1, "--requests must be at least 1");
    let client = client(&options)?;
    stop_on_signal()?;
    let options = Arc::new(options);
    // Warm-up: one request per worker (every worker by default, so that no measured request
    // pays for a new connection), in parallel, not measured.
    let warmups: Vec<_> = (0..options.warmup_requests.min(options.concurrency))
        .map(|worker| {
            let client = client.clone();
            let options = Arc::clone(&options);
            tokio::spawn(async move {
                one_request(&client, &options, 1_000_000 + u64::from(worker), None).await
            })
        })
        .collect();
    for warmup in warmups {
        if let Err(error) = warmup.await? {
            anyhow::bail!("warm-up request failed: {error}");
        }
    }

    let started = Instant::now();
    let results = if options.rate_per_s > 0.0 {
        open_loop(&client, &options, started).await?
    } else {
        closed_loop(&client, &options, started).await?
    };
    let started_count = u32::try_from(results.len()).unwrap_or(u32::MAX);
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(sample) => samples.push(sample),
            Err(error) => errors.push(error),
        }
    }
    let wall = started.elapsed();
    let output_tokens: u64 = samples
        .iter()
        .map(|sample| u64::from(sample.output_tokens))
        .sum();
    let count = samples.len().max(1) as f64;
    Ok(BenchReport {
        url: options.url.clone(),
        model: options.model.clone(),
        concurrency: options.concurrency,
        requests: started_count,
        succeeded: samples.len() as u32,
        errors: errors.len() as u32,
        resent: samples.iter().filter(|sample| sample.resent).count() as u32,
        first_error: errors.first().cloned(),
        stream: options.stream,
        max_tokens: options.max_tokens,
        wall_s: wall.as_secs_f64(),
        output_tokens,
        output_tokens_per_s: output_tokens as f64 / wall.as_secs_f64(),
        requests_per_s: samples.len() as f64 / wall.as_secs_f64(),
        prompt_tokens_mean: samples
            .iter()
            .map(|sample| f64::from(sample.prompt_tokens))
            .sum::<f64>()
            / count,
        cached_tokens_mean: samples
            .iter()
            .map(|sample| f64::from(sample.cached_tokens))
            .sum::<f64>()
            / count,
        ttft_ms: options.stream.then(|| {
            Percentiles::of(
                samples
                    .iter()
                    .filter_map(|sample| sample.ttft.map(milliseconds))
                    .collect(),
            )
        }),
        tpot_ms: options.stream.then(|| {
            Percentiles::of(
                samples
                    .iter()
                    .filter(|sample| sample.output_tokens > 1)
                    .filter_map(|sample| {
                        let ttft = sample.ttft?;
                        Some(
                            milliseconds(sample.end_to_end.saturating_sub(ttft))
                                / f64::from(sample.output_tokens - 1),
                        )
                    })
                    .collect(),
            )
        }),
        itl_ms: Percentiles::of(
            samples
                .iter()
                .flat_map(|sample| sample.gaps.iter().map(|gap| milliseconds(*gap)))
                .collect(),
        ),
        end_to_end_ms: Percentiles::of(
            samples
                .iter()
                .map(|sample| milliseconds(sample.end_to_end))
                .collect(),
        ),
    })
}

/// The report as a human-readable table.
pub fn render(report: &BenchReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} model={} concurrency={} requests={} ok={} errors={} resent={} stream={} max_tokens={}",
        report.url,
        report.model,
        report.concurrency,
        report.requests,
        report.succeeded,
        report.errors,
        report.resent,
        report.stream,
        report.max_tokens
    );
    let _ = writeln!(
        out,
        "output {:.1} tok/s, {:.2} req/s over {:.1} s; prompt {:.0} tokens (cached {:.0}) on average",
        report.output_tokens_per_s,
        report.requests_per_s,
        report.wall_s,
        report.prompt_tokens_mean,
        report.cached_tokens_mean
    );
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "ms", "mean", "p50", "p95", "p99", "max"
    );
    for (name, value) in [
        ("TTFT", report.ttft_ms.as_ref()),
        ("TPOT", report.tpot_ms.as_ref()),
        ("ITL", report.stream.then_some(&report.itl_ms)),
        ("latency", Some(&report.end_to_end_ms)),
    ] {
        let _ = match value {
            Some(value) => writeln!(
                out,
                "{name:<10} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                value.mean, value.p50, value.p95, value.p99, value.max
            ),
            None => writeln!(out, "{name:<10} {:>9}", "n/a (not streamed)"),
        };
    }
    if let Some(error) = &report.first_error {
        let _ = writeln!(out, "first error: {error}");
    }
    out
}

#[cfg(test)]
mod tests;
