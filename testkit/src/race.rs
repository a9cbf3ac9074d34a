//! The scaffolding of the cache-aside race tests (`tests/races.rs` and
//! `tests/client_models.rs`): a database stand-in with a lagging replica,
//! where a script runs ([`Target`]: plain Redis or cachefence) and the
//! scratch Redis plus optional in-process proxy it runs against
//! ([`Setup`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::{Proxy, RawClient, RedisServer};

/// The database stand-in: writes go to the primary; the replica shows them
/// only after `replicate`. Clones share one database, so the concurrent
/// tasks of a script see each other's writes.
#[derive(Clone, Default)]
pub struct Database(Arc<Mutex<(Rows, Rows)>>);

/// One copy of the database: the primary's or the replica's.
type Rows = HashMap<&'static str, String>;

impl Database {
    /// A database whose `x` is `x`, on the primary and the replica.
    pub fn new(x: &str) -> Database {
        let db = Database::default();
        db.write("x", x);
        db.replicate();
        db
    }

    pub fn write(&self, key: &'static str, value: &str) {
        self.0.lock().unwrap().0.insert(key, value.to_string());
    }

    pub fn replicate(&self) {
        let mut both = self.0.lock().unwrap();
        both.1 = both.0.clone();
    }

    /// `key` on the primary (panics if absent).
    pub fn primary(&self, key: &str) -> String {
        self.0.lock().unwrap().0[key].clone()
    }

    /// `key` on the replica (panics if absent).
    pub fn replica(&self, key: &str) -> String {
        self.0.lock().unwrap().1[key].clone()
    }
}

/// Where a script runs: plain Redis, or cachefence with these settings.
#[derive(Clone, Copy)]
pub enum Target {
    Redis,
    Cachefence(&'static str),
}

/// A scratch Redis and, for [`Target::Cachefence`], the proxy in process in
/// front of it; `addr` is where clients connect (the proxy, else Redis).
pub struct Setup {
    pub redis: RedisServer,
    pub proxy: Option<Proxy>,
    pub addr: String,
}

impl Setup {
    pub async fn new(target: Target) -> Setup {
        let redis = RedisServer::start();
        let proxy = match target {
            Target::Redis => None,
            Target::Cachefence(toml) => Some(Proxy::start(&redis.addr(), toml).await),
        };
        let addr = proxy.as_ref().map_or(redis.addr(), |p| p.addr.to_string());
        Setup { redis, proxy, addr }
    }

    /// A new raw connection to `addr`.
    pub async fn client(&self) -> RawClient {
        RawClient::connect(self.addr.as_str()).await
    }

    /// The cached value of `key` and its PTTL in ms, read on a connection
    /// of its own.
    pub async fn cached(&self, key: &str) -> (Option<String>, i64) {
        let mut check = self.client().await;
        let value = cached(&mut check, key).await;
        let ttl = check.call(&format!("PTTL {key}")).await;
        let ttl = ttl.trim_start_matches(':').trim_end().parse().unwrap();
        (value, ttl)
    }

    /// Shuts the proxy (if any) down; Redis stops when dropped.
    pub async fn stop(self) {
        if let Some(proxy) = self.proxy {
            proxy.shutdown().await;
        }
    }
}

/// The cached value of `key` as text (`None` if absent), read on `client`.
pub async fn cached(client: &mut RawClient, key: &str) -> Option<String> {
    raw_value(&client.call(&format!("GET {key}")).await)
}

/// A GET reply's value as text (`None` for nil).
pub fn raw_value(reply: &str) -> Option<String> {
    match reply {
        "$-1\r\n" | "_\r\n" => None,
        _ => reply
            .strip_prefix('$')
            .and_then(|r| r.split_once("\r\n"))
            .map(|(_, v)| v.trim_end().to_string()),
    }
}

/// R8, the stampede: every client misses `key` at once; each one told to go
/// to the database reads it (counted, 50 ms) and fills `from-db`. Returns
/// the database reads and each client's outcome (`filled`, or the reply of
/// its GET).
pub async fn stampede(clients: Vec<RawClient>, key: &str) -> (usize, Vec<String>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let reads = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut tasks = Vec::new();
    for mut client in clients {
        let (reads, start, key) = (reads.clone(), start.clone(), key.to_string());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let reply = client.call(&format!("GET {key}")).await;
            if reply != "$-1\r\n" {
                return reply;
            }
            reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert_eq!(client.call(&format!("SET {key} from-db EX 60")).await, "+OK\r\n");
            "filled".to_string()
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("a reader"));
    }
    (reads.load(Ordering::SeqCst), outcomes)
}
