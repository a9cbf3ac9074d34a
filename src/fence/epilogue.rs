//! Where every invalidation ends. A client's `DEL`, `CACHE.INVALIDATE`, a
//! change-log row, a retried client delete and a second delete each reach
//! Redis their own way, but once Redis acknowledged one, the same things
//! follow, here and only here: the misses held on its keys are woken (they
//! ask again and get a ticket for the new fence), the event goes into each
//! key's history (`CACHE.EXPLAIN`), and the second delete of
//! `double_delete` is scheduled.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;

use super::failover::Failovers;
use super::history::{Event, History, Source, What};
use super::second_delete::SecondDeletes;
use super::{LiveScope, Scope};

/// What follows an acknowledged invalidation, shared by the sessions and
/// the workers that send invalidations of their own.
#[derive(Debug, Clone)]
pub struct Epilogue {
    scope: LiveScope,
    history: Arc<History>,
    /// Sessions holding a miss on a key (herd control), woken when a fill,
    /// refusal or invalidation of that key passes through this process.
    waiters: Arc<Waiters>,
    /// Present for the first delivery of an invalidation; absent in the
    /// epilogue the second-delete worker itself uses (a second delete
    /// schedules no third) and in the retry worker's (a retried delete is
    /// the late delete: its key read as a miss until it landed).
    second_deletes: Option<SecondDeletes>,
    /// Told of every key changed, to delete it again after a failover.
    failovers: Arc<Failovers>,
}

/// Sessions waiting per key, and how many keys have any: most
/// invalidations find none, and then cost no lookup.
#[derive(Debug, Default)]
struct Waiters {
    keys: DashMap<Bytes, Vec<Weak<Notify>>>,
    count: AtomicUsize,
}

impl Epilogue {
    pub fn new(scope: LiveScope, history: Arc<History>, failovers: Arc<Failovers>) -> Epilogue {
        Epilogue {
            scope,
            history,
            waiters: Arc::default(),
            second_deletes: None,
            failovers,
        }
    }

    /// The same epilogue, scheduling second deletes through `worker`.
    pub fn with_second_deletes(&self, worker: SecondDeletes) -> Epilogue {
        Epilogue {
            second_deletes: Some(worker),
            ..self.clone()
        }
    }

    /// The `[[cache]]` sections in force (for the workers' invalidations).
    pub fn scope(&self) -> arc_swap::Guard<Arc<super::Scope>> {
        self.scope.load()
    }

    /// Redis acknowledged an invalidation of `keys` in database `db`, made
    /// by `source` (`connection` 0: the proxy itself). A client's command
    /// may name keys outside every pattern, which have no fence and get no
    /// history; every other source names only keys it fenced
    /// (`CACHE.INVALIDATE` fences any key it is given).
    pub fn after_invalidation(&self, db: u32, keys: &[Bytes], source: Source, connection: u64) {
        let scope = self.scope.load();
        // A retried delete (a replayed one among them) is remembered for a
        // later failover, not made again now: that would be its own loop.
        if self.failovers.remembers() {
            self.remember(db, keys, &scope, source != Source::Retry);
        }
        let event = Event::now(connection, What::Invalidated(source));
        for key in keys {
            self.wake(key);
            let policy = scope.policy(key).map(|(_, policy)| policy);
            if source != Source::Client || policy.is_some() {
                self.history.record(key, event);
            }
            if let (Some(worker), Some(delay)) = (&self.second_deletes, policy.and_then(|p| p.double_delete))
            {
                worker.schedule(delay, db, vec![key.clone()]);
            }
        }
    }

    /// What follows an acknowledged write of `keys` (a value stored, not
    /// a fill): the misses held on them are woken, and the keys are
    /// remembered for a failover's replay.
    pub fn after_write(&self, db: u32, keys: &[Bytes]) {
        // One Redis remembers nothing: not even the scope is loaded for it.
        if self.failovers.remembers() {
            self.remember(db, keys, &self.scope.load(), true);
        }
        keys.iter().for_each(|key| self.wake(key));
    }

    /// The fenced ones of `keys`, remembered for a failover's replay
    /// ([`Failovers::replay`]), which deletes them: never a key that is not
    /// a cache (an `MSET` or `DEL` may name both kinds). `late`: a change
    /// acknowledged right after a replay is deleted again at once too.
    /// Callers ask [`Failovers::remembers`] first: one Redis pays no more.
    fn remember(&self, db: u32, keys: &[Bytes], scope: &Scope, late: bool) {
        let fenced: Vec<Bytes> = keys
            .iter()
            .filter(|key| scope.policy(key).is_some())
            .cloned()
            .collect();
        if !fenced.is_empty() {
            self.failovers.changed(db, &fenced, late);
        }
    }

    /// Asks to be woken when `key` is filled, refused or invalidated here.
    pub fn watch(&self, key: &Bytes, session: &Arc<Notify>) {
        let mut waiters = match self.waiters.keys.entry(key.clone()) {
            dashmap::Entry::Occupied(waiters) => waiters.into_ref(),
            dashmap::Entry::Vacant(slot) => {
                self.waiters.count.fetch_add(1, Ordering::AcqRel);
                slot.insert(Vec::new())
            }
        };
        waiters.retain(|w| w.strong_count() > 0);
        waiters.push(Arc::downgrade(session));
    }

    /// Wakes the sessions waiting on `key`.
    pub fn wake(&self, key: &[u8]) {
        if self.waiters.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some((_, waiters)) = self.waiters.keys.remove(key) {
            self.waiters.count.fetch_sub(1, Ordering::AcqRel);
            for waiter in waiters.iter().filter_map(Weak::upgrade) {
                waiter.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::undelivered::Undelivered;
    use crate::fence::{CacheSection, Scope};

    /// Only cache keys are remembered for a failover's replay: it deletes
    /// them, and a key outside every pattern is data.
    #[test]
    fn a_replay_remembers_fenced_keys_only() {
        let section = CacheSection {
            pattern: Some("cache:*".into()),
            ..Default::default()
        };
        let scope: LiveScope = Arc::new(arc_swap::ArcSwap::from_pointee(
            Scope::new(&[section]).expect("valid sections"),
        ));
        let failovers = Arc::new(Failovers::default());
        let undelivered = Arc::new(Undelivered::default());
        failovers.replay_into(&undelivered);
        let epilogue = Epilogue::new(scope, Arc::new(History::new(16)), failovers.clone());
        let keys =
            |names: &[&str]| -> Vec<Bytes> { names.iter().map(|n| Bytes::from(n.to_string())).collect() };
        epilogue.after_write(0, &keys(&["cache:1", "balance:1"]));
        epilogue.after_invalidation(2, &keys(&["cache:2", "session:2"]), Source::Client, 1);
        failovers.replay();
        assert!(undelivered.is_pending(0, b"cache:1"));
        assert!(undelivered.is_pending(2, b"cache:2"));
        assert!(!undelivered.is_pending(0, b"balance:1"));
        assert!(!undelivered.is_pending(2, b"session:2"));
        assert_eq!(undelivered.len(), 2);
    }
}
