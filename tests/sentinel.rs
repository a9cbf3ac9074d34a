//! A Sentinel upstream (#19 item 5): a master, a replica and three
//! sentinels of the test's own, `SENTINEL FAILOVER` in the middle.
//!
//! - Commands follow the master: before the failover on the first master,
//!   after it on the promoted replica. A client blocked on the old master
//!   gets an error at the switch (its connection is revoked, not left to
//!   wait for Sentinel to close it); a client on a shared connection with
//!   nothing owed keeps its connection.
//! - Tickets from before a failover fill nothing after it, though the new
//!   master lost the invalidation that should refuse them (replication is
//!   asynchronous). The loss is made on purpose: the replica is writable,
//!   and the fence it received with the invalidation is put back as it
//!   was before. The control is a proxy of the same build that did not see
//!   the failover (an upstream of `host:port`, the promoted replica): the
//!   fence alone admits the stale fill there.
//! - The races R1 and R7 with a failover in the middle, and R8 on the
//!   master Sentinel names, each against the deployment straight (the
//!   control) and through cachefence.

use std::time::Duration;

use testkit::{Proxy, RawClient, RedisServer, Sentinels, WAIT, eventually};

/// Every key fenced; tickets live long enough that only the failover
/// refuses them.
const FENCED: &str = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlease_ttl = \"60s\"\n";

async fn direct(server: &RedisServer) -> RawClient {
    RawClient::connect(server.addr()).await
}

/// Waits until the proxy names `port` as its master after one failover.
async fn proxy_follows(proxy: &Proxy, port: u16) {
    let wanted = format!("sentinel_master:127.0.0.1:{port}\r\n");
    eventually("the proxy follows the new master", async || {
        // A connection per look: one of its own ends with the old master.
        let info = RawClient::connect(proxy.addr).await.call("CACHE.INFO").await;
        info.contains(&wanted) && info.contains("sentinel_failovers:1\r\n")
    })
    .await;
}

