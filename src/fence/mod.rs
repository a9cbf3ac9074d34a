//! Version fences and lease tickets: the consistency layer.
//!
//! - which keys are fenced (`[[cache]]` globs) and how is configuration:
//!   [`crate::config::cache`].
//! - [`client`]: one client connection's fence state; [`plan`]: how an
//!   intercepted request is sent; [`translate`]: how its reply comes back;
//!   [`herd`]: misses held while another client fills the key (C7);
//!   [`probe`]: pipelined writes whose fences are asked for first, sent
//!   without the script where none exists; [`direct`]: reads of a pattern
//!   that mostly misses, sent as the miss script.
//! - [`script`] (and `fence.lua`): the one Lua script that does every fence
//!   operation in Redis, and the fence key naming.
//! - [`epilogue`]: what follows every acknowledged invalidation.
//! - [`invalidator`], [`undelivered`], [`second_delete`]: invalidations the
//!   proxy sends on its own (retried client deletes, `double_delete`).
//! - [`history`]: each key's recent events, for `CACHE.EXPLAIN`.
//! - this module: the state shared by all sessions — counters, and which
//!   keys were missed here lately. The outstanding misses themselves (the
//!   tickets) are fields of each key's fence in Redis, so every proxy in
//!   front of it judges a SET by the same ones.

pub mod client;
pub mod direct;
pub mod epilogue;
pub mod failover;
pub mod herd;
pub mod history;
pub mod invalidator;
pub mod lag;
pub mod plan;
pub mod probe;
pub mod script;
pub mod second_delete;
pub mod translate;
pub mod undelivered;
pub mod visible;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;

pub use crate::config::cache::{CacheSection, LagPolicy, OnStaleFill, OnWrite, Policy, Scope, TicketScope};
use crate::telemetry::Counter;
pub use crate::telemetry::FenceStats;
pub use client::Client;

pub use crate::config::DEFAULT_EXPLAIN_KEYS;
/// Keys this process remembers a recent miss of at once (for
/// `fence_missing`); past it a miss is not remembered (counted as dropped).
pub const MAX_RECENT_MISSES: usize = 1 << 20;

/// Why a fill was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The fence moved since the miss (an invalidation, a write, or another fill won).
    FenceMoved,
    /// The fence is gone (eviction, FLUSH, restart): nothing proves the read is fresh.
    FenceMissing,
    /// Every outstanding miss the SET could belong to is older than `lease_ttl`.
    Expired,
    /// The newest outstanding miss in the ticket scope saw the current fence,
    /// but an older one did not: the SET may be that older miss's stale read.
    OlderMissOutstanding,
    /// The miss was within `lag_window` of an invalidation (`lag_policy = "refuse"`).
    LagWindow,
    /// A delete of the key could not be delivered yet and is being retried.
    PendingDelete,
}

impl Refusal {
    pub fn from_script(reason: &[u8]) -> Refusal {
        match reason {
            b"fence_missing" => Refusal::FenceMissing,
            b"lag_window" => Refusal::LagWindow,
            b"expired" => Refusal::Expired,
            b"older_miss_outstanding" => Refusal::OlderMissOutstanding,
            b"pending_delete" => Refusal::PendingDelete,
            _ => Refusal::FenceMoved,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::FenceMoved => "fence_moved",
            Refusal::FenceMissing => "fence_missing",
            Refusal::Expired => "expired",
            Refusal::OlderMissOutstanding => "older_miss_outstanding",
            Refusal::LagWindow => "lag_window",
            Refusal::PendingDelete => "pending_delete",
        }
    }
}

impl FenceStats {
    pub fn refused(&self, why: Refusal) -> &Counter {
        match why {
            Refusal::FenceMoved => &self.refused_fence_moved,
            Refusal::FenceMissing => &self.refused_fence_missing,
            Refusal::Expired => &self.refused_expired,
            Refusal::OlderMissOutstanding => &self.refused_older_miss_outstanding,
            Refusal::LagWindow => &self.refused_lag_window,
            Refusal::PendingDelete => &self.refused_pending_delete,
        }
    }
}

