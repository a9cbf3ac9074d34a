//! The cache-aside races of DESIGN.md, driven step by step with several
//! client connections and a database stand-in (a primary and a replica that
//! lags until told to catch up). Each runs the same script against plain
//! Redis — the control, where the stale value stays — and through
//! cachefence, where it must not.

use testkit::race::cached;
use testkit::{Database, FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, Setup, Target, cmds};

/// R1: reader misses and reads X=1; writer writes X=2 and deletes; reader
/// fills X=1.
async fn r1_script(target: Target) -> (Option<String>, String) {
    let setup = Setup::new(target).await;
    let db = Database::default();
    db.write("x", "1");
    db.replicate();
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);

    assert_eq!(reader.call("GET user:x").await, "$-1\r\n");
    let read = db.primary("x");
    db.write("x", "2");
    assert_eq!(writer.call("DEL user:x").await, ":0\r\n");
    assert_eq!(reader.call(&format!("SET user:x {read} EX 60")).await, "+OK\r\n");

    let value = cached(&mut setup.client().await, "user:x").await;
    drop(setup.proxy);
    (value, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r1_read_write_race_fill_is_refused() {
    let (stale, db) = r1_script(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "2"),
        "control: plain Redis keeps the stale value"
    );
    let (value, db) = r1_script(Target::Cachefence(FENCE_EVERY_KEY)).await;
    assert_eq!(
        (value, db.as_str()),
        (None, "2"),
        "through cachefence the stale fill is refused"
    );
}

/// R2-style ordering without a change log is covered by R1's fence; R3:
/// writer writes X=2 on the primary and deletes; a reader misses, reads
/// X=1 from the lagging replica and fills.
async fn r3_script(target: Target) -> (Option<String>, i64) {
    let setup = Setup::new(target).await;
    let db = Database::default();
    db.write("x", "1");
    db.replicate();
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);

    db.write("x", "2");
    assert_eq!(writer.call("DEL user:x").await, ":0\r\n");
    assert_eq!(reader.call("GET user:x").await, "$-1\r\n");
    let read = db.replica("x"); // the replica still says 1
    assert_eq!(reader.call(&format!("SET user:x {read} EX 60")).await, "+OK\r\n");

    let mut check = setup.client().await;
    let value = cached(&mut check, "user:x").await;
    let ttl = check.call("PTTL user:x").await;
    let ttl: i64 = ttl.trim_start_matches(':').trim_end().parse().unwrap();
    drop(setup.proxy);
    (value, ttl)
}

#[tokio::test(flavor = "multi_thread")]
async fn r3_replica_lag_fill_is_cut_to_the_lag_window_or_refused() {
    let (stale, ttl) = r3_script(Target::Redis).await;
    assert_eq!(
        stale.as_deref(),
        Some("1"),
        "control: the stale replica value is cached"
    );
    assert!(ttl > 59_000, "control: for its whole TTL ({ttl} ms)");

    // short_ttl: stored, but expiring lag_window after the invalidation.
    let (value, ttl) = r3_script(Target::Cachefence(
        "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\nlag_window = \"2s\"\n",
    ))
    .await;
    assert_eq!(value.as_deref(), Some("1"));
    assert!(
        (1..=2_000).contains(&ttl),
        "stale for at most lag_window, got {ttl} ms"
    );

    // refuse: not stored at all.
    let refuse = "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\nlag_window = \"2s\"\nlag_policy = \"refuse\"\n";
    let (value, _) = r3_script(Target::Cachefence(refuse)).await;
    assert_eq!(value, None);
}

