//! The outbox consumer: one task per proxy process.
//!
//! It wakes on a `NOTIFY` (low latency) or every `poll_interval` (NOTIFY is
//! not durable), then drains the outbox in batches, each in one
//! transaction: claim rows with `FOR UPDATE SKIP LOCKED` (so several
//! proxies share one outbox without taking the same row), invalidate their
//! keys in Redis through the same script as a client's `DEL`, and only
//! after Redis acknowledged, delete the rows and commit. Any failure rolls
//! the batch back: its rows stay for the next attempt (at least once).
//!
//! PostgreSQL or Redis away: retried with backoff, logged once per change
//! of state; client traffic is not affected.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deadpool_postgres::tokio_postgres::{AsyncMessage, Client, NoTls};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::install::describe;
use crate::config::Upstream;
use crate::config::postgres::ChangeLogConfig;
use crate::config::template::ident;
use crate::fence::LiveScope;
use crate::fence::epilogue::Epilogue;
use crate::fence::history::Source;
use crate::fence::invalidator::Invalidator;
use crate::telemetry::ChangeLogStats;

/// Longest any one PostgreSQL step (connect, claim, delete, commit) may take.
const PG_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_RETRY: Duration = Duration::from_millis(200);
const LAST_RETRY: Duration = Duration::from_secs(5);

/// Why a drain stopped.
#[derive(Debug)]
enum Failure {
    Postgres(String),
    Redis(String),
}

impl Failure {
    fn side(&self) -> &'static str {
        match self {
            Failure::Postgres(_) => "postgres",
            Failure::Redis(_) => "redis",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Postgres(e) => write!(f, "PostgreSQL: {e}"),
            Failure::Redis(e) => write!(f, "Redis: {e}"),
        }
    }
}

fn pg(error: deadpool_postgres::tokio_postgres::Error) -> Failure {
    Failure::Postgres(describe(&error))
}

/// Where the change log's invalidations go: the upstream, and, with fences
/// on, the fenced key space and where every invalidation ends.
#[derive(Debug, Clone)]
pub struct Target {
    pub upstream: Upstream,
    pub connect_timeout: Duration,
    pub fences: Option<(LiveScope, Epilogue)>,
}

/// Runs the consumer until `stop` turns true.
pub async fn run(
    config: ChangeLogConfig,
    target: Target,
    stats: Arc<ChangeLogStats>,
    mut stop: watch::Receiver<bool>,
) {
    let manager = Manager::from_config(
        config.pg_config(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        },
    );
    let pool = match Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(PG_TIMEOUT))
        .create_timeout(Some(PG_TIMEOUT))
        .recycle_timeout(Some(PG_TIMEOUT))
        .build()
    {
        Ok(pool) => pool,
        Err(error) => {
            warn!(%error, "change log disabled: cannot build the PostgreSQL pool");
            return;
        }
    };
    let mut invalidator = Invalidator::new(target.upstream.clone(), target.connect_timeout);
    let mut listener: Option<Listener> = None;
    // The side that failed last, so each change of state is logged once.
    let mut failing: Option<&'static str> = None;
    let mut backoff = FIRST_RETRY;
    info!(outbox = %config.outbox, channel = %config.channel, "change log consumer started");
    while !*stop.borrow() {
        if listener.is_none() {
            match Listener::start(&config).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    stats.connected.set(0);
                    let failure = Failure::Postgres(e);
                    if failing != Some(failure.side()) {
                        warn!(error = %failure, "change log: PostgreSQL unreachable; retrying (Redis traffic is not affected)");
                    }
                    failing = Some(failure.side());
                    stats.retries.inc();
                    wait(&mut stop, backoff).await;
                    backoff = (backoff * 2).min(LAST_RETRY);
                    continue;
                }
            }
        }
        stats.connected.set(1);
        match drain(&config, &pool, &mut invalidator, &target, &stats).await {
            Ok(()) => {
                if failing.take().is_some() {
                    info!("change log: consuming again");
                }
                backoff = FIRST_RETRY;
            }
            Err(failure) => {
                if failing != Some(failure.side()) {
                    warn!(error = %failure, "change log: batch rolled back; its rows stay in the outbox and will be retried");
                }
                if matches!(failure, Failure::Postgres(_)) {
                    listener = None;
                    stats.connected.set(0);
                }
                failing = Some(failure.side());
                stats.retries.inc();
                wait(&mut stop, backoff).await;
                backoff = (backoff * 2).min(LAST_RETRY);
                continue;
            }
        }
        let notified = async {
            match &mut listener {
                Some(l) => l.notes.recv().await,
                None => None,
            }
        };
        tokio::select! {
            note = notified => if note.is_none() {
                debug!("change log: LISTEN connection lost");
                listener = None;
            },
            _ = tokio::time::sleep(config.poll_interval) => {}
            _ = stop.changed() => {}
        }
    }
    debug!("change log consumer stopped");
}

