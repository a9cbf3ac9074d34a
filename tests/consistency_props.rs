//! C1 as a property: random interleavings of read misses, database writes
//! followed by `DEL`, fills and evictions over a few keys and connections,
//! through cachefence, for three client models: each flow (miss, database
//! read, fill) on a connection of its own; flows over a pool, each step on
//! any pooled connection; and every flow on one shared connection (a
//! multiplexing client). Writers delete one key, or pipeline a delete of
//! every key (a run the proxy probes for its fences); with one connection
//! per thread under `ticket_scope = "connection"`, also a write-through
//! `SET` of every key. After every run, each cached key equals the model
//! database or is absent. The same interleavings against plain Redis break
//! this (the control, `plain_redis_breaks_the_property`).

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use testkit::{Proxy, RawClient, RedisServer};

const KEYS: [&str; 2] = ["user:a", "user:b"];
/// Flows (requests: miss, database read, fill) in flight at once.
const FLOWS: usize = 3;
/// Connections of the pooled model.
const POOL: usize = 2;

/// How the flows' commands reach the proxy.
#[derive(Debug, Clone, Copy)]
enum Model {
    /// Each flow on a connection of its own (the flow is the connection).
    PerConnection,
    /// A pool: each step of a flow goes out on any of `POOL` connections.
    Pooled,
    /// A multiplexing client: every flow on one shared connection.
    Shared,
}

impl Model {
    /// How many client connections the flows (and writers) use.
    fn connections(self) -> usize {
        match self {
            Model::PerConnection => FLOWS,
            Model::Pooled => POOL,
            Model::Shared => 1,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A flow misses (or hits) on connection `conn` and, on a miss, reads
    /// the database.
    Read { flow: usize, key: usize, conn: usize },
    /// That flow stores what it read, on connection `conn`.
    Fill { flow: usize, key: usize, conn: usize },
    /// The database changes and a writer deletes the cached key, on
    /// connection `conn` (`conn == connections`: the writer's own).
    Write { key: usize, conn: usize },
    /// Every key changes in the database and a writer pipelines, on
    /// connection `conn`, a `DEL` of each key or (`through`) a `SET` of its
    /// new value (write-through): one run the proxy probes.
    WriteAll { conn: usize, through: bool },
    /// The cache loses the key (eviction, expiry).
    Evict { key: usize },
}

/// What writers may do.
#[derive(Debug, Clone, Copy)]
enum Writers {
    /// Delete (one key, or every key pipelined).
    Delete,
    /// Delete, or write every new value through (`SET`, pipelined).
    DeleteOrWriteThrough,
}

fn op(model: Model, writers: Writers) -> impl Strategy<Value = Op> {
    let flow = 0..FLOWS;
    let key = 0..KEYS.len();
    // The connection a step goes out on: the flow's own, or the pool's
    // (proptest picks one per step), or the one shared connection.
    let conn = move |flow: usize, pick: usize| match model {
        Model::PerConnection => flow,
        Model::Pooled => pick % POOL,
        Model::Shared => 0,
    };
    // Writers: their own connection, or (pooled, shared) one of the
    // application's.
    let writer = match model {
        Model::PerConnection => model.connections()..=model.connections(),
        _ => 0..=model.connections(),
    };
    prop_oneof![
        3 => (flow.clone(), key.clone(), 0..POOL)
            .prop_map(move |(flow, key, pick)| Op::Read { flow, key, conn: conn(flow, pick) }),
        3 => (flow, key.clone(), 0..POOL)
            .prop_map(move |(flow, key, pick)| Op::Fill { flow, key, conn: conn(flow, pick) }),
        2 => (key.clone(), writer.clone()).prop_map(|(key, conn)| Op::Write { key, conn }),
        1 => (writer, any::<bool>()).prop_map(move |(conn, through)| Op::WriteAll {
            conn,
            through: through && matches!(writers, Writers::DeleteOrWriteThrough),
        }),
        1 => key.prop_map(|key| Op::Evict { key }),
    ]
}

/// Runs `ops` against `addr` (clients) with `direct` for evictions and
/// checks; returns the keys whose cached value disagrees with the database.
async fn run(model: Model, addr: &str, direct: &str, ops: &[Op]) -> Vec<String> {
    let mut admin = RawClient::connect(direct).await;
    assert_eq!(admin.call("FLUSHALL").await, "+OK\r\n");
    // The application's connections, then the writer's own.
    let mut conns = Vec::new();
    for _ in 0..=model.connections() {
        conns.push(RawClient::connect(addr).await);
    }
    let mut database: HashMap<usize, u64> = HashMap::new();
    let mut read: HashMap<(usize, usize), u64> = HashMap::new();
    for op in ops {
        match *op {
            Op::Read { flow, key, conn } => {
                if conns[conn].call(&format!("GET {}", KEYS[key])).await == "$-1\r\n" {
                    read.insert((flow, key), database.get(&key).copied().unwrap_or(0));
                }
            }
            Op::Fill { flow, key, conn } => {
                if let Some(value) = read.remove(&(flow, key)) {
                    let reply = conns[conn]
                        .call(&format!("SET {} v{value} EX 60", KEYS[key]))
                        .await;
                    assert_eq!(reply, "+OK\r\n");
                }
            }
            Op::Write { key, conn } => {
                *database.entry(key).or_default() += 1;
                assert!(
                    conns[conn]
                        .call(&format!("DEL {}", KEYS[key]))
                        .await
                        .starts_with(':')
                );
            }
            Op::WriteAll { conn, through } => {
                let mut writes = Vec::new();
                for (key, name) in KEYS.iter().enumerate() {
                    let value = database.entry(key).or_default();
                    *value += 1;
                    let write = match through {
                        true => format!("SET {name} v{value} EX 60"),
                        false => format!("DEL {name}"),
                    };
                    writes.extend(testkit::cmds(&write));
                }
                conns[conn].send(&writes).await;
                for _ in KEYS {
                    let reply = conns[conn].read_frame().await;
                    assert!(reply == b"+OK\r\n" || reply.starts_with(b":"), "{reply:?}");
                }
            }
            Op::Evict { key } => {
                assert!(
                    admin
                        .call(&format!("UNLINK {}", KEYS[key]))
                        .await
                        .starts_with(':')
                );
            }
        }
    }
    let mut stale = Vec::new();
    for (index, key) in KEYS.iter().enumerate() {
        let cached = admin.call(&format!("GET {key}")).await;
        let expected = format!("v{}", database.get(&index).copied().unwrap_or(0));
        if cached != "$-1\r\n" && cached != format!("${}\r\n{expected}\r\n", expected.len()) {
            stale.push(format!("{key}: cached {cached:?}, database {expected}"));
        }
    }
    stale
}

fn check(model: Model, writers: Writers, target: &str, direct: &str, cases: u32) -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(op(model, writers), 1..40), |ops| {
            let stale = runtime.block_on(run(model, target, direct, &ops));
            prop_assert!(stale.is_empty(), "stale after {ops:?}: {stale:?}");
            Ok::<(), TestCaseError>(())
        })
        .map_err(|e| e.to_string())
}

