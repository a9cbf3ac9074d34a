//! Reads of a pattern that mostly misses go to Redis as the miss script
//! (`fence::direct`): the client sees what a `GET` answers (the value, the
//! error, nil), a miss still gets its ticket, and a fill read before an
//! invalidation is still refused (C1). Once hits come back, reads are
//! plain `GET`s again.

use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, cmds, escape};

/// Misses enough fresh keys to send this section's reads direct, each
/// filled as a cache-aside client does.
async fn miss_many(client: &mut RawClient, prefix: &str, count: usize) {
    for i in 0..count {
        let key = format!("{prefix}:{i}");
        assert_eq!(client.call(&format!("GET {key}")).await, "$-1\r\n");
        assert_eq!(client.call(&format!("SET {key} v{i}")).await, "+OK\r\n");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pattern_that_mostly_misses_reads_in_one_round_trip_with_the_same_replies() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let stats = &proxy.ctx.fences.as_ref().expect("fences on").stats;
    let mut client = RawClient::connect(proxy.addr).await;
    miss_many(&mut client, "warm", 20).await;
    assert!(
        stats.direct_reads.get() > 0,
        "20 misses in a row send reads direct"
    );

    let mut direct = RawClient::connect(redis.addr()).await;
    let evalsha = |direct_calls: &str| {
        direct_calls
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    let before = stats.direct_reads.get();
    // A miss: nil, from one script call (the GETs commandstats shows are
    // the script's own).
    assert_eq!(client.call("GET fresh").await, "$-1\r\n");
    let info = direct.call("INFO commandstats").await;
    assert_eq!(evalsha(&info), 1, "{info}");
    assert_eq!(stats.direct_reads.get(), before + 1);
    // Its fill is stored, and read back as the value.
    assert_eq!(client.call("SET fresh filled").await, "+OK\r\n");
    assert_eq!(client.call("GET fresh").await, "$6\r\nfilled\r\n");
    // Another type answers GET's own error.
    assert_eq!(direct.call("HSET h f v").await, ":1\r\n");
    assert_eq!(
        client.call("GET h").await,
        "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    );
    // RESP3: the nil of RESP3.
    assert!(client.call("HELLO 3").await.starts_with('%'));
    assert_eq!(client.call("GET fresh2").await, "_\r\n");
    assert_eq!(client.call("SET fresh2 v").await, "+OK\r\n");
    assert_eq!(
        stats.direct_reads.get(),
        before + 4,
        "each read above went direct"
    );

    // C1 still holds: a read before an invalidation fills nothing.
    let mut writer = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("GET raced").await, "_\r\n");
    assert_eq!(writer.call("DEL raced").await, ":0\r\n");
    assert_eq!(client.call("SET raced stale").await, "+OK\r\n");
    assert_eq!(
        direct.call("GET raced").await,
        "$-1\r\n",
        "the stale fill was refused"
    );

    // Hits bring plain GETs back.
    for i in 0..20 {
        assert_eq!(
            client.call(&format!("GET warm:{i}")).await,
            format!("${}\r\nv{i}\r\n", 1 + i.to_string().len())
        );
    }
    let after = stats.direct_reads.get();
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    for i in 0..5 {
        client.call(&format!("GET warm:{i}")).await;
    }
    assert_eq!(stats.direct_reads.get(), after, "hits: GETs again");
    let info = direct.call("INFO commandstats").await;
    assert!(
        info.contains("cmdstat_get:calls=5,"),
        "{}",
        escape(info.as_bytes())
    );
    assert_eq!(evalsha(&info), 0, "{info}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_stay_gets_inside_multi_and_on_a_connection_of_its_own() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let stats = &proxy.ctx.fences.as_ref().expect("fences on").stats;
    let mut client = RawClient::connect(proxy.addr).await;
    miss_many(&mut client, "warm", 20).await;
    let before = stats.direct_reads.get();
    assert!(before > 0);
    // In MULTI the GET is queued as a GET, and EXEC answers its nil.
    assert_eq!(client.call("MULTI").await, "+OK\r\n");
    assert_eq!(client.call("GET inmulti").await, "+QUEUED\r\n");
    assert_eq!(client.call("EXEC").await, "*1\r\n$-1\r\n");
    // A connection that WATCHes has one of its own: its GETs stay GETs.
    let mut watcher = RawClient::connect(proxy.addr).await;
    assert_eq!(watcher.call("WATCH w").await, "+OK\r\n");
    assert_eq!(watcher.call("GET own").await, "$-1\r\n");
    assert_eq!(stats.direct_reads.get(), before);
    proxy.shutdown().await;
}

/// Many clients at once, each sending one request at a time: their direct
/// reads travel together on the shared connection (in one batch call where
/// they queue next to each other), and each still gets its own reply:
/// nil for a fresh key, then its fill read back, and the value of a key
/// that is there (one read in four).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_direct_reads_each_get_their_own_reply() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let stats = &proxy.ctx.fences.as_ref().expect("fences on").stats;
    let mut direct = RawClient::connect(redis.addr()).await;
    for n in 0..24 {
        assert_eq!(direct.call(&format!("SET present:{n} here{n}")).await, "+OK\r\n");
    }
    let clients = (0..24).map(|n| {
        let addr = proxy.addr;
        tokio::spawn(async move {
            let mut client = RawClient::connect(addr).await;
            for i in 0..40 {
                if i % 4 == 3 {
                    let expected = format!("${}\r\nhere{n}\r\n", 4 + n.to_string().len());
                    assert_eq!(client.call(&format!("GET present:{n}")).await, expected);
                    continue;
                }
                let key = format!("fresh:{n}:{i}");
                assert_eq!(client.call(&format!("GET {key}")).await, "$-1\r\n", "{key}");
                assert_eq!(client.call(&format!("SET {key} {key}")).await, "+OK\r\n");
            }
            for i in (0..40).filter(|i| i % 4 != 3) {
                let key = format!("fresh:{n}:{i}");
                let expected = format!("${}\r\n{key}\r\n", key.len());
                assert_eq!(client.call(&format!("GET {key}")).await, expected);
            }
        })
    });
    for client in clients.collect::<Vec<_>>() {
        client.await.expect("a client");
    }
    assert!(stats.direct_reads.get() > 0, "reads went direct");
    proxy.shutdown().await;
}

/// A direct read of a key another client is filling waits for that fill
/// (C7), as a `GET`'s miss does: it gets the value, not nil, and takes no
/// ticket.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_read_waits_for_the_leaders_fill() {
    let redis = RedisServer::start();
    let config = "[[cache]]\npattern = \"*\"\non_write = \"write\"\nhold = \"5s\"\n";
    let proxy = Proxy::start(&redis.addr(), config).await;
    let stats = &proxy.ctx.fences.as_ref().expect("fences on").stats;
    let mut leader = RawClient::connect(proxy.addr).await;
    miss_many(&mut leader, "warm", 20).await;
    let before = stats.direct_reads.get();
    assert_eq!(leader.call("GET herd").await, "$-1\r\n");
    let tickets = stats.tickets_issued.get();
    let addr = proxy.addr;
    let follower = tokio::spawn(async move {
        let mut follower = RawClient::connect(addr).await;
        follower.call("GET herd").await
    });
    // The follower's read is held (its reply has not come) until the fill.
    testkit::eventually("the follower's read is held", async || stats.holds.get() == 1).await;
    assert!(!follower.is_finished());
    assert_eq!(leader.call("SET herd from-the-database").await, "+OK\r\n");
    let reply = tokio::time::timeout(testkit::WAIT, follower)
        .await
        .expect("served")
        .unwrap();
    assert_eq!(reply, "$17\r\nfrom-the-database\r\n");
    assert_eq!(stats.direct_reads.get(), before + 2, "both reads went direct");
    assert_eq!(stats.tickets_issued.get(), tickets, "the follower took no ticket");
    assert_eq!(stats.holds_served.get(), 1);
    proxy.shutdown().await;
}

/// One connection that many threads share (a multiplexed client: their
/// commands pipelined on it): two threads' direct reads, another thread's
/// `DEL` of one key, then both fills. The fill read before the `DEL` is
/// refused, the other stored (C1); plain Redis, the control, stores the
/// stale one. Then the same race through a pool of connections.
#[tokio::test(flavor = "multi_thread")]
async fn direct_reads_on_a_multiplexed_connection_and_a_pool_refuse_the_stale_fill() {
    const PIPELINE: &[&str] = &[
        "GET mx:a",
        "GET mx:b",
        "DEL mx:a",
        "SET mx:a stale",
        "SET mx:b fresh",
    ];
    let all: Vec<u8> = PIPELINE.iter().flat_map(|line| cmds(line)).collect();
    let read = async |client: &mut RawClient| {
        let mut replies = Vec::new();
        for _ in PIPELINE {
            replies.push(escape(&client.read_frame().await));
        }
        replies
    };

    let control = RedisServer::start();
    let mut plain = RawClient::connect(control.addr()).await;
    plain.send(&all).await;
    read(&mut plain).await;
    assert_eq!(
        plain.call("GET mx:a").await,
        "$5\r\nstale\r\n",
        "the control stores the stale fill"
    );

    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let stats = &proxy.ctx.fences.as_ref().expect("fences on").stats;
    let mut shared = RawClient::connect(proxy.addr).await;
    miss_many(&mut shared, "warm", 20).await;
    let before = stats.direct_reads.get();
    shared.send(&all).await;
    let replies = read(&mut shared).await;
    assert_eq!(
        replies,
        ["$-1\\r\\n", "$-1\\r\\n", ":0\\r\\n", "+OK\\r\\n", "+OK\\r\\n"]
    );
    assert_eq!(stats.direct_reads.get(), before + 2, "both reads went direct");
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(
        direct.call("GET mx:a").await,
        "$-1\r\n",
        "the stale fill was refused"
    );
    assert_eq!(direct.call("GET mx:b").await, "$5\r\nfresh\r\n");

    // A pool: the read, the other request's DEL and the fill each on a
    // connection of the pool, as redis-py or Jedis hand them out.
    let mut pool = Vec::new();
    for _ in 0..3 {
        pool.push(RawClient::connect(proxy.addr).await);
    }
    assert_eq!(pool[0].call("GET pool:a").await, "$-1\r\n");
    assert_eq!(
        stats.direct_reads.get(),
        before + 3,
        "the pooled read went direct"
    );
    assert_eq!(pool[1].call("DEL pool:a").await, ":0\r\n");
    assert_eq!(pool[2].call("SET pool:a stale").await, "+OK\r\n");
    assert_eq!(
        direct.call("GET pool:a").await,
        "$-1\r\n",
        "the pooled stale fill was refused"
    );
    proxy.shutdown().await;
}
