//! Tickets issued before a failover admit no fill after it (#19).
//!
//! Redis replicates asynchronously: a master that fails may take its last
//! fence moves with it. A miss recorded before the failover, whose
//! invalidation the new master never received, would find its version
//! still in the fence and have its stale read admitted. So once the proxy
//! learns that the master changed (Sentinel's `+switch-master`, or a
//! connection that finds its master demoted), every ticket from before
//! counts as expired: fills are judged with a lease no longer than the
//! time since the failover, less [`CLOCK_SKEW`] (a miss's time is the old
//! master's clock, the fill's age the new master's).
//!
//! For a plain `SET` judged by the misses in its scope (pooled and
//! multiplexed clients), an outstanding miss from before the failover
//! keeps blocking for its lease as any miss does, and refuses every SET
//! judged while it is the oldest: that SET may be its stale fill.
//!
//! The bound only ever refuses fills (a cold key is filled again by its
//! next miss), and it lapses once it reaches `lease_ttl`: by then every
//! ticket from before the failover is expired anyway. A proxy with a
//! Sentinel upstream starts with the same bound: it cannot know whether
//! the master changed before it started.
//!
//! The same failover may lose the invalidations and writes themselves: a
//! `DEL` the old master acknowledged and never replicated leaves the old
//! value cached on the new master, for good (C1's "every cached key equals
//! the database or is absent" would not hold). So the fenced keys written
//! or invalidated through this process in the last [`REPLAY_WINDOW`] are
//! remembered (bounded by [`REPLAY_KEYS`] entries and [`REPLAY_BYTES`]),
//! and after a failover [`replay`] hands them to the retry worker of
//! undelivered deletes (C3): each is deleted on the new master with its
//! fence moved, and reads of it through this proxy miss until that is
//! done. A key deleted that did not need it costs one miss. Keys outside
//! every `[[cache]]` pattern are never remembered: they are data, and a
//! replayed delete would lose them.
//!
//! [`replay`]: Failovers::replay

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};

use super::undelivered::Undelivered;

/// How far the clocks of two Redis hosts may disagree: a ticket issued up
/// to this long after the failover is refused too.
pub const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// How long before a failover is noticed a write or invalidation may have
/// been lost with the old master. Sentinel declares a master down after
/// `down-after-milliseconds` (30 s by default) and the proxy writes to it
/// until the switch; a cluster's `cluster-node-timeout` is 15 s by default.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// Most changes remembered for a replay (a key changed again right after
/// itself takes no second entry). Past it the oldest are forgotten
/// (counted, and logged at the failover that could not replay them): at a
/// high write rate this, not the window, bounds what a replay covers.
pub const REPLAY_KEYS: usize = 65_536;
/// Most bytes of key names remembered: keys may be long.
pub const REPLAY_BYTES: usize = 8 << 20;
/// For this long after a replay, a key changed is deleted again at once: a
/// write the old master acknowledged just before the switch may have its
/// reply read only after the replay took the list.
pub const REPLAY_GRACE: Duration = Duration::from_secs(2);

/// The failovers this process has seen.
#[derive(Debug)]
pub struct Failovers {
    count: AtomicU64,
    /// When the last one was seen: µs since `origin`, plus 1 (0: none).
    last: AtomicU64,
    origin: Instant,
    /// Keys written or invalidated lately, once [`Failovers::replay_into`]
    /// gave them somewhere to go.
    changed: Mutex<Changed>,
    replay_to: OnceLock<Weak<Undelivered>>,
    /// When the last replay ran, as `last` is kept.
    replayed_at: AtomicU64,
    /// Keys handed to the retry worker after failovers.
    pub replayed: AtomicU64,
    /// Changes within the window that were forgotten for room, and so not
    /// replayed.
    pub unreplayed: AtomicU64,
}

/// The changes remembered, in the order they came. This is on the path of
/// every fenced write behind Sentinel or a cluster, so it is a queue and
/// nothing more (no map per key); duplicates go at the replay.
#[derive(Debug, Default)]
struct Changed {
    queue: VecDeque<(Instant, u32, Bytes)>,
    bytes: usize,
    /// Changes dropped for room while still in the window.
    forgotten: u64,
}

