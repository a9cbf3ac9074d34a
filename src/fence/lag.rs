//! `lag_window = "auto"` (#16): the lag window sized from the replicas'
//! own replay lag instead of guessed.
//!
//! **What is measured.** C2 needs, for a read from a replica at time `x`,
//! the age of the newest primary state the replica is known to show: every
//! write acknowledged before `x - lag` is visible there. The monitor
//! ([`crate::changelog::replica_lag`]) samples the primary's WAL insert
//! position every `lag_poll` (`(time, lsn)`: every commit acknowledged
//! before `time` ends at or before `lsn`), and each replica's replay
//! position; a replica that replayed past the sample taken at `time` shows
//! everything acknowledged before `time`. Its lag at `x` is then `x - time`
//! for the newest such sample ([`LagEstimator`]): exact to one `lag_poll`,
//! measured on the proxy's own clock (no clock skew between hosts), zero on
//! an idle primary whose replicas caught up, and growing by itself while a
//! replica stops replaying or cannot be asked, so a stale measurement
//! turns into a lag over the ceiling rather than into a window too short.
//!
//! Why not `pg_stat_replication.replay_lag` on the primary: it goes NULL
//! when the primary is idle, keeps its last value while a standby stops
//! replaying (it measures replayed WAL only), and a disconnected standby
//! drops out of the view. Why not `now() - pg_last_xact_replay_timestamp()`
//! on the replica: it grows on an idle primary (nothing new to replay) and
//! mixes two hosts' clocks.
//!
//! **What is in force** ([`LagGauge`]): the largest lag measured over
//! `lag_interval` (at least `lease_ttl` + `lag_poll`: a fill may come that
//! long after its read), plus `lag_margin`, plus the time since that
//! measurement, for every section with `auto`, up to its `lag_window_max`.
//! Over that ceiling, or with no measurement (and for the first interval,
//! whose earlier reads nobody measured), those sections judge fills by the
//! ceiling with `lag_policy = "refuse"`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::cache::{LagPolicy, Policy};
use crate::telemetry::LagStats;

/// Where [`LagGauge`] keeps "no window measured".
const UNKNOWN: u64 = u64::MAX;

/// The window a fill is judged by: how long after an invalidation the lag
/// rule applies, and what it does inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Judged {
    pub window: Duration,
    pub policy: LagPolicy,
}

/// The measured window, shared by the monitor (which sets it) and every
/// session (which judges fills by it). It ages: a lag grows by at most the
/// time that passes, so the window in force is the last measured one plus
/// the time since it was measured. A monitor that is slow, stalled or gone
/// leaves a window that grows past every ceiling, never one that stays.
#[derive(Debug)]
pub struct LagGauge {
    /// The window when measured, µs (UNKNOWN: none).
    window_us: AtomicU64,
    /// When it was measured, µs after `base`.
    at_us: AtomicU64,
    base: Instant,
    /// Each replica's last measured lag (`None`: never, or not now).
    replicas: Mutex<Vec<(String, Option<Duration>)>>,
    pub stats: LagStats,
}

impl Default for LagGauge {
    fn default() -> LagGauge {
        LagGauge {
            window_us: AtomicU64::new(UNKNOWN),
            at_us: AtomicU64::new(0),
            base: Instant::now(),
            replicas: Mutex::default(),
            stats: LagStats::default(),
        }
    }
}

impl LagGauge {
    /// The window and policy a fill of keys under `rules` is judged by now.
    pub fn judge(&self, rules: &Policy) -> Judged {
        let policy = rules.lag_policy;
        if !rules.lag_auto {
            return Judged {
                window: rules.lag_window,
                policy,
            };
        }
        match self.window() {
            Some(window) if window <= rules.lag_window => Judged { window, policy },
            // Over the ceiling, or nothing measured: the ceiling, strictly.
            _ => Judged {
                window: rules.lag_window,
                policy: LagPolicy::Refuse,
            },
        }
    }

    /// The window in force now (`None`: nothing measured): the measured one
    /// plus the time since.
    pub fn window(&self) -> Option<Duration> {
        self.window_at(self.base.elapsed())
    }

    fn window_at(&self, now: Duration) -> Option<Duration> {
        // `at` first: a newer `at` comes with its window (stored before it).
        let at = Duration::from_micros(self.at_us.load(Ordering::Acquire));
        match self.window_us.load(Ordering::Relaxed) {
            UNKNOWN => None,
            us => Some(Duration::from_micros(us) + now.saturating_sub(at)),
        }
    }

    /// The window measured at `at`, and each replica's lag then.
    pub fn set(&self, at: Instant, window: Option<Duration>, replicas: Vec<(String, Option<Duration>)>) {
        let us = window.map_or(UNKNOWN, |w| (w.as_micros() as u64).min(UNKNOWN - 1));
        self.window_us.store(us, Ordering::Relaxed);
        let since = at.saturating_duration_since(self.base).as_micros() as u64;
        self.at_us.store(since, Ordering::Release);
        self.stats.measured.set(u64::from(window.is_some()));
        self.stats
            .window_ms
            .set(window.map_or(0, |w| w.as_millis() as u64));
        *self.replicas.lock().expect("lag gauge lock") = replicas;
    }

