//! The replica-lag monitor (`[postgres] replicas`, #16): every `lag_poll`
//! it reads the primary's WAL insert position and each replica's replay
//! position, and sets the window `lag_window = "auto"` sections are judged
//! by ([`crate::fence::lag`] says how lag follows from the two, and why
//! this and not `pg_stat_replication`).
//!
//! Each side has a connection of its own, opened again after any error;
//! every query has a timeout, and a side that fails is retried at the
//! next poll. A replica that cannot be asked keeps the position it last
//! showed, so its lag grows until the window passes the ceiling and fills
//! inside it are refused. The state (measured, over the ceiling, not
//! measured) is logged once per change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::tokio_postgres::{self, Client, NoTls};
use futures_util::future::join_all;
use tokio::sync::watch;
use tracing::{info, warn};

use super::install::describe;
use crate::config::postgres::ChangeLogConfig;
use crate::fence::LiveScope;
use crate::fence::lag::{LagEstimator, LagGauge};

/// Longest a connect or a query may take.
const PG_TIMEOUT: Duration = Duration::from_secs(2);

/// How far back a replica's replay position can be placed: beyond it, its
/// lag grows from the oldest position it was known to show.
const HORIZON: Duration = Duration::from_secs(600);

/// The state logged on each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Measured,
    OverCeiling,
    Unmeasured,
}

/// One side: its connection config and, while up, its client.
struct Side {
    name: String,
    config: tokio_postgres::Config,
    client: Option<(Client, tokio::task::JoinHandle<()>)>,
    /// The last error, logged once until the side answers again.
    failing: Option<String>,
}

/// Why a query gave no position.
enum Failed {
    /// The connection is not to be trusted: dropped, opened again next time.
    Connection(String),
    /// It answered, but not with a position (a replica promoted, or a
    /// primary given as a replica): the connection stays.
    Answer(String),
}

impl Side {
    fn new(name: String, config: tokio_postgres::Config) -> Side {
        Side {
            name,
            config,
            client: None,
            failing: None,
        }
    }

    /// One integer from `sql`, connecting first if needed.
    async fn query(&mut self, sql: &str) -> Result<i64, ()> {
        let error = match self.try_query(sql).await {
            Ok(n) => {
                if self.failing.take().is_some() {
                    info!(side = %self.name, "replica lag: answering again");
                }
                return Ok(n);
            }
            Err(Failed::Answer(error)) => error,
            Err(Failed::Connection(error)) => {
                // The connection's task may still wait on a server that
                // does not answer: it goes with the client.
                if let Some((_, task)) = self.client.take() {
                    task.abort();
                }
                error
            }
        };
        if self.failing.as_deref() != Some(&error) {
            warn!(side = %self.name, %error, "replica lag: cannot be measured here; retrying each lag_poll");
        }
        self.failing = Some(error);
        Err(())
    }

    async fn try_query(&mut self, sql: &str) -> Result<i64, Failed> {
        if self.client.is_none() {
            let connecting = self.config.connect(NoTls);
            let (client, connection) = match tokio::time::timeout(PG_TIMEOUT, connecting).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(Failed::Connection(describe(&e))),
                Err(_) => return Err(Failed::Connection(format!("no connection within {PG_TIMEOUT:?}"))),
            };
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some((client, task));
        }
        let (client, _) = self.client.as_ref().expect("connected above");
        let row = match tokio::time::timeout(PG_TIMEOUT, client.query_one(sql, &[])).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) if e.as_db_error().is_some() => return Err(Failed::Answer(describe(&e))),
            Ok(Err(e)) => return Err(Failed::Connection(describe(&e))),
            Err(_) => return Err(Failed::Connection(format!("no answer within {PG_TIMEOUT:?}"))),
        };
        row.try_get::<_, Option<i64>>(0)
            .map_err(|e| Failed::Answer(describe(&e)))?
            .ok_or_else(|| {
                Failed::Answer("not a replica in recovery (pg_last_wal_replay_lsn() is NULL)".to_string())
            })
    }
}

/// The primary's WAL insert position, as a byte offset.
const PRIMARY_LSN: &str = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8";
/// A replica's replay position (NULL on a server not in recovery).
const REPLAY_LSN: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8";
const BLOCK_SIZE: &str = "SELECT current_setting('wal_block_size')::int8";