impl Changed {
    fn add(&mut self, now: Instant, db: u32, key: &[u8]) {
        if let Some(last) = self.queue.back_mut()
            && last.1 == db
            && last.2 == key
        {
            last.0 = now;
            return;
        }
        self.bytes += key.len();
        // A copy: the key may be a slice of a whole request's buffer.
        self.queue.push_back((now, db, Bytes::copy_from_slice(key)));
    }

    /// Drops what is older than the window, and the oldest past the bounds.
    fn trim(&mut self, now: Instant) {
        while let Some((at, _, key)) = self.queue.front() {
            let old = now.saturating_duration_since(*at) > REPLAY_WINDOW;
            if !old && self.queue.len() <= REPLAY_KEYS && self.bytes <= REPLAY_BYTES {
                break;
            }
            self.bytes -= key.len();
            self.forgotten += u64::from(!old);
            self.queue.pop_front();
        }
    }
}

impl Default for Failovers {
    fn default() -> Failovers {
        Failovers {
            count: AtomicU64::new(0),
            last: AtomicU64::new(0),
            origin: Instant::now(),
            changed: Mutex::default(),
            replay_to: OnceLock::new(),
            replayed_at: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            unreplayed: AtomicU64::new(0),
        }
    }
}

impl Failovers {
    /// Keys changed from now on are remembered, and replayed into
    /// `undelivered` after a failover. Only for an upstream that can fail
    /// over: one Redis never remembers anything.
    pub fn replay_into(&self, undelivered: &Arc<Undelivered>) {
        let _ = self.replay_to.set(Arc::downgrade(undelivered));
    }

    /// Whether changed keys are remembered (the upstream can fail over).
    pub fn remembers(&self) -> bool {
        self.replay_to.get().is_some()
    }

    /// Fenced `keys` of database `db` were written or invalidated
    /// (acknowledged). Only cache keys: a replay deletes them. `late`: if
    /// a replay ran less than [`REPLAY_GRACE`] ago, they are deleted again
    /// at once (not for the replay's own deletes, delivered).
    pub fn changed(&self, db: u32, keys: &[Bytes], late: bool) {
        let Some(target) = self.replay_to.get() else {
            return;
        };
        let now = Instant::now();
        let replayed_at = self.replayed_at.load(Ordering::Acquire);
        if late
            && replayed_at > 0
            && self
                .since_origin(now)
                .saturating_sub(Duration::from_micros(replayed_at - 1))
                < REPLAY_GRACE
            && let Some(undelivered) = target.upgrade()
        {
            undelivered.push(db, keys);
            self.replayed.fetch_add(keys.len() as u64, Ordering::Relaxed);
        }
        self.changed_at(now, db, keys);
    }