/// State shared by every session of one proxy process. Soft state only: the
/// fences themselves live in Redis (C4).
#[derive(Debug)]
pub struct Fences {
    /// The `[[cache]]` sections in force; a reload swaps them whole.
    pub scope: LiveScope,
    /// Keys missed here recently, by when (see [`Fences::missed`]).
    recent_misses: DashMap<Bytes, Instant>,
    /// Never fewer than the keys `recent_misses` holds (counted up before
    /// an insert, down after a remove): at 0 a SET need not hash its key
    /// into the map, which a write-heavy proxy would do for every write.
    recent_count: AtomicUsize,
    pub stats: FenceStats,
    next_connection: AtomicU64,
    /// This process's identity in herd lease holder names.
    instance: String,
    /// What follows every acknowledged invalidation; herd waiters.
    pub epilogue: epilogue::Epilogue,
    /// The `double_delete` worker, when some policy asks for it.
    pub second_deletes: Option<second_delete::SecondDeletes>,
    /// Client deletes that could not be delivered, being retried (C3).
    pub undelivered: std::sync::Arc<undelivered::Undelivered>,
    /// `admin_password`: what `CACHE.AUTH` must give before admin commands
    /// (a reload may change it).
    pub admin_password: arc_swap::ArcSwapOption<crate::config::Secret>,
    /// Recent events per key, for `CACHE.EXPLAIN`.
    pub history: std::sync::Arc<history::History>,
    /// The window `lag_window = "auto"` sections are judged by, set by the
    /// replica-lag monitor.
    pub lag: std::sync::Arc<lag::LagGauge>,
    /// A session sent the script's source already. Redis keeps scripts
    /// for the whole server, not per connection, so a new client's first
    /// call goes as `EVALSHA` too (a client that connects per request no
    /// longer sends 20 KB of Lua with its first fenced command); a Redis
    /// that lost it (`SCRIPT FLUSH`, a restart) answers `NOSCRIPT`, and
    /// the call is sent again with the source.
    pub script_sent: std::sync::atomic::AtomicBool,
    /// The upstream's failovers (a Sentinel or Redis Cluster upstream
    /// records them): tickets from before the last one admit no fill.
    pub failovers: std::sync::Arc<failover::Failovers>,
    /// How much each section's reads miss: where most do, `GET`s go as
    /// the miss script ([`direct`]).
    pub miss_scores: direct::MissScores,
}

/// The fenced key space as it is now, shared with the workers: readers
/// load it (no lock, no reference count on the hot path), a reload stores
/// a new one.
pub type LiveScope = std::sync::Arc<arc_swap::ArcSwap<Scope>>;

impl Fences {
    /// The fence state of one process; with `upstream`, starts the retry
    /// worker of undelivered deletes and the `double_delete` worker if some
    /// policy needs it (needs a runtime).
    pub fn new(scope: Scope, upstream: Option<(crate::config::Upstream, Duration)>) -> Fences {
        let scope: LiveScope = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(scope));
        let undelivered = std::sync::Arc::new(undelivered::Undelivered::default());
        let failovers =
            upstream
                .as_ref()
                .and_then(|(upstream, _)| match (&upstream.sentinel, &upstream.cluster) {
                    (Some(sentinel), _) => Some(sentinel.failovers.clone()),
                    (_, Some(cluster)) => Some(cluster.failovers.clone()),
                    _ => None,
                });
        // Only an upstream that can fail over remembers the keys changed.
        if let Some(failovers) = &failovers {
            failovers.replay_into(&undelivered);
        }
        let failovers = failovers.unwrap_or_default();
        let history = std::sync::Arc::new(history::History::new(DEFAULT_EXPLAIN_KEYS));
        // The second-delete worker runs even if no policy asks for it yet (a
        // reload may); it connects on its first job.
        let base = epilogue::Epilogue::new(scope.clone(), history.clone(), failovers.clone());
        let second_deletes = upstream.map(|(upstream, timeout)| {
            undelivered.start(upstream.clone(), timeout, base.clone());
            second_delete::SecondDeletes::start(upstream, timeout, base.clone())
        });
        let epilogue = match &second_deletes {
            Some(worker) => base.with_second_deletes(worker.clone()),
            None => base,
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Fences {
            scope,
            recent_misses: DashMap::new(),
            recent_count: AtomicUsize::new(0),
            stats: FenceStats::default(),
            next_connection: AtomicU64::new(1),
            instance: format!("{}-{nanos:x}", std::process::id()),
            epilogue,
            second_deletes,
            undelivered,
            admin_password: arc_swap::ArcSwapOption::empty(),
            history,
            miss_scores: direct::MissScores::default(),
            lag: std::sync::Arc::default(),
            script_sent: std::sync::atomic::AtomicBool::new(false),
            failovers,
        }
    }

