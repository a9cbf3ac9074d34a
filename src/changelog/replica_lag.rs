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
    client: Option<Client>,
    /// The last error, logged once until the side answers again.
    failing: Option<String>,
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
    async fn query(&mut self, sql: &str) -> Result<i64, String> {
        let result = self.try_query(sql).await;
        match &result {
            Ok(_) => {
                if self.failing.take().is_some() {
                    info!(side = %self.name, "replica lag: answering again");
                }
            }
            Err(error) => {
                self.client = None;
                if self.failing.as_deref() != Some(error) {
                    warn!(side = %self.name, %error, "replica lag: cannot be measured here; retrying each lag_poll");
                }
                self.failing = Some(error.clone());
            }
        }
        result
    }

    async fn try_query(&mut self, sql: &str) -> Result<i64, String> {
        if self.client.is_none() {
            let connecting = self.config.connect(NoTls);
            let (client, connection) = match tokio::time::timeout(PG_TIMEOUT, connecting).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Err(describe(&e)),
                Err(_) => return Err(format!("no connection within {PG_TIMEOUT:?}")),
            };
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        let client = self.client.as_ref().expect("connected above");
        let row = match tokio::time::timeout(PG_TIMEOUT, client.query_one(sql, &[])).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => return Err(describe(&e)),
            Err(_) => return Err(format!("no answer within {PG_TIMEOUT:?}")),
        };
        row.try_get::<_, Option<i64>>(0)
            .map_err(|e| describe(&e))?
            .ok_or_else(|| "not a replica in recovery (pg_last_wal_replay_lsn() is NULL)".to_string())
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
    // Between two polls a lag grows by up to one lag_poll: the window
    // covers it, then the margin.
    let mut estimator = LagEstimator::new(
        replicas.len(),
        config.lag_interval,
        config.lag_poll + config.lag_margin,
        HORIZON,
    );
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
        // The primary first: a sample taken when the query was sent.
        let sent = Instant::now();
        if !block_known && let Ok(block) = primary.query(BLOCK_SIZE).await {
            estimator.set_block_size(block as u64);
            block_known = true;
        }
        match primary.query(PRIMARY_LSN).await {
            Ok(lsn) => estimator.primary(sent, lsn as u64),
            Err(_) => gauge.stats.poll_errors.inc(),
        }
        let replays = join_all(replicas.iter_mut().map(|r| r.query(REPLAY_LSN))).await;
        for (i, replay) in replays.into_iter().enumerate() {
            match replay {
                Ok(lsn) => estimator.replica(i, lsn as u64),
                Err(_) => gauge.stats.poll_errors.inc(),
            }
        }
        let now = Instant::now();
        let window = estimator.window(now);
        let lags = estimator.lags(now);
        gauge.set(
            window,
            replicas.iter().map(|r| r.name.clone()).zip(lags).collect(),
        );
        // The smallest ceiling in force decides the state counted and logged.
        let ceiling = scope
            .load()
            .policies()
            .filter(|p| p.lag_auto)
            .map(|p| p.lag_window)
            .min();
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
                State::Unmeasured => warn!(
                    ?ceiling_ms,
                    "replica lag not measured: fills inside lag_window_max are refused"
                ),
            }
            state = Some(next);
        }
    }
}
