//! Shared upstream connections (`shared_connections` > 0): many clients'
//! commands on one upstream connection, replies routed back in order;
//! clients moved to a connection of their own before a command that needs
//! one; a failed shared connection answered with errors and replaced.
//!
//! Each test counts the upstream connections from Redis' own `CLIENT LIST`
//! (the proxy's connections are the ones that are not the test's).

use std::time::Duration;

use testkit::{Proxy, RawClient, RedisServer, cmds, eventually};

const SHARED: &str = "shared_connections = 1\n";

/// Upstream connections Redis has, not counting the one asking.
async fn upstream_connections(redis: &RedisServer) -> usize {
    let mut direct = RawClient::connect(redis.addr()).await;
    let list = direct.call("CLIENT LIST").await;
    list.lines().filter(|l| l.contains("id=")).count() - 1
}

#[tokio::test(flavor = "multi_thread")]
async fn many_clients_share_one_connection_and_get_their_own_replies() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let connections_received = async || {
        let mut direct = RawClient::connect(redis.addr()).await;
        let info = direct.call("INFO stats").await;
        let line = info
            .lines()
            .find(|l| l.starts_with("total_connections_received:"))
            .unwrap();
        line["total_connections_received:".len()..]
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = connections_received().await;
    let mut tasks = Vec::new();
    for client in 0..20 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            // Pipelined, and interleaved with the other clients' pipelines.
            let mut pipeline = Vec::new();
            for _ in 0..200 {
                pipeline.extend(cmds(&format!("INCR counter:{client}")));
            }
            pipeline.extend(cmds(&format!("GET counter:{client}")));
            c.send(&pipeline).await;
            for n in 1..=200 {
                assert_eq!(
                    c.read_frame().await,
                    format!(":{n}\r\n").into_bytes(),
                    "client {client}"
                );
            }
            assert_eq!(c.read_frame().await, b"$3\r\n200\r\n".to_vec());
            c
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    assert_eq!(
        upstream_connections(&redis).await,
        1,
        "20 clients, one upstream connection"
    );
    assert_eq!(proxy.ctx.metrics.shared_opened.get(), 1);
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 0);
    // Arriving together, they waited for one connection rather than each
    // opening one: the others received are this test's own (CLIENT LIST,
    // and the INFO before this one).
    assert_eq!(connections_received().await - before, 3);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_state_moves_a_client_to_its_own_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut a = RawClient::connect(proxy.addr).await;
    let mut b = RawClient::connect(proxy.addr).await;
    assert_eq!(a.call("SET k 1").await, "+OK\r\n");
    assert_eq!(b.call("GET k").await, "$1\r\n1\r\n");
    assert_eq!(upstream_connections(&redis).await, 1);

    // A transaction pipelined behind a plain command: the GET is answered
    // on the shared connection first, then the session moves.
    a.send(&[cmds("GET k"), cmds("MULTI"), cmds("INCR k"), cmds("EXEC")].concat())
        .await;
    assert_eq!(a.read_frame().await, b"$1\r\n1\r\n");
    assert_eq!(a.read_frame().await, b"+OK\r\n");
    assert_eq!(a.read_frame().await, b"+QUEUED\r\n");
    assert_eq!(a.read_frame().await, b"*1\r\n:2\r\n");
    assert_eq!(upstream_connections(&redis).await, 2);
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 1);

    // Its own connection from then on: SELECT and CLIENT SETNAME hold.
    assert_eq!(a.call("CLIENT SETNAME mine").await, "+OK\r\n");
    assert_eq!(a.call("SELECT 2").await, "+OK\r\n");
    assert_eq!(a.call("SET k two").await, "+OK\r\n");
    assert_eq!(a.call("CLIENT GETNAME").await, "$4\r\nmine\r\n");
    // b is still on the shared connection, in database 0.
    assert_eq!(b.call("GET k").await, "$1\r\n2\r\n");

    // A subscriber gets messages published by a client on the shared connection.
    let mut sub = RawClient::connect(proxy.addr).await;
    assert_eq!(
        sub.call("SUBSCRIBE ch").await,
        "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    );
    assert_eq!(b.call("PUBLISH ch hello").await, ":1\r\n");
    assert_eq!(
        sub.read_frame().await,
        b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n"
    );
    assert_eq!(upstream_connections(&redis).await, 3);
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 2);
    proxy.shutdown().await;
}