/// Runs the monitor until `stop` turns true; `scope` gives the ceilings
/// (`lag_window_max` of the `auto` sections) the time over is counted by.
pub async fn run(
    config: ChangeLogConfig,
    gauge: Arc<LagGauge>,
    scope: LiveScope,
    mut stop: watch::Receiver<bool>,
) {
    let mut primary = Side::new("primary".to_string(), config.pg_config());
    let mut replicas: Vec<Side> = config
        .replicas
        .iter()
        .map(|r| Side::new(r.name.clone(), r.pg_config()))
        .collect();
    // The gauge adds the time since each measurement: the margin is for
    // what a measurement misses (its own round trips).
    let mut estimator = LagEstimator::new(replicas.len(), config.lag_margin, HORIZON);
    let mut block_known = false;
    let mut state: Option<State> = None;
    let mut last = Instant::now();
    let mut tick = tokio::time::interval(config.lag_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        replicas = ?config.replicas.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        poll = ?config.lag_poll,
        "replica lag monitor started"
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        // The primary and the replicas at once: a sample is taken when its
        // query is sent; a replica's replay position is placed against the
        // samples by position, whenever it was read.
        let sent = Instant::now();
        let asking_primary = async {
            let mut block = None;
            if !block_known && let Ok(size) = primary.query(BLOCK_SIZE).await {
                block = Some(size as u64);
            }
            (block, primary.query(PRIMARY_LSN).await)
        };
        let asking_replicas = join_all(replicas.iter_mut().map(|r| r.query(REPLAY_LSN)));
        let ((block, at_primary), replays) = tokio::join!(asking_primary, asking_replicas);
        if let Some(block) = block {
            estimator.set_block_size(block);
            block_known = true;
        }
        match at_primary {
            Ok(lsn) => estimator.primary(sent, lsn as u64),
            Err(()) => gauge.stats.poll_errors.inc(),
        }
        for (i, replay) in replays.into_iter().enumerate() {
            match replay {
                Ok(lsn) => estimator.replica(i, lsn as u64),
                Err(()) => gauge.stats.poll_errors.inc(),
            }
        }
        // The interval covers a fill's read of the database: up to
        // lease_ttl before it.
        let (lease, ceiling) = {
            let scope = scope.load();
            let auto = || scope.policies().filter(|p| p.lag_auto);
            // The smallest ceiling in force decides the state counted and logged.
            (
                auto().map(|p| p.lease_ttl).max().unwrap_or_default(),
                auto().map(|p| p.lag_window).min(),
            )
        };
        let interval = config.lag_interval.max(lease + config.lag_poll);
        let now = Instant::now();
        let window = estimator.window(now, interval);
        let lags = estimator.lags(now);
        gauge.set(
            now,
            window,
            replicas.iter().map(|r| r.name.clone()).zip(lags).collect(),
        );
        let next = match (window, ceiling) {
            (None, _) => State::Unmeasured,
            (Some(w), Some(c)) if w > c => State::OverCeiling,
            _ => State::Measured,
        };
        if next != State::Measured && ceiling.is_some() {
            gauge
                .stats
                .over_ceiling_ms
                .add(now.duration_since(last).as_millis() as u64);
        }
        last = now;
        if state != Some(next) {
            let window_ms = window.map(|w| w.as_millis() as u64);
            let ceiling_ms = ceiling.map(|c| c.as_millis() as u64);
            match next {
                State::Measured => info!(
                    ?window_ms,
                    ?ceiling_ms,
                    "replica lag measured: lag windows follow it"
                ),
                State::OverCeiling => warn!(
                    ?window_ms,
                    ?ceiling_ms,
                    "replica lag over lag_window_max: fills inside the ceiling are refused"
                ),
                // Only before the first complete measurement (a side that
                // cannot be asked warns of itself).
                State::Unmeasured => info!(
                    ?ceiling_ms,
                    "replica lag not measured yet: fills inside lag_window_max are refused until it has been \
                     measured for lag_interval"
                ),
            }
            state = Some(next);
        }
    }
}