async fn commands_follow_the_master(mode: &str) {
    let deployment = Sentinels::start(&[]).await;
    let toml = format!("{mode}[[cache]]\npattern = \"cache:*\"\n");
    let proxy = Proxy::start(&deployment.url(), &toml).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET plain before").await, "+OK\r\n");
    assert_eq!(
        direct(&deployment.master).await.call("GET plain").await,
        "$6\r\nbefore\r\n"
    );
    let info = client.call("CACHE.INFO").await;
    assert!(
        info.contains(&format!(
            "sentinel_master:127.0.0.1:{}\r\n",
            deployment.master.port
        )) && info.contains("sentinel_failovers:0\r\n"),
        "{info}"
    );

    // A client blocked on the master (a connection of its own).
    let mut blocked = RawClient::connect(proxy.addr).await;
    blocked
        .send(b"*3\r\n$5\r\nBLPOP\r\n$5\r\nqueue\r\n$1\r\n0\r\n")
        .await;
    let mut on_master = direct(&deployment.master).await;
    eventually("the BLPOP blocks on the master", async || {
        on_master
            .call("INFO clients")
            .await
            .contains("blocked_clients:1\r\n")
    })
    .await;

    deployment.failover().await;
    proxy_follows(&proxy, deployment.replica.port).await;
    let metrics = cachefence::telemetry::exporter::render(&*proxy.ctx);
    assert!(
        metrics.contains("\ncachefence_upstream_failovers_total 1\n"),
        "{metrics}"
    );

    // Revoked at the switch: an error, then closed (as Sentinel's CLIENT
    // KILL on the demoted master would, later).
    let reply = blocked
        .read_frame_within(WAIT)
        .await
        .expect("the blocked client is answered at the switch");
    let expected = format!(
        "-ERR cachefence: upstream {} the upstream master changed (Sentinel failover)\r\n",
        deployment.url()
    );
    assert_eq!(String::from_utf8_lossy(&reply), expected);
    assert!(blocked.read_to_close().await.1, "the blocked client is closed");

    // The first client: on a shared connection it keeps its connection;
    // on one of its own, the session ends with it and the client connects
    // again, as to a Redis that Sentinel reconfigured.
    client
        .send(b"*3\r\n$3\r\nSET\r\n$5\r\nplain\r\n$5\r\nafter\r\n")
        .await;
    match client.read_frame_within(WAIT).await {
        Some(reply) => assert_eq!(reply, b"+OK\r\n"),
        None => {
            assert!(
                mode.contains("shared_connections = 0"),
                "a shared client lost its connection"
            );
            client = RawClient::connect(proxy.addr).await;
            assert_eq!(client.call("SET plain after").await, "+OK\r\n");
        }
    }
    assert_eq!(
        direct(&deployment.replica).await.call("GET plain").await,
        "$5\r\nafter\r\n"
    );
    assert_eq!(client.call("GET plain").await, "$5\r\nafter\r\n");
    let mut fresh = RawClient::connect(proxy.addr).await;
    assert_eq!(fresh.call("INCR counter").await, ":1\r\n");
    assert_eq!(
        direct(&deployment.replica).await.call("GET counter").await,
        "$1\r\n1\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_the_master_through_a_failover_on_shared_connections() {
    commands_follow_the_master("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_follow_the_master_through_a_failover_on_connections_of_their_own() {
    commands_follow_the_master("shared_connections = 0\n").await;
}

/// `fenced`: the `[[cache]]` section. `control`: whether a proxy that did
/// not see the failover fills k2 too.
async fn tickets_from_before_a_failover(fenced: &str, control: bool) {
    let deployment = Sentinels::start(&["--replica-read-only", "no"]).await;
    let proxy = Proxy::start(&deployment.url(), fenced).await;
    // A ticket is refused for CLOCK_SKEW after the proxy starts (it cannot
    // know what happened before): the misses come after that.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Misses: tickets recorded in the fences, replicated.
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("GET k1").await, "$-1\r\n");
    assert_eq!(reader.call("GET k2").await, "$-1\r\n");
    let mut on_master = direct(&deployment.master).await;
    assert_eq!(on_master.call("WAIT 1 5000").await, ":1\r\n");
    let mut before = Vec::new();
    for fence in ["cachefence:{k1}", "cachefence:{k2}"] {
        let frame = on_master.call(&format!("GET {fence}")).await;
        // `$<len>\r\n<fence>\r\n`: the fence holds its misses, a line each.
        let (len, rest) = frame[1..].split_once("\r\n").expect("a bulk reply");
        let value = rest[..len.parse::<usize>().expect("a fence")].to_string();
        assert!(value.contains('\n'), "{fence} holds its miss: {value:?}");
        before.push((fence, frame, value));
    }

    // The database changes; the invalidation moves both fences, and
    // reaches the replica. It goes through another proxy, in front of the
    // master alone: the one under test does not know of it, so it has no
    // delete to make again after the failover, and only the bound on
    // tickets refuses the stale fill.
    let other = Proxy::start(&deployment.master.addr(), fenced).await;
    let mut writer = RawClient::connect(other.addr).await;
    assert_eq!(writer.call("DEL k1 k2").await, ":0\r\n");
    assert_eq!(on_master.call("WAIT 1 5000").await, ":1\r\n");
    // Lost in the failover: the replica's fences go back to before it.
    let mut on_replica = direct(&deployment.replica).await;
    for (fence, frame, value) in &before {
        assert_ne!(&on_replica.call(&format!("GET {fence}")).await, frame);
        on_replica
            .send(&testkit::cmd(&[
                b"SET",
                fence.as_bytes(),
                value.as_bytes(),
                b"PX",
                b"60000",
            ]))
            .await;
        assert_eq!(on_replica.read_frame().await, b"+OK\r\n");
    }

    deployment.failover().await;
    proxy_follows(&proxy, deployment.replica.port).await;
    let mut on_new_master = direct(&deployment.replica).await;

    // The stale read of k1 is filled through the proxy that saw the
    // failover: answered as a fill is, and not stored.
    assert_eq!(reader.call("SET k1 stale EX 60").await, "+OK\r\n");
    assert_eq!(on_new_master.call("GET k1").await, "$-1\r\n");

    if !control {
        return;
    }
    // Control: a proxy that did not see the failover admits the stale fill
    // of k2 on the fence the new master has.
    let control = Proxy::start(&deployment.replica.addr(), fenced).await;
    let mut control_client = RawClient::connect(control.addr).await;
    assert_eq!(control_client.call("SET k2 stale EX 60").await, "+OK\r\n");
    assert_eq!(on_new_master.call("GET k2").await, "$5\r\nstale\r\n");
}

/// Pooled clients (`ticket_scope = "client"`, the default): the fill is a
/// plain `SET` judged by the misses in the fence (the `set` call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_from_before_a_failover_fill_nothing_after_it() {
    tickets_from_before_a_failover(FENCED, true).await;
}