/// Clients name themselves as they connect (`CLIENT SETNAME`, and
/// `CLIENT SETINFO` from redis-py 5, go-redis 9, Jedis 5): that stays on the
/// shared connection, and a client that later moves to its own connection
/// finds its name there.
#[tokio::test(flavor = "multi_thread")]
async fn a_clients_name_stays_shared_and_follows_it_to_its_own_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut c = RawClient::connect(proxy.addr).await;
    assert_eq!(c.call("CLIENT SETNAME first").await, "+OK\r\n");
    assert_eq!(c.call("CLIENT SETNAME worker-7").await, "+OK\r\n");
    // Redis' own refusal, from the shared connection.
    c.send(&testkit::cmd(&[b"CLIENT", b"SETNAME", b"with space"]))
        .await;
    assert_eq!(
        c.read_frame().await,
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(c.call("SET k v").await, "+OK\r\n");
    assert_eq!(upstream_connections(&redis).await, 1);
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 0);
    assert_eq!(c.call("CLIENT GETNAME").await, "$8\r\nworker-7\r\n");
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 1);
    proxy.shutdown().await;
}

/// Clients that speak RESP3 (`HELLO 3`, as Lettuce and go-redis 9 do when
/// they connect) share a RESP3 connection; one that moves to its own
/// connection keeps RESP3 there; `HELLO 2` goes back.
#[tokio::test(flavor = "multi_thread")]
async fn resp3_clients_share_a_resp3_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("HSET h f v").await, ":1\r\n");
    let hello = |id: &str| {
        format!(
            "%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$6\r\n7.0.15\r\n$5\r\nproto\r\n:3\r\n\
             $2\r\nid\r\n:{id}\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n\
             $7\r\nmodules\r\n*0\r\n"
        )
    };
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::connect(proxy.addr).await;
        let reply = c.call("HELLO 3").await;
        // The id is the shared RESP3 connection's.
        assert!(reply == hello("5") || reply == hello("6"), "{reply}");
        assert_eq!(c.call("HGETALL h").await, "%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
        clients.push(c);
    }
    // One RESP2 connection (opened as the first client came), one RESP3,
    // and this test's own.
    assert_eq!(upstream_connections(&redis).await, 3);
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 0);

    // Back to RESP2 on the RESP2 connection.
    let c = &mut clients[0];
    assert_eq!(c.call("HELLO 2").await.lines().next(), Some("*14"));
    assert_eq!(c.call("HGETALL h").await, "*2\r\n$1\r\nf\r\n$1\r\nv\r\n");

    // A RESP3 client moved to its own connection still speaks RESP3.
    let c = &mut clients[1];
    c.send(&[cmds("MULTI"), cmds("HGETALL h"), cmds("EXEC")].concat())
        .await;
    assert_eq!(c.read_frame().await, b"+OK\r\n");
    assert_eq!(c.read_frame().await, b"+QUEUED\r\n");
    assert_eq!(c.read_frame().await, b"*1\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n");
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 1);
    assert_eq!(upstream_connections(&redis).await, 4);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocked_client_does_not_block_the_shared_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut blocked = RawClient::connect(proxy.addr).await;
    let mut other = RawClient::connect(proxy.addr).await;
    assert_eq!(other.call("PING").await, "+PONG\r\n");
    blocked.send(&cmds("BLPOP list 0")).await;
    // Answered while the BLPOP waits, on the shared connection.
    for _ in 0..3 {
        let reply = other.call_within("INCR n", Duration::from_secs(5)).await;
        assert!(reply.is_some_and(|r| r.starts_with(':')));
    }
    assert_eq!(other.call("RPUSH list x").await, ":1\r\n");
    assert_eq!(blocked.read_frame().await, b"*2\r\n$4\r\nlist\r\n$1\r\nx\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quit_closes_the_client_and_not_the_shared_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut stays = RawClient::connect(proxy.addr).await;
    assert_eq!(stays.call("SET k v").await, "+OK\r\n");
    let mut quits = RawClient::connect(proxy.addr).await;
    // What follows QUIT in the same write is not run (as in Redis).
    quits
        .send(&[cmds("INCR n"), cmds("QUIT"), cmds("INCR n")].concat())
        .await;
    let (bytes, closed) = quits.read_to_close().await;
    assert_eq!(String::from_utf8_lossy(&bytes), ":1\r\n+OK\r\n");
    assert!(closed);
    assert_eq!(stays.call("GET n").await, "$1\r\n1\r\n");
    assert_eq!(upstream_connections(&redis).await, 1);
    assert_eq!(proxy.ctx.metrics.shared_opened.get(), 1);
    proxy.shutdown().await;
}

