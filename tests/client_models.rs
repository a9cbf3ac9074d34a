//! The cache-aside races of tests/races.rs again, driven through the two
//! client models of issue 14 that do not keep one request on one
//! connection:
//!
//! - a multiplexing client: one `redis::aio::MultiplexedConnection` shared
//!   (cloned) by concurrent tasks, every request's commands on the same
//!   connection (as Lettuce, ioredis, redis-rs do); and ioredis itself,
//!   one client shared by a script's concurrent requests (`tests/node/`:
//!   r1.js, lag.js for R3/R4, r7.js, r8.js);
//! - a connection pool (deadpool-redis): a request's `GET` goes out on one
//!   pooled connection and its `SET` on whichever the pool hands out next.
//!
//! Each script runs against plain Redis (the control: the stale value stays)
//! and through cachefence (it must not). The steps of concurrent requests
//! are put in one explicit order ([`Turns`]); pooled checkouts are shaped so
//! the pool hands out the connections of the pool sequence, and the
//! tests assert which connection each command went out on.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::managed::{Object, ObjectId, Pool, QueueMode};
use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use testkit::race::raw_value;
use testkit::{Database, FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, Setup, Target, WAIT};

const KEY: &str = "user:x";

/// The clients of the two client models (the redis crate's multiplexed
/// connection, a deadpool-redis pool) on a [`Setup`]'s address.
trait ClientModels {
    async fn multiplexed(&self) -> MultiplexedConnection;
    fn pool(&self, size: usize) -> Pool<deadpool_redis::Manager>;
}

impl ClientModels for Setup {
    /// One multiplexed connection (the redis crate's), its response timeout
    /// raised above the proxy's herd hold.
    async fn multiplexed(&self) -> MultiplexedConnection {
        redis::Client::open(format!("redis://{}/", self.addr))
            .unwrap()
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await
            .expect("connect the multiplexed connection")
    }

    /// A deadpool-redis pool of up to `size` connections, last returned
    /// first out (LIFO), so the tests can say which connection a checkout
    /// gets.
    fn pool(&self, size: usize) -> Pool<deadpool_redis::Manager> {
        let manager =
            deadpool_redis::Manager::new_with_config(format!("redis://{}/", self.addr), connection_config())
                .unwrap();
        Pool::builder(manager)
            .max_size(size)
            .queue_mode(QueueMode::Lifo)
            .build()
            .unwrap()
    }
}

fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(WAIT))
        .set_response_timeout(Some(WAIT))
}

async fn get(conn: &mut impl ConnectionLike) -> Option<String> {
    redis::cmd("GET").arg(KEY).query_async(conn).await.expect("GET")
}

/// A fill or write with a 60 s TTL; a refused fill answers +OK too
/// (`on_stale_fill = "ok"`, the default).
async fn set(conn: &mut impl ConnectionLike, value: &str) {
    let reply: String = redis::cmd("SET")
        .arg(KEY)
        .arg(value)
        .arg("EX")
        .arg(60)
        .query_async(conn)
        .await
        .expect("SET");
    assert_eq!(reply, "OK");
}

async fn del(conn: &mut impl ConnectionLike) {
    let _: i64 = redis::cmd("DEL").arg(KEY).query_async(conn).await.expect("DEL");
}

/// Puts the steps of concurrent tasks in one order: step `n` runs once
/// steps `0..n` have finished (each wait bounded by `WAIT`).
#[derive(Clone)]
struct Turns(Arc<tokio::sync::watch::Sender<usize>>);

impl Turns {
    fn new() -> Turns {
        Turns(Arc::new(tokio::sync::watch::channel(0).0))
    }

    async fn at<T>(&self, n: usize, step: impl Future<Output = T>) -> T {
        let mut turn = self.0.subscribe();
        tokio::time::timeout(WAIT, turn.wait_for(|done| *done == n))
            .await
            .unwrap_or_else(|_| panic!("step {n} never came: stuck at {}", *self.0.borrow()))
            .map(|_| ())
            .expect("turns open");
        let out = step.await;
        self.0.send_modify(|done| *done += 1);
        out
    }
}

/// Spawns tasks (each a request of the application) and waits for all.
async fn run_all(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        tokio::time::timeout(WAIT * 2, task)
            .await
            .expect("a request finished in time")
            .expect("a request task");
    }
}

