//! Herd control (C7) on one connection: the misses held while another
//! client holds the key's herd lease. A held miss is asked again (its miss
//! script sent once more) when a fill, refusal or invalidation of the key
//! passes through this process, every [`poll_every`] for leaders in other
//! processes, and one last time at its deadline, when it takes a ticket
//! regardless and its nil goes to the client.
//!
//! This is bookkeeping only: the session sends the calls and routes the
//! answers.

use std::time::{Duration, Instant};

use super::translate::ScriptReply;

/// How often a held miss asks Redis again, for leaders in other processes.
pub fn poll_every(hold: Duration) -> Duration {
    (hold / 10).clamp(Duration::from_millis(2), Duration::from_millis(25))
}

/// The misses one connection holds, by the outbox position of their reply.
#[derive(Debug, Default)]
pub struct Holds {
    waits: Vec<Hold>,
}

#[derive(Debug)]
struct Hold {
    slot: u64,
    reply: ScriptReply,
    /// After this, take a ticket regardless (nil goes to the client).
    deadline: Instant,
    /// When to ask Redis again (the lease holder may be another process).
    next_poll: Instant,
    /// Asked again; its answer is on the way.
    in_flight: bool,
}

impl Holds {
    /// Holds the miss in `slot` for up to `hold` from `now`, or, if it is
    /// held already (its answer said "still led elsewhere"), schedules its
    /// next poll. True if the hold is new.
    pub fn hold(&mut self, slot: u64, reply: ScriptReply, hold: Duration, now: Instant) -> bool {
        match self.waits.iter_mut().find(|w| w.slot == slot) {
            Some(wait) => {
                wait.in_flight = false;
                wait.next_poll = now + poll_every(hold);
                false
            }
            None => {
                self.waits.push(Hold {
                    slot,
                    reply,
                    deadline: now + hold,
                    next_poll: now + poll_every(hold),
                    in_flight: false,
                });
                true
            }
        }
    }

    /// The miss held in `slot` is answered; forgets it. Whether it was held.
    pub fn release(&mut self, slot: u64) -> bool {
        let before = self.waits.len();
        self.waits.retain(|w| w.slot != slot);
        self.waits.len() < before
    }

    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }

    /// When the next held miss is due to ask again.
    pub fn next_poll(&self) -> Option<Instant> {
        self.waits
            .iter()
            .filter(|w| !w.in_flight)
            .map(|w| w.next_poll.min(w.deadline))
            .min()
    }

    /// The held misses to ask again now (all of them when `woken`
    /// in-process), marked in flight; past its deadline a miss is `forced`
    /// to take a ticket.
    pub fn due(&mut self, now: Instant, woken: bool) -> Vec<(u64, ScriptReply)> {
        let mut due = Vec::new();
        for wait in self.waits.iter_mut().filter(|w| !w.in_flight) {
            if !woken && wait.next_poll.min(wait.deadline) > now {
                continue;
            }
            let ScriptReply::Miss {
                key,
                policy,
                nil,
                miss,
                ..
            } = &wait.reply
            else {
                continue;
            };
            wait.in_flight = true;
            let reply = ScriptReply::Miss {
                key: key.clone(),
                policy: *policy,
                nil,
                forced: now >= wait.deadline,
                miss: *miss,
                // Asked again with the miss script: the key read with MGET.
                direct: false,
            };
            due.push((wait.slot, reply));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn miss(key: &'static str) -> ScriptReply {
        ScriptReply::Miss {
            key: Bytes::from_static(key.as_bytes()),
            policy: 0,
            nil: b"$-1\r\n",
            forced: false,
            miss: 1,
            direct: false,
        }
    }

    fn forced(due: &[(u64, ScriptReply)]) -> Vec<(u64, bool)> {
        due.iter()
            .map(|(slot, reply)| match reply {
                ScriptReply::Miss { forced, .. } => (*slot, *forced),
                _ => panic!("only misses are held"),
            })
            .collect()
    }

    #[test]
    fn poll_interval_is_a_tenth_of_hold_within_bounds() {
        assert_eq!(poll_every(Duration::from_millis(100)), Duration::from_millis(10));
        assert_eq!(poll_every(Duration::from_millis(5)), Duration::from_millis(2));
        assert_eq!(poll_every(Duration::from_secs(3)), Duration::from_millis(25));
    }

    #[test]
    fn a_held_miss_polls_then_is_forced_at_its_deadline() {
        let t0 = Instant::now();
        let mut holds = Holds::default();
        assert!(holds.hold(7, miss("k"), Duration::from_millis(100), t0));
        assert_eq!(holds.next_poll(), Some(t0 + Duration::from_millis(10)));
        assert!(holds.due(t0 + Duration::from_millis(5), false).is_empty());
        let due = holds.due(t0 + Duration::from_millis(10), false);
        assert_eq!(forced(&due), vec![(7, false)]);
        // In flight: not asked twice, and not counted as a new hold.
        assert!(holds.due(t0 + Duration::from_millis(50), true).is_empty());
        assert_eq!(holds.next_poll(), None);
        assert!(!holds.hold(
            7,
            miss("k"),
            Duration::from_millis(100),
            t0 + Duration::from_millis(11)
        ));
        let due = holds.due(t0 + Duration::from_millis(100), false);
        assert_eq!(forced(&due), vec![(7, true)]);
        assert!(holds.release(7));
        assert!(!holds.release(7));
        assert!(holds.is_empty());
    }

    #[test]
    fn a_wake_asks_every_held_miss_at_once() {
        let t0 = Instant::now();
        let mut holds = Holds::default();
        holds.hold(1, miss("a"), Duration::from_secs(1), t0);
        holds.hold(2, miss("b"), Duration::from_secs(1), t0);
        assert_eq!(forced(&holds.due(t0, true)), vec![(1, false), (2, false)]);
    }
}