/// `WAIT` counts the replicas that have the writes of the connection it is
/// sent on. A session moved to its own connection for it must not lose the
/// writes it made on the shared one: with the only replica stopped, a
/// `WAIT` after a write finds no replica — as directly. The control is
/// what a fresh connection's `WAIT` answers (every replica: it wrote
/// nothing), which is what the moved session would answer without the
/// carried offset.
#[tokio::test(flavor = "multi_thread")]
async fn wait_after_writes_on_the_shared_connection_counts_them() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    let mut r = RawClient::connect(replica.addr()).await;
    let port = primary.addr().rsplit(':').next().unwrap().to_string();
    assert_eq!(r.call(&format!("REPLICAOF 127.0.0.1 {port}")).await, "+OK\r\n");
    let mut p = RawClient::connect(primary.addr()).await;
    eventually("the replica is online", async || {
        let info = p.call("INFO replication").await;
        info.contains("state=online")
    })
    .await;
    // Acknowledged up to here, then silent.
    assert_eq!(p.call("WAIT 1 2000").await, ":1\r\n");
    replica.pause();

    let proxy = Proxy::start(&primary.addr(), SHARED).await;
    let mut c = RawClient::connect(proxy.addr).await;
    assert_eq!(c.call("SET k v").await, "+OK\r\n");
    assert_eq!(c.call("WAIT 1 200").await, ":0\r\n");
    assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 1);

    // The control: a connection with no writes of its own.
    let mut fresh = RawClient::connect(primary.addr()).await;
    assert_eq!(fresh.call("WAIT 1 200").await, ":1\r\n");
    replica.resume();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_shared_connection_answers_what_it_owed_and_is_replaced() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut owed = RawClient::connect(proxy.addr).await;
    let mut idle = RawClient::connect(proxy.addr).await;
    assert_eq!(owed.call("SET k v").await, "+OK\r\n");
    assert_eq!(idle.call("PING").await, "+PONG\r\n");

    redis.pause();
    owed.send(&[cmds("GET k"), cmds("PING")].concat()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.kill();
    let (bytes, closed) = owed.read_to_close().await;
    // Redis died with the requests unread: the kernel resets the connection.
    let error = format!(
        "-ERR cachefence: upstream {} Connection reset by peer (os error 104)\r\n",
        redis.addr()
    );
    assert_eq!(String::from_utf8_lossy(&bytes), error.repeat(2));
    assert!(closed);

    // A client owed nothing keeps its connection: its next command opens
    // the replacement.
    redis.restart();
    assert_eq!(idle.call("SET k again").await, "+OK\r\n");
    assert_eq!(idle.call("GET k").await, "$5\r\nagain\r\n");
    assert_eq!(proxy.ctx.metrics.shared_opened.get(), 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_reply_reaches_its_client_and_the_small_ones_theirs() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), SHARED).await;
    let mut big = RawClient::connect(proxy.addr).await;
    let value = "x".repeat(10 << 20);
    big.send(&testkit::cmd(&[b"SET", b"big", value.as_bytes()])).await;
    assert_eq!(big.read_frame().await, b"+OK\r\n");
    let mut small = RawClient::connect(proxy.addr).await;
    assert_eq!(small.call("SET s 1").await, "+OK\r\n");
    // The 10 MB reply and small ones in flight on the one connection.
    big.send(&[cmds("GET big"), cmds("GET s")].concat()).await;
    let mut pipeline = Vec::new();
    for _ in 0..100 {
        pipeline.extend(cmds("GET s"));
    }
    small.send(&pipeline).await;
    for _ in 0..100 {
        assert_eq!(small.read_frame().await, b"$1\r\n1\r\n");
    }
    let reply = big.read_frame().await;
    assert_eq!(
        reply.len(),
        value.len() + format!("${}\r\n\r\n", value.len()).len()
    );
    assert!(reply.starts_with(format!("${}\r\nxxx", value.len()).as_bytes()));
    assert_eq!(big.read_frame().await, b"$1\r\n1\r\n");
    assert_eq!(upstream_connections(&redis).await, 1);
    proxy.shutdown().await;
}

