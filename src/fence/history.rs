//! `CACHE.EXPLAIN key`: the recent history of a key as this proxy saw it —
//! misses with the fence version their ticket holds, fills and why they
//! were refused, invalidations and where they came from, writes — so that
//! "why is this value stale / why was my SET dropped" has an answer.
//!
//! Bounded twice: [`EVENTS_PER_KEY`] per key (oldest dropped first), and
//! `explain_keys` keys in all, holding at most [`MAX_KEY_BYTES`] of key
//! names (the key first recorded longest ago is dropped first). Keys are
//! recorded across databases, by name.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;

use super::Refusal;

/// Events kept per key.
pub const EVENTS_PER_KEY: usize = 16;
/// Bytes of key names kept in all: long keys (Redis allows 512 MiB) cost
/// more than their share of `explain_keys`.
pub const MAX_KEY_BYTES: usize = 64 << 20;

/// Where an invalidation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `DEL`, `UNLINK`, `GETDEL`, or a write under `on_write = "invalidate"`.
    Client,
    /// `CACHE.INVALIDATE`.
    Admin,
    /// A row change read from the PostgreSQL change log.
    ChangeLog,
    /// A client delete Redis could not take at first, delivered by the retry worker.
    Retry,
    /// The second delete of `double_delete`.
    SecondDelete,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// A read found nothing; the reader's ticket holds fence `version`.
    Miss { version: u64 },
    /// A fill was stored.
    FillAccepted,
    /// A fill was stored with its TTL ending `window_us` after the last
    /// invalidation (the lag rule, C2).
    FillShortened { window_us: u64 },
    /// A fill with `NX` found a value and stored nothing.
    FillNotStored,
    /// A fill was refused.
    FillRefused(Refusal),
    /// A fill was refused by the lag rule judged with `window_us`.
    FillRefusedLag { window_us: u64 },
    /// An invalidation was sent (the value deleted, the fence moved).
    Invalidated(Source),
    /// A write without a ticket was stored (`on_write = "write"`).
    Write,
    /// A write was refused (`on_write = "reject"`).
    WriteRejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Wall clock, ms since the Unix epoch.
    pub at_ms: u64,
    /// The client connection (0: the proxy itself).
    pub connection: u64,
    pub what: What,
}

impl Event {
    pub fn now(connection: u64, what: What) -> Event {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Event {
            at_ms,
            connection,
            what,
        }
    }

    /// One line for `CACHE.EXPLAIN`.
    pub fn describe(&self) -> String {
        let who = match self.connection {
            0 => "proxy".to_string(),
            n => format!("conn {n}"),
        };
        let what = match self.what {
            What::Miss { version } => format!("miss: ticket at fence version {version}"),
            What::FillAccepted => "fill stored: the fence had not moved since the miss".to_string(),
            What::FillShortened { window_us } => format!(
                "fill stored with a TTL ending lag_window ({}) after the last invalidation: the miss was \
                 within it, and a replica may not have shown that write",
                window(window_us)
            ),
            What::FillRefusedLag { window_us } => format!(
                "fill refused (lag_window): the miss was within lag_window ({}) of an invalidation, and of an \
                 earlier one too, or lag_policy = refuse, or the replica lag was over lag_window_max or not \
                 measured",
                window(window_us)
            ),
            What::FillNotStored => "fill not stored: NX found a value".to_string(),
            What::FillRefused(why) => format!(
                "fill refused ({}): {}",
                why.as_str(),
                match why {
                    Refusal::FenceMoved => "an invalidation, a write or another fill came after the miss",
                    Refusal::FenceMissing =>
                        "the fence is gone (evicted, flushed, Redis restarted): nothing proves the read fresh",
                    Refusal::Expired => "the ticket was older than lease_ttl, or than the last failover",
                    Refusal::OlderMissOutstanding =>
                        "an older miss of the key, which may have produced this value, saw an earlier fence",
                    Refusal::LagWindow => "the miss was within lag_window of an invalidation",
                    Refusal::PendingDelete => "a delete of the key is waiting to be retried",
                }
            ),
            What::Invalidated(Source::Client) => {
                "invalidated by a client (DEL/UNLINK/GETDEL or on_write)".to_string()
            }
            What::Invalidated(Source::Admin) => "invalidated by CACHE.INVALIDATE".to_string(),
            What::Invalidated(Source::ChangeLog) => "invalidated by the PostgreSQL change log".to_string(),
            What::Invalidated(Source::Retry) => {
                "invalidated by the retry of a client delete Redis could not take before".to_string()
            }
            What::Invalidated(Source::SecondDelete) => "invalidated again by double_delete".to_string(),
            What::Write => "write stored without a ticket (on_write = write): the fence moved".to_string(),
            What::WriteRejected => "write rejected (on_write = reject)".to_string(),
        };
        format!("{} {who} {what}", rfc3339_ms(self.at_ms))
    }
}

/// A window in µs as `CACHE.EXPLAIN` shows it: `1.2s`, `350ms`.
fn window(us: u64) -> String {
    match us {
        us if us >= 1_000_000 => format!("{}s", us as f64 / 1e6),
        us => format!("{}ms", us as f64 / 1e3),
    }
}

/// Recent events per key.
#[derive(Debug)]
pub struct History {
    keys: DashMap<Bytes, VecDeque<Event>>,
    /// Keys in the order first recorded, for the global bounds.
    order: Mutex<Order>,
    max_keys: AtomicUsize,
    /// Whether any key was ever recorded: until then a write has no
    /// history to look up (a write-only workload never pays the lookup).
    any: AtomicBool,
}