    /// Each replica's name and last measured lag.
    pub fn replicas(&self) -> Vec<(String, Option<Duration>)> {
        self.replicas.lock().expect("lag gauge lock").clone()
    }
}

/// A sample of the primary: every commit acknowledged before `at` ends at
/// or before `lsn`.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    lsn: u64,
}

/// Replica lag from WAL positions (see the module's doc). Pure: the
/// monitor feeds it readings and the times they were taken.
#[derive(Debug)]
pub struct LagEstimator {
    /// The primary's samples, oldest first, kept for `horizon`.
    marks: VecDeque<Mark>,
    /// Per replica: the newest sample time it is known to show.
    shows: Vec<Option<Instant>>,
    /// The largest lag of each measurement, kept for the interval.
    peaks: VecDeque<(Instant, Duration)>,
    /// Since when every replica has been measured: until the peaks cover a
    /// whole interval, a read made before (a miss older than the proxy's
    /// first measurement) may have met a lag nobody saw.
    complete_since: Option<Instant>,
    margin: Duration,
    horizon: Duration,
    /// `wal_block_size`: the primary's insert position may point past a
    /// page header, where no record ends.
    block: u64,
}

/// A bound on kept samples and peaks, whatever the settings.
const MAX_MARKS: usize = 100_000;

/// The longest page header (a segment's first page).
const LONG_PAGE_HEADER: u64 = 40;

impl LagEstimator {
    /// For `replicas` replicas; `horizon`: how far back a replica's
    /// position can be placed (beyond it, its lag grows from the oldest
    /// sample it was known to show).
    pub fn new(replicas: usize, margin: Duration, horizon: Duration) -> LagEstimator {
        LagEstimator {
            marks: VecDeque::new(),
            shows: vec![None; replicas],
            peaks: VecDeque::new(),
            complete_since: None,
            margin,
            horizon,
            block: 8192,
        }
    }

    pub fn set_block_size(&mut self, block: u64) {
        self.block = block.max(LONG_PAGE_HEADER + 1);
    }

    /// The primary's WAL insert position, read by a query sent at `at`.
    pub fn primary(&mut self, at: Instant, lsn: u64) {
        while self.marks.len() >= MAX_MARKS
            || self
                .marks
                .front()
                .is_some_and(|m| at.saturating_duration_since(m.at) > self.horizon)
        {
            self.marks.pop_front();
        }
        self.marks.push_back(Mark { at, lsn });
    }

    /// Replica `i` has replayed WAL up to `replay`.
    pub fn replica(&mut self, i: usize, replay: u64) {
        let block = self.block;
        // The newest sample it covers. A sample a page header past a page
        // start is covered by a replay up to that start.
        let covered = |m: &Mark| {
            let into_page = m.lsn % block;
            replay >= m.lsn || (into_page <= LONG_PAGE_HEADER && replay >= m.lsn - into_page)
        };
        if let Some(mark) = self.marks.iter().rev().find(|m| covered(m)) {
            let shows = &mut self.shows[i];
            *shows = Some(shows.map_or(mark.at, |s| s.max(mark.at)));
        }
    }

    /// Each replica's lag at `now` (`None`: never measured).
    pub fn lags(&self, now: Instant) -> Vec<Option<Duration>> {
        self.shows
            .iter()
            .map(|s| s.map(|at| now.saturating_duration_since(at)))
            .collect()
    }