/// R7: A writes DB=1, B writes DB=2, B sets cache 2, A sets cache 1.
async fn r7_script(target: Target) -> (Option<String>, String) {
    let setup = Setup::new(target).await;
    let db = Database::default();
    let (mut a, mut b) = (setup.client().await, setup.client().await);
    db.write("x", "1");
    db.write("x", "2");
    assert_eq!(b.call("SET user:x 2").await, "+OK\r\n");
    assert_eq!(a.call("SET user:x 1").await, "+OK\r\n");
    let value = cached(&mut setup.client().await, "user:x").await;
    drop(setup.proxy);
    (value, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r7_update_on_write_race_is_removed_by_on_write_invalidate() {
    let (stale, db) = r7_script(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "2"),
        "control: the older write wins"
    );
    let (value, db) = r7_script(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"invalidate\"\n",
    ))
    .await;
    assert_eq!((value, db.as_str()), (None, "2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fence_lost_between_miss_and_fill_refuses_the_fill() {
    let setup = Setup::new(Target::Cachefence(FENCE_EVERY_KEY)).await;
    let (mut reader, mut admin) = (setup.client().await, setup.client().await);
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    assert_eq!(admin.call("FLUSHALL").await, "+OK\r\n");
    assert_eq!(reader.call("SET k stale").await, "+OK\r\n");
    assert_eq!(cached(&mut admin, "k").await, None);
    let stats = admin.call("CACHE.STATS").await;
    assert!(stats.contains("fills_refused_fence_missing\r\n:1\r\n"), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writer_never_consumes_a_readers_ticket_and_first_fill_wins() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\non_stale_fill = \"error\"\n",
    ))
    .await;
    let (mut reader, mut writer, mut other) =
        (setup.client().await, setup.client().await, setup.client().await);
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    assert_eq!(other.call("GET k").await, "$-1\r\n");
    // Another connection's SET is a write (no ticket there): stored, fence moved.
    assert_eq!(writer.call("SET k fresh").await, "+OK\r\n");
    // The reader's ticket is still its own, but the fence moved: refused.
    assert_eq!(
        reader.call("SET k old").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );
    assert_eq!(cached(&mut writer, "k").await.as_deref(), Some("fresh"));

    // First fill wins: two tickets of one version, the second fill is stale.
    assert_eq!(writer.call("DEL k").await, ":1\r\n");
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    assert_eq!(other.call("GET k").await, "$-1\r\n");
    assert_eq!(reader.call("SET k v1").await, "+OK\r\n");
    assert_eq!(
        other.call("SET k v2").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );
    assert_eq!(cached(&mut writer, "k").await.as_deref(), Some("v1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn fence_versions_never_repeat_across_redis_restarts() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut versions = Vec::new();
    for round in 0..3 {
        let mut client = RawClient::connect(proxy.addr).await;
        for _ in 0..3 {
            // A miss creates the fence (a delete alone does not), the delete moves it.
            assert_eq!(client.call("GET k").await, "$-1\r\n");
            assert!(client.call("DEL k").await.starts_with(':'));
            let info = client.call("CACHE.FENCE k").await;
            let version = info
                .split("version\r\n")
                .nth(1)
                .and_then(|r| r.split("\r\n").nth(1))
                .unwrap()
                .to_string();
            versions.push(version);
        }
        if round < 2 {
            redis.restart();
        }
    }
    let mut unique = versions.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), versions.len(), "a version repeated: {versions:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cache_commands_answer_in_the_connections_protocol() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\n",
    ))
    .await;
    let mut c = setup.client().await;
    assert_eq!(c.call("SET user:1 a").await, "+OK\r\n");
    assert_eq!(c.call("CACHE.INVALIDATE user:1 user:2").await, ":1\r\n");
    let resp2 = c.call("CACHE.STATS").await;
    assert!(resp2.starts_with("*64\r\n$6\r\nmisses\r\n"), "{resp2}");
    assert!(resp2.contains("$13\r\ninvalidations\r\n:1\r\n"), "{resp2}");
    let fence = c.call("CACHE.FENCE user:1").await;
    assert!(
        fence.starts_with("*14\r\n$3\r\nkey\r\n$6\r\nuser:1\r\n$9\r\nfenced_by\r\n$6\r\nuser:*\r\n"),
        "{fence}"
    );
    c.send(&cmds("HELLO 3")).await;
    c.read_frame().await;
    let resp3 = c.call("CACHE.STATS").await;
    assert!(
        resp3.starts_with("%32\r\n") && resp3.contains("$6\r\nmisses\r\n:0\r\n"),
        "{resp3}"
    );
    assert!(
        c.call("CACHE.FENCE nothing")
            .await
            .contains("$9\r\nfenced_by\r\n_\r\n")
    );
    let unknown = c.call("CACHE.NOPE").await;
    assert!(
        unknown.starts_with("-ERR unknown cachefence command 'CACHE.NOPE'; try CACHE.HELP"),
        "{unknown}"
    );
    // Keys outside every pattern are pure passthrough: no fence is made.
    assert_eq!(c.call("SET other 1").await, "+OK\r\n");
    assert_eq!(c.call("EXISTS cachefence:{other}").await, ":0\r\n");
}

/// R8: `readers` clients miss the same hot key at once; each that gets nil
/// reads the database (counted, 50 ms) and fills. Returns the database
/// reads and what every reader ended up with.
async fn r8_script(target: Target, readers: usize) -> (usize, Vec<String>) {
    let setup = Setup::new(target).await;
    // Connect everyone first, then let them all miss at once.
    let mut clients = Vec::new();
    for _ in 0..readers {
        clients.push(setup.client().await);
    }
    let outcome = testkit::race::stampede(clients, "hot").await;
    drop(setup.proxy);
    outcome
}