/// A client that sends without reading its replies is read up to
/// `max_pending` requests, as on a connection of its own (where Redis
/// holds their replies; here the proxy does), so a client that writes its
/// whole pipeline before reading never deadlocks below that; the other
/// clients on the shared connection go on; once it reads, every reply
/// comes in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_read_is_read_up_to_max_pending() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), &format!("{SHARED}max_pending = 1000\n")).await;
    let value = "v".repeat(10 << 10);
    let mut setup = RawClient::connect(proxy.addr).await;
    setup
        .send(&testkit::cmd(&[b"SET", b"big", value.as_bytes()]))
        .await;
    assert_eq!(setup.read_frame().await, b"+OK\r\n");

    const GETS: usize = 5000; // 50 MB of replies
    let mut slow = RawClient::connect(proxy.addr).await;
    let framed_commands = || proxy.ctx.metrics.commands[0].get() + proxy.ctx.metrics.commands[1].get();
    let before = framed_commands();
    let mut pipeline = Vec::new();
    for _ in 0..GETS {
        pipeline.extend(cmds("GET big"));
    }
    slow.send(&pipeline).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // max_pending, plus the requests whose replies went into the socket
    // buffers on the way to the client, plus one read: not all of them.
    let read = framed_commands() - before;
    assert!((1000..GETS as u64).contains(&read), "{read} GETs read");

    // Others are served meanwhile.
    let mut other = RawClient::connect(proxy.addr).await;
    assert_eq!(other.call("SET k v").await, "+OK\r\n");
    assert_eq!(other.call("GET k").await, "$1\r\nv\r\n");

    let expected = format!("${}\r\n{value}\r\n", value.len()).into_bytes();
    for n in 0..GETS {
        assert_eq!(slow.read_frame().await, expected, "reply {n}");
    }
    proxy.shutdown().await;
}