    /// The window at `now`: the largest lag measured over `interval`
    /// (this measurement included) plus `margin`; `None` while some
    /// replica was never measured, and for the first `interval` after all
    /// were. `interval` must cover the time from a read of the database to
    /// its fill (`lease_ttl`), so the window is the largest lag any fill
    /// judged now may have met.
    pub fn window(&mut self, now: Instant, interval: Duration) -> Option<Duration> {
        let lags = self.lags(now);
        let Some(largest) = lags.iter().try_fold(Duration::ZERO, |m, l| l.map(|l| m.max(l))) else {
            self.complete_since = None;
            return None;
        };
        let since = *self.complete_since.get_or_insert(now);
        while self.peaks.len() >= MAX_MARKS
            || self
                .peaks
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > interval)
        {
            self.peaks.pop_front();
        }
        self.peaks.push_back((now, largest));
        if now.saturating_duration_since(since) < interval {
            return None;
        }
        let peak = self.peaks.iter().map(|(_, l)| *l).max().unwrap_or(largest);
        Some(peak + self.margin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn estimator(replicas: usize) -> LagEstimator {
        LagEstimator::new(replicas, ms(100), ms(60_000))
    }

    const INTERVAL: Duration = Duration::from_millis(1000);

    #[test]
    fn a_replica_that_replayed_the_newest_sample_has_no_lag_but_the_time_since() {
        let t0 = Instant::now();
        let mut e = estimator(1);
        e.primary(t0, 1000);
        e.replica(0, 1000);
        assert_eq!(e.lags(t0 + ms(3)), [Some(ms(3))]);
    }

    #[test]
    fn a_replica_behind_shows_the_newest_sample_it_replayed() {
        let t0 = Instant::now();
        let mut e = estimator(1);
        for i in 0..10 {
            e.primary(t0 + ms(100 * i), 1000 + 100 * i);
        }
        // It replayed up to 1350: the sample at 300 ms (1300) and no later one.
        e.replica(0, 1350);
        assert_eq!(e.lags(t0 + ms(950)), [Some(ms(650))]);
    }

    #[test]
    fn no_window_until_every_replica_is_measured_for_a_whole_interval() {
        let t0 = Instant::now();
        let mut e = estimator(2);
        e.primary(t0, 10);
        e.replica(0, 10);
        assert_eq!(e.window(t0, INTERVAL), None, "replica 1 was never measured");
        e.replica(1, 10);
        assert_eq!(
            e.window(t0 + ms(10), INTERVAL),
            None,
            "a miss before may have met any lag"
        );
        e.primary(t0 + ms(1010), 10);
        e.replica(0, 10);
        e.replica(1, 10);
        assert_eq!(
            e.window(t0 + ms(1010), INTERVAL),
            Some(ms(110)),
            "the first measurement's 10 ms"
        );
        // Nothing new from either: the lag is the time since the sample.
        assert_eq!(e.lags(t0 + ms(5000)), [Some(ms(3990)), Some(ms(3990))]);
    }

    #[test]
    fn the_window_is_the_largest_lag_over_the_interval_plus_the_margin() {
        let t0 = Instant::now();
        let mut e = estimator(1);
        e.primary(t0, 100);
        e.replica(0, 100);
        assert_eq!(e.window(t0, INTERVAL), None);
        e.primary(t0 + ms(500), 200);
        assert_eq!(
            e.window(t0 + ms(1000), INTERVAL),
            Some(ms(1100)),
            "shows t0 at 1 s"
        );
        // Caught up: the peak of 1 s stays for the interval…
        for at in [1100, 1900, 2200] {
            e.primary(t0 + ms(at), 200);
            e.replica(0, 200);
        }
        assert_eq!(e.window(t0 + ms(1900), INTERVAL), Some(ms(1100)));
        // … and then goes.
        assert_eq!(e.window(t0 + ms(2200), INTERVAL), Some(ms(100)));
    }

    #[test]
    fn the_gauge_ages_the_window_by_the_time_since_it_was_measured() {
        let gauge = LagGauge::default();
        assert_eq!(gauge.window_at(ms(5)), None);
        gauge.set(gauge.base + ms(10), Some(ms(300)), vec![]);
        assert_eq!(gauge.window_at(ms(10)), Some(ms(300)));
        assert_eq!(
            gauge.window_at(ms(2010)),
            Some(ms(2300)),
            "a monitor that stopped"
        );
    }

    #[test]
    fn an_insert_position_past_a_page_header_is_covered_by_the_page_start() {
        let t0 = Instant::now();
        let mut e = estimator(1);
        e.primary(t0, 8192 * 3 + 24);
        e.replica(0, 8192 * 3);
        assert_eq!(e.lags(t0 + ms(1)), [Some(ms(1))]);
        // Inside a page, a replay one byte short covers nothing.
        let mut e = estimator(1);
        e.primary(t0, 8192 * 3 + 100);
        e.replica(0, 8192 * 3 + 99);
        assert_eq!(e.lags(t0), [None]);
    }

    #[test]
    fn auto_sections_refuse_by_the_ceiling_above_it_or_unmeasured() {
        let mut section = crate::config::CacheSection::for_pattern("*");
        section.lag_window = Some(crate::config::LagWindow::Auto);
        section.lag_window_max = Some(crate::config::Span(ms(2000)));
        let rules = Policy::from_section(&section).unwrap();
        let gauge = LagGauge::default();
        let strict = Judged {
            window: ms(2000),
            policy: LagPolicy::Refuse,
        };
        assert_eq!(gauge.judge(&rules), strict, "nothing measured yet");
        gauge.set(Instant::now(), Some(ms(400)), vec![]);
        let judged = gauge.judge(&rules);
        assert_eq!(judged.policy, LagPolicy::ShortTtl);
        assert!((ms(400)..ms(450)).contains(&judged.window), "{judged:?}");
        gauge.set(Instant::now(), Some(ms(2500)), vec![]);
        assert_eq!(gauge.judge(&rules), strict);
        // A fixed window ignores the gauge.
        let fixed = Policy::from_section(&crate::config::CacheSection::for_pattern("*")).unwrap();
        assert_eq!(
            gauge.judge(&fixed),
            Judged {
                window: Duration::ZERO,
                policy: LagPolicy::ShortTtl
            }
        );
    }
}