/// A pooled connection and which one it is.
async fn checkout(pool: &Pool<deadpool_redis::Manager>) -> (Object<deadpool_redis::Manager>, ObjectId) {
    let conn = tokio::time::timeout(WAIT, pool.get())
        .await
        .expect("a pooled connection in time")
        .expect("a pooled connection");
    let id = Object::id(&conn);
    (conn, id)
}

// --- R1: the read/write race -------------------------------------------

/// R1 on one shared multiplexed connection X, in the mux order:
/// A misses and reads 1; the database becomes 2 and a writer deletes (also
/// on X: the whole application shares it); B misses and reads 2; B fills 2;
/// A fills 1.
async fn r1_multiplexed(target: Target) -> (Option<String>, String) {
    let setup = Setup::new(target).await;
    let db = Database::new("1");
    let x = setup.multiplexed().await;
    let turns = Turns::new();
    let a = tokio::spawn({
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        async move {
            let read = turns
                .at(0, async {
                    assert_eq!(get(&mut x).await, None);
                    db.primary("x")
                })
                .await;
            turns.at(4, set(&mut x, &read)).await;
        }
    });
    let writer = tokio::spawn({
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        async move {
            turns
                .at(1, async {
                    db.write("x", "2");
                    del(&mut x).await;
                })
                .await;
        }
    });
    let b = tokio::spawn({
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        async move {
            let read = turns
                .at(2, async {
                    assert_eq!(get(&mut x).await, None);
                    db.primary("x")
                })
                .await;
            turns.at(3, set(&mut x, &read)).await;
        }
    });
    run_all(vec![a, writer, b]).await;
    let (value, _) = setup.cached(KEY).await;
    setup.stop().await;
    (value, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_read_write_race_through_a_shared_multiplexed_connection() {
    let (stale, db) = r1_multiplexed(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "2"),
        "control: plain Redis keeps A's stale fill"
    );
    let (value, db) = r1_multiplexed(Target::Cachefence(FENCE_EVERY_KEY)).await;
    assert_eq!(db, "2");
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "through cachefence A's stale fill must not be stored (it borrowed B's miss on the shared connection)"
    );
}

/// R1 over a pool of two connections, P1 and P2: A misses on P1 and
/// reads 1; the database becomes 2 and a writer deletes (through the
/// pool); B misses on P2 (P1 is busy with another request) and reads 2;
/// B fills 2 on P1; A fills 1 on P2 (B still holds P1). The fills end in
/// this order so that plain Redis keeps the stale value too.
async fn r1_pooled(target: Target) -> (Option<String>, String) {
    let setup = Setup::new(target).await;
    let db = Database::new("1");
    let pool = setup.pool(2);

    let (mut a_conn, p1) = checkout(&pool).await;
    assert_eq!(get(&mut *a_conn).await, None);
    let a_read = db.primary("x");
    drop(a_conn);

    db.write("x", "2");
    let (mut w_conn, on) = checkout(&pool).await;
    assert_eq!(on, p1);
    del(&mut *w_conn).await;
    drop(w_conn);

    let (busy, on) = checkout(&pool).await; // another request holds P1
    assert_eq!(on, p1);
    let (mut b_conn, p2) = checkout(&pool).await;
    assert_ne!(p2, p1, "the pool opened a second connection");
    assert_eq!(get(&mut *b_conn).await, None);
    let b_read = db.primary("x");
    drop(b_conn);
    drop(busy); // P1 returned last: LIFO hands it out next

    let (mut b_conn, on) = checkout(&pool).await;
    assert_eq!(on, p1, "B's fill goes out on P1, where A missed");
    set(&mut *b_conn, &b_read).await;
    let (mut a_conn, on) = checkout(&pool).await;
    assert_eq!(on, p2, "A's fill goes out on P2, where B missed");
    set(&mut *a_conn, &a_read).await;
    drop((a_conn, b_conn));

    let (value, _) = setup.cached(KEY).await;
    pool.close();
    setup.stop().await;
    (value, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_read_write_race_through_a_connection_pool() {
    let (stale, db) = r1_pooled(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "2"),
        "control: plain Redis keeps A's stale fill"
    );
    let (value, db) = r1_pooled(Target::Cachefence(FENCE_EVERY_KEY)).await;
    assert_eq!(db, "2");
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "through cachefence A's stale fill on P2 must not be stored"
    );
}

