//! `cachefence audit`: how many cached values disagree with the database.
//!
//! The audit samples keys from Redis (`SCAN` with each key template's
//! glob), reads each key back into column values (the template's inverse,
//! [`KeyTemplate::parse_key`]), selects the row whose key it is, renders
//! the value the application caches for it with the mapping's `values`
//! expression, and compares the bytes. A disagreement may be a change in
//! flight (committed, not yet invalidated): after a settle delay the key
//! is read again from both sides, and it counts as stale only if Redis
//! still holds the same value and the database still disagrees with it.
//!
//! It only reads, and like any other client: `SCAN` and `GET` on one Redis
//! connection, and one plain autocommit `SELECT` per key on one PostgreSQL
//! connection (READ COMMITTED, read-only, no `FOR UPDATE`, with
//! `statement_timeout` and `lock_timeout`). Sampling is bounded in keys,
//! `SCAN` calls and time.
//!
//! - `redis`: the read-only Redis connection.
//! - [`report`]: the outcome of each key, the stale ratio in nines, text
//!   and JSON.

mod redis;
pub mod report;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use deadpool_postgres::tokio_postgres::error::SqlState;
use deadpool_postgres::tokio_postgres::types::Type;
use deadpool_postgres::tokio_postgres::{Client, NoTls};
use tracing::{debug, warn};

use self::redis::{Cached, ReadOnlyRedis};
use super::install::describe;
use crate::config::Upstream;
use crate::config::postgres::{ChangeLogConfig, Mapping};
use crate::config::template::{KeyParseError, KeyTemplate, ident, literal};
use crate::fence::script::is_fence_key;
pub use report::{Outcome, Reason, Report, TemplateCounts};

/// Longest one `SELECT` may run (PostgreSQL's `statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a `SELECT` may wait for a lock on the table (held by DDL,
/// say) before it gives up (`lock_timeout`).
const LOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest the client waits for PostgreSQL (connecting, any one query).
const PG_TIMEOUT: Duration = Duration::from_secs(10);
/// Sampling stops after this long or this many `SCAN` calls, whatever it
/// has found by then.
const SAMPLE_TIME_LIMIT: Duration = Duration::from_secs(60);
const MAX_SCAN_CALLS: usize = 10_000;

/// `cachefence audit [--sample N] [--settle DURATION]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Keys to sample, at most.
    pub sample: usize,
    /// How long a disagreement may take to resolve before it counts.
    pub settle: Duration,
}

/// One key template of one mapping, as the audit uses it.
struct Target<'a> {
    /// `[[postgres.table]] #number`, for error messages.
    number: usize,
    mapping: &'a Mapping,
    template: &'a KeyTemplate,
    /// `None`: the template has no `values` expression.
    value: Option<ValueSql>,
}

/// How the cached value of a row is selected.
struct ValueSql {
    /// `(<expression>)::text`, or the bare expression if it is `bytea`
    /// (compared as raw bytes).
    select: String,
    binary: bool,
}