#[tokio::test(flavor = "multi_thread")]
async fn r8_stampede_sends_one_reader_to_the_database() {
    let (reads, _) = r8_script(Target::Redis, 200).await;
    assert_eq!(reads, 200, "control: every reader misses and reads the database");
    let (reads, outcomes) = r8_script(
        Target::Cachefence("[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"2s\"\n"),
        200,
    )
    .await;
    assert_eq!(reads, 1, "through cachefence one reader goes to the database");
    let served = outcomes.iter().filter(|o| *o == "$7\r\nfrom-db\r\n").count();
    assert_eq!(served, 199, "the others get the value it filled: {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_miss_gives_up_after_hold_and_gets_a_ticket_of_its_own() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"300ms\"\n",
    ))
    .await;
    let (mut leader, mut waiter) = (setup.client().await, setup.client().await);
    assert_eq!(leader.call("GET k").await, "$-1\r\n");
    let started = std::time::Instant::now();
    // The leader never fills: the waiter is released with nil after `hold`.
    assert_eq!(waiter.call("GET k").await, "$-1\r\n");
    let waited = started.elapsed();
    assert!(waited >= std::time::Duration::from_millis(280), "{waited:?}");
    // … holding a ticket of its own: its fill is accepted.
    assert_eq!(waiter.call("SET k mine").await, "+OK\r\n");
    assert_eq!(cached(&mut leader, "k").await.as_deref(), Some("mine"));
    let stats = leader.call("CACHE.STATS").await;
    assert!(stats.contains("$15\r\nholds_timed_out\r\n:1\r\n"), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_share_one_herd_lease_and_refuse_each_others_stale_fills() {
    let redis = RedisServer::start();
    let (a, b) = (
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
    );
    let mut reader_a = RawClient::connect(a.addr).await;
    let mut reader_b = RawClient::connect(b.addr).await;
    let mut writer = RawClient::connect(b.addr).await;
    // Reader on A leads; reader on B waits (polling Redis), then gets A's fill.
    assert_eq!(reader_a.call("GET k").await, "$-1\r\n");
    reader_b.send(&cmds("GET k")).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(reader_a.call("SET k from-a").await, "+OK\r\n");
    assert_eq!(reader_b.read_frame().await, b"$6\r\nfrom-a\r\n");
    // A miss on A, an invalidation through B, then A's stale fill is refused.
    assert_eq!(writer.call("DEL k").await, ":1\r\n");
    assert_eq!(reader_a.call("GET k").await, "$-1\r\n");
    assert_eq!(writer.call("DEL k").await, ":0\r\n");
    assert_eq!(reader_a.call("SET k stale").await, "+OK\r\n");
    assert_eq!(cached(&mut writer, "k").await, None);
    a.shutdown().await;
    b.shutdown().await;
}

/// The pool sequence of #14 with the pool spread over two proxies behind
/// one address: A's miss on P1 (proxy a), a delete, B's miss on P2 (proxy
/// b), A's stale value stored on P2, B's fresh one on P1.
async fn pool_over_two_proxies(a: &str, b: &str) -> Option<String> {
    let (mut p1, mut p2, mut writer) = (
        RawClient::connect(a).await,
        RawClient::connect(b).await,
        RawClient::connect(b).await,
    );
    assert_eq!(p1.call("GET user:k").await, "$-1\r\n");
    assert_eq!(writer.call("DEL user:k").await, ":0\r\n");
    assert_eq!(p2.call("GET user:k").await, "$-1\r\n");
    assert_eq!(p2.call("SET user:k stale EX 60").await, "+OK\r\n");
    assert_eq!(p1.call("SET user:k fresh EX 60").await, "+OK\r\n");
    cached(&mut writer, "user:k").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_spread_over_two_proxies_never_stores_the_stale_fill() {
    let redis = RedisServer::start();
    let direct = redis.addr();
    assert_eq!(
        pool_over_two_proxies(&direct, &direct).await.as_deref(),
        Some("fresh"),
        "control: plain Redis keeps whichever came last"
    );
    let mut flush = RawClient::connect(direct.as_str()).await;
    assert_eq!(flush.call("FLUSHALL").await, "+OK\r\n");
    // The same order with the stale value last, on plain Redis: stale stays.
    let (mut p1, mut p2) = (
        RawClient::connect(direct.as_str()).await,
        RawClient::connect(direct.as_str()).await,
    );
    assert_eq!(p2.call("SET user:k fresh EX 60").await, "+OK\r\n");
    assert_eq!(p1.call("SET user:k stale EX 60").await, "+OK\r\n");
    assert_eq!(cached(&mut flush, "user:k").await.as_deref(), Some("stale"));
    assert_eq!(flush.call("FLUSHALL").await, "+OK\r\n");

    let (a, b) = (
        Proxy::start(&direct, FENCE_EVERY_KEY).await,
        Proxy::start(&direct, FENCE_EVERY_KEY).await,
    );
    let value = pool_over_two_proxies(&a.addr.to_string(), &b.addr.to_string()).await;
    assert_eq!(value, None, "neither fill can be told fresh: both refused");
    let mut stats = RawClient::connect(b.addr).await;
    let reply = stats.call("CACHE.STATS").await;
    assert!(
        reply.contains("$36\r\nfills_refused_older_miss_outstanding\r\n:1\r\n"),
        "{reply}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The `on_write` table of docs/consistency.md: a fill that comes after its
/// miss and its fence are gone (lease_ttl 100 ms: the fence lives 1.1 s)
/// is a write, and `on_write` decides what becomes of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_later_than_lease_ttl_follows_on_write() {
    for (on_write, reply, stored) in [
        ("write", "+OK\r\n", Some("late")),
        ("invalidate", "+OK\r\n", None),
        ("reject", "-ERR cachefence: writes to 'user:k' are rejected", None),
    ] {
        let toml = format!(
            "[[cache]]\npattern = \"*\"\nlease_ttl = \"100ms\"\nhold = \"50ms\"\non_write = \"{on_write}\"\n"
        );
        let setup = Setup::new(Target::Cachefence(Box::leak(toml.into_boxed_str()))).await;
        let mut reader = setup.client().await;
        assert_eq!(reader.call("GET user:k").await, "$-1\r\n");
        tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
        let got = reader.call("SET user:k late EX 60").await;
        assert!(got.starts_with(reply), "on_write = {on_write}: {got}");
        let mut direct = RawClient::connect(setup.redis.addr()).await;
        assert_eq!(
            cached(&mut direct, "user:k").await.as_deref(),
            stored,
            "on_write = {on_write}"
        );
    }
}

/// A connection shared by threads that send one request at a time (a
/// client object behind a lock): the second thread's miss of a key whose
/// lease an earlier miss of the same connection holds must not wait, since
/// that fill can only come after this reply. Waiting stalled the connection
/// for the whole `hold` (measured: reads/s fell from ~2300 to ~250).
#[tokio::test(flavor = "multi_thread")]
async fn a_miss_never_waits_for_a_leader_on_its_own_idle_connection() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"2s\"\n",
    ))
    .await;
    let mut shared = setup.client().await;
    assert_eq!(shared.call("GET user:k").await, "$-1\r\n", "thread A leads");
    let started = std::time::Instant::now();
    assert_eq!(shared.call("GET user:k").await, "$-1\r\n", "thread B");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "B was held {:?} for A's fill, which can only come after B's reply",
        started.elapsed()
    );
    // Another connection still waits for the leader's fill (herd control).
    let mut other = setup.client().await;
    other.send(&cmds("GET user:k")).await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(shared.call("SET user:k filled EX 60").await, "+OK\r\n");
    assert_eq!(other.read_frame().await, b"$6\r\nfilled\r\n");
}