    /// Asks to be woken when `key` is filled, refused or invalidated here.
    pub fn watch(&self, key: &Bytes, session: &std::sync::Arc<tokio::sync::Notify>) {
        self.epilogue.watch(key, session)
    }

    /// Wakes the sessions waiting on `key`.
    pub fn wake(&self, key: &[u8]) {
        self.epilogue.wake(key)
    }

    /// The `[[cache]]` sections in force. Hold the guard for one batch of
    /// work, not across waits.
    pub fn scope(&self) -> arc_swap::Guard<std::sync::Arc<Scope>> {
        self.scope.load()
    }

    /// Whether `key` is fenced now.
    pub fn is_fenced(&self, key: &[u8]) -> bool {
        self.scope().policy(key).is_some()
    }

    /// A new connection identity, for tickets and lease holder names.
    pub fn connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub fn lease_holder(&self, connection: u64) -> String {
        format!("{}:{connection}", self.instance)
    }

    /// A miss of `key` by `connection` went to the database at fence
    /// `version`: counted, recorded for `CACHE.EXPLAIN`, and remembered until
    /// a SET of the key is judged, so that a fence lost meanwhile refuses it.
    pub fn missed(&self, connection: u64, key: &Bytes, version: u64) {
        self.stats.tickets_issued.inc();
        self.history.record(
            key,
            history::Event::now(connection, history::What::Miss { version }),
        );
        if self.recent_count.load(Ordering::SeqCst) >= MAX_RECENT_MISSES
            && !self.recent_misses.contains_key(key)
        {
            self.stats.tickets_dropped.inc();
            return;
        }
        self.recent_count.fetch_add(1, Ordering::SeqCst);
        if self.recent_misses.insert(key.clone(), Instant::now()).is_some() {
            self.recent_count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether a miss of `key` here may still have a fill coming (within
    /// `lease_ttl`); the memory of it ends with the first SET judged.
    pub fn take_recent_miss(&self, key: &[u8], lease_ttl: Duration) -> bool {
        if self.recent_count.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let Some((_, at)) = self.recent_misses.remove(key) else {
            return false;
        };
        self.recent_count.fetch_sub(1, Ordering::SeqCst);
        at.elapsed() <= lease_ttl
    }

    /// Every sample of the fence layer's counters (`CACHE.STATS`,
    /// `/metrics`), the gauges sampled on read set first.
    pub fn visit_stats<'a>(&'a self, out: &mut dyn FnMut(crate::telemetry::Sample<'a>)) {
        self.stats
            .tickets_outstanding
            .set(self.tickets_outstanding() as u64);
        self.undelivered.stats.pending.set(self.undelivered.len() as u64);
        self.stats.visit(out);
        if let Some(worker) = &self.second_deletes {
            worker.stats.visit(out);
        }
        self.undelivered.stats.visit(out);
    }

    /// Keys with a miss here whose SET has not come yet (the outstanding
    /// misses themselves live in the fences, in Redis).
    pub fn tickets_outstanding(&self) -> usize {
        self.recent_misses.len()
    }
}

/// Milliseconds, at least 1, as Redis wants them in `PEXPIRE`.
pub fn millis(d: Duration) -> Bytes {
    decimal(d.as_millis().max(1))
}

/// Microseconds.
pub fn micros(d: Duration) -> Bytes {
    decimal(d.as_micros())
}

impl Fences {
    /// `lease_ttl` as a `fill` call gives it (µs): bounded by the time since
    /// the last failover ([`failover`]).
    pub fn fill_lease(&self, lease_ttl: Duration) -> Bytes {
        match self.failovers.ticket_bound(lease_ttl) {
            None => micros(lease_ttl),
            Some(bound) => Bytes::from(bound.as_micros().to_string()),
        }
    }

    /// `lease_ttl` as a `set` call gives it (µs), where it also says how
    /// long an outstanding miss blocks: after a failover `<lease>,<bound>`.
    /// A miss older than the bound admits no fill, and still blocks for its
    /// whole lease: a pooled or multiplexed client's SET cannot be told
    /// from that miss's stale fill. A short lease would instead let the
    /// next miss's ticket admit it.
    pub fn set_lease(&self, lease_ttl: Duration) -> Bytes {
        match self.failovers.ticket_bound(lease_ttl) {
            None => micros(lease_ttl),
            Some(bound) => Bytes::from(format!("{},{}", lease_ttl.as_micros(), bound.as_micros())),
        }
    }
}

/// The lag window in force, in microseconds. A measured one
/// (`lag_window = "auto"`) grows with the time since its measurement, so
/// it hardly comes twice: made anew, not kept (it would push the repeating
/// values out of [`decimal`]'s few).
pub fn lag_micros(window: Duration, rules: &Policy) -> Bytes {
    match rules.lag_auto {
        true => Bytes::from(window.as_micros().to_string()),
        false => micros(window),
    }
}

/// `n` in decimal. A script call carries the same few durations over and
/// over (a policy's fence TTL and `lease_ttl`, the lag window), so the
/// last few are kept per thread: a repeat costs a reference count, not an
/// allocation.
fn decimal(n: u128) -> Bytes {
    const KEPT: usize = 8;
    thread_local! {
        static RECENT: std::cell::RefCell<(usize, [(u128, Bytes); KEPT])> =
            std::cell::RefCell::new((0, std::array::from_fn(|_| (u128::MAX, Bytes::new()))));
    }
    if n == 0 {
        return Bytes::from_static(b"0");
    }
    RECENT.with_borrow_mut(|(next, kept)| {
        if let Some((_, bytes)) = kept.iter().find(|(value, _)| *value == n) {
            return bytes.clone();
        }
        let bytes = Bytes::from(n.to_string());
        kept[*next] = (n, bytes.clone());
        *next = (*next + 1) % KEPT;
        bytes
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept or made anew, a duration's text is its decimal: more distinct
    /// values than are kept, each asked for several times over.
    #[test]
    fn durations_are_their_decimal_kept_or_not() {
        let values: Vec<u64> = vec![
            0,
            1,
            9,
            10,
            99,
            100,
            1_000,
            30_000,
            5_000_000,
            7,
            123_456_789,
            u64::MAX / 1000,
        ];
        for _ in 0..3 {
            for &n in &values {
                assert_eq!(&micros(Duration::from_micros(n))[..], n.to_string().as_bytes());
                assert_eq!(
                    &millis(Duration::from_millis(n))[..],
                    n.max(1).to_string().as_bytes()
                );
            }
        }
    }

    /// A miss is remembered once per key until a SET takes it; the count
    /// that lets a SET skip the map never falls below what it holds.
    #[test]
    fn a_recent_miss_is_taken_once_and_counted() {
        let every_key = CacheSection {
            pattern: Some("*".into()),
            ..Default::default()
        };
        let fences = Fences::new(Scope::new(&[every_key]).expect("valid sections"), None);
        let (a, b) = (Bytes::from_static(b"user:1"), Bytes::from_static(b"user:2"));
        let lease = Duration::from_secs(10);
        assert!(!fences.take_recent_miss(&a, lease));
        fences.missed(1, &a, 7);
        fences.missed(2, &a, 7);
        fences.missed(1, &b, 7);
        assert_eq!(fences.tickets_outstanding(), 2);
        assert_eq!(fences.recent_count.load(Ordering::SeqCst), 2);
        assert!(fences.take_recent_miss(&a, lease));
        assert!(!fences.take_recent_miss(&a, lease));
        assert!(fences.take_recent_miss(&b, lease));
        assert_eq!(fences.tickets_outstanding(), 0);
        assert_eq!(fences.recent_count.load(Ordering::SeqCst), 0);
        fences.missed(3, &b, 8);
        assert!(fences.take_recent_miss(&b, lease));
    }

    /// A lag window is its decimal too, measured (not kept) or fixed.
    #[test]
    fn lag_windows_are_their_decimal_measured_or_fixed() {
        use crate::config::values::{LagWindow, Span};
        let policy = |lag_window: LagWindow| {
            let section = CacheSection {
                pattern: Some("*".into()),
                lag_window: Some(lag_window),
                ..Default::default()
            };
            Policy::from_section(&section).expect("a valid section")
        };
        let auto = policy(LagWindow::Auto);
        let fixed = policy(LagWindow::Fixed(Span(Duration::from_millis(250))));
        assert!(auto.lag_auto && !fixed.lag_auto);
        for us in [0u64, 1, 250_000, 1_234_567] {
            for rules in [&auto, &fixed] {
                let text = lag_micros(Duration::from_micros(us), rules);
                assert_eq!(&text[..], us.to_string().as_bytes());
            }
        }
    }
}