// --- R3 and R4: a lagging replica ----------------------------------------

const LAG_REFUSE: &str =
    "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlag_window = \"2s\"\nlag_policy = \"refuse\"\n";
const LAG_SHORT_TTL: &str = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlag_window = \"2s\"\n";

/// Through the proxy, a fill of the lagging replica's value that was not
/// stored was refused by the lag rule (not for a fence lost or misread).
fn assert_refused_by_the_lag_rule(setup: &Setup, cached: &(Option<String>, i64)) {
    if let (Some(proxy), None) = (&setup.proxy, &cached.0) {
        let fences = proxy.ctx.fences.as_ref().expect("fences on");
        assert!(
            fences.stats.refused_lag_window.get() >= 1,
            "not stored, and not by the lag rule"
        );
    }
}

/// R3/R4 on one shared multiplexed connection: `writes` writers each
/// change the primary and delete; then requests A and B both miss, both
/// read the lagging replica (1) and fill, A first. Returns the cached value
/// and its PTTL.
async fn lag_multiplexed(target: Target, writes: &[&'static str]) -> (Option<String>, i64) {
    let setup = Setup::new(target).await;
    let db = Database::new("1");
    let x = setup.multiplexed().await;
    let turns = Turns::new();
    let mut tasks = Vec::new();
    for (n, value) in writes.iter().copied().enumerate() {
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        tasks.push(tokio::spawn(async move {
            turns
                .at(n, async {
                    db.write("x", value);
                    del(&mut x).await;
                })
                .await;
        }));
    }
    let first = writes.len();
    for (miss, fill) in [(first, first + 2), (first + 1, first + 3)] {
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        tasks.push(tokio::spawn(async move {
            let read = turns
                .at(miss, async {
                    assert_eq!(get(&mut x).await, None);
                    db.replica("x") // the replica still says 1
                })
                .await;
            turns.at(fill, set(&mut x, &read)).await;
        }));
    }
    run_all(tasks).await;
    assert_eq!(db.replica("x"), "1");
    let cached = setup.cached(KEY).await;
    assert_refused_by_the_lag_rule(&setup, &cached);
    setup.stop().await;
    cached
}

/// R3/R4 over a pool: the writers delete through the pool (P1); request A
/// misses on P1, reads the lagging replica (1) and fills on P2 (P1 is busy
/// with another request).
async fn lag_pooled(target: Target, writes: &[&'static str]) -> (Option<String>, i64) {
    let setup = Setup::new(target).await;
    let db = Database::new("1");
    let pool = setup.pool(2);
    let mut p1 = None;
    for value in writes {
        db.write("x", value);
        let (mut w_conn, on) = checkout(&pool).await;
        assert_eq!(*p1.get_or_insert(on), on);
        del(&mut *w_conn).await;
    }
    let (mut a_conn, on) = checkout(&pool).await;
    assert_eq!(Some(on), p1);
    assert_eq!(get(&mut *a_conn).await, None);
    let read = db.replica("x"); // the replica still says 1
    drop(a_conn);
    let (busy, on) = checkout(&pool).await;
    assert_eq!(Some(on), p1);
    let (mut a_conn, p2) = checkout(&pool).await;
    assert_ne!(Some(p2), p1, "A's fill goes out on P2");
    set(&mut *a_conn, &read).await;
    drop((busy, a_conn));
    let cached = setup.cached(KEY).await;
    assert_refused_by_the_lag_rule(&setup, &cached);
    pool.close();
    setup.stop().await;
    cached
}

#[tokio::test(flavor = "multi_thread")]
async fn r3_replica_lag_through_a_shared_multiplexed_connection() {
    let (stale, ttl) = lag_multiplexed(Target::Redis, &["2"]).await;
    assert_eq!(stale.as_deref(), Some("1"), "control: the replica's 1 is cached");
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");
    let (value, _) = lag_multiplexed(Target::Cachefence(LAG_REFUSE), &["2"]).await;
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "lag_policy = refuse: no fill within lag_window of the delete is stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn r3_replica_lag_through_a_connection_pool() {
    let (stale, ttl) = lag_pooled(Target::Redis, &["2"]).await;
    assert_eq!(stale.as_deref(), Some("1"), "control: the replica's 1 is cached");
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");
    let (value, _) = lag_pooled(Target::Cachefence(LAG_REFUSE), &["2"]).await;
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "lag_policy = refuse: A's fill on P2 is a fill of its miss on P1, within lag_window"
    );
}

/// The R4 contract (#16): the replica's 1 lacks both writes, and the first
/// of their invalidations is not in the fence, so neither policy stores it.
/// (Before #16, `short_ttl` stored it until `lag_window` after the LAST
/// invalidation: up to twice the window after the first write.)
fn assert_r4_refused(refused: Option<String>, short: (Option<String>, i64)) {
    assert_ne!(refused.as_deref(), Some("1"), "lag_policy = refuse");
    assert_ne!(
        short.0.as_deref(),
        Some("1"),
        "lag_policy = short_ttl: refused, stored for {} ms",
        short.1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn r4_two_writers_and_replica_lag_through_a_shared_multiplexed_connection() {
    let (stale, ttl) = lag_multiplexed(Target::Redis, &["2", "3"]).await;
    assert_eq!(stale.as_deref(), Some("1"), "control: the replica's 1 is cached");
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");
    let (refused, _) = lag_multiplexed(Target::Cachefence(LAG_REFUSE), &["2", "3"]).await;
    let short = lag_multiplexed(Target::Cachefence(LAG_SHORT_TTL), &["2", "3"]).await;
    assert_r4_refused(refused, short);
}

#[tokio::test(flavor = "multi_thread")]
async fn r4_two_writers_and_replica_lag_through_a_connection_pool() {
    let (stale, ttl) = lag_pooled(Target::Redis, &["2", "3"]).await;
    assert_eq!(stale.as_deref(), Some("1"), "control: the replica's 1 is cached");
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");
    let (refused, _) = lag_pooled(Target::Cachefence(LAG_REFUSE), &["2", "3"]).await;
    let short = lag_pooled(Target::Cachefence(LAG_SHORT_TTL), &["2", "3"]).await;
    assert_r4_refused(refused, short);
}

// --- R7: the update-on-write race ----------------------------------------

/// A declared cache at the defaults: `on_write = "invalidate"`, the cure
/// for R7 in every client model.
const ON_WRITE_INVALIDATE: &str = "[[cache]]\npattern = \"*\"\n";
/// The same with `on_write = "write"`: R7's older write stays.
const ON_WRITE_WRITE: &str = "[[cache]]\npattern = \"*\"\non_write = \"write\"\n";

/// R7 on one shared multiplexed connection, with a reader in the middle:
/// A writes DB=1, B writes DB=2, B sets cache 2; reader C misses (on the
/// same connection) and reads 2; A sets cache 1; C fills 2.
async fn r7_multiplexed(target: Target) -> (Option<String>, String) {
    let setup = Setup::new(target).await;
    let db = Database::default();
    let x = setup.multiplexed().await;
    let turns = Turns::new();
    let a = tokio::spawn({
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        async move {
            turns.at(0, async { db.write("x", "1") }).await;
            turns.at(4, set(&mut x, "1")).await;
        }
    });
    let b = tokio::spawn({
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        async move {
            turns.at(1, async { db.write("x", "2") }).await;
            turns.at(2, set(&mut x, "2")).await;
        }
    });
    let c = tokio::spawn({
        let (mut x, db, turns) = (x.clone(), db.clone(), turns.clone());
        async move {
            let read = turns
                .at(3, async {
                    // Plain Redis hits B's 2; cachefence invalidated it.
                    let _ = get(&mut x).await;
                    db.primary("x")
                })
                .await;
            turns.at(5, set(&mut x, &read)).await;
        }
    });
    run_all(vec![a, b, c]).await;
    let (value, _) = setup.cached(KEY).await;
    setup.stop().await;
    (value, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r7_update_on_write_race_through_a_shared_multiplexed_connection() {
    let (stale, db) = r7_multiplexed(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("2"), "2"),
        "control: C's fill comes last and repairs plain Redis"
    );
    let (value, db) = r7_multiplexed(Target::Cachefence(ON_WRITE_INVALIDATE)).await;
    assert_eq!(db, "2");
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "A's older write must not stay cached"
    );
}

/// R7 over a pool as races.rs runs it: A writes DB=1, B writes DB=2,
/// B sets cache 2 on P1, A sets cache 1 on P2 (B still holds P1).
async fn r7_pooled(target: Target) -> (Option<String>, String) {
    let setup = Setup::new(target).await;
    let db = Database::default();
    let pool = setup.pool(2);
    db.write("x", "1");
    db.write("x", "2");
    let (mut b_conn, p1) = checkout(&pool).await;
    set(&mut *b_conn, "2").await;
    let (mut a_conn, p2) = checkout(&pool).await;
    assert_ne!(p1, p2);
    set(&mut *a_conn, "1").await;
    drop((a_conn, b_conn));
    let (value, _) = setup.cached(KEY).await;
    pool.close();
    setup.stop().await;
    (value, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r7_update_on_write_race_through_a_connection_pool() {
    let (stale, db) = r7_pooled(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "2"),
        "control: the older write wins"
    );
    let (value, db) = r7_pooled(Target::Cachefence(ON_WRITE_INVALIDATE)).await;
    assert_eq!(db, "2");
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "A's older write must not stay cached"
    );
    // Why `invalidate` is the default: with `write`, the two SETs are
    // writes, and the older one stays as it does in plain Redis.
    let (kept, _) = r7_pooled(Target::Cachefence(ON_WRITE_WRITE)).await;
    assert_eq!(
        kept.as_deref(),
        Some("1"),
        "on_write = write stores the older write"
    );
}

// --- R8: the stampede ----------------------------------------------------

const HOLD: &str = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"2s\"\n";
const DATABASE_READ: Duration = Duration::from_millis(200);

/// One reader of the stampede: GET; on nil, count a database read, take
/// it (200 ms) and fill. Returns what the GET got.
async fn stampede_reader(conn: &mut impl ConnectionLike, reads: &AtomicUsize) -> Option<String> {
    let got = get(conn).await;
    if got.is_none() {
        reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(DATABASE_READ).await;
        set(conn, "from-db").await;
    }
    got
}

/// What the readers got, each within `WAIT * 2`.
async fn outcomes<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for task in tasks {
        out.push(
            tokio::time::timeout(WAIT * 2, task)
                .await
                .expect("a reader finished in time")
                .expect("a reader task"),
        );
    }
    out
}

/// R8 on one shared multiplexed connection: `readers` tasks GET the hot
/// key at once; each that gets nil reads the database and fills.
async fn r8_multiplexed(target: Target, readers: usize) -> (usize, Vec<Option<String>>) {
    let setup = Setup::new(target).await;
    let x = setup.multiplexed().await;
    // A long-lived multiplexed connection has carried concurrent requests
    // before: until it has, cachefence treats it as a connection used one
    // request at a time, whose misses never wait for a leader on it
    // (docs/consistency.md, herd control). One pipeline is one write
    // (separate requests could arrive one at a time on a loaded machine).
    let mut warm = redis::pipe();
    for _ in 0..4 {
        warm.cmd("PING");
    }
    let pongs: Vec<String> = warm.query_async(&mut x.clone()).await.expect("warm-up pings");
    assert_eq!(pongs, ["PONG"; 4]);
    let reads = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(tokio::sync::Barrier::new(readers));
    let mut tasks = Vec::new();
    for _ in 0..readers {
        let (mut x, reads, start) = (x.clone(), reads.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            stampede_reader(&mut x, &reads).await
        }));
    }
    let got = outcomes(tasks).await;
    setup.stop().await;
    (reads.load(Ordering::SeqCst), got)
}