/// The unsafe row of the client-model table: `ticket_scope = "connection"`
/// judges a pooled client's fill by its connection's own misses, so the
/// stale value (whose miss was on the other connection) is stored as a write.
#[tokio::test(flavor = "multi_thread")]
async fn a_pool_with_connection_scope_stores_the_stale_fill() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.addr(),
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nticket_scope = \"connection\"\n",
    )
    .await;
    let addr = proxy.addr.to_string();
    let (mut p1, mut p2, mut writer) = (
        RawClient::connect(addr.as_str()).await,
        RawClient::connect(addr.as_str()).await,
        RawClient::connect(addr.as_str()).await,
    );
    assert_eq!(p1.call("GET user:k").await, "$-1\r\n");
    assert_eq!(writer.call("DEL user:k").await, ":0\r\n");
    // The stale value goes out on a connection that never missed the key.
    assert_eq!(p2.call("SET user:k stale EX 60").await, "+OK\r\n");
    assert_eq!(cached(&mut writer, "user:k").await.as_deref(), Some("stale"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_proxys_miss_blocks_fills_for_lease_ttl_at_most() {
    let redis = RedisServer::start();
    let config = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlease_ttl = \"1s\"\n";
    let a = Proxy::start(&redis.addr(), config).await;
    let b = Proxy::start(&redis.addr(), config).await;
    let mut on_a = RawClient::connect(a.addr).await;
    assert_eq!(on_a.call("GET user:k").await, "$-1\r\n");
    let missed = std::time::Instant::now();
    drop(on_a);
    a.shutdown().await;
    let (mut reader, mut writer) = (RawClient::connect(b.addr).await, RawClient::connect(b.addr).await);
    assert_eq!(writer.call("DEL user:k").await, ":0\r\n");
    // Within lease_ttl the dead proxy's miss may still have a stale fill coming.
    assert_eq!(reader.call("GET user:k").await, "$-1\r\n");
    assert_eq!(reader.call("SET user:k fresh EX 60").await, "+OK\r\n");
    assert_eq!(cached(&mut writer, "user:k").await, None);
    // Past lease_ttl it no longer counts.
    tokio::time::sleep(std::time::Duration::from_millis(1100).saturating_sub(missed.elapsed())).await;
    assert_eq!(reader.call("GET user:k").await, "$-1\r\n");
    assert_eq!(reader.call("SET user:k fresh EX 60").await, "+OK\r\n");
    assert_eq!(cached(&mut writer, "user:k").await.as_deref(), Some("fresh"));
    b.shutdown().await;
}

/// Misses that are never filled (a row that does not exist) leave their
/// fields in the fence; once they are older than twice `lease_ttl` the next
/// miss whose leader's herd lease lapsed sweeps them, so the fence does not
/// grow with every miss of such a key.
#[tokio::test(flavor = "multi_thread")]
async fn misses_never_filled_are_swept_from_the_fence() {
    let redis = RedisServer::start();
    let config = "[[cache]]\npattern = \"*\"\nlease_ttl = \"100ms\"\nhold = \"0s\"\n";
    let proxy = Proxy::start(&redis.addr(), config).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    for _ in 0..20 {
        let mut reader = RawClient::connect(proxy.addr).await;
        assert_eq!(reader.call("GET nothing").await, "$-1\r\n");
    }
    // The fence is one string: a line per outstanding miss, ending in its name.
    let misses = |fence: &str| fence.matches(" m|").count();
    assert_eq!(misses(&direct.call("GET cachefence:{nothing}").await), 20);
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("GET nothing").await, "$-1\r\n");
    assert_eq!(
        misses(&direct.call("GET cachefence:{nothing}").await),
        1,
        "only the newest miss is left"
    );
    proxy.shutdown().await;
}

/// A fence lives only while it guards something (fence.lua `bump`,
/// `settle`): a write to a key nobody missed makes none, a fill that leaves
/// no miss outstanding deletes it, so does the refusal of the last one, and
/// with a lag window it stays for the invalidation time. A fence of the
/// format before it was one string (a hash) is replaced, not misread.
#[tokio::test(flavor = "multi_thread")]
async fn fences_live_only_while_they_guard_something() {
    let redis = RedisServer::start();
    let config = "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\nhold = \"0s\"\n\n\
                  [[cache]]\npattern = \"lag:*\"\non_write = \"write\"\nlag_window = \"5s\"\n";
    let proxy = Proxy::start(&redis.addr(), config).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let (mut a, mut b) = (
        RawClient::connect(proxy.addr).await,
        RawClient::connect(proxy.addr).await,
    );
    let exists =
        async |direct: &mut RawClient, key: &str| direct.call(&format!("EXISTS cachefence:{{{key}}}")).await;

    // Writes and deletes of a key nobody missed: no fence.
    assert_eq!(a.call("SET user:1 w").await, "+OK\r\n");
    assert_eq!(a.call("DEL user:1").await, ":1\r\n");
    assert_eq!(exists(&mut direct, "user:1").await, ":0\r\n");
    // A miss makes one; its fill, the only miss, deletes it.
    assert_eq!(a.call("GET user:1").await, "$-1\r\n");
    assert_eq!(exists(&mut direct, "user:1").await, ":1\r\n");
    assert_eq!(a.call("SET user:1 v EX 60").await, "+OK\r\n");
    assert_eq!(exists(&mut direct, "user:1").await, ":0\r\n");
    assert_eq!(cached(&mut direct, "user:1").await.as_deref(), Some("v"));

    // Two misses: the first fill keeps the fence for the other, whose fill
    // is refused (first fill wins) and takes the fence with it.
    assert_eq!(a.call("DEL user:1").await, ":1\r\n");
    assert_eq!(a.call("GET user:1").await, "$-1\r\n");
    assert_eq!(b.call("GET user:1").await, "$-1\r\n");
    assert_eq!(a.call("SET user:1 first EX 60").await, "+OK\r\n");
    assert_eq!(exists(&mut direct, "user:1").await, ":1\r\n");
    assert_eq!(b.call("SET user:1 second EX 60").await, "+OK\r\n");
    assert_eq!(exists(&mut direct, "user:1").await, ":0\r\n");
    assert_eq!(cached(&mut direct, "user:1").await.as_deref(), Some("first"));

    // A miss outstanding survives a delete: the fence moves, and stays.
    assert_eq!(a.call("DEL user:1").await, ":1\r\n");
    assert_eq!(a.call("GET user:1").await, "$-1\r\n");
    assert_eq!(b.call("DEL user:1").await, ":0\r\n");
    assert_eq!(exists(&mut direct, "user:1").await, ":1\r\n");
    assert_eq!(a.call("SET user:1 stale EX 60").await, "+OK\r\n");
    assert_eq!(cached(&mut direct, "user:1").await, None);

    // Under a lag window the invalidation time is kept, even by a write.
    assert_eq!(a.call("SET lag:1 w").await, "+OK\r\n");
    assert_eq!(exists(&mut direct, "lag:1").await, ":1\r\n");

    // A fence of the old format (a hash) is replaced by the next miss.
    assert_eq!(direct.call("HSET cachefence:{user:2} v 1 t 0").await, ":2\r\n");
    assert_eq!(a.call("GET user:2").await, "$-1\r\n");
    assert_eq!(direct.call("TYPE cachefence:{user:2}").await, "+string\r\n");
    assert_eq!(a.call("SET user:2 v EX 60").await, "+OK\r\n");
    assert_eq!(cached(&mut direct, "user:2").await.as_deref(), Some("v"));
    proxy.shutdown().await;
}

/// Under `ticket_scope = "connection"` (one connection per thread) a
/// connection's own write takes back its own misses of the key: a thread
/// that misses, then writes the key itself, has no fill pending (Redis'
/// expire.tcl: GET x nil, DEL x, SETEX x 10 foo, TTL x is 10). Another
/// connection's delete still refuses the stale fill (R1). Under the
/// default scope (per client address) the connection's own DEL cannot be
/// told from a pooled writer's, so the SETEX is refused there.
#[tokio::test(flavor = "multi_thread")]
async fn a_connections_own_write_takes_back_its_misses_under_connection_scope() {
    let scoped = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nticket_scope = \"connection\"\n";
    for (config, own_ttl) in [(scoped, ":10\r\n"), (FENCE_EVERY_KEY, ":-2\r\n")] {
        let setup = Setup::new(Target::Cachefence(config)).await;
        let (mut a, mut b) = (setup.client().await, setup.client().await);
        assert_eq!(a.call("GET x").await, "$-1\r\n");
        assert_eq!(a.call("DEL x").await, ":0\r\n");
        assert_eq!(a.call("SETEX x 10 foo").await, "+OK\r\n");
        assert_eq!(a.call("TTL x").await, own_ttl, "{config}");
        // R1: another connection's delete between the miss and the fill.
        assert_eq!(a.call("GET y").await, "$-1\r\n");
        assert_eq!(b.call("DEL y").await, ":0\r\n");
        assert_eq!(a.call("SET y stale EX 60").await, "+OK\r\n");
        assert_eq!(cached(&mut b, "y").await, None, "{config}");
    }
}

/// The token in a `[nil, token]` reply of `CACHE.GET`.
fn lease_token(reply: &str) -> String {
    let (nil, rest) = reply
        .strip_prefix("*2\r\n")
        .and_then(|r| r.split_once("\r\n"))
        .expect("an array of two");
    assert!(nil == "$-1" || nil == "_", "{reply}");
    rest.split("\r\n").nth(1).expect("a token").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_api_works_across_connections_and_proxies() {
    let redis = RedisServer::start();
    let (a, b) = (
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
    );
    let mut on_a = RawClient::connect(a.addr).await;
    let mut on_b = RawClient::connect(b.addr).await;
    let mut writer = RawClient::connect(b.addr).await;

    // Miss through A, fill through B (another connection, another process).
    let token = lease_token(&on_a.call("CACHE.GET user:1").await);
    assert!(token.starts_with("cf1."), "{token}");
    assert_eq!(
        on_b.call(&format!("CACHE.FILL user:1 {token} alice EX 60")).await,
        "+OK\r\n"
    );
    assert_eq!(
        on_a.call("CACHE.GET user:1").await,
        "*2\r\n$5\r\nalice\r\n$-1\r\n"
    );
    // The token was used up: first fill wins.
    assert_eq!(
        on_b.call(&format!("CACHE.FILL user:1 {token} again")).await,
        "+STALE\r\n"
    );

    // R1 through the lease API: an invalidation between miss and fill.
    assert_eq!(writer.call("DEL user:1").await, ":1\r\n");
    let token = lease_token(&on_a.call("CACHE.GET user:1").await);
    assert_eq!(writer.call("DEL user:1").await, ":0\r\n");
    assert_eq!(
        on_b.call(&format!("CACHE.FILL user:1 {token} stale")).await,
        "+STALE\r\n"
    );
    assert_eq!(cached(&mut writer, "user:1").await, None);

    // RESP3 replies, and bad input.
    on_a.send(&cmds("HELLO 3")).await;
    on_a.read_frame().await;
    let token = lease_token(&on_a.call("CACHE.GET user:1").await);
    assert_eq!(
        on_a.call(&format!("CACHE.FILL user:1 {token} bob PX 60000"))
            .await,
        "+OK\r\n"
    );
    assert_eq!(on_a.call("CACHE.GET user:1").await, "*2\r\n$3\r\nbob\r\n_\r\n");
    assert_eq!(
        on_a.call("CACHE.FILL user:1 nonsense v").await,
        "-ERR cachefence: invalid lease token\r\n"
    );
    assert_eq!(
        on_a.call(&format!("CACHE.FILL user:1 {token} v EX soon")).await,
        "-ERR syntax error (CACHE.FILL key token value [EX s|PX ms])\r\n"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_tokens_expire_after_lease_ttl() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlease_ttl = \"200ms\"\nhold = \"0s\"\n",
    ))
    .await;
    let mut c = setup.client().await;
    let token = lease_token(&c.call("CACHE.GET k").await);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(c.call(&format!("CACHE.FILL k {token} late")).await, "+STALE\r\n");
    assert!(
        c.call("CACHE.STATS")
            .await
            .contains("$21\r\nfills_refused_expired\r\n:1\r\n")
    );
    assert_eq!(cached(&mut c, "k").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn double_delete_removes_a_fill_from_a_lagging_read_in_the_clients_database() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\ndouble_delete = \"300ms\"\n",
    ))
    .await;
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);
    for c in [&mut reader, &mut writer] {
        assert_eq!(c.call("SELECT 3").await, "+OK\r\n");
    }
    // R3 without lag_window: the miss comes after the delete, so the fill of
    // the replica's old value is accepted …
    assert_eq!(writer.call("DEL k").await, ":0\r\n");
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    assert_eq!(reader.call("SET k old-from-replica").await, "+OK\r\n");
    assert_eq!(
        cached(&mut writer, "k").await.as_deref(),
        Some("old-from-replica")
    );
    // … and the second delete, 300 ms after the first, removes it.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(cached(&mut writer, "k").await, None);
    let stats = writer.call("CACHE.STATS").await;
    assert!(stats.contains("$19\r\nsecond_deletes_done\r\n:1\r\n"), "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mget_and_getex_misses_leave_tickets() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\non_stale_fill = \"error\"\n",
    ))
    .await;
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);
    assert_eq!(writer.call("SET user:a A").await, "+OK\r\n");
    // Each nil of a fenced key in an MGET is a miss with a ticket.
    assert_eq!(
        reader.call("MGET user:a user:b other").await,
        "*3\r\n$1\r\nA\r\n$-1\r\n$-1\r\n"
    );
    assert_eq!(writer.call("DEL user:b").await, ":0\r\n");
    assert_eq!(
        reader.call("SET user:b stale").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );
    assert_eq!(reader.call("MGET user:b").await, "*1\r\n$-1\r\n");
    assert_eq!(reader.call("SET user:b fresh").await, "+OK\r\n");
    assert_eq!(cached(&mut writer, "user:b").await.as_deref(), Some("fresh"));
    // GETEX too.
    assert_eq!(reader.call("GETEX user:c EX 10").await, "$-1\r\n");
    assert_eq!(writer.call("DEL user:c").await, ":0\r\n");
    assert_eq!(
        reader.call("SET user:c old").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );
    // The rebuilt array follows the connection's protocol.
    reader.send(&cmds("HELLO 3")).await;
    reader.read_frame().await;
    assert_eq!(reader.call("MGET user:a user:zz").await, "*2\r\n$1\r\nA\r\n_\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_and_deletes_inside_multi_move_the_fence_with_replies_unchanged() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\non_stale_fill = \"error\"\n",
    ))
    .await;
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    writer
        .send(
            &[
                cmds("MULTI"),
                cmds("SET k new"),
                cmds("GETDEL k"),
                cmds("INCR n"),
                cmds("EXEC"),
            ]
            .concat(),
        )
        .await;
    for expected in ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n", "+QUEUED\r\n"] {
        assert_eq!(writer.read_frame().await, expected.as_bytes());
    }
    assert_eq!(writer.read_frame().await, b"*3\r\n+OK\r\n$3\r\nnew\r\n:1\r\n");
    assert_eq!(
        reader.call("SET k old").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );

    // RESP3: a nil inside EXEC stays the protocol's nil, not Lua's false.
    writer.send(&cmds("HELLO 3")).await;
    writer.read_frame().await;
    writer
        .send(&[cmds("MULTI"), cmds("GETDEL absent"), cmds("DEL k"), cmds("EXEC")].concat())
        .await;
    for expected in ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n"] {
        assert_eq!(writer.read_frame().await, expected.as_bytes());
    }
    assert_eq!(writer.read_frame().await, b"*2\r\n_\r\n:0\r\n");
    // A malformed command still aborts the transaction exactly as Redis does.
    writer
        .send(&[cmds("MULTI"), cmds("SET k"), cmds("EXEC")].concat())
        .await;
    assert_eq!(writer.read_frame().await, b"+OK\r\n");
    assert_eq!(
        writer.read_frame().await,
        b"-ERR wrong number of arguments for 'set' command\r\n"
    );
    assert_eq!(
        writer.read_frame().await,
        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
}