/// A client that does not read replies piling up past
/// `client_output_limit` is closed, as Redis closes a client past
/// `client-output-buffer-limit` (the replies a connection of its own would
/// leave in Redis' output buffer are the proxy's to hold here); the
/// shared connection and the clients on it go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_past_client_output_limit_is_closed_and_the_others_go_on() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), &format!("{SHARED}client_output_limit = \"8mb\"\n")).await;
    let value = "v".repeat(1 << 20);
    let mut other = RawClient::connect(proxy.addr).await;
    other
        .send(&testkit::cmd(&[b"SET", b"big", value.as_bytes()]))
        .await;
    assert_eq!(other.read_frame().await, b"+OK\r\n");

    const GETS: usize = 64; // 64 MB of replies, never read while they come
    let mut slow = RawClient::connect(proxy.addr).await;
    let mut pipeline = Vec::new();
    for _ in 0..GETS {
        pipeline.extend(cmds("GET big"));
    }
    slow.send(&pipeline).await;
    eventually("the client past its limit is closed", async || {
        proxy.ctx.metrics.clients_output_closed.get() == 1
    })
    .await;

    assert_eq!(other.call("SET k v").await, "+OK\r\n");
    assert_eq!(other.call("GET k").await, "$1\r\nv\r\n");
    assert_eq!(
        upstream_connections(&redis).await,
        1,
        "the shared connection stays"
    );
    // What reached its socket before it was closed, and then the end.
    let (bytes, closed) = slow.read_to_close().await;
    assert!(closed, "closed, not left hanging");
    let reply = format!("${}\r\n{value}\r\n", value.len()).len();
    assert!(
        bytes.len() < GETS * reply,
        "{} bytes of {} reached it",
        bytes.len(),
        GETS * reply
    );
    proxy.shutdown().await;
}

/// A shared connection whose Redis stops answering is given up after three
/// times `reply_timeout` (each client owed a reply has had its error at
/// `reply_timeout` already, as on a connection of its own), and the next
/// client is served on a new connection once Redis answers again.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_shared_connection_is_replaced_after_reply_timeout() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), &format!("{SHARED}reply_timeout = \"200ms\"\n")).await;
    let mut owed = RawClient::connect(proxy.addr).await;
    assert_eq!(owed.call("PING").await, "+PONG\r\n");
    redis.pause();
    owed.send(&cmds("GET k")).await;
    let (bytes, closed) = owed.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        format!(
            "-ERR cachefence: upstream {} did not reply within 200ms\r\n",
            redis.addr()
        )
    );
    assert!(closed);
    assert_eq!(proxy.ctx.metrics.upstream_timeouts.get(), 1);
    // The connection is given up within six times reply_timeout of the
    // request (it looks once per three), before Redis comes back.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    redis.resume();
    let mut next = RawClient::connect(proxy.addr).await;
    assert_eq!(next.call("PING").await, "+PONG\r\n");
    assert_eq!(proxy.ctx.metrics.shared_opened.get(), 2);
    proxy.shutdown().await;
}