/// Exactly one database read; every other reader got the filled value.
fn assert_one_database_read(reads: usize, got: &[Option<String>]) {
    assert_eq!(
        reads, 1,
        "through cachefence one reader goes to the database: {got:?}"
    );
    let served = got.iter().filter(|o| o.as_deref() == Some("from-db")).count();
    assert_eq!(
        served,
        got.len() - 1,
        "the others get the value it filled: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn r8_stampede_through_a_shared_multiplexed_connection() {
    let (reads, _) = r8_multiplexed(Target::Redis, 50).await;
    assert_eq!(reads, 50, "control: every reader misses and reads the database");
    let (reads, got) = r8_multiplexed(Target::Cachefence(HOLD), 50).await;
    assert_one_database_read(reads, &got);
}

/// R8 over a pool: the first reader misses on P1 and returns it; while it
/// reads the database, `readers - 1` more requests arrive at once — one of
/// them reuses P1 (the only idle connection), the rest open connections of
/// their own — and GET. The pool has a connection to spare, so the first
/// reader's fill finds one whatever the held readers occupy. Returns the
/// database reads and what each reader's GET got.
async fn r8_pooled(target: Target, readers: usize) -> (usize, Vec<Option<String>>) {
    let setup = Setup::new(target).await;
    let pool = setup.pool(readers + 1);
    let reads = Arc::new(AtomicUsize::new(0));
    let (missed, first_missed) = tokio::sync::oneshot::channel::<ObjectId>();
    let first = tokio::spawn({
        let (pool, reads) = (pool.clone(), reads.clone());
        async move {
            let (mut conn, p1) = checkout(&pool).await;
            let got = get(&mut *conn).await;
            assert_eq!(got, None, "the first reader misses");
            drop(conn);
            reads.fetch_add(1, Ordering::SeqCst);
            missed.send(p1).unwrap();
            tokio::time::sleep(DATABASE_READ).await;
            let (mut conn, _) = checkout(&pool).await;
            set(&mut *conn, "from-db").await;
            got
        }
    });
    let p1 = tokio::time::timeout(WAIT, first_missed)
        .await
        .expect("the first reader missed in time")
        .expect("the first reader");
    let start = Arc::new(tokio::sync::Barrier::new(readers - 1));
    let mut tasks = Vec::new();
    for _ in 1..readers {
        let (pool, reads, start) = (pool.clone(), reads.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let (mut conn, on) = checkout(&pool).await;
            let got = get(&mut *conn).await;
            drop(conn);
            if got.is_none() {
                reads.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(DATABASE_READ).await;
                set(&mut *checkout(&pool).await.0, "from-db").await;
            }
            (got, on)
        }));
    }
    let followers = outcomes(tasks).await;
    assert!(
        followers.iter().any(|(_, on)| *on == p1),
        "a later reader reused the first reader's connection"
    );
    let mut got = outcomes(vec![first]).await;
    got.extend(followers.into_iter().map(|(got, _)| got));
    pool.close();
    setup.stop().await;
    (reads.load(Ordering::SeqCst), got)
}