async fn wait(stop: &mut watch::Receiver<bool>, delay: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.changed() => {}
    }
}

/// Applies outbox rows until none is left (or left unlocked), then records
/// the age of the oldest row still there.
async fn drain(
    config: &ChangeLogConfig,
    pool: &Pool,
    invalidator: &mut Invalidator,
    target: &Target,
    stats: &ChangeLogStats,
) -> Result<(), Failure> {
    let outbox = config.outbox.sql();
    let claim = format!("SELECT id, keys FROM {outbox} ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED");
    let delete = format!("DELETE FROM {outbox} WHERE id = ANY($1)");
    let db = target.upstream.db;
    let timed =
        |what: &'static str| move |_| Failure::Postgres(format!("{what}: no answer within {PG_TIMEOUT:?}"));
    let mut client = tokio::time::timeout(PG_TIMEOUT, pool.get())
        .await
        .map_err(timed("connect"))?
        .map_err(|e| Failure::Postgres(e.to_string()))?;
    loop {
        let tx = tokio::time::timeout(PG_TIMEOUT, client.transaction())
            .await
            .map_err(timed("BEGIN"))?
            .map_err(pg)?;
        let rows = tokio::time::timeout(PG_TIMEOUT, tx.query(&claim, &[&config.batch_size]))
            .await
            .map_err(timed("claim"))?
            .map_err(pg)?;
        if rows.is_empty() {
            drop(tx);
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut keys: Vec<Bytes> = Vec::new();
        for row in &rows {
            ids.push(row.get::<_, i64>(0));
            keys.extend(row.get::<_, Vec<String>>(1).into_iter().map(Bytes::from));
        }
        keys.sort_unstable();
        keys.dedup();
        // The scope in force now (a reload may have changed it).
        let scope = target.fences.as_ref().map(|(scope, _)| scope.load_full());
        invalidator
            .invalidate(db, &keys, scope.as_deref())
            .await
            .map_err(Failure::Redis)?;
        if let Some((_, epilogue)) = &target.fences {
            epilogue.after_invalidation(db, &keys, Source::ChangeLog, 0);
        }
        tokio::time::timeout(PG_TIMEOUT, tx.execute(&delete, &[&ids]))
            .await
            .map_err(timed("delete"))?
            .map_err(pg)?;
        tokio::time::timeout(PG_TIMEOUT, tx.commit())
            .await
            .map_err(timed("COMMIT"))?
            .map_err(pg)?;
        // Keys first: whoever sees the rows counted sees their keys too.
        stats.keys_invalidated.add(keys.len() as u64);
        stats.rows_consumed.add(rows.len() as u64);
        debug!(rows = rows.len(), keys = keys.len(), "change log: batch applied");
        if (rows.len() as i64) < config.batch_size {
            break;
        }
    }
    let lag = format!(
        "SELECT (extract(epoch FROM clock_timestamp() - created_at) * 1000)::float8 FROM {outbox} ORDER BY id LIMIT 1"
    );
    let oldest = tokio::time::timeout(PG_TIMEOUT, client.query_opt(&lag, &[]))
        .await
        .map_err(timed("lag"))?
        .map_err(pg)?;
    let lag_ms = oldest.map_or(0.0, |row| row.get::<_, f64>(0)).max(0.0);
    stats.lag_ms.set(lag_ms as u64);
    Ok(())
}

/// The `LISTEN` connection: notifications arrive as `()` (coalesced); the
/// channel closes when the connection does.
struct Listener {
    _client: Client,
    notes: mpsc::Receiver<()>,
}

impl Listener {
    async fn start(config: &ChangeLogConfig) -> Result<Listener, String> {
        let (client, mut connection) = tokio::time::timeout(PG_TIMEOUT, config.pg_config().connect(NoTls))
            .await
            .map_err(|_| format!("no answer within {PG_TIMEOUT:?}"))?
            .map_err(|e| describe(&e))?;
        let (tx, notes) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => {
                        // A notification already waiting covers this one.
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        let listen = format!("LISTEN {}", ident(&config.channel));
        tokio::time::timeout(PG_TIMEOUT, client.batch_execute(&listen))
            .await
            .map_err(|_| format!("LISTEN: no answer within {PG_TIMEOUT:?}"))?
            .map_err(|e| describe(&e))?;
        Ok(Listener {
            _client: client,
            notes,
        })
    }
}