    fn changed_at(&self, now: Instant, db: u32, keys: &[Bytes]) {
        let mut changed = self.changed.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            changed.add(now, db, key);
        }
        changed.trim(now);
    }

    fn since_origin(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    /// After a failover: the keys changed within [`REPLAY_WINDOW`] are
    /// deleted again on the new master, by the retry worker of undelivered
    /// deletes; and for [`REPLAY_GRACE`] keys changed are deleted again at
    /// once. Call it once connections reach the new master (connections
    /// to the old one revoked, or the slot map updated), so that no replayed
    /// delete lands on the old master. Its work grows with the keys
    /// remembered (65,536 at most: milliseconds, once per failover).
    pub fn replay(&self) {
        let Some(undelivered) = self.replay_to.get().and_then(Weak::upgrade) else {
            return;
        };
        let now = Instant::now();
        let micros = u64::try_from(self.since_origin(now).as_micros()).unwrap_or(u64::MAX - 1);
        self.replayed_at.store(micros + 1, Ordering::Release);
        let (mut keys, forgotten) = {
            let mut changed = self.changed.lock().unwrap_or_else(|p| p.into_inner());
            changed.trim(now);
            let mut seen = HashSet::new();
            let keys: Vec<(u32, Bytes)> = std::mem::take(&mut changed.queue)
                .into_iter()
                .map(|(_, db, key)| (db, key))
                .filter(|entry| seen.insert(entry.clone()))
                .collect();
            changed.bytes = 0;
            (keys, std::mem::take(&mut changed.forgotten))
        };
        keys.sort_unstable_by_key(|(db, _)| *db);
        for run in keys.chunk_by(|a, b| a.0 == b.0) {
            let db_keys: Vec<Bytes> = run.iter().map(|(_, key)| key.clone()).collect();
            undelivered.push(run[0].0, &db_keys);
        }
        let count = keys.len();
        self.replayed.fetch_add(count as u64, Ordering::Relaxed);
        self.unreplayed.fetch_add(forgotten, Ordering::Relaxed);
        info!(
            keys = count,
            "keys changed before the failover are deleted again on the new master"
        );
        if forgotten > 0 {
            warn!(
                forgotten,
                bound = REPLAY_KEYS,
                "keys changed shortly before the failover were forgotten for room and not deleted again"
            );
        }
    }

    /// The master changed now.
    pub fn record(&self) {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.last.store(micros + 1, Ordering::Release);
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    /// Tickets from before now admit no fill, as after a failover, without
    /// counting one: a proxy that starts cannot know whether the master
    /// changed while it was not running, and misses recorded through other
    /// proxies before then may be judged here.
    pub fn bound_from_now(&self) {
        let micros = u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.last.store(micros + 1, Ordering::Release);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The longest a ticket may have lived for its fill to be admitted now,
    /// when that is less than `lease`: the time since the last failover
    /// less [`CLOCK_SKEW`]. `None`: `lease` alone bounds it.
    pub fn ticket_bound(&self, lease: Duration) -> Option<Duration> {
        match self.last.load(Ordering::Acquire) {
            0 => None,
            last => self.bound_at(self.origin.elapsed(), Duration::from_micros(last - 1), lease),
        }
    }

    fn bound_at(&self, now: Duration, failover: Duration, lease: Duration) -> Option<Duration> {
        let since = now.saturating_sub(failover).saturating_sub(CLOCK_SKEW);
        (since < lease).then_some(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    fn without_a_failover_the_lease_alone_bounds_tickets() {
        let failovers = Failovers::default();
        assert_eq!(failovers.ticket_bound(LEASE), None);
        assert_eq!(failovers.count(), 0);
    }

    #[test]
    fn from_start_tickets_are_bounded_without_counting_a_failover() {
        let failovers = Failovers::default();
        failovers.bound_from_now();
        assert_eq!(failovers.count(), 0);
        assert_eq!(failovers.ticket_bound(LEASE), Some(Duration::ZERO));
    }

    #[test]
    fn after_a_failover_tickets_from_before_it_are_expired() {
        let failovers = Failovers::default();
        failovers.record();
        assert_eq!(failovers.count(), 1);
        // Right after it, within the clock skew: no ticket is young enough.
        assert_eq!(failovers.ticket_bound(LEASE), Some(Duration::ZERO));
        let at = Duration::from_secs(100);
        let s = |secs: f64| Duration::from_secs_f64(secs);
        assert_eq!(failovers.bound_at(at + s(0.5), at, LEASE), Some(Duration::ZERO));
        assert_eq!(failovers.bound_at(at + s(3.0), at, LEASE), Some(s(2.0)));
        assert_eq!(failovers.bound_at(at + s(10.999), at, LEASE), Some(s(9.999)));
        // Past lease_ttl + the skew every ticket from before is expired anyway.
        assert_eq!(failovers.bound_at(at + s(11.0), at, LEASE), None);
        assert_eq!(failovers.bound_at(at + s(60.0), at, LEASE), None);
    }

    fn key(name: &str) -> Bytes {
        Bytes::copy_from_slice(name.as_bytes())
    }

    /// Failovers that remember changes, and where they replay them.
    fn remembering() -> (Failovers, Arc<Undelivered>) {
        let failovers = Failovers::default();
        let undelivered = Arc::new(Undelivered::default());
        failovers.replay_into(&undelivered);
        (failovers, undelivered)
    }

    #[test]
    fn keys_changed_within_the_window_are_deleted_again_after_a_failover() {
        let failovers = Failovers::default();
        let undelivered = Arc::new(Undelivered::default());
        // Not remembered before the upstream is known to fail over.
        failovers.changed(0, &[key("before")], true);
        failovers.replay_into(&undelivered);
        let start = Instant::now();
        failovers.changed_at(start, 0, &[key("old")]);
        let later = start + REPLAY_WINDOW + Duration::from_secs(1);
        failovers.changed_at(later, 0, &[key("k1"), key("k2")]);
        failovers.changed_at(later, 3, &[key("k3")]);
        failovers.changed_at(later, 0, &[key("k4"), key("k1")]);
        failovers.record();
        failovers.replay();
        for (db, name) in [(0, "k1"), (0, "k2"), (3, "k3"), (0, "k4")] {
            assert!(undelivered.is_pending(db, name.as_bytes()), "{db} {name}");
        }
        for name in ["before", "old"] {
            assert!(!undelivered.is_pending(0, name.as_bytes()), "{name}");
        }
        assert_eq!(undelivered.len(), 4);
        assert_eq!(failovers.replayed.load(Ordering::Relaxed), 4);
        assert_eq!(failovers.unreplayed.load(Ordering::Relaxed), 0);
        // Handed over once: a second failover replays what changed since.
        failovers.replay();
        assert_eq!(failovers.replayed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_key_changed_again_in_a_row_takes_one_entry_with_its_last_time() {
        // Kept: the replay hands its keys to it.
        let (failovers, _undelivered) = remembering();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        for i in 0..300 {
            failovers.changed_at(at(10 * i), 0, &[key("hot")]);
        }
        failovers.changed_at(at(3000), 0, &[key("other")]);
        failovers.changed_at(at(3010), 0, &[key("hot")]);
        let changed = failovers.changed.lock().unwrap();
        let entries: Vec<(Instant, &[u8])> = changed.queue.iter().map(|(t, _, k)| (*t, &k[..])).collect();
        assert_eq!(
            entries,
            [(at(2990), &b"hot"[..]), (at(3000), b"other"), (at(3010), b"hot")]
        );
        drop(changed);
        failovers.replay();
        assert_eq!(failovers.replayed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn right_after_a_replay_a_change_is_deleted_again_at_once() {
        let (failovers, undelivered) = remembering();
        failovers.changed(0, &[key("before")], true);
        assert!(!undelivered.is_pending(0, b"before"));
        failovers.record();
        failovers.replay();
        assert!(undelivered.is_pending(0, b"before"));
        // A reply read after the replay, of a write the old master took.
        failovers.changed(0, &[key("late")], true);
        assert!(undelivered.is_pending(0, b"late"));
        assert_eq!(failovers.replayed.load(Ordering::Relaxed), 2);
        // The replay's own deletes, delivered, are remembered only (else
        // each delivery would queue the next).
        failovers.changed(0, &[key("delivered")], false);
        assert!(!undelivered.is_pending(0, b"delivered"));
        // Remembered for a later failover, as the late one is.
        assert_eq!(failovers.changed.lock().unwrap().queue.len(), 2);
    }

    #[test]
    fn past_the_bound_the_oldest_keys_are_forgotten_and_counted() {
        let (failovers, undelivered) = remembering();
        let keys: Vec<Bytes> = (0..REPLAY_KEYS + 5).map(|i| key(&format!("k{i}"))).collect();
        failovers.changed_at(Instant::now(), 0, &keys);
        failovers.replay();
        assert_eq!(failovers.replayed.load(Ordering::Relaxed), REPLAY_KEYS as u64);
        assert_eq!(failovers.unreplayed.load(Ordering::Relaxed), 5);
        assert!(!undelivered.is_pending(0, b"k4"));
        assert!(undelivered.is_pending(0, b"k5"));
        assert!(undelivered.is_pending(0, format!("k{}", REPLAY_KEYS + 4).as_bytes()));
    }
}
