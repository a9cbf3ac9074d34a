//! `double_delete`: a second fenced delete some time after an invalidation,
//! for readers that fill from a replica that had not caught up yet.
//!
//! One worker per process sends them on its own upstream connection, in
//! the database the client's invalidation was made in, in the order they
//! were scheduled; the queue is bounded and a full queue drops (and counts)
//! the second delete — the first one and the fence already happened.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::script;
use crate::config::Upstream;
use crate::metrics::Counter;
use crate::session::upstream;

/// Second deletes waiting at most, per process.
const QUEUE: usize = 10_000;

#[derive(Debug)]
struct Job {
    due: Instant,
    db: u32,
    keys: Vec<Bytes>,
    args: Vec<Bytes>,
}

#[derive(Debug, Default)]
pub struct SecondDeleteStats {
    pub done: Counter,
    pub dropped: Counter,
    pub failed: Counter,
}

#[derive(Debug)]
pub struct SecondDeletes {
    jobs: mpsc::Sender<Job>,
    pub stats: std::sync::Arc<SecondDeleteStats>,
}

impl SecondDeletes {
    /// Starts the worker (needs a tokio runtime).
    pub fn start(upstream: Upstream, connect_timeout: Duration) -> SecondDeletes {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let stats = std::sync::Arc::new(SecondDeleteStats::default());
        tokio::spawn(worker(queue, upstream, connect_timeout, stats.clone()));
        SecondDeletes { jobs, stats }
    }

    /// Deletes `keys` again (moving their fences) after `delay`.
    pub fn schedule(&self, delay: Duration, db: u32, keys: Vec<Bytes>, fence_ttl: Duration) {
        let (keys, args) = script::invalidation(&keys, fence_ttl);
        let job = Job {
            due: Instant::now() + delay,
            db,
            keys,
            args,
        };
        if self.jobs.try_send(job).is_err() {
            self.stats.dropped.inc();
            warn!("second-delete queue full: dropping one (the first delete and the fence stand)");
        }
    }
}

/// The worker's connection: which database it has selected, and whether
/// the script was sent with its source on it.
struct Connection {
    stream: TcpStream,
    db: u32,
    loaded: bool,
}

async fn worker(
    mut queue: mpsc::Receiver<Job>,
    upstream: Upstream,
    timeout: Duration,
    stats: std::sync::Arc<SecondDeleteStats>,
) {
    let mut connection: Option<Connection> = None;
    while let Some(job) = queue.recv().await {
        tokio::time::sleep_until(job.due.into()).await;
        let mut done = false;
        for _ in 0..2 {
            match tokio::time::timeout(timeout, run(&mut connection, &job, &upstream, timeout)).await {
                Ok(Ok(())) => {
                    done = true;
                    break;
                }
                Ok(Err(error)) => debug!(%error, "second delete failed; reconnecting"),
                Err(_) => debug!("second delete timed out; reconnecting"),
            }
            connection = None;
        }
        match done {
            true => stats.done.inc(),
            false => {
                stats.failed.inc();
                warn!(
                    keys = job.keys.len() / 2,
                    "second delete failed twice; giving up (the first delete and the fence stand)"
                );
            }
        }
    }
}

async fn run(
    connection: &mut Option<Connection>,
    job: &Job,
    upstream: &Upstream,
    timeout: Duration,
) -> std::io::Result<()> {
    if connection.is_none() {
        let stream = upstream::connect(upstream, timeout)
            .await
            .map_err(std::io::Error::other)?;
        *connection = Some(Connection {
            stream,
            db: upstream.db,
            loaded: false,
        });
    }
    let conn = connection.as_mut().expect("connected");
    if conn.db != job.db {
        let db = job.db.to_string();
        let select = crate::resp::encode::command(&[b"SELECT", db.as_bytes()]);
        upstream::call(&mut conn.stream, &select)
            .await
            .map_err(std::io::Error::other)?;
        conn.db = job.db;
    }
    let keys: Vec<&[u8]> = job.keys.iter().map(|k| &k[..]).collect();
    let args: Vec<&[u8]> = job.args.iter().map(|a| &a[..]).collect();
    let request = match conn.loaded {
        true => script::call(&keys, &args),
        false => script::call_with_source(&keys, &args),
    };
    conn.loaded = true;
    upstream::call(&mut conn.stream, &request)
        .await
        .map_err(std::io::Error::other)
}
