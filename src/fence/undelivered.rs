//! Deletes the proxy could not deliver (C3): a client's `DEL`/`UNLINK`/
//! `GETDEL` of fenced keys whose reply never came — the upstream was
//! unreachable, closed the connection, or did not answer within
//! `reply_timeout`. The client gets an error; the keys wait here and a
//! worker invalidates them (delete + fence moved) until Redis takes them.
//! While a key waits, `GET`s of it through this proxy answer nil and fills
//! of it are refused, so the value the delete was meant to remove is never
//! served or re-stored through the proxy.
//!
//! Bounded: past [`MAX_UNDELIVERED`] keys a further undeliverable delete is
//! still answered with an error but not retried (counted as dropped, logged).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::epilogue::Epilogue;
use super::history::Source;
use super::invalidator::Invalidator;
use crate::config::Upstream;
pub use crate::telemetry::UndeliveredStats;

/// Most keys waiting for a retried delete, per process.
pub const MAX_UNDELIVERED: usize = 100_000;
/// Keys sent per retry round.
const BATCH: usize = 1000;
/// Retry backoff bounds.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct Undelivered {
    /// (database, key) → the generation it was queued at: a key queued again
    /// while its retry is in flight stays queued.
    keys: DashMap<(u32, Bytes), u64>,
    /// `keys.len()`, read on every fenced GET without touching the map.
    count: AtomicUsize,
    generation: AtomicU64,
    wake: Notify,
    pub stats: UndeliveredStats,
}

impl Undelivered {
    /// Queues `keys` of database `db`; `false` for those past the bound.
    pub fn push(&self, db: u32, keys: &[Bytes]) -> bool {
        let mut all = true;
        for key in keys {
            let generation = self.generation.fetch_add(1, Ordering::Relaxed);
            let fresh = !self.keys.contains_key(&(db, key.clone()));
            if fresh && self.count.load(Ordering::Relaxed) >= MAX_UNDELIVERED {
                self.stats.dropped.inc();
                all = false;
                continue;
            }
            if self.keys.insert((db, key.clone()), generation).is_none() {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            self.stats.queued.inc();
        }
        if !all {
            warn!(
                db,
                bound = MAX_UNDELIVERED,
                "undelivered-delete queue full: a delete was answered with an error and will not be retried"
            );
        }
        self.wake.notify_one();
        all
    }

    /// Is a delete of `key` in `db` waiting to be delivered?
    pub fn is_pending(&self, db: u32, key: &[u8]) -> bool {
        self.count.load(Ordering::Relaxed) > 0 && self.keys.contains_key(&(db, Bytes::copy_from_slice(key)))
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Vec<((u32, Bytes), u64)> {
        self.keys
            .iter()
            .take(BATCH)
            .map(|e| (e.key().clone(), *e.value()))
            .collect()
    }

    /// Forgets the keys whose delete Redis took, unless queued again since.
    fn delivered(&self, done: &[((u32, Bytes), u64)]) {
        for (key, generation) in done {
            if self.keys.remove_if(key, |_, g| g == generation).is_some() {
                self.count.fetch_sub(1, Ordering::Relaxed);
                self.stats.delivered.inc();
            }
        }
    }

    /// Starts the retry worker (needs a tokio runtime).
    pub fn start(self: &Arc<Self>, upstream: Upstream, timeout: Duration, epilogue: Epilogue) {
        let this = Arc::downgrade(self);
        let invalidator = Invalidator::new(upstream, timeout);
        tokio::spawn(retry(this, invalidator, epilogue));
    }
}

/// Retries until the queue is empty, backing off while Redis is away; ends
/// when the proxy's state is dropped.
async fn retry(this: std::sync::Weak<Undelivered>, mut invalidator: Invalidator, epilogue: Epilogue) {
    let mut backoff = FIRST_RETRY;
    let mut failing = false;
    loop {
        let Some(queue) = this.upgrade() else { return };
        if queue.is_empty() {
            // Not holding the state for long: the worker ends with it.
            let _ = tokio::time::timeout(Duration::from_secs(1), queue.wake.notified()).await;
            continue;
        }
        let batch = queue.snapshot();
        let mut by_db: Vec<(u32, Vec<Bytes>)> = Vec::new();
        for ((db, key), _) in &batch {
            match by_db.iter_mut().find(|(d, _)| d == db) {
                Some((_, keys)) => keys.push(key.clone()),
                None => by_db.push((*db, vec![key.clone()])),
            }
        }
        let mut result = Ok(());
        for (db, keys) in &by_db {
            result = invalidator.invalidate(*db, keys, Some(&epilogue.scope())).await;
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                queue.delivered(&batch);
                for (db, keys) in &by_db {
                    epilogue.after_invalidation(*db, keys, Source::Retry, 0);
                }
                if failing {
                    info!(keys = batch.len(), "undelivered deletes reached Redis");
                }
                (failing, backoff) = (false, FIRST_RETRY);
            }
            Err(error) => {
                queue.stats.retries.inc();
                if !failing {
                    warn!(%error, waiting = queue.len(), "retrying undelivered deletes until Redis takes them");
                }
                failing = true;
                drop(queue);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(LAST_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_queued_again_during_a_retry_stay_queued() {
        let queue = Undelivered::default();
        queue.push(0, &[Bytes::from_static(b"a"), Bytes::from_static(b"b")]);
        assert!(queue.is_pending(0, b"a") && !queue.is_pending(1, b"a"));
        let batch = queue.snapshot();
        queue.push(0, &[Bytes::from_static(b"a")]);
        queue.delivered(&batch);
        assert!(queue.is_pending(0, b"a"));
        assert!(!queue.is_pending(0, b"b"));
        assert_eq!(queue.len(), 1);
    }
}