impl Target<'_> {
    fn describe(&self) -> String {
        format!(
            "[[postgres.table]] #{} (`{}`), key template `{}`",
            self.number, self.mapping.table, self.template.source
        )
    }

    /// `t."col" = <value>` for each column the template names once.
    fn conditions(&self, values: impl Iterator<Item = (String, String)>) -> String {
        let mut seen = HashSet::new();
        values
            .filter(|(column, _)| seen.insert(column.clone()))
            .map(|(column, value)| format!("t.{} = {value}", ident(&column)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// What the database holds for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Row {
    Value(Vec<u8>),
    /// No row renders the key.
    Missing,
    Several,
    /// The value expression is NULL.
    Null,
    /// A captured value is not valid for its column's type (PostgreSQL's
    /// data exceptions, class 22).
    BadKey,
}

/// A sampled key on its way through the audit.
enum Step {
    Decided(Outcome),
    /// To be read from Redis and looked up: the key as text and its
    /// column values.
    Lookup(String, Vec<(String, String)>),
}

/// Runs the audit against `upstream` and the database of `config`.
pub async fn run(
    config: &ChangeLogConfig,
    upstream: &Upstream,
    connect_timeout: Duration,
    options: Options,
) -> anyhow::Result<Report> {
    let mut targets = targets(config);
    anyhow::ensure!(
        config.tables.iter().flat_map(|m| &m.values).any(Option::is_some),
        "no `[[postgres.table]]` entry has `values`: nothing can be compared \
         (map key templates to SQL expressions rendering the cached value, see config.example.toml)"
    );
    let database = Database::connect(config).await?;
    for (target, expression) in targets
        .iter_mut()
        .zip(config.tables.iter().flat_map(|m| &m.values))
    {
        if let Some(expression) = expression {
            target.value = Some(database.prepare(target, expression).await?);
        }
    }
    let mut redis = ReadOnlyRedis::connect(upstream, connect_timeout)
        .await
        .context("cannot connect to Redis")?;
    let sample = sample(&mut redis, &targets, options.sample).await?;
    let mut report = Report {
        redis: upstream.addr(),
        sample: options.sample,
        scan_complete: sample.complete,
        scan_stopped: sample.stopped.clone(),
        settle_ms: options.settle.as_millis() as u64,
        templates: targets
            .iter()
            .map(|t| TemplateCounts {
                table: t.mapping.table.to_string(),
                template: t.template.source.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };

    // Which template each key belongs to, and what can be said without
    // reading it.
    let mut steps: Vec<(usize, Step)> = sample
        .keys
        .iter()
        .map(|(key, scanned_by)| plan(&targets, key, *scanned_by))
        .collect();

    // First look: the cached value against the row.
    let lookups: Vec<usize> = (0..steps.len())
        .filter(|&i| matches!(steps[i].1, Step::Lookup(..)))
        .collect();
    let keys: Vec<Bytes> = lookups.iter().map(|&i| sample.keys[i].0.clone()).collect();
    let cached = redis.get_all(&keys).await?;
    let mut disagreeing: Vec<(usize, Bytes)> = Vec::new();
    for (&i, cached) in lookups.iter().zip(cached) {
        let (target, Step::Lookup(key, values)) = &steps[i] else {
            unreachable!("a lookup")
        };
        let outcome = match cached {
            Cached::Missing => Outcome::NotComparable(Reason::Vanished),
            Cached::NotAString => Outcome::NotComparable(Reason::NotAString),
            Cached::Value(value) => match database.row(&targets[*target], key, values).await? {
                Row::Value(row) if row == value => Outcome::Equal,
                Row::Value(_) | Row::Missing => {
                    disagreeing.push((i, value));
                    continue;
                }
                other => not_comparable(other),
            },
        };
        steps[i].1 = Step::Decided(outcome);
    }

    // Second look, after the settle delay, at the keys that disagreed.
    if !disagreeing.is_empty() {
        debug!(
            keys = disagreeing.len(),
            settle = ?options.settle,
            "audit: disagreements, waiting to look again"
        );
        tokio::time::sleep(options.settle).await;
        let keys: Vec<Bytes> = disagreeing
            .iter()
            .map(|&(i, _)| sample.keys[i].0.clone())
            .collect();
        let now = redis.get_all(&keys).await?;
        for ((i, first), now) in disagreeing.into_iter().zip(now) {
            let (target, Step::Lookup(key, values)) = &steps[i] else {
                unreachable!("a lookup")
            };
            let outcome = match now {
                Cached::Value(value) if value == first => {
                    match database.row(&targets[*target], key, values).await? {
                        Row::Value(row) if row == first => Outcome::InFlight,
                        Row::Value(row) => Outcome::Stale {
                            cached: first.to_vec(),
                            database: row,
                        },
                        Row::Missing => Outcome::StaleRowMissing {
                            cached: first.to_vec(),
                        },
                        other => not_comparable(other),
                    }
                }
                // Invalidated or refilled meanwhile: the change was in flight.
                _ => Outcome::InFlight,
            };
            steps[i].1 = Step::Decided(outcome);
        }
    }

    for ((key, _), (target, step)) in sample.keys.iter().zip(&steps) {
        let Step::Decided(outcome) = step else {
            unreachable!("every key is decided")
        };
        report.record(*target, &String::from_utf8_lossy(key), outcome);
    }
    report.finish();
    Ok(report)
}

/// Every key template of every mapping, in config order (their value
/// expressions not prepared yet).
fn targets(config: &ChangeLogConfig) -> Vec<Target<'_>> {
    config
        .tables
        .iter()
        .enumerate()
        .flat_map(|(i, mapping)| {
            mapping.keys.iter().map(move |template| Target {
                number: i + 1,
                mapping,
                template,
                value: None,
            })
        })
        .collect()
}

fn not_comparable(row: Row) -> Outcome {
    Outcome::NotComparable(match row {
        Row::Several => Reason::SeveralRows,
        Row::Null => Reason::ValueNull,
        Row::BadKey => Reason::KeyDoesNotParse,
        Row::Value(_) | Row::Missing => unreachable!("comparable"),
    })
}

/// The template `key` belongs to (the most specific one whose shape it
/// has, among all mappings: `user:email:{e}` over `user:{id}` for
/// `user:email:a@x`) and whether it can be looked up.
fn plan(targets: &[Target], key: &[u8], scanned_by: usize) -> (usize, Step) {
    let decided = |target, reason| (target, Step::Decided(Outcome::NotComparable(reason)));
    // PostgreSQL text is UTF-8 without NUL: no row renders such a key.
    let Some(text) = std::str::from_utf8(key).ok().filter(|k| !k.contains('\0')) else {
        return decided(scanned_by, Reason::KeyDoesNotParse);
    };
    let fitting: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i].template.matches(text))
        .collect();
    let best = fitting.iter().map(|&i| targets[i].template.literal_len()).max();
    let owners: Vec<usize> = fitting
        .into_iter()
        .filter(|&i| Some(targets[i].template.literal_len()) == best)
        .collect();
    let owner = match owners.as_slice() {
        [owner] => *owner,
        [] => return decided(scanned_by, Reason::KeyDoesNotParse),
        [first, ..] => return decided(*first, Reason::AmbiguousTemplate),
    };
    let target = &targets[owner];
    if target.value.is_none() {
        return decided(owner, Reason::NoValueExpression);
    }
    match target.template.parse_key(text) {
        Ok(values) => (owner, Step::Lookup(text.to_string(), values)),
        Err(KeyParseError::AmbiguousTemplate) => decided(owner, Reason::AmbiguousTemplate),
        Err(KeyParseError::NoMatch | KeyParseError::AmbiguousKey) => decided(owner, Reason::KeyDoesNotParse),
    }
}

/// The sampled keys, each with the target whose `SCAN` found it.
struct Sample {
    keys: Vec<(Bytes, usize)>,
    /// Every `SCAN` reached its end.
    complete: bool,
    stopped: Option<String>,
}

/// `SCAN`s every template's glob, one call each in turn, until `wanted`
/// keys are found, every scan is complete, or a limit is reached. The
/// proxy's fence keys are skipped; a key found twice counts once. The
/// sample is the first keys `SCAN` returns, in Redis' hash-table order.
async fn sample(redis: &mut ReadOnlyRedis, targets: &[Target<'_>], wanted: usize) -> anyhow::Result<Sample> {
    // One scan per distinct glob, with the first target that has it.
    let mut scans: Vec<(String, usize, Option<Bytes>)> = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let glob = target.template.glob();
        if !scans.iter().any(|(g, _, _)| *g == glob) {
            scans.push((glob, i, Some(Bytes::from_static(b"0"))));
        }
    }
    let started = Instant::now();
    let (mut calls, mut stopped) = (0, None);
    let mut seen = HashSet::new();
    let mut keys = Vec::new();
    'sampling: while keys.len() < wanted && scans.iter().any(|(_, _, cursor)| cursor.is_some()) {
        for (glob, target, cursor) in &mut scans {
            let Some(at) = cursor.take() else { continue };
            if calls >= MAX_SCAN_CALLS {
                stopped = Some(format!("{MAX_SCAN_CALLS} SCAN calls"));
            } else if started.elapsed() >= SAMPLE_TIME_LIMIT {
                stopped = Some(format!("time limit of {SAMPLE_TIME_LIMIT:?}"));
            }
            if stopped.is_some() {
                *cursor = Some(at);
                break 'sampling;
            }
            let (next, found) = redis.scan(&at, glob).await?;
            calls += 1;
            *cursor = (&next[..] != b"0").then_some(next);
            for key in found {
                if is_fence_key(&key) || !seen.insert(key.clone()) {
                    continue;
                }
                keys.push((key, *target));
                if keys.len() == wanted {
                    break 'sampling;
                }
            }
        }
    }
    if let Some(why) = &stopped {
        warn!(sampled = keys.len(), wanted, limit = %why, "audit: sampling stopped early");
    }
    debug!(sampled = keys.len(), calls, "audit: sampled");
    Ok(Sample {
        keys,
        complete: scans.iter().all(|(_, _, cursor)| cursor.is_none()),
        stopped,
    })
}