/// Under the default `on_write = "invalidate"`, a SET inside MULTI is
/// answered as Redis answers it (it is sent as it is) and then deleted, with
/// the fence moved, by the proxy's call behind it, whose reply is hidden.
#[tokio::test(flavor = "multi_thread")]
async fn a_set_inside_multi_under_invalidate_is_redis_own_reply_then_a_delete() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"user:*\"\non_stale_fill = \"error\"\n",
    ))
    .await;
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);
    // No miss outstanding: a SET is a write, turned into a delete.
    assert_eq!(writer.call("SET user:1 old").await, "+OK\r\n");
    assert_eq!(reader.call("GET user:1").await, "$-1\r\n");
    writer
        .send(
            &[
                cmds("MULTI"),
                cmds("SET user:1 new"),
                cmds("SET other 1"),
                cmds("EXEC"),
            ]
            .concat(),
        )
        .await;
    for expected in ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n"] {
        assert_eq!(writer.read_frame().await, expected.as_bytes());
    }
    assert_eq!(writer.read_frame().await, b"*2\r\n+OK\r\n+OK\r\n");
    assert_eq!(
        reader.call("SET user:1 stale").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );
    assert_eq!(cached(&mut writer, "user:1").await, None);
    assert_eq!(cached(&mut writer, "other").await.as_deref(), Some("1"));
}

