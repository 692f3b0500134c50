//! Per-caller rate limits: requests and tokens per minute for each API key
//! (`auth.api_keys[].requests_per_minute`, `tokens_per_minute`) and for anonymous callers
//! together (`auth.anonymous_limits`).
//!
//! Each limit is a bucket that holds up to a minute's allowance and refills continuously
//! (a limit of 600 per minute: 10 a second). A request takes one unit of the requests bucket
//! when it is admitted; its tokens (prompt plus completion, from the answer's usage) are
//! taken from the tokens bucket when it ends, since only then are they known. The tokens
//! bucket may so go below zero: a request is admitted while it holds anything, and the next
//! ones wait until the debt is repaid. A refused request gets `429 rate_limit_exceeded`
//! with `Retry-After`, and every answer to a limited caller carries OpenAI's
//! `x-ratelimit-*` headers. Buckets belong to the process (each gateway of a cluster
//! enforces its own) and survive configuration reloads; a changed limit applies to the
//! bucket as it stands. With `anonymous_limits.per_client`, each anonymous client (by
//! address) has buckets of its own; beyond a few thousand callers, buckets that refilled
//! while idle are dropped, which changes nothing for their callers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::RateLimits;

/// What `x-ratelimit-*` headers say after an admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub requests: Option<BucketStanding>,
    pub tokens: Option<BucketStanding>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketStanding {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// Which limit refused a request, and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// `requests` or `tokens`.
    pub kind: &'static str,
    pub limit: u64,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Units available; below zero is debt (tokens only).
    level: f64,
    updated: Instant,
    /// The limit it last refilled under.
    limit: u64,
}

impl Bucket {
    fn full(limit: u64, now: Instant) -> Bucket {
        Bucket {
            level: limit as f64,
            updated: now,
            limit,
        }
    }

    /// Refills for the time since the last update, up to `limit`.
    fn refill(&mut self, limit: u64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * per_second(limit)).min(limit as f64);
        // `now` is read before the lock is taken: a caller that waited for it may bring an
        // earlier time than the one stored, which must not count the gap twice.
        self.updated = self.updated.max(now);
        self.limit = limit;
    }

    /// Whether it would be full by `now` (as a bucket never made), debt repaid.
    fn full_by(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level + elapsed * per_second(self.limit) >= self.limit as f64
    }

    /// How long until the bucket holds `level` units, to the millisecond.
    fn until(&self, limit: u64, level: f64) -> Duration {
        let missing = (level - self.level).max(0.0);
        Duration::from_millis((missing * 60_000.0 / limit as f64).round() as u64)
    }

    fn standing(&self, limit: u64) -> BucketStanding {
        BucketStanding {
            limit,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.until(limit, limit as f64),
        }
    }
}

fn per_second(limit: u64) -> f64 {
    limit as f64 / 60.0
}

#[derive(Debug, Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

impl Buckets {
    /// Full again (any debt repaid), the same as buckets never made.
    fn refilled_while_idle(&self, now: Instant) -> bool {
        [self.requests, self.tokens]
            .iter()
            .flatten()
            .all(|bucket| bucket.full_by(now))
    }
}
/// Above this many callers (each anonymous client counts where `per_client` is on), the
/// buckets that refilled while idle are dropped, at most once a second.
const CALLERS_KEPT_MAX: usize = 4_096;

/// The buckets of every caller that has limits.
#[derive(Debug, Default)]
pub struct RateLimiter {
    callers: Mutex<HashMap<String, Buckets>>,
    pruned: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// Admits a request of `caller` under `limits` at `now`, taking one request, or says
    /// which limit refused it.
    pub fn admit(
        &self,
        caller: &str,
        limits: RateLimits,
        now: Instant,
    ) -> Result<Standing, Refusal> {
        let mut callers = self.lock();
        if callers.len() > CALLERS_KEPT_MAX && !callers.contains_key(caller) {
            self.prune(&mut callers, now);
        }
        let buckets = callers.entry(caller.to_owned()).or_default();
        let requests = limits.requests_per_minute.map(|limit| {
            let limit = u64::from(limit);
            let bucket = buckets
                .requests
                .get_or_insert_with(|| Bucket::full(limit, now));
            bucket.refill(limit, now);
            (limit, bucket)
        });
        if let Some((limit, bucket)) = &requests
            && bucket.level < 1.0
        {
            return Err(Refusal {
                kind: "requests",
                limit: *limit,
                retry_after: bucket.until(*limit, 1.0),
            });
        }
        let requests = requests.map(|(limit, bucket)| (limit, *bucket));
        let tokens = limits.tokens_per_minute.map(|limit| {
            let bucket = buckets
                .tokens
                .get_or_insert_with(|| Bucket::full(limit, now));
            bucket.refill(limit, now);
            (limit, *bucket)
        });
        if let Some((limit, bucket)) = tokens
            && bucket.level < 1.0
        {
            return Err(Refusal {
                kind: "tokens",
                limit,
                retry_after: bucket.until(limit, 1.0),
            });
        }
        // Admitted: the request's unit is taken now, its tokens when it ends.
        let requests = requests.map(|(limit, mut bucket)| {
            bucket.level -= 1.0;
            buckets.requests = Some(bucket);
            bucket.standing(limit)
        });
        Ok(Standing {
            requests,
            tokens: tokens.map(|(limit, bucket)| bucket.standing(limit)),
        })
    }

    /// Where `caller` stands under `limits` at `now`, taking nothing (a caller not seen yet
    /// has full buckets).
    pub fn standing(&self, caller: &str, limits: RateLimits, now: Instant) -> Standing {
        let callers = self.lock();
        let buckets = callers.get(caller);
        let stand = |bucket: Option<&Bucket>, limit: u64| {
            let mut bucket = bucket.copied().unwrap_or_else(|| Bucket::full(limit, now));
            bucket.refill(limit, now);
            bucket.standing(limit)
        };
        Standing {
            requests: limits.requests_per_minute.map(|limit| {
                stand(
                    buckets.and_then(|buckets| buckets.requests.as_ref()),
                    u64::from(limit),
                )
            }),
            tokens: limits
                .tokens_per_minute
                .map(|limit| stand(buckets.and_then(|buckets| buckets.tokens.as_ref()), limit)),
        }
    }

    /// Takes the `tokens` a finished request of `caller` used.
    pub fn charge(&self, caller: &str, limits: RateLimits, tokens: u64, now: Instant) {
        let Some(limit) = limits.tokens_per_minute else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let mut callers = self.lock();
        let buckets = callers.entry(caller.to_owned()).or_default();
        let bucket = buckets
            .tokens
            .get_or_insert_with(|| Bucket::full(limit, now));
        bucket.refill(limit, now);
        bucket.level -= tokens as f64;
    }

    /// Drops the buckets that refilled while idle, at most once a second.
    fn prune(&self, callers: &mut HashMap<String, Buckets>, now: Instant) {
        let mut pruned = self
            .pruned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pruned.is_some_and(|last| now.saturating_duration_since(last) < Duration::from_secs(1)) {
            return;
        }
        *pruned = Some(now);
        callers.retain(|_, buckets| !buckets.refilled_while_idle(now));
    }

    /// Callers with buckets, for tests of the bound.
    #[cfg(test)]
    fn callers(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Buckets>> {
        self.callers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1s`, `6m0s`.
pub fn reset_text(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1_000 {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3_600 => format!("{}m{}s", seconds / 60, seconds % 60),
        _ => format!(
            "{}h{}m{}s",
            seconds / 3_600,
            seconds % 3_600 / 60,
            seconds % 60
        ),
    }
}

#[cfg(test)]
mod tests;
