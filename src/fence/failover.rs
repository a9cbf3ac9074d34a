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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How far the clocks of two Redis hosts may disagree: a ticket issued up
/// to this long after the failover is refused too.
pub const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// The failovers this process has seen.
#[derive(Debug)]
pub struct Failovers {
    count: AtomicU64,
    /// When the last one was seen: µs since `origin`, plus 1 (0: none).
    last: AtomicU64,
    origin: Instant,
}

impl Default for Failovers {
    fn default() -> Failovers {
        Failovers {
            count: AtomicU64::new(0),
            last: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }
}

impl Failovers {
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
}