/// The version in a `CACHE.FENCE` reply.
fn fence_version(info: &str) -> u64 {
    info.split("version\r\n")
        .nth(1)
        .and_then(|r| r.split("\r\n").nth(1))
        .and_then(|v| v.parse().ok())
        .expect("a version")
}

#[tokio::test(flavor = "multi_thread")]
async fn fence_versions_grow_across_fence_expiry_and_proxy_restarts() {
    let redis = RedisServer::start();
    let settings =
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlease_ttl = \"100ms\"\nhold = \"50ms\"\n";
    let mut last = 0;
    for _ in 0..2 {
        let proxy = Proxy::start(&redis.addr(), settings).await;
        let mut client = RawClient::connect(proxy.addr).await;
        // A miss creates the fence (a delete alone does not), the delete moves it.
        assert_eq!(client.call("GET k").await, "$-1\r\n");
        assert_eq!(client.call("DEL k").await, ":0\r\n");
        let version = fence_version(&client.call("CACHE.FENCE k").await);
        assert!(version > last, "{version} after {last}");
        last = version;
        // Let the fence expire (lease_ttl + 1 s margin), then miss: a new fence.
        tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
        assert_eq!(client.call("EXISTS cachefence:{k}").await, ":0\r\n");
        assert_eq!(client.call("GET k").await, "$-1\r\n");
        let version = fence_version(&client.call("CACHE.FENCE k").await);
        assert!(version > last, "{version} after {last}");
        last = version;
        proxy.shutdown().await;
    }
}