impl History {
    pub fn new(max_keys: usize) -> History {
        History {
            keys: DashMap::new(),
            order: Mutex::new(Order::default()),
            max_keys: AtomicUsize::new(max_keys),
            any: AtomicBool::new(false),
        }
    }

    /// `explain_keys` (a reload may change it; 0 turns recording off).
    pub fn set_max_keys(&self, max_keys: usize) {
        self.max_keys.store(max_keys, Ordering::Relaxed);
        if max_keys == 0 {
            self.keys.clear();
            *self.order.lock().unwrap_or_else(|p| p.into_inner()) = Order::default();
        }
    }

    pub fn record(&self, key: &[u8], event: Event) {
        let max_keys = self.max_keys.load(Ordering::Relaxed);
        if max_keys == 0 {
            return;
        }
        if let Some(mut events) = self.keys.get_mut(key) {
            push(&mut events, event);
            return;
        }
        let key = Bytes::copy_from_slice(key);
        match self.keys.entry(key.clone()) {
            // Another session recorded it between the lookup and here.
            dashmap::Entry::Occupied(mut events) => {
                push(events.get_mut(), event);
                return;
            }
            dashmap::Entry::Vacant(slot) => {
                self.any.store(true, Ordering::Relaxed);
                push(slot.insert(VecDeque::with_capacity(4)).value_mut(), event);
            }
        }
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        order.bytes += key.len();
        order.keys.push_back(key);
        while order.keys.len() > max_keys || order.bytes > MAX_KEY_BYTES {
            let Some(oldest) = order.keys.pop_front() else {
                break;
            };
            order.bytes -= oldest.len();
            self.keys.remove(&oldest);
        }
    }

    /// Records `event` only for a key that has a history already. A write
    /// stored without a ticket can only explain something about a miss
    /// before it; a key only ever written has nothing to explain, and a
    /// history entry per write would cost a pipelined write as much as the
    /// rest of its way through the proxy (`bench/fences.sh`).
    pub fn record_if_known(&self, key: &[u8], event: impl FnOnce() -> Event) {
        if !self.any.load(Ordering::Relaxed) {
            return;
        }
        if let Some(mut events) = self.keys.get_mut(key) {
            push(&mut events, event());
        }
    }

    pub fn record_all(&self, keys: &[Bytes], connection: u64, what: What) {
        if self.max_keys.load(Ordering::Relaxed) == 0 {
            return;
        }
        let event = Event::now(connection, what);
        for key in keys {
            self.record(key, event);
        }
    }

    /// The key's events, oldest first.
    pub fn explain(&self, key: &[u8]) -> Vec<Event> {
        self.keys
            .get(key)
            .map(|events| events.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Keys with a history now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The keys with a history, oldest first, and the bytes of their names.
#[derive(Debug, Default)]
struct Order {
    keys: VecDeque<Bytes>,
    bytes: usize,
}

/// Appends `event`, dropping the oldest past [`EVENTS_PER_KEY`].
fn push(events: &mut VecDeque<Event>, event: Event) {
    if events.len() == EVENTS_PER_KEY {
        events.pop_front();
    }
    events.push_back(event);
}

/// `2026-11-23T18:50:01.123Z`.
fn rfc3339_ms(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_795_459_801_005), "2026-11-23T18:50:01.005Z");
    }

    #[test]
    fn a_write_is_recorded_only_where_the_key_has_a_history() {
        let history = History::new(10);
        history.record_if_known(b"a", || Event::now(1, What::Write));
        assert!(history.explain(b"a").is_empty());
        assert_eq!(history.len(), 0, "no entry made for it");
        history.record(b"a", Event::now(1, What::Miss { version: 7 }));
        history.record_if_known(b"a", || Event::now(2, What::Write));
        let whats: Vec<What> = history.explain(b"a").iter().map(|e| e.what).collect();
        assert_eq!(whats, [What::Miss { version: 7 }, What::Write]);
    }

    #[test]
    fn bounded_per_key_and_in_all() {
        let history = History::new(3);
        for i in 0..20u64 {
            history.record(b"a", Event::now(1, What::Miss { version: i }));
        }
        let events = history.explain(b"a");
        assert_eq!(events.len(), EVENTS_PER_KEY);
        assert_eq!(events[0].what, What::Miss { version: 4 });
        assert_eq!(events[15].what, What::Miss { version: 19 });
        for key in [&b"b"[..], b"c", b"d"] {
            history.record(key, Event::now(2, What::Write));
        }
        // `a` was recorded first: it went.
        assert_eq!(history.len(), 3);
        assert!(history.explain(b"a").is_empty());
        assert_eq!(history.explain(b"d").len(), 1);
        // Long names count against the byte bound: two keys of half of it
        // and a third one leave the last two.
        let long = |c: u8| vec![c; MAX_KEY_BYTES / 2];
        let wide = History::new(100);
        for c in [b'x', b'y', b'z'] {
            wide.record(&long(c), Event::now(3, What::Write));
        }
        assert_eq!(wide.len(), 2);
        assert!(wide.explain(&long(b'x')).is_empty());
        assert_eq!(wide.explain(&long(b'z')).len(), 1);
        history.set_max_keys(0);
        history.record(b"e", Event::now(2, What::Write));
        assert!(history.is_empty());
    }
}
