//! Direct reads: the `GET`s of a pattern whose reads mostly miss go to
//! Redis as the miss script itself (fence.lua `miss` with `get`), which
//! reads the key and, if it is missing, records the miss in the same call.
//!
//! A fenced `GET` is forwarded as it is, and only a nil reply sends the
//! miss script: a hit costs what it costs without the proxy, a miss two
//! round trips to Redis. Where most reads miss (a cold cache, keys written
//! more often than read, one-off keys), the `GET` alone is the round trip
//! to save: Redis' work for the pair drops by the `GET` and its network
//! turn, and the miss reaches the application one round trip sooner. A hit
//! through the script costs Redis a script call instead of a `GET`, so
//! reads go direct only while misses stay the clear majority.
//!
//! Each `[[cache]]` section (by its index, modulo [`SLOTS`]) keeps a score:
//! a miss adds 1, a hit takes 2, between 0 and [`CEILING`]. Reads go direct
//! at [`DIRECT_AT`] or more: the score climbs only while more than two
//! reads in three miss, and a section that starts to hit falls back to
//! plain `GET`s within a few hits. A hit-only workload only loads the score
//! (0): no write, no shared cache line bounced between threads. A reload
//! that renumbers the sections leaves each score to the section that now
//! has its index, which settles it again within a few reads.
//!
//! The reply is the `GET`'s (its value, its error, or nil with a ticket),
//! so nothing changes for the client. Not used where a read must stay a
//! `GET` to Redis: inside `MULTI`, and on a connection of its own (client
//! tracking, for one, follows the `GET`s a connection sends).

use std::sync::atomic::{AtomicU32, Ordering};

/// Sections with a score of their own (more share one).
pub const SLOTS: usize = 64;
/// Where a score stops.
pub const CEILING: u32 = 32;
/// The score from which reads go direct.
pub const DIRECT_AT: u32 = 16;

/// The miss scores of the `[[cache]]` sections.
#[derive(Debug)]
pub struct MissScores([AtomicU32; SLOTS]);

impl Default for MissScores {
    fn default() -> MissScores {
        MissScores(std::array::from_fn(|_| AtomicU32::new(0)))
    }
}

impl MissScores {
    /// A read of section `policy` missed.
    pub fn missed(&self, policy: usize) {
        let score = &self.0[policy % SLOTS];
        // Racing updates may lose one: a score, not a count.
        let now = score.load(Ordering::Relaxed);
        if now < CEILING {
            score.store(now + 1, Ordering::Relaxed);
        }
    }

    /// A read of section `policy` hit.
    pub fn hit(&self, policy: usize) {
        let score = &self.0[policy % SLOTS];
        let now = score.load(Ordering::Relaxed);
        if now > 0 {
            score.store(now.saturating_sub(2), Ordering::Relaxed);
        }
    }

    /// Whether reads of section `policy` go direct.
    pub fn direct(&self, policy: usize) -> bool {
        self.0[policy % SLOTS].load(Ordering::Relaxed) >= DIRECT_AT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_direct_only_while_most_miss() {
        let scores = MissScores::default();
        for _ in 0..DIRECT_AT - 1 {
            scores.missed(3);
        }
        assert!(!scores.direct(3));
        scores.missed(3);
        assert!(scores.direct(3));
        assert!(!scores.direct(4), "each section has its own score");
        // Two misses in three hold the score where it is.
        for _ in 0..100 {
            scores.missed(3);
            scores.missed(3);
            scores.hit(3);
        }
        assert!(scores.direct(3));
        // Half of them hitting brings the reads back to GET.
        for _ in 0..CEILING {
            scores.missed(3);
            scores.hit(3);
        }
        assert!(!scores.direct(3));
    }

    #[test]
    fn scores_stay_between_zero_and_the_ceiling() {
        let scores = MissScores::default();
        scores.hit(0);
        assert!(!scores.direct(0));
        for _ in 0..1000 {
            scores.missed(0);
        }
        // From the ceiling, a few hits in a row end direct reads.
        let hits = (CEILING - DIRECT_AT) / 2 + 1;
        for _ in 0..hits {
            scores.hit(0);
        }
        assert!(!scores.direct(0));
        assert!(!scores.direct(SLOTS - 1));
        scores.missed(SLOTS);
        let shared = scores.0[0].load(Ordering::Relaxed);
        assert_eq!(
            shared,
            CEILING - 2 * hits + 1,
            "section {SLOTS} shares section 0's score"
        );
    }
}