/// R4: writers A and B update the primary and delete; a miss reads a replica
/// that has neither write, and fills. Ending that fill's TTL `lag_window`
/// after the LAST invalidation (the rule before #16) served it until then:
/// staler than `lag_window` after A's write, up to twice the window. The
/// first of the invalidations the value may lack is not known, so the
/// fill is refused; with one invalidation it is stored, cut to the window
/// (r3).
/// `fills_refused_lag_window` in `CACHE.STATS`.
async fn refused_lag_window(client: &mut RawClient) -> i64 {
    let stats = client.call("CACHE.STATS").await;
    let name = "fills_refused_lag_window\r\n:";
    let at = stats.find(name).unwrap_or_else(|| panic!("{stats}")) + name.len();
    stats[at..].split("\r\n").next().unwrap().parse().unwrap()
}

async fn r4_script(target: Target) -> (Option<String>, i64, String) {
    let setup = Setup::new(target).await;
    let db = Database::default();
    db.write("x", "1");
    db.replicate();
    let (mut a, mut b, mut reader) = (setup.client().await, setup.client().await, setup.client().await);
    db.write("x", "2");
    assert_eq!(a.call("DEL user:x").await, ":0\r\n");
    db.write("x", "3");
    assert_eq!(b.call("DEL user:x").await, ":0\r\n");
    assert_eq!(reader.call("GET user:x").await, "$-1\r\n");
    let read = db.replica("x"); // neither write has reached it
    let refused = match setup.proxy.is_some() {
        true => refused_lag_window(&mut reader).await,
        false => 0,
    };
    assert_eq!(reader.call(&format!("SET user:x {read} EX 60")).await, "+OK\r\n");
    let mut check = setup.client().await;
    if setup.proxy.is_some() {
        // Refused by the lag rule (not for a fence lost or misread), or stored.
        let now = refused_lag_window(&mut check).await;
        let stored = cached(&mut check, "user:x").await.is_some();
        assert_eq!((now - refused, stored), (i64::from(!stored), stored));
    }
    let value = cached(&mut check, "user:x").await;
    let ttl: i64 = check
        .call("PTTL user:x")
        .await
        .trim_start_matches(':')
        .trim_end()
        .parse()
        .unwrap();
    drop(setup.proxy);
    (value, ttl, db.primary("x"))
}

#[tokio::test(flavor = "multi_thread")]
async fn r4_two_writers_and_a_lagging_replica_leave_nothing_past_the_lag_window() {
    let (stale, ttl, db) = r4_script(Target::Redis).await;
    assert_eq!(
        (stale.as_deref(), db.as_str()),
        (Some("1"), "3"),
        "control: stale for the fill's TTL"
    );
    assert!(ttl > 59_000);
    let short = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlag_window = \"2s\"\n";
    let (value, _, _) = r4_script(Target::Cachefence(short)).await;
    assert_eq!(
        value, None,
        "refused: it may lack a write invalidated before the last"
    );
    // short_ttl_last, the rule before #16, by choice: stored until the
    // window ends after the LAST invalidation (hot keys stay cacheable; a
    // read up to twice the window after A's write).
    let last = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlag_window = \"2s\"\nlag_policy = \"short_ttl_last\"\n";
    let (value, ttl, _) = r4_script(Target::Cachefence(last)).await;
    assert_eq!(value.as_deref(), Some("1"));
    assert!(
        (1..=2_000).contains(&ttl),
        "until the window after the last invalidation, got {ttl} ms"
    );
    let refuse =
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlag_window = \"2s\"\nlag_policy = \"refuse\"\n";
    let (value, _, _) = r4_script(Target::Cachefence(refuse)).await;
    assert_eq!(value, None);
}

