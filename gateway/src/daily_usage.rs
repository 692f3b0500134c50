//! Daily token budgets (`tokens_per_day` on an API key or `auth.anonymous_limits`): the
//! prompt and completion tokens each budgeted caller used on the current UTC day, kept in
//! `<state_dir>/daily-usage.json` so that a restart does not hand out a fresh budget.
//!
//! Counts start when a caller has a budget (a budget added by a reload counts from then on)
//! and start again at 00:00 UTC. The file is rewritten (a synced sibling renamed over it)
//! every few seconds while counts change and when the gateway stops: a crash can forget the
//! last seconds' tokens, never the file. A caller is refused once the day's count reaches its budget; the request
//! that crosses it is served whole, since its tokens are known only at its end. Requests in
//! flight hold a reservation of what they may use (see [`DailyUsage::reserve`]), so that many
//! requests at once cannot each cross the budget.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The file under the state directory.
pub const FILE: &str = "daily-usage.json";
const SECONDS_PER_DAY: u64 = 86_400;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Day {
    /// Days since 1970-01-01 (UTC).
    day: u64,
    /// Tokens by caller (`Caller::owner`).
    used: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct State {
    today: Day,
    /// Counts changed since the file was last written.
    dirty: bool,
    /// Tokens that requests in flight may still use, by caller (not kept in the file).
    reserved: BTreeMap<String, u64>,
}

/// The day's counts.
#[derive(Debug)]
pub struct DailyUsage {
    path: PathBuf,
    state: Mutex<State>,
    /// Held by a save from taking the counts until the file is in place: the periodic save
    /// and the one at shutdown neither share a temporary file nor put older counts last.
    saving: Mutex<()>,
}

impl DailyUsage {
    /// Reads the counts kept in `state_dir`, if they are today's.
    pub fn open(state_dir: &Path, now: SystemTime) -> std::io::Result<DailyUsage> {
        let path = state_dir.join(FILE);
        let today = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Day>(&bytes).map_err(|error| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {error}", path.display()),
                )
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Day::default(),
            Err(error) => return Err(error),
        };
        let usage = DailyUsage {
            path,
            state: Mutex::new(State {
                today,
                dirty: false,
                reserved: BTreeMap::new(),
            }),
            saving: Mutex::new(()),
        };
        usage.roll(&mut usage.lock(), now);
        Ok(usage)
    }

    /// Tokens `caller` used today.
    pub fn used(&self, caller: &str, now: SystemTime) -> u64 {
        let mut state = self.lock();
        self.roll(&mut state, now);
        let key = counted_as(&state.today.used, caller);
        state.today.used.get(key).copied().unwrap_or(0)
    }

    /// Admits a request of `caller` that may use up to `tokens` against `budget`: refused
    /// (with the tokens used and held) when what the day's count and the other requests in
    /// flight hold already reaches the budget. The request's own reservation is not weighed
    /// against it, so a lone request is admitted while anything is left and served whole, as
    /// before; what it holds is given back when the reservation is dropped, after the
    /// request's tokens were counted with [`DailyUsage::add`].
    pub fn reserve(
        self: &Arc<Self>,
        caller: &str,
        tokens: u64,
        budget: u64,
        now: SystemTime,
    ) -> Result<Reservation, u64> {
        let mut state = self.lock();
        self.roll(&mut state, now);
        let key = counted_as(&state.today.used, caller).to_owned();
        let used = state.today.used.get(&key).copied().unwrap_or(0);
        let held = state.reserved.get(&key).copied().unwrap_or(0);
        if used.saturating_add(held) >= budget {
            return Err(used.saturating_add(held));
        }
        let entry = state.reserved.entry(key.clone()).or_insert(0);
        *entry = entry.saturating_add(tokens);
        Ok(Reservation {
            usage: Arc::clone(self),
            caller: key,
            tokens,
        })
    }

    /// Counts `tokens` for `caller` today.
    pub fn add(&self, caller: &str, tokens: u64, now: SystemTime) {
        if tokens == 0 {
            return;
        }
        let mut state = self.lock();
        self.roll(&mut state, now);
        let caller = counted_as(&state.today.used, caller).to_owned();
        match state.today.used.get_mut(&caller) {
            Some(used) => *used = used.saturating_add(tokens),
            None => {
                state.today.used.insert(caller, tokens);
            }
        }
        state.dirty = true;
    }

    /// Writes the counts when they changed: a synced sibling file renamed over the old one,
    /// the directory synced, so that a crash or power loss leaves the old counts or the new
    /// ones, never a torn or empty file.
    pub fn save(&self) -> std::io::Result<()> {
        let _saving = self
            .saving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes = {
            let mut state = self.lock();
            if !state.dirty {
                return Ok(());
            }
            state.dirty = false;
            serde_json::to_vec(&state.today).map_err(std::io::Error::other)?
        };
        let written = crate::audit::key::write_atomically(&self.path, &bytes, 0o600);
        if written.is_err() {
            self.lock().dirty = true;
        }
        written
    }

    /// Starts a new day's counts when the UTC date moved on. A clock set back (across
    /// midnight, or an appliance that starts before its clock is set) keeps the counts,
    /// which would otherwise hand every caller a fresh budget; counts dated more than a day
    /// ahead (kept while the clock ran ahead) give way, so budgets do not stay spent until
    /// the clock catches up.
    fn roll(&self, state: &mut State, now: SystemTime) {
        let day = day_of(now);
        if day > state.today.day || state.today.day > day.saturating_add(1) {
            state.today = Day {
                day,
                used: BTreeMap::new(),
            };
            state.dirty = true;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Tokens a request in flight holds of its caller's daily budget, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    usage: Arc<DailyUsage>,
    caller: String,
    tokens: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut state = self.usage.lock();
        if let Some(held) = state.reserved.get_mut(&self.caller) {
            *held = held.saturating_sub(self.tokens);
            if *held == 0 {
                state.reserved.remove(&self.caller);
            }
        }
    }
}

/// The most callers counted apart in a day (anonymous clients counted by address could
/// otherwise grow the map, and the file rewritten every few seconds, without bound).
const CALLERS_MAX: usize = 100_000;
/// Where callers beyond [`CALLERS_MAX`] are counted, together.
const OVERFLOW_CALLER: &str = "overflow";

/// The key `caller` is counted under: its own, or for an anonymous client (keyed by address)
/// once the day's map is full and it is not in it yet, the one shared by all such clients.
/// API keys, a bounded set the configuration names, always keep their own.
fn counted_as<'a>(used: &BTreeMap<String, u64>, caller: &'a str) -> &'a str {
    if caller.starts_with("anonymous") && used.len() >= CALLERS_MAX && !used.contains_key(caller) {
        OVERFLOW_CALLER
    } else {
        caller
    }
}

fn day_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() / SECONDS_PER_DAY)
}

/// How long until the next UTC day starts.
pub fn until_tomorrow(now: SystemTime) -> Duration {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let next = (since.as_secs() / SECONDS_PER_DAY + 1) * SECONDS_PER_DAY;
    Duration::from_secs(next).saturating_sub(since)
}

#[cfg(test)]
mod tests;
