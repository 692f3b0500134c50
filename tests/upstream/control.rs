//! Process-wide state shared by every connection and protocol: the behaviour tests set through
//! `/_control/behaviour`, the release signal for held answers, the log of received requests,
//! and the counters of `/_control/stats`.
//!
//! What a request meets is decided by [`Behaviour::plan`], a pure function over the behaviour
//! (it counts down `count`); the service carries the plan out.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

/// Requests kept in the log; older ones are forgotten first.
pub const LOG_ENTRIES_MAX: usize = 1000;
/// Longest first-byte delay a test may ask for.
const DELAY_FIRST_BYTE_MS_MAX: u64 = 600_000;

/// Everything the connections share; lives as long as the process.
#[derive(Debug)]
pub struct State {
    pub name: String,
    pub name_header: HeaderValue,
    pub tokens: u32,
    /// Whether `/_control/*` answers (and so whether requests are logged at all).
    pub control: bool,
    pub stats: Stats,
    behaviour: Mutex<Behaviour>,
    /// Bumped by every release; a held answer waits until it passes the value it started with.
    release: watch::Sender<u64>,
    log: Mutex<VecDeque<Value>>,
    sequence: AtomicU64,
}

/// Counters for `/_control/stats`. `in_flight`, `held`, `completed`, `cancelled` and
/// `injected` count completion requests only; `requests` counts every non-control request.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub in_flight: AtomicU64,
    pub held: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub injected: AtomicU64,
    /// Requests dropped by `drop_reused`.
    pub dropped: AtomicU64,
    /// Connections accepted; numbers them.
    pub accepted: AtomicU64,
    /// Connections that carried a request other than a control call: the test's own
    /// control connections (its HTTP client may open one more at any time) count nowhere.
    pub connections: AtomicU64,
    pub connections_open: AtomicU64,
}

/// How the next requests are answered (also the JSON of `GET /_control/behaviour`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Behaviour {
    /// Completion requests are answered with this status and an OpenAI error body...
    pub status: Option<u16>,
    /// ... with this `retry-after` header ...
    pub retry_after_s: Option<u64>,
    /// ... this many more times (`None`: until changed).
    pub count: Option<u64>,
    /// `GET /health` answers this status (`None`: 200).
    pub health_status: Option<u16>,
    /// Streams send their first chunk and then wait for a release; other answers wait before
    /// answering.
    pub hold: bool,
    /// Wait before sending a completion answer's headers.
    pub delay_first_byte_ms: u64,
    /// The next this many completion requests that arrive on a connection that has already
    /// answered one are dropped: the connection closes without an answer, as when a server's
    /// keep-alive runs out just as the client sends on it.
    pub drop_reused: u64,
}

/// `POST /_control/behaviour`: only the fields given change, after `reset` if it is true.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBehaviour {
    #[serde(default)]
    reset: bool,
    status: Option<u16>,
    retry_after_s: Option<u64>,
    count: Option<u64>,
    health_status: Option<u16>,
    hold: Option<bool>,
    delay_first_byte_ms: Option<u64>,
    drop_reused: Option<u64>,
}

/// What one completion request meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub failure: Option<Failure>,
    pub hold: bool,
    pub delay_first_byte_ms: u64,
}

/// An injected error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub retry_after_s: Option<u64>,
}

impl Behaviour {
    /// The behaviour after `raw`, and whether held answers are to be released (on `reset`
    /// and on `hold: false`).
    pub fn apply(&self, raw: RawBehaviour) -> Result<(Behaviour, bool), String> {
        let mut next = if raw.reset {
            Behaviour::default()
        } else {
            self.clone()
        };
        let mut release = raw.reset;
        match raw.status {
            Some(status) => {
                check_status("status", status)?;
                if status < 400 || raw.count == Some(0) {
                    next.status = None;
                    next.retry_after_s = None;
                    next.count = None;
                } else {
                    next.status = Some(status);
                    next.retry_after_s = raw.retry_after_s;
                    next.count = raw.count;
                }
            }
            None if raw.retry_after_s.is_some() || raw.count.is_some() => {
                return Err("`retry_after_s` and `count` need `status`".to_owned());
            }
            None => {}
        }
        if let Some(status) = raw.health_status {
            check_status("health_status", status)?;
            next.health_status = Some(status);
        }
        if let Some(hold) = raw.hold {
            next.hold = hold;
            release |= !hold;
        }
        if let Some(delay) = raw.delay_first_byte_ms {
            if delay > DELAY_FIRST_BYTE_MS_MAX {
                return Err(format!(
                    "`delay_first_byte_ms` is at most {DELAY_FIRST_BYTE_MS_MAX}"
                ));
            }
            next.delay_first_byte_ms = delay;
        }
        if let Some(drop) = raw.drop_reused {
            next.drop_reused = drop;
        }
        Ok((next, release))
    }

    /// What the next completion request meets; counts an injected failure down.
    pub fn plan(&mut self) -> Plan {
        let failure = self.status.map(|status| Failure {
            status,
            retry_after_s: self.retry_after_s,
        });
        if let Some(count) = &mut self.count {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.status = None;
                self.retry_after_s = None;
                self.count = None;
            }
        }
        Plan {
            failure,
            hold: self.hold,
            delay_first_byte_ms: self.delay_first_byte_ms,
        }
    }
}