/// The fence keeps the previous invalidation's time: with it outside the
/// window, a fill inside the window of the last one is stored, its TTL cut
/// to end one window after that invalidation.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_after_one_invalidation_inside_the_window_is_cut_to_the_window() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\nlag_window = \"300ms\"\n",
    ))
    .await;
    let mut client = setup.client().await;
    assert_eq!(client.call("DEL user:x").await, ":0\r\n");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert_eq!(client.call("DEL user:x").await, ":0\r\n");
    let fence = client.call("GET cachefence:{user:x}").await;
    assert!(fence.contains('|'), "the previous invalidation is kept: {fence}");
    assert_eq!(client.call("GET user:x").await, "$-1\r\n");
    assert_eq!(client.call("SET user:x 1 EX 60").await, "+OK\r\n");
    let ttl: i64 = client
        .call("PTTL user:x")
        .await
        .trim_start_matches(':')
        .trim_end()
        .parse()
        .unwrap();
    assert!((1..=300).contains(&ttl), "cut to the window: {ttl} ms");
    assert_eq!(refused_lag_window(&mut client).await, 0);
    setup.stop().await;
}

/// A pooled client sends a request's miss and its fill on different
/// connections: with the default `ticket_scope = "client"` that SET is a
/// fill, whatever `on_write` says; with `ticket_scope = "connection"` (for
/// clients that keep one connection per thread) it is a write per `on_write`.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_on_another_connection_than_its_miss_is_a_fill_unless_the_scope_is_the_connection() {
    for (scope, on_write, reply, stored) in [
        ("client", "write", "+OK\r\n", Some("v")),
        ("client", "invalidate", "+OK\r\n", Some("v")),
        ("client", "reject", "+OK\r\n", Some("v")),
        ("connection", "write", "+OK\r\n", Some("v")),
        ("connection", "invalidate", "+OK\r\n", None),
        (
            "connection",
            "reject",
            "-ERR cachefence: writes to 'k' are rejected",
            None,
        ),
    ] {
        let toml =
            format!("[[cache]]\npattern = \"*\"\non_write = \"{on_write}\"\nticket_scope = \"{scope}\"\n");
        let setup = Setup::new(Target::Cachefence(Box::leak(toml.into_boxed_str()))).await;
        let (mut missed_here, mut filled_there) = (setup.client().await, setup.client().await);
        assert_eq!(missed_here.call("GET k").await, "$-1\r\n");
        let got = filled_there.call("SET k v").await;
        assert!(got.starts_with(reply), "{scope}, on_write = {on_write}: {got}");
        assert_eq!(
            cached(&mut missed_here, "k").await.as_deref(),
            stored,
            "{scope}, on_write = {on_write}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flushed_script_cache_is_reloaded_without_the_client_noticing() {
    let setup = Setup::new(Target::Cachefence(
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\non_stale_fill = \"error\"\n",
    ))
    .await;
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);
    // Both connections have sent the script once (with its source).
    assert_eq!(writer.call("SET k v").await, "+OK\r\n");
    assert_eq!(reader.call("DEL nothing").await, ":0\r\n");
    assert_eq!(writer.call("SCRIPT FLUSH").await, "+OK\r\n");
    // EVALSHA now fails with NOSCRIPT inside the proxy; the client sees
    // its command's own replies, and the fences still work.
    assert_eq!(reader.call("GET fresh").await, "$-1\r\n");
    assert_eq!(writer.call("DEL fresh").await, ":0\r\n");
    assert_eq!(
        reader.call("SET fresh stale").await,
        "-STALE cachefence: fill refused (fence_moved)\r\n"
    );
    assert_eq!(writer.call("DEL k").await, ":1\r\n");
    let stats = writer.call("CACHE.STATS").await;
    let reloads: u64 = stats
        .split("$14\r\nscript_reloads\r\n:")
        .nth(1)
        .and_then(|r| r.split("\r\n").next())
        .and_then(|n| n.parse().ok())
        .expect("script_reloads in CACHE.STATS");
    // The script cache is global: the first NOSCRIPT reloads it for every connection.
    assert_eq!(reloads, 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_commands_need_the_admin_password() {
    let setup = Setup::new(Target::Cachefence("admin_password = \"s3cret-admin\"\n")).await;
    let mut c = setup.client().await;
    assert_eq!(c.call("SET user:1 a").await, "+OK\r\n");
    assert_eq!(
        c.call("CACHE.INVALIDATE user:1").await,
        "-NOAUTH cachefence: CACHE.INVALIDATE needs CACHE.AUTH <admin password> first\r\n"
    );
    assert_eq!(c.call("GET user:1").await, "$1\r\na\r\n");
    // The lease API and the read-only commands stay open to applications.
    assert!(c.call("CACHE.STATS").await.starts_with("*64\r\n"));
    assert_eq!(
        c.call("CACHE.AUTH wrong").await,
        "-WRONGPASS cachefence: invalid admin password\r\n"
    );
    assert_eq!(c.call("CACHE.AUTH s3cret-admin").await, "+OK\r\n");
    assert_eq!(c.call("CACHE.INVALIDATE user:1").await, ":1\r\n");
    // Per connection: another connection is not admitted.
    let mut other = setup.client().await;
    assert!(other.call("CACHE.INVALIDATE user:1").await.starts_with("-NOAUTH"));
    // Redis' own AUTH is untouched: its error passes through as Redis wrote it.
    assert_eq!(
        other.call("AUTH s3cret-admin").await,
        "-ERR AUTH <password> called without any password configured for the default user. \
         Are you sure your configuration is correct?\r\n"
    );
    // Without a password configured, CACHE.AUTH says so.
    let open = Setup::new(Target::Cachefence(FENCE_EVERY_KEY)).await;
    let mut c = open.client().await;
    assert_eq!(
        c.call("CACHE.AUTH x").await,
        "-ERR cachefence: CACHE.AUTH called without an admin password configured\r\n"
    );
}