/// A connection per thread (`ticket_scope = "connection"`): the fill
/// carries the connection's own ticket (the `fill` call). No control here:
/// another proxy's client holds no ticket of this connection, so its `SET`
/// is a write, not a fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_ticket_from_before_a_failover_fills_nothing_after_it() {
    let fenced = format!("{FENCED}ticket_scope = \"connection\"\n");
    tickets_from_before_a_failover(&fenced, false).await;
}

/// A failover that loses the last writes and invalidations themselves:
/// through `proxy` (else straight to the master, the control) k1 is
/// written and then deleted, k2 written anew; the replica receives it all,
/// then has the old values put back, as if it never had (replication is
/// asynchronous). Returns k1 and k2 on the new master after the failover.
async fn changes_lost_in_a_failover(through_proxy: bool) -> (Option<String>, Option<String>) {
    let deployment = Sentinels::start(&["--replica-read-only", "no"]).await;
    let proxy = match through_proxy {
        true => Some(Proxy::start(&deployment.url(), FENCED).await),
        false => None,
    };
    let mut client = match &proxy {
        Some(proxy) => RawClient::connect(proxy.addr).await,
        None => direct(&deployment.master).await,
    };
    assert_eq!(client.call("SET k1 v1").await, "+OK\r\n");
    assert_eq!(client.call("DEL k1").await, ":1\r\n");
    assert_eq!(client.call("SET k2 new").await, "+OK\r\n");
    let mut on_master = direct(&deployment.master).await;
    assert_eq!(on_master.call("WAIT 1 5000").await, ":1\r\n");
    let mut on_replica = direct(&deployment.replica).await;
    assert_eq!(on_replica.call("GET k2").await, "$3\r\nnew\r\n");
    assert_eq!(on_replica.call("SET k1 v1").await, "+OK\r\n");
    assert_eq!(on_replica.call("SET k2 old").await, "+OK\r\n");

    deployment.failover().await;
    // Sentinel closes the promoted replica's clients: a new connection.
    let mut on_new_master = direct(&deployment.replica).await;
    let Some(proxy) = &proxy else {
        let (k1, k2) = (
            on_new_master.call("GET k1").await,
            on_new_master.call("GET k2").await,
        );
        return (testkit::race::raw_value(&k1), testkit::race::raw_value(&k2));
    };
    proxy_follows(proxy, deployment.replica.port).await;
    // Through the proxy the keys read as misses from the switch on.
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("GET k1").await, "$-1\r\n");
    assert_eq!(client.call("GET k2").await, "$-1\r\n");
    eventually("the deletes reach the new master", async || {
        on_new_master.call("EXISTS k1 k2").await == ":0\r\n"
    })
    .await;
    // k1 and k2 (again if a later look at the sentinels replays them too).
    let info = client.call("CACHE.INFO").await;
    let replayed = testkit::info_number(&info, "failover_replayed_keys");
    assert!(replayed.is_some_and(|n| n >= 2), "{info}");
    assert_eq!(
        testkit::info_number(&info, "failover_unreplayed_keys"),
        Some(0),
        "{info}"
    );
    (None, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_deletes_lost_in_a_failover_are_deleted_again_on_the_new_master() {
    assert_eq!(
        changes_lost_in_a_failover(false).await,
        (Some("v1".to_string()), Some("old".to_string())),
        "control: the new master serves what the lost DEL and SET should have replaced"
    );
    assert_eq!(changes_lost_in_a_failover(true).await, (None, None));
}

/// Where the race scripts below run: straight on the Sentinel deployment
/// (the control: a Sentinel-aware client reaches whichever is master), or
/// through cachefence in front of it.
struct RaceSetup {
    deployment: Sentinels,
    proxy: Option<Proxy>,
}

impl RaceSetup {
    async fn new(fenced: Option<&str>) -> RaceSetup {
        let deployment = Sentinels::start(&[]).await;
        let proxy = match fenced {
            None => None,
            Some(toml) => {
                let proxy = Proxy::start(&deployment.url(), toml).await;
                // Past the bound a proxy starts with.
                tokio::time::sleep(Duration::from_millis(1100)).await;
                Some(proxy)
            }
        };
        RaceSetup { deployment, proxy }
    }

    /// A client of the master now: through the proxy, or straight to the
    /// master the sentinels name.
    async fn client(&self) -> RawClient {
        match &self.proxy {
            Some(proxy) => RawClient::connect(proxy.addr).await,
            None => RawClient::connect(("127.0.0.1", self.deployment.master_port().await)).await,
        }
    }

    /// A failover, and (through the proxy) until the proxy follows it.
    async fn failover(&self) {
        let mut on_master = direct(&self.deployment.master).await;
        assert_eq!(on_master.call("WAIT 1 5000").await, ":1\r\n");
        self.deployment.failover().await;
        if let Some(proxy) = &self.proxy {
            proxy_follows(proxy, self.deployment.replica.port).await;
        }
    }

    /// `key` on the new master.
    async fn cached(&self, key: &str) -> Option<String> {
        testkit::race::cached(&mut direct(&self.deployment.replica).await, key).await
    }
}

/// R1 across a failover: the reader misses and reads X=1 on the first
/// master; the writer writes X=2 and deletes; the master fails over; the
/// reader fills X=1 on the new one.
async fn r1_across_a_failover(fenced: Option<&str>) -> Option<String> {
    let setup = RaceSetup::new(fenced).await;
    let db = testkit::Database::new("1");
    let (mut reader, mut writer) = (setup.client().await, setup.client().await);
    assert_eq!(reader.call("GET user:x").await, "$-1\r\n");
    let read = db.primary("x");
    db.write("x", "2");
    assert_eq!(writer.call("DEL user:x").await, ":0\r\n");
    setup.failover().await;
    if setup.proxy.is_none() {
        // Straight to Redis the reader's connection is to the old master.
        reader = setup.client().await;
    }
    assert_eq!(reader.call(&format!("SET user:x {read} EX 60")).await, "+OK\r\n");
    setup.cached("user:x").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_across_a_sentinel_failover_fill_is_refused() {
    assert_eq!(
        r1_across_a_failover(None).await.as_deref(),
        Some("1"),
        "control: plain Redis keeps the stale value"
    );
    assert_eq!(r1_across_a_failover(Some(testkit::FENCE_EVERY_KEY)).await, None);
}

/// The two client models of issue 14 with a failover in the middle: A
/// misses before it, B after it, then A fills "stale" and B "fresh".
/// `pool`: A misses on P1 and fills on P2, B misses on P2 and fills on P1.
/// Else one connection X carries A and B (a multiplexing client). W
/// deletes between A's miss and the failover, through a proxy in front of
/// the master alone, so the proxy under test has no delete to make again
/// after it. Straight to the deployment every connection is made again to
/// the new master after the failover (as a Sentinel-aware client does);
/// through cachefence on shared connections they go on, as they were.
/// Returns the cached value.
///
/// Through cachefence neither fill is stored: a SET on a pooled or
/// multiplexed connection is judged by the oldest miss outstanding in its
/// scope, A's, from before the failover (it may be A's stale fill, and
/// the fence that would tell may be one the failover set back). The key is
/// filled by its next miss. Before that rule, A's miss stopped blocking at
/// the failover, and A's fill was stored with B's ticket: "stale".
async fn client_models_across_a_failover(fenced: Option<&str>, pool: bool) -> Option<String> {
    let setup = RaceSetup::new(fenced).await;
    let (mut p1, mut p2) = (setup.client().await, setup.client().await);
    let other = match fenced {
        Some(toml) => Some(Proxy::start(&setup.deployment.master.addr(), toml).await),
        None => None,
    };
    let mut w = match &other {
        Some(other) => RawClient::connect(other.addr).await,
        None => setup.client().await,
    };
    assert_eq!(p1.call("GET k").await, "$-1\r\n", "A misses");
    assert!(w.call("DEL k").await.starts_with(':'), "W deletes");
    setup.failover().await;
    if setup.proxy.is_none() {
        (p1, p2) = (setup.client().await, setup.client().await);
    } else {
        // Past the clock-skew second after the failover: B's ticket counts.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    // The pool: B misses and A fills on P2, B fills on P1. The
    // multiplexing client: all of it on X (P1).
    let (b_misses, b_fills) = match pool {
        true => (&mut p2, &mut p1),
        false => (&mut p1, &mut p2),
    };
    assert_eq!(b_misses.call("GET k").await, "$-1\r\n", "B misses");
    assert_eq!(b_misses.call("SET k stale EX 60").await, "+OK\r\n", "A fills");
    let b_fills = if pool { b_fills } else { b_misses };
    assert_eq!(b_fills.call("SET k fresh EX 60").await, "+OK\r\n", "B fills");
    testkit::race::cached(&mut direct(&setup.deployment.replica).await, "k").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pools_fills_across_a_sentinel_failover_store_nothing_stale() {
    assert_eq!(
        client_models_across_a_failover(None, true).await.as_deref(),
        Some("fresh"),
        "control: plain Redis ends with the last SET"
    );
    assert_eq!(
        client_models_across_a_failover(Some(FENCED), true).await,
        None,
        "through cachefence no SET is admitted while A's miss from before the failover is outstanding"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiplexed_connections_fills_across_a_sentinel_failover_store_nothing_stale() {
    assert_eq!(
        client_models_across_a_failover(None, false).await.as_deref(),
        Some("fresh"),
        "control: plain Redis ends with the last SET"
    );
    assert_eq!(
        client_models_across_a_failover(Some(FENCED), false).await,
        None,
        "through cachefence no SET is admitted while A's miss from before the failover is outstanding"
    );
}

/// R7 across a failover: A writes DB=1, B writes DB=2 and sets 2, the
/// master fails over, A sets 1.
async fn r7_across_a_failover(fenced: Option<&str>) -> Option<String> {
    let setup = RaceSetup::new(fenced).await;
    let (mut a, mut b) = (setup.client().await, setup.client().await);
    assert_eq!(b.call("SET user:x 2").await, "+OK\r\n");
    setup.failover().await;
    if setup.proxy.is_none() {
        a = setup.client().await;
    }
    assert_eq!(a.call("SET user:x 1").await, "+OK\r\n");
    setup.cached("user:x").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r7_across_a_sentinel_failover_leaves_no_older_write() {
    assert_eq!(
        r7_across_a_failover(None).await.as_deref(),
        Some("1"),
        "control: the older write wins"
    );
    let invalidate = "[[cache]]\npattern = \"*\"\non_write = \"invalidate\"\n";
    assert_eq!(r7_across_a_failover(Some(invalidate)).await, None);
}

/// R8 on the master Sentinel names: 50 readers miss at once, each that is
/// told to go to the database reads it (counted) and fills.
async fn r8_on_sentinel(fenced: Option<&str>) -> (usize, Vec<String>) {
    let setup = RaceSetup::new(fenced).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(setup.client().await);
    }
    testkit::race::stampede(clients, "hot").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r8_on_a_sentinel_master_sends_one_reader_to_the_database() {
    let (reads, _) = r8_on_sentinel(None).await;
    assert_eq!(reads, 50, "control: every reader misses and reads the database");
    let hold = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"2s\"\n";
    let (reads, outcomes) = r8_on_sentinel(Some(hold)).await;
    assert_eq!(reads, 1, "through cachefence one reader goes to the database");
    let served = outcomes.iter().filter(|o| *o == "$7\r\nfrom-db\r\n").count();
    assert_eq!(served, 49, "the others get the value it filled: {outcomes:?}");
}

/// R8 with a `SENTINEL FAILOVER` in the middle: 20 readers miss at once
/// through cachefence; the one sent to the database (the leader) fills
/// only after the failover (and its clock-skew second): its ticket is from
/// before it, so the fill is refused and the herd lease given back; one
/// more reader goes to the database, and its fill serves the others. The
/// control is the stampede without cachefence, each reader to the database.
///
/// A held reader asks Redis again every few milliseconds; one whose ask is
/// on the way at the switch is owed a reply on the old master and is
/// answered as every such client is: the failover error, then closed. The
/// readers do what a pool does then, connect again and ask once more; the
/// bound holds for them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r8_with_a_sentinel_failover_in_the_middle_stays_bounded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const READERS: usize = 20;
    let (reads, _) = {
        let setup = RaceSetup::new(None).await;
        let mut clients = Vec::new();
        for _ in 0..READERS {
            clients.push(setup.client().await);
        }
        testkit::race::stampede(clients, "hot").await
    };
    assert_eq!(reads, READERS, "control: every reader reads the database");

    let hold = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"10s\"\n";
    let setup = RaceSetup::new(Some(hold)).await;
    let reads = Arc::new(AtomicUsize::new(0));
    let failed_over = Arc::new(tokio::sync::Notify::new());
    let start = Arc::new(tokio::sync::Barrier::new(READERS));
    let switched = format!(
        "-ERR cachefence: upstream {} the upstream master changed (Sentinel failover)\r\n",
        setup.deployment.url()
    );
    let retried = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..READERS {
        let mut client = setup.client().await;
        let addr = setup.proxy.as_ref().expect("through the proxy").addr;
        let (reads, failed_over, start) = (reads.clone(), failed_over.clone(), start.clone());
        let (switched, retried) = (switched.clone(), retried.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let mut reply = client.call("GET hot").await;
            if reply == switched {
                retried.fetch_add(1, Ordering::SeqCst);
                client = RawClient::connect(addr).await;
                reply = client.call("GET hot").await;
            }
            if reply != "$-1\r\n" {
                return reply;
            }
            // The first to the database reads before the failover and fills after.
            if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                failed_over.notified().await;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(client.call("SET hot from-db EX 60").await, "+OK\r\n");
            "filled".to_string()
        }));
    }
    eventually("the leader reads the database", async || {
        reads.load(Ordering::SeqCst) == 1
    })
    .await;
    setup.failover().await;
    // Past the clock-skew second after the failover: new tickets fill.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    failed_over.notify_one();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(
        reads.load(Ordering::SeqCst),
        2,
        "one reader before the failover (its fill refused), one after: {outcomes:?}"
    );
    let served = outcomes.iter().filter(|o| *o == "$7\r\nfrom-db\r\n").count();
    let retried = retried.load(Ordering::SeqCst);
    assert_eq!(
        served,
        READERS - 2,
        "{retried} asked again after the switch: {outcomes:?}"
    );
    assert_eq!(setup.cached("hot").await.as_deref(), Some("from-db"));
}

/// The master dies: the sentinels agree it is down and promote the
/// replica. Meanwhile clients get errors that say the upstream is
/// unreachable; then the proxy reaches the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_clients_reach_the_new_one() {
    let mut deployment = Sentinels::start(&[]).await;
    deployment.wait_until_acquainted().await;
    let proxy = Proxy::start(&deployment.url(), "").await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET plain before").await, "+OK\r\n");
    let mut on_master = direct(&deployment.master).await;
    assert_eq!(on_master.call("WAIT 1 5000").await, ":1\r\n");

    deployment.master.kill();
    // The error names the master that could not be reached, or (a request
    // sent on the shared connection as the master died) says it was lost.
    let unreachable = format!(
        "-ERR cachefence: upstream 127.0.0.1:{} unreachable (",
        deployment.master.port
    );
    let lost = format!("-ERR cachefence: upstream {} ", deployment.url());
    let mut errors = 0;
    testkit::eventually_within(
        "a write reaches the new master",
        Duration::from_secs(30),
        async || {
            let reply = RawClient::connect(proxy.addr).await.call("SET plain after").await;
            if reply == "+OK\r\n" {
                return true;
            }
            assert!(
                reply.starts_with(&unreachable) || reply.starts_with(&lost),
                "{reply}"
            );
            errors += 1;
            false
        },
    )
    .await;
    assert!(errors > 0, "the master was down for a while");
    proxy_follows(&proxy, deployment.replica.port).await;
    assert_eq!(
        direct(&deployment.replica).await.call("GET plain").await,
        "$5\r\nafter\r\n"
    );
}

/// Sentinels that ask for a password (`requirepass`): the proxy logs in
/// with `sentinel_password`; without it, clients get an error that says
/// why the master could not be found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_with_a_password_are_asked_with_sentinel_password() {
    let deployment = Sentinels::start_with(&[], Some("s3cret")).await;
    let proxy = Proxy::start(&deployment.url(), "sentinel_password = \"s3cret\"\n").await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET plain v").await, "+OK\r\n");
    assert_eq!(
        direct(&deployment.master).await.call("GET plain").await,
        "$1\r\nv\r\n"
    );

    let without = Proxy::start(&deployment.url(), "").await;
    let reply = RawClient::connect(without.addr).await.call("GET plain").await;
    let expected = format!(
        "-ERR cachefence: upstream {} unreachable (no sentinel named the master (",
        deployment.url()
    );
    assert!(reply.starts_with(&expected), "{reply}");
    assert!(reply.contains("NOAUTH"), "{reply}");
}
