//! C1 as a property: random interleavings of read misses, database writes
//! followed by `DEL`, fills and evictions over a few keys and connections,
//! through cachefence. After every run, each cached key equals the model
//! database or is absent. The same interleavings against plain Redis break
//! this (the control, `plain_redis_breaks_the_property`).

use std::collections::HashMap;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use testkit::{Proxy, RawClient, RedisServer};

const KEYS: [&str; 2] = ["user:a", "user:b"];
const READERS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// A reader misses (or hits) and, on a miss, reads the database.
    Read { reader: usize, key: usize },
    /// That reader stores what it read.
    Fill { reader: usize, key: usize },
    /// The database changes and the writer deletes the cached key.
    Write { key: usize },
    /// The cache loses the key (eviction, expiry).
    Evict { key: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let reader = 0..READERS;
    let key = 0..KEYS.len();
    prop_oneof![
        3 => (reader.clone(), key.clone()).prop_map(|(reader, key)| Op::Read { reader, key }),
        3 => (reader, key.clone()).prop_map(|(reader, key)| Op::Fill { reader, key }),
        2 => key.clone().prop_map(|key| Op::Write { key }),
        1 => key.prop_map(|key| Op::Evict { key }),
    ]
}

/// Runs `ops` against `addr` (clients) with `direct` for evictions and
/// checks; returns the keys whose cached value disagrees with the database.
async fn run(addr: &str, direct: &str, ops: &[Op]) -> Vec<String> {
    let mut admin = RawClient::connect(direct).await;
    assert_eq!(admin.call("FLUSHALL").await, "+OK\r\n");
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(RawClient::connect(addr).await);
    }
    let mut writer = RawClient::connect(addr).await;
    let mut database: HashMap<usize, u64> = HashMap::new();
    let mut read: HashMap<(usize, usize), u64> = HashMap::new();
    for op in ops {
        match *op {
            Op::Read { reader, key } => {
                if readers[reader].call(&format!("GET {}", KEYS[key])).await == "$-1\r\n" {
                    read.insert((reader, key), database.get(&key).copied().unwrap_or(0));
                }
            }
            Op::Fill { reader, key } => {
                if let Some(value) = read.remove(&(reader, key)) {
                    let reply = readers[reader]
                        .call(&format!("SET {} v{value} EX 60", KEYS[key]))
                        .await;
                    assert_eq!(reply, "+OK\r\n");
                }
            }
            Op::Write { key } => {
                *database.entry(key).or_default() += 1;
                assert!(writer.call(&format!("DEL {}", KEYS[key])).await.starts_with(':'));
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

fn check(target: &str, direct: &str, cases: u32) -> Result<(), String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(op(), 1..40), |ops| {
            let stale = runtime.block_on(run(target, direct, &ops));
            prop_assert!(stale.is_empty(), "stale after {ops:?}: {stale:?}");
            Ok::<(), TestCaseError>(())
        })
        .map_err(|e| e.to_string())
}

#[test]
fn every_cached_key_equals_the_database_or_is_absent() {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // hold = 0: a reader never waits for another's fill (the driver is sequential).
    let proxy = runtime.block_on(Proxy::start(&redis.addr(), "[[cache]]\nhold = \"0s\"\n"));
    let result = check(&proxy.addr.to_string(), &redis.addr(), 96);
    runtime.block_on(proxy.shutdown());
    result.unwrap();
}

#[test]
fn plain_redis_breaks_the_property() {
    let redis = RedisServer::start();
    let result = check(&redis.addr(), &redis.addr(), 96);
    let error = result.expect_err("the control must find a stale interleaving against plain Redis");
    assert!(error.contains("stale after"), "{error}");
}