/// The audit's PostgreSQL connection.
struct Database {
    client: Client,
}

impl Database {
    /// Connects and makes every statement of the session a plain reader:
    /// read-only, READ COMMITTED (no serializable predicate locks that
    /// could abort the application's transactions), bounded in time and
    /// in waiting for locks.
    async fn connect(config: &ChangeLogConfig) -> anyhow::Result<Database> {
        let (client, connection) = tokio::time::timeout(PG_TIMEOUT, config.pg_config().connect(NoTls))
            .await
            .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within {PG_TIMEOUT:?}"))?
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {}", describe(&e)))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "audit: PostgreSQL connection ended");
            }
        });
        let session = format!(
            "SET application_name = 'cachefence audit';
             SET default_transaction_read_only = on;
             SET default_transaction_isolation = 'read committed';
             SET standard_conforming_strings = on;
             SET statement_timeout = {};
             SET lock_timeout = {};",
            STATEMENT_TIMEOUT.as_millis(),
            LOCK_TIMEOUT.as_millis()
        );
        tokio::time::timeout(PG_TIMEOUT, client.batch_execute(&session))
            .await
            .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within {PG_TIMEOUT:?}"))?
            .map_err(|e| anyhow::anyhow!("PostgreSQL: {}", describe(&e)))?;
        Ok(Database { client })
    }

    /// Checks, before sampling, that the lookup of `target` is valid SQL
    /// (table, key columns, `expression`) and whether the expression is
    /// `bytea`. Prepared, not run.
    async fn prepare(&self, target: &Target<'_>, expression: &str) -> anyhow::Result<ValueSql> {
        let columns = target
            .template
            .columns()
            .map(|c| (c.to_string(), "NULL".to_string()));
        let check = format!(
            "SELECT ({expression}) FROM {} t WHERE {} AND {} = NULL LIMIT 0",
            target.mapping.table.sql(),
            target.conditions(columns),
            target.template.sql("t"),
        );
        let statement = tokio::time::timeout(PG_TIMEOUT, self.client.prepare(&check))
            .await
            .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within {PG_TIMEOUT:?}"))?
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: its `values` expression `{expression}` cannot be used: {}",
                    target.describe(),
                    describe(&e)
                )
            })?;
        let binary = statement.columns()[0].type_() == &Type::BYTEA;
        Ok(ValueSql {
            select: match binary {
                true => format!("({expression})"),
                false => format!("({expression})::text"),
            },
            binary,
        })
    }

    /// The value the rows rendering `key` give. The key columns are
    /// compared with untyped literals, which PostgreSQL reads as the
    /// column's type (so its index is used); the key is rendered back in
    /// SQL and must come out the same, so a key read back wrongly (or a
    /// value the column type normalizes, `user:007` for id 7) never
    /// matches another key's row.
    async fn row(&self, target: &Target<'_>, key: &str, values: &[(String, String)]) -> anyhow::Result<Row> {
        let value = target
            .value
            .as_ref()
            .expect("only targets with a value are looked up");
        let conditions = target.conditions(values.iter().map(|(c, v)| (c.clone(), literal(v))));
        let sql = format!(
            "SELECT {} FROM {} t WHERE {conditions} AND {} = {} LIMIT 2",
            value.select,
            target.mapping.table.sql(),
            target.template.sql("t"),
            literal(key)
        );
        let rows = match tokio::time::timeout(PG_TIMEOUT, self.client.query(&sql, &[])).await {
            Err(_) => anyhow::bail!(
                "{}: key `{key}`: PostgreSQL did not answer within {PG_TIMEOUT:?}",
                target.describe()
            ),
            Ok(Err(e)) if e.code().is_some_and(|c| c.code().starts_with("22")) => return Ok(Row::BadKey),
            Ok(Err(e)) => {
                let hint = match e.code() {
                    Some(c) if *c == SqlState::QUERY_CANCELED => {
                        " (statement_timeout: is there an index on the key columns?)"
                    }
                    Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE => " (lock_timeout: the table is locked)",
                    _ => "",
                };
                anyhow::bail!(
                    "{}: reading the row of `{key}`: {}{hint}",
                    target.describe(),
                    describe(&e)
                )
            }
            Ok(Ok(rows)) => rows,
        };
        let row = match rows.as_slice() {
            [] => return Ok(Row::Missing),
            [row] => row,
            _ => return Ok(Row::Several),
        };
        let rendered = match value.binary {
            true => row.try_get::<_, Option<Vec<u8>>>(0),
            false => row
                .try_get::<_, Option<String>>(0)
                .map(|v| v.map(String::into_bytes)),
        }
        .with_context(|| format!("{}: reading the value of `{key}`", target.describe()))?;
        Ok(rendered.map_or(Row::Null, Row::Value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::template::QualifiedName;

    fn mapping(keys: &[&str], values: &[Option<&str>]) -> Mapping {
        Mapping {
            table: QualifiedName::parse("users").unwrap(),
            keys: keys.iter().map(|k| KeyTemplate::parse(k).unwrap()).collect(),
            values: values.iter().map(|v| v.map(str::to_string)).collect(),
        }
    }

    fn targets(mapping: &Mapping) -> Vec<Target<'_>> {
        mapping
            .keys
            .iter()
            .zip(&mapping.values)
            .map(|(template, value)| Target {
                number: 1,
                mapping,
                template,
                value: value.as_ref().map(|v| ValueSql {
                    select: v.clone(),
                    binary: false,
                }),
            })
            .collect()
    }

    fn planned(targets: &[Target], key: &str) -> (usize, Result<Vec<(String, String)>, Reason>) {
        match plan(targets, key.as_bytes(), 0) {
            (t, Step::Lookup(k, values)) => {
                assert_eq!(k, key);
                (t, Ok(values))
            }
            (t, Step::Decided(Outcome::NotComparable(reason))) => (t, Err(reason)),
            (_, Step::Decided(other)) => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_go_to_the_most_specific_template() {
        let m = mapping(
            &["user:{id}", "user:email:{email}", "pair:{a}{b}", "x:{a}", "x:{b}"],
            &[
                Some("t.name"),
                None,
                Some("t.name"),
                Some("t.name"),
                Some("t.name"),
            ],
        );
        let t = targets(&m);
        let ok = |pairs: &[(&str, &str)]| {
            Ok(pairs
                .iter()
                .map(|(c, v)| (c.to_string(), v.to_string()))
                .collect())
        };
        assert_eq!(planned(&t, "user:7"), (0, ok(&[("id", "7")])));
        assert_eq!(planned(&t, "user:email:a@x"), (1, Err(Reason::NoValueExpression)));
        assert_eq!(planned(&t, "pair:12"), (2, Err(Reason::AmbiguousTemplate)));
        assert_eq!(planned(&t, "x:1"), (3, Err(Reason::AmbiguousTemplate)));
        assert_eq!(planned(&t, "other"), (0, Err(Reason::KeyDoesNotParse)));
        assert_eq!(planned(&t, "user:a\0b"), (0, Err(Reason::KeyDoesNotParse)));
        assert_eq!(
            plan(&t, b"user:\xff", 1).0,
            1,
            "an unreadable key stays with the scan that found it"
        );
    }
}
