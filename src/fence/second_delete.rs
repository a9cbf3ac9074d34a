//! `double_delete`: a second fenced delete some time after an invalidation,
//! for readers that fill from a replica that had not caught up yet.
//!
//! One worker per process sends them through its own [`Invalidator`], in
//! the database the client's invalidation was made in, in the order they
//! were scheduled; the queue is bounded and a full queue drops (and counts)
//! the second delete — the first one and the fence already happened.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::epilogue::Epilogue;
use super::history::Source;
use super::invalidator::Invalidator;
use crate::config::Upstream;
pub use crate::telemetry::SecondDeleteStats;

/// Second deletes waiting at most, per process.
const QUEUE: usize = 10_000;

#[derive(Debug)]
struct Job {
    due: Instant,
    db: u32,
    keys: Vec<Bytes>,
}

#[derive(Debug, Clone)]
pub struct SecondDeletes {
    jobs: mpsc::Sender<Job>,
    pub stats: std::sync::Arc<SecondDeleteStats>,
}

impl SecondDeletes {
    /// Starts the worker (needs a tokio runtime).
    pub fn start(upstream: Upstream, timeout: Duration, epilogue: Epilogue) -> SecondDeletes {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let stats = std::sync::Arc::new(SecondDeleteStats::default());
        let invalidator = Invalidator::new(upstream, timeout);
        tokio::spawn(worker(queue, invalidator, epilogue, stats.clone()));
        SecondDeletes { jobs, stats }
    }

    /// Deletes `keys` again (moving their fences) after `delay`.
    pub fn schedule(&self, delay: Duration, db: u32, keys: Vec<Bytes>) {
        let job = Job {
            due: Instant::now() + delay,
            db,
            keys,
        };
        if self.jobs.try_send(job).is_err() {
            self.stats.dropped.inc();
            warn!("second-delete queue full: dropping one (the first delete and the fence stand)");
        }
    }
}

async fn worker(
    mut queue: mpsc::Receiver<Job>,
    mut invalidator: Invalidator,
    epilogue: Epilogue,
    stats: std::sync::Arc<SecondDeleteStats>,
) {
    while let Some(job) = queue.recv().await {
        tokio::time::sleep_until(job.due.into()).await;
        let mut done = false;
        for _ in 0..2 {
            match invalidator
                .invalidate(job.db, &job.keys, Some(&epilogue.scope()))
                .await
            {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(error) => debug!(%error, "second delete failed; reconnecting"),
            }
        }
        match done {
            true => {
                stats.done.inc();
                epilogue.after_invalidation(job.db, &job.keys, Source::SecondDelete, 0);
            }
            false => {
                stats.failed.inc();
                warn!(
                    keys = job.keys.len(),
                    "second delete failed twice; giving up (the first delete and the fence stand)"
                );
            }
        }
    }
}