fn check_status(field: &str, status: u16) -> Result<(), String> {
    if (100..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!("`{field}` must be an HTTP status (100 to 599)"))
    }
}

impl State {
    pub fn new(name: &str, tokens: u32, control: bool) -> anyhow::Result<State> {
        let name_header = HeaderValue::from_str(name)
            .map_err(|_| anyhow::anyhow!("--name must be usable as a header value"))?;
        Ok(State {
            name: name.to_owned(),
            name_header,
            tokens,
            control,
            stats: Stats::default(),
            behaviour: Mutex::new(Behaviour::default()),
            release: watch::Sender::new(0),
            log: Mutex::new(VecDeque::with_capacity(if control {
                LOG_ENTRIES_MAX
            } else {
                0
            })),
            sequence: AtomicU64::new(0),
        })
    }

    /// A number unique to this request within the process.
    pub fn next_sequence(&self) -> u64 {
        self.sequence.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn behaviour(&self) -> Behaviour {
        lock(&self.behaviour).clone()
    }

    /// Applies a behaviour change; returns the new behaviour.
    pub fn change_behaviour(&self, raw: RawBehaviour) -> Result<Behaviour, String> {
        let (next, release) = {
            let mut behaviour = lock(&self.behaviour);
            let (next, release) = behaviour.apply(raw)?;
            *behaviour = next.clone();
            (next, release)
        };
        if release {
            self.release();
        }
        Ok(next)
    }

    /// The plan for a completion request and, when it is to be held, the release generation
    /// it waits to see passed.
    pub fn plan(&self) -> (Plan, u64) {
        let plan = lock(&self.behaviour).plan();
        (plan, *self.release.borrow())
    }

    /// Releases every answer held so far.
    pub fn release(&self) {
        self.release.send_modify(|generation| *generation += 1);
    }

    /// Waits until a release after `generation`.
    pub async fn wait_release(&'static self, generation: u64) {
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        let _held = Decrement(&self.stats.held);
        let mut receiver = self.release.subscribe();
        // The sender lives in `self`, which is never dropped, so this cannot fail.
        let _ = receiver.wait_for(|current| *current > generation).await;
    }

    /// Whether a completion request on a connection that already answered is to be
    /// dropped (`drop_reused`); counts it.
    pub fn take_drop(&self) -> bool {
        let mut behaviour = lock(&self.behaviour);
        if behaviour.drop_reused == 0 {
            return false;
        }
        behaviour.drop_reused -= 1;
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn health_status(&self) -> u16 {
        lock(&self.behaviour).health_status.unwrap_or(200)
    }

    /// Adds a request to the log (when control is on; otherwise `entry` is not even made).
    pub fn record(&self, entry: impl FnOnce() -> Value) {
        if !self.control {
            return;
        }
        let entry = entry();
        let mut log = lock(&self.log);
        if log.len() == LOG_ENTRIES_MAX {
            log.pop_front();
        }
        log.push_back(entry);
    }

    /// The logged requests, oldest first.
    pub fn requests(&self) -> Value {
        Value::Array(lock(&self.log).iter().cloned().collect())
    }

    /// Empties the log; returns how many entries it had.
    pub fn clear_requests(&self) -> usize {
        let mut log = lock(&self.log);
        let count = log.len();
        log.clear();
        count
    }
}

/// A lock that a panic elsewhere does not poison for everyone (the data stays consistent:
/// no update spans a panic point).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Stats {
    pub fn json(&self) -> Value {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::json!({
            "requests": read(&self.requests),
            "in_flight": read(&self.in_flight),
            "held": read(&self.held),
            "completed": read(&self.completed),
            "cancelled": read(&self.cancelled),
            "injected": read(&self.injected),
            "dropped": read(&self.dropped),
            "connections": read(&self.connections),
            "connections_open": read(&self.connections_open),
        })
    }

    /// Counts a completion request in flight until the guard is finished or dropped.
    pub fn start(&'static self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: self,
            finished: false,
        }
    }

    /// Counts a connection open until the guard drops; the guard carries its number.
    pub fn connection_opened(&'static self) -> OpenConnection {
        let id = self.accepted.fetch_add(1, Ordering::Relaxed) + 1;
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection { stats: self, id }
    }
}

/// A completion request being answered. Dropped before [`InFlight::finish`], it counts as
/// cancelled: the client went away (hyper drops the handler or the body when it does).
#[derive(Debug)]
pub struct InFlight {
    stats: &'static Stats,
    finished: bool,
}

impl InFlight {
    /// The whole answer has been handed to the connection.
    pub fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let outcome = if self.finished {
            &self.stats.completed
        } else {
            &self.stats.cancelled
        };
        outcome.fetch_add(1, Ordering::Relaxed);
    }
}

/// An open connection, numbered from 1 in accept order.
#[derive(Debug)]
pub struct OpenConnection {
    stats: &'static Stats,
    pub id: u64,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Decrements a counter when dropped.
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