#[tokio::test(flavor = "multi_thread")]
async fn r8_stampede_through_a_connection_pool() {
    let (reads, _) = r8_pooled(Target::Redis, 20).await;
    assert_eq!(reads, 20, "control: every reader misses and reads the database");
    let (reads, got) = r8_pooled(Target::Cachefence(HOLD), 20).await;
    assert_one_database_read(reads, &got);
}

// --- The two raw sequences ---------------------------------------

/// The pool sequence of issue 14, exactly: A misses on P1; W deletes on
/// its own connection; B misses on P2; A fills "stale" on P2; B fills
/// "fresh" on P1. Returns the cached value of k.
async fn raw_pool_sequence(target: Target) -> Option<String> {
    let setup = Setup::new(target).await;
    let addr = setup.addr.as_str();
    let (mut p1, mut p2, mut w) = (
        RawClient::connect(addr).await,
        RawClient::connect(addr).await,
        RawClient::connect(addr).await,
    );
    assert_eq!(p1.call("GET k").await, "$-1\r\n", "A: GET k on P1");
    assert!(w.call("DEL k").await.starts_with(':'), "W: DEL k");
    assert_eq!(p2.call("GET k").await, "$-1\r\n", "B: GET k on P2");
    assert_eq!(p2.call("SET k stale").await, "+OK\r\n", "A: SET k stale on P2");
    assert_eq!(p1.call("SET k fresh").await, "+OK\r\n", "B: SET k fresh on P1");
    let value = raw_value(&w.call("GET k").await);
    setup.stop().await;
    value
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_pool_sequence_get_on_one_connection_set_on_another() {
    // Plain Redis keeps the last SET, B's "fresh": in this order the stale
    // value is cachefence's own doing (B's fill on P1 is judged by A's
    // ticket there, A's stale one on P2 by B's).
    assert_eq!(
        raw_pool_sequence(Target::Redis).await.as_deref(),
        Some("fresh"),
        "control: plain Redis ends with the last SET"
    );
    assert_ne!(
        raw_pool_sequence(Target::Cachefence(FENCE_EVERY_KEY))
            .await
            .as_deref(),
        Some("stale"),
        "through cachefence A's fill, whose miss predates the DEL, must not be stored"
    );
}

/// The mux sequence of issue 14, exactly: A and B share connection X; W
/// deletes on its own connection. Returns the cached value of k.
async fn raw_mux_sequence(target: Target) -> Option<String> {
    let setup = Setup::new(target).await;
    let addr = setup.addr.as_str();
    let (mut x, mut w) = (RawClient::connect(addr).await, RawClient::connect(addr).await);
    assert_eq!(x.call("GET k").await, "$-1\r\n", "A: GET k on X");
    assert!(w.call("DEL k").await.starts_with(':'), "W: DEL k");
    assert_eq!(x.call("GET k").await, "$-1\r\n", "B: GET k on X");
    assert_eq!(x.call("SET k fresh").await, "+OK\r\n", "B: SET k fresh on X");
    assert_eq!(x.call("SET k stale").await, "+OK\r\n", "A: SET k stale on X");
    let value = raw_value(&w.call("GET k").await);
    setup.stop().await;
    value
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_mux_sequence_every_request_on_one_connection() {
    assert_eq!(
        raw_mux_sequence(Target::Redis).await.as_deref(),
        Some("stale"),
        "control: plain Redis keeps A's stale fill"
    );
    assert_ne!(
        raw_mux_sequence(Target::Cachefence(FENCE_EVERY_KEY))
            .await
            .as_deref(),
        Some("stale"),
        "through cachefence A's fill, whose miss predates the DEL, must not be stored"
    );
}

// --- ioredis ---------------------------------------------------------------

/// Runs `node tests/node/<script> PORT ARGS...` (the script drives one
/// ioredis client shared by all its requests) and returns what it printed
/// (JSON). Every script ends itself within 20 s.
fn node_script(script: &str, port: u16, args: &[String]) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/ioredis").is_dir(),
        "tests/node/node_modules is missing: run `npm ci --prefix tests/node` first (needs node and npm)"
    );
    let out = Command::new("node")
        .arg(dir.join(script))
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `node` ({e}): the ioredis tests need Node.js 18 or later"));
    assert!(
        out.status.success(),
        "node tests/node/{script} {port} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Runs `tests/node/r1.js` (R1 through one ioredis client) against `port`
/// and returns the value it printed (JSON: a string or null).
fn ioredis_r1(port: u16) -> String {
    node_script("r1.js", port, &[])
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_read_write_race_through_one_ioredis_client() {
    let redis = RedisServer::start();
    let stale = tokio::task::spawn_blocking({
        let port = redis.port;
        move || ioredis_r1(port)
    })
    .await
    .unwrap();
    assert_eq!(stale, "\"1\"", "control: plain Redis keeps A's stale fill");

    let behind = RedisServer::start();
    let proxy = Proxy::start(&behind.addr(), FENCE_EVERY_KEY).await;
    let port = proxy.addr.port();
    let value = tokio::task::spawn_blocking(move || ioredis_r1(port))
        .await
        .unwrap();
    proxy.shutdown().await;
    assert_ne!(
        value, "\"1\"",
        "through cachefence A's stale fill must not be stored (ioredis shares one connection)"
    );
}

/// Runs a script of tests/node against `setup` (plain Redis or cachefence)
/// off the runtime's threads and parses what it printed.
async fn ioredis(setup: &Setup, script: &'static str, args: &[&str]) -> serde_json::Value {
    let port = setup.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || node_script(script, port, &args))
        .await
        .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{script} printed {out:?}: {e}"))
}

/// R3/R4 through one ioredis client (`tests/node/lag.js`), in the order of
/// [`lag_multiplexed`]: the writers change the primary and delete; A and B
/// miss, read the lagging replica (1) and fill, A first. Returns the cached
/// value and its PTTL.
async fn lag_ioredis(target: Target, writes: &[&'static str]) -> (Option<String>, i64) {
    let setup = Setup::new(target).await;
    let out = ioredis(&setup, "lag.js", writes).await;
    assert_eq!(out["replica"], "1", "{out}");
    assert_eq!(out["primary"], *writes.last().unwrap(), "{out}");
    let cached = setup.cached(KEY).await;
    assert_refused_by_the_lag_rule(&setup, &cached);
    setup.stop().await;
    cached
}

#[tokio::test(flavor = "multi_thread")]
async fn r3_replica_lag_through_one_ioredis_client() {
    let (stale, ttl) = lag_ioredis(Target::Redis, &["2"]).await;
    assert_eq!(stale.as_deref(), Some("1"), "control: the replica's 1 is cached");
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");
    let (value, _) = lag_ioredis(Target::Cachefence(LAG_REFUSE), &["2"]).await;
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "lag_policy = refuse: no fill within lag_window of the delete is stored (ioredis shares one connection)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn r4_two_writers_and_replica_lag_through_one_ioredis_client() {
    let (stale, ttl) = lag_ioredis(Target::Redis, &["2", "3"]).await;
    assert_eq!(stale.as_deref(), Some("1"), "control: the replica's 1 is cached");
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");
    let (refused, _) = lag_ioredis(Target::Cachefence(LAG_REFUSE), &["2", "3"]).await;
    let short = lag_ioredis(Target::Cachefence(LAG_SHORT_TTL), &["2", "3"]).await;
    assert_r4_refused(refused, short);
}

/// R7 through one ioredis client (`tests/node/r7.js`): A writes DB=1, B
/// writes DB=2, B sets cache 2; reader C GETs and, on nil, reads 2; A sets
/// cache 1 (while C's miss, if any, is outstanding on the same connection);
/// C fills 2 if it missed. Returns the cached value, the database's value
/// and what C's GET got.
async fn r7_ioredis(target: Target) -> (Option<String>, String, Option<String>) {
    let setup = Setup::new(target).await;
    let out = ioredis(&setup, "r7.js", &[]).await;
    let (value, _) = setup.cached(KEY).await;
    setup.stop().await;
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    (value, text(&out["db"]).expect("db"), text(&out["c_got"]))
}

#[tokio::test(flavor = "multi_thread")]
async fn r7_update_on_write_race_through_one_ioredis_client() {
    let (stale, db, c_got) = r7_ioredis(Target::Redis).await;
    assert_eq!(
        c_got.as_deref(),
        Some("2"),
        "control: C hits B's 2 and does not fill"
    );
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "2"),
        "control: the older write wins"
    );
    let (value, db, c_got) = r7_ioredis(Target::Cachefence(ON_WRITE_INVALIDATE)).await;
    assert_eq!(db, "2");
    assert_eq!(c_got, None, "on_write = invalidate: B's SET deleted, C misses");
    assert_ne!(
        value.as_deref(),
        Some("1"),
        "A's older write must not stay cached, though C's miss is outstanding on the same connection"
    );
}

/// R8 through one ioredis client (`tests/node/r8.js`): `readers` requests
/// GET the hot key at once; each that gets nil reads the database (200 ms)
/// and fills. Returns the database reads and what each GET got.
async fn r8_ioredis(target: Target, readers: usize) -> (usize, Vec<Option<String>>) {
    let setup = Setup::new(target).await;
    let out = ioredis(&setup, "r8.js", &[&readers.to_string()]).await;
    setup.stop().await;
    let reads = out["reads"].as_u64().expect("reads") as usize;
    let got = out["got"].as_array().expect("got");
    (
        reads,
        got.iter().map(|v| v.as_str().map(str::to_string)).collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn r8_stampede_through_one_ioredis_client() {
    let (reads, got) = r8_ioredis(Target::Redis, 50).await;
    assert_eq!(got.len(), 50);
    assert_eq!(reads, 50, "control: every reader misses and reads the database");
    let (reads, got) = r8_ioredis(Target::Cachefence(HOLD), 50).await;
    assert_eq!(got.len(), 50);
    assert_one_database_read(reads, &got);
}