/// Fenced writes of clients that do not pipeline, each one script call,
/// run on the shared connection as one batch call (Redis pays a script
/// call's fixed cost once per batch, not once per client), and each client
/// still gets exactly the reply its write alone gets from Redis: `+OK`, a
/// `SET … NX` that did not set, an error in the middle, a `DEL`'s count;
/// RESP2 and RESP3; and after `SCRIPT FLUSH` (each merged call gets the
/// `NOSCRIPT` and is sent again with the script's source).
#[tokio::test(flavor = "multi_thread")]
async fn fenced_writes_of_many_clients_run_as_one_script_call_each_with_its_own_reply() {
    const CLIENTS: usize = 20;
    const ROUNDS: usize = 40;
    let config = "shared_connections = 1\n[[cache]]\npattern = \"*\"\non_write = \"write\"\n";
    for resp3 in [false, true] {
        let redis = RedisServer::start();
        let proxy = Proxy::start(&redis.addr(), config).await;
        let nil = if resp3 { "_\r\n" } else { "$-1\r\n" };
        // (command, reply) of one round; the replies are Redis' own, as the
        // control below checks on a direct connection.
        let round = |i: usize| {
            vec![
                (format!("SET w:{i} v{i:02}"), "+OK\r\n".to_string()),
                (format!("SET w:{i} other NX"), nil.to_string()),
                (format!("SET s:{i} abc"), "+OK\r\n".to_string()),
                (
                    format!("INCR s:{i}"),
                    "-ERR value is not an integer or out of range\r\n".to_string(),
                ),
                (format!("GET w:{i}"), format!("$3\r\nv{i:02}\r\n")),
                (format!("DEL w:{i}"), ":1\r\n".to_string()),
            ]
        };
        let mut control = RawClient::connect(redis.addr()).await;
        if resp3 {
            control.call("HELLO 3").await;
        }
        for (command, reply) in round(99) {
            assert_eq!(control.call(&command).await, reply, "direct: {command}");
        }
        let writes_per_round = 5; // every command but the GET
        // A client whose reply was wrong panics: the others then stop
        // waiting for it here, within a bound.
        async fn meet(barrier: &tokio::sync::Barrier) {
            tokio::time::timeout(Duration::from_secs(20), barrier.wait())
                .await
                .expect("every client reaches the middle round");
        }
        let flushed = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let (addr, flushed) = (proxy.addr, flushed.clone());
            let round = round(i);
            tasks.push(tokio::spawn(async move {
                let mut c = RawClient::connect(addr).await;
                if resp3 {
                    assert!(c.call("HELLO 3").await.starts_with("%7\r\n"));
                }
                for n in 0..ROUNDS {
                    if n == ROUNDS / 2 {
                        // Redis loses the script while every client waits here.
                        meet(&flushed).await;
                        meet(&flushed).await;
                    }
                    for (command, reply) in &round {
                        assert_eq!(c.call(command).await, *reply, "client {i}, round {n}: {command}");
                    }
                }
            }));
        }
        meet(&flushed).await;
        assert_eq!(control.call("SCRIPT FLUSH").await, "+OK\r\n");
        meet(&flushed).await;
        for task in tasks {
            task.await.unwrap();
        }
        let writes = (CLIENTS * ROUNDS * writes_per_round) as u64;
        let merged = proxy.ctx.metrics.shared_merged.get();
        let stats = control.call("INFO commandstats").await;
        let calls = |name: &str| -> u64 {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
                .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
        };
        let script_calls = calls("evalsha") + calls("eval");
        assert!(merged > 0, "no call was merged (resp3: {resp3})");
        assert!(
            script_calls < writes,
            "{script_calls} script calls for {writes} fenced writes (resp3: {resp3})"
        );
        assert_eq!(proxy.ctx.metrics.sessions_pinned.get(), 0);
        proxy.shutdown().await;
    }
}

/// Redis checks the keys a script call declares against the user's ACL
/// before it runs: a batch call of several clients' writes would be refused
/// as a whole (`-NOPERM`) for one client's key. Under a proxy user that may
/// not touch every key, calls are not merged, and each client gets what
/// its own write gets: the one writing a key it may not touch an error, the
/// others `+OK`.
#[tokio::test(flavor = "multi_thread")]
async fn calls_are_not_merged_for_a_user_that_may_not_touch_every_key() {
    const CLIENTS: usize = 10;
    let redis = RedisServer::start();
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(
        direct.call("ACL SETUSER u on >p ~ok:* ~cachefence:* +@all").await,
        "+OK\r\n"
    );
    let config = "shared_connections = 1\nupstream_user = \"u\"\nupstream_password = \"p\"\n\
                  [[cache]]\npattern = \"*\"\non_write = \"write\"\n";
    let proxy = Proxy::start(&redis.addr(), config).await;
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            for n in 0..50 {
                match i {
                    0 => assert!(
                        c.call(&format!("SET bad:{n} v")).await.starts_with("-NOPERM"),
                        "a key the user may not touch"
                    ),
                    _ => assert_eq!(
                        c.call(&format!("SET ok:{i} v{n}")).await,
                        "+OK\r\n",
                        "client {i}, write {n}"
                    ),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(proxy.ctx.metrics.shared_merged.get(), 0);
    assert_eq!(direct.call("GET ok:3").await, "$3\r\nv49\r\n");
    proxy.shutdown().await;
}