/// The property through cachefence, for one client model.
fn holds_through_cachefence(model: Model) {
    // hold = 0: a miss is never held for another's fill (the driver is
    // sequential, and on the shared connection a held miss would block every
    // flow behind it).
    let config = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"0s\"\n";
    holds_with(model, Writers::Delete, config);
}

fn holds_with(model: Model, writers: Writers, config: &str) {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let proxy = runtime.block_on(Proxy::start(&redis.addr(), config));
    let result = check(model, writers, &proxy.addr.to_string(), &redis.addr(), 96);
    runtime.block_on(proxy.shutdown());
    result.unwrap();
}

/// The control: plain Redis breaks the property for the same model.
fn plain_redis_breaks_it(model: Model, writers: Writers) {
    let redis = RedisServer::start();
    let result = check(model, writers, &redis.addr(), &redis.addr(), 96);
    let error = result.expect_err("the control must find a stale interleaving against plain Redis");
    assert!(error.contains("stale after"), "{error}");
}

#[test]
fn every_cached_key_equals_the_database_or_is_absent() {
    holds_through_cachefence(Model::PerConnection);
}

#[test]
fn plain_redis_breaks_the_property() {
    plain_redis_breaks_it(Model::PerConnection, Writers::Delete);
}

#[test]
fn every_cached_key_equals_the_database_or_is_absent_through_a_pool() {
    holds_through_cachefence(Model::Pooled);
}

#[test]
fn plain_redis_breaks_the_property_through_a_pool() {
    plain_redis_breaks_it(Model::Pooled, Writers::Delete);
}

#[test]
fn every_cached_key_equals_the_database_or_is_absent_on_one_shared_connection() {
    holds_through_cachefence(Model::Shared);
}

#[test]
fn plain_redis_breaks_the_property_on_one_shared_connection() {
    plain_redis_breaks_it(Model::Shared, Writers::Delete);
}

/// The same three client models with the proxy's upstream connections
/// shared (`shared_connections`): every client's fences, misses and fills
/// ride the shared connections, and C1 still holds. (The controls above
/// are the same: what the client models do against plain Redis.)
#[test]
fn every_client_model_keeps_the_property_on_shared_upstream_connections() {
    let config = "shared_connections = 2\n[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"0s\"\n";
    for model in [Model::PerConnection, Model::Pooled, Model::Shared] {
        holds_with(model, Writers::Delete, config);
    }
}

/// Write-through writers (a `SET` of the new value instead of a `DEL`) keep
/// C1 for one connection per thread under `ticket_scope = "connection"`:
/// a writer's `SET` is never taken as another connection's fill. (Where a
/// writer's `SET` can be taken as a reader's fill — pools, multiplexed
/// connections, wider scopes — it is not kept: see docs/consistency.md,
/// "Client models and ticket_scope".)
#[test]
fn write_through_writers_keep_the_property_with_connection_scope() {
    let config = "[[cache]]\npattern = \"*\"\nticket_scope = \"connection\"\nhold = \"0s\"\n";
    holds_with(Model::PerConnection, Writers::DeleteOrWriteThrough, config);
}

#[test]
fn plain_redis_breaks_the_property_with_write_through_writers() {
    plain_redis_breaks_it(Model::PerConnection, Writers::DeleteOrWriteThrough);
}
