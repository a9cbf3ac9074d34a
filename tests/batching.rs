//! Fenced writes and stores that a client pipelines go to Redis as one
//! script call (#17): each command's reply is what it would have been sent
//! alone, byte for byte, and what Redis itself answers where fences do not
//! change the reply — errors in their places, RESP2 and RESP3.

use testkit::race::cached;
use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, cmds, escape};

/// Replies fences do not change (no miss is outstanding): stores with and
/// without options, writes that fail in the middle (WRONGTYPE, bad
/// expiries), `NX`/`XX`/`GET`, invalidations, a read and a transaction
/// between them (neither joins a batch).
const PIPELINE: &[&str] = &[
    "SET a 1",
    "SET b 2 EX 100",
    "INCR a",
    "LPUSH l x",
    "INCR l",
    "SET c 3 NX",
    "SET c 4 NX",
    "SETEX d 100 v",
    "PSETEX d2 100000 w",
    "DEL a b",
    "GET c",
    "MSET e 1 f 2",
    "APPEND e x",
    "SET g v XX",
    "GETDEL c",
    "UNLINK d",
    "SET h v EX notanumber",
    "SETEX h -1 v",
    "MULTI",
    "SET m 1",
    "DEL m",
    "EXEC",
    "SET i v",
    "INCRBY i 1",
    "SET j v GET",
    "SET i w GET",
    "DEL nothing",
];

/// The replies to [`PIPELINE`] at `addr`: sent in one write, or one command
/// at a time (each waits for its reply: nothing to batch).
async fn replies(addr: &str, resp3: bool, pipelined: bool) -> Vec<String> {
    let mut client = RawClient::connect(addr).await;
    if resp3 {
        client.send(&cmds("HELLO 3")).await;
        client.read_frame().await;
    }
    let mut out = Vec::new();
    if pipelined {
        let all: Vec<u8> = PIPELINE.iter().flat_map(|line| cmds(line)).collect();
        client.send(&all).await;
        for _ in PIPELINE {
            out.push(escape(&client.read_frame().await));
        }
    } else {
        for line in PIPELINE {
            out.push(escape(client.call(line).await.as_bytes()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_fenced_writes_answer_as_alone_and_as_redis() {
    for resp3 in [false, true] {
        let redis = RedisServer::start();
        let direct = replies(&redis.addr(), resp3, true).await;
        drop(redis);
        let mut through = Vec::new();
        for pipelined in [true, false] {
            let redis = RedisServer::start();
            let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
            through.push(replies(&proxy.addr.to_string(), resp3, pipelined).await);
            proxy.shutdown().await;
        }
        assert_eq!(through[0], through[1], "resp3 {resp3}: batched vs one at a time");
        assert_eq!(through[0], direct, "resp3 {resp3}: batched vs Redis");
    }
}

/// The same pipeline under the default `on_write = "invalidate"` (a SET
/// that is not a fill becomes a delete): replies differ from Redis' by
/// design (a later read misses), but batched and one at a time agree.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_writes_under_invalidate_answer_as_alone() {
    let config = "[[cache]]\npattern = \"*\"\n";
    for resp3 in [false, true] {
        let mut through = Vec::new();
        for pipelined in [true, false] {
            let redis = RedisServer::start();
            let proxy = Proxy::start(&redis.addr(), config).await;
            through.push(replies(&proxy.addr.to_string(), resp3, pipelined).await);
            proxy.shutdown().await;
        }
        assert_eq!(through[0], through[1], "resp3 {resp3}: batched vs one at a time");
        // `SET a 1` became a delete: the `INCR a` behind it starts from 0.
        assert_eq!(through[0][2], ":1\\r\\n", "resp3 {resp3}");
    }
}

/// The count of a command in `INFO commandstats` (0 if absent).
async fn calls(direct: &mut RawClient, command: &str) -> u64 {
    let stats = direct.call("INFO commandstats").await;
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("a count"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_pipelined_sets_are_one_script_call() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let mut client = RawClient::connect(proxy.addr).await;
    // The connection's first call carries the script's source.
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    let sets: Vec<u8> = (0..16)
        .flat_map(|i| cmds(&format!("SET k{i} v{i} EX 60")))
        .collect();
    client.send(&sets).await;
    for _ in 0..16 {
        assert_eq!(client.read_frame().await, b"+OK\r\n");
    }
    assert_eq!(
        calls(&mut direct, "evalsha").await,
        1,
        "one call for the pipeline"
    );
    assert_eq!(calls(&mut direct, "set").await, 16, "each SET ran");
    for i in [0, 15] {
        let value = cached(&mut direct, &format!("k{i}")).await;
        assert_eq!(value.as_deref(), Some(format!("v{i}").as_str()));
    }
    proxy.shutdown().await;
}

/// Fills that win and lose in one pipeline: A misses k1 and k2, a writer
/// deletes k2 (A's read of it is now stale), then A pipelines both fills, a
/// write of k3 and a delete. Returns the replies and what is cached.
async fn fills_in_a_pipeline(pipelined: bool) -> (Vec<Vec<u8>>, [Option<String>; 3]) {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let (mut a, mut writer) = (
        RawClient::connect(proxy.addr).await,
        RawClient::connect(proxy.addr).await,
    );
    assert_eq!(a.call("GET k1").await, "$-1\r\n");
    assert_eq!(a.call("GET k2").await, "$-1\r\n");
    assert_eq!(writer.call("DEL k2").await, ":0\r\n");
    let lines = [
        "SET k1 fresh EX 60",
        "SET k2 stale EX 60",
        "SET k3 written EX 60",
        "DEL k4",
    ];
    let mut got = Vec::new();
    if pipelined {
        a.send(&lines.iter().flat_map(|l| cmds(l)).collect::<Vec<u8>>())
            .await;
        for _ in lines {
            got.push(a.read_frame().await);
        }
    } else {
        for line in lines {
            got.push(a.call(line).await.into_bytes());
        }
    }
    let cached = [
        cached(&mut direct, "k1").await,
        cached(&mut direct, "k2").await,
        cached(&mut direct, "k3").await,
    ];
    proxy.shutdown().await;
    (got, cached)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_fill_among_accepted_ones_stays_refused_in_a_batch() {
    let batched = fills_in_a_pipeline(true).await;
    assert_eq!(batched, fills_in_a_pipeline(false).await);
    let (replies, cached) = batched;
    // A refused fill answers +OK (on_stale_fill = "ok") and stores nothing.
    assert_eq!(replies, [&b"+OK\r\n"[..], b"+OK\r\n", b"+OK\r\n", b":0\r\n"]);
    assert_eq!(
        cached,
        [Some("fresh".to_string()), None, Some("written".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_finds_the_script_gone_is_sent_again_with_it() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    assert_eq!(direct.call("LPUSH l x").await, ":1\r\n");
    assert_eq!(direct.call("SCRIPT FLUSH").await, "+OK\r\n");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    let lines = ["SET k1 a", "INCR l", "SET k2 b EX 60", "DEL k1"];
    client
        .send(&lines.iter().flat_map(|l| cmds(l)).collect::<Vec<u8>>())
        .await;
    let mut got = Vec::new();
    for _ in lines {
        got.push(escape(&client.read_frame().await));
    }
    assert_eq!(
        got,
        [
            "+OK\\r\\n",
            "-WRONGTYPE Operation against a key holding the wrong kind of value\\r\\n",
            "+OK\\r\\n",
            ":1\\r\\n"
        ]
    );
    assert_eq!(cached(&mut direct, "k2").await.as_deref(), Some("b"));
    assert_eq!(
        calls(&mut direct, "evalsha").await,
        1,
        "one batch, answered NOSCRIPT"
    );
    assert_eq!(
        calls(&mut direct, "eval").await,
        1,
        "sent again once, with the source"
    );
    proxy.shutdown().await;
}

/// Redis stops while a batch is owed: each of its commands gets the
/// proxy's error, not one for the whole batch (the client counts replies).
#[tokio::test(flavor = "multi_thread")]
async fn a_lost_upstream_answers_every_command_of_a_batch() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    redis.pause();
    let sets: Vec<u8> = (0..5).flat_map(|i| cmds(&format!("SET k{i} v"))).collect();
    client.send(&sets).await;
    // Let the batch reach the paused Redis, then lose it.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    redis.kill();
    let (rest, closed) = client.read_to_close().await;
    assert!(closed, "the proxy closes the client after the errors");
    let text = String::from_utf8_lossy(&rest);
    assert_eq!(text.matches("-ERR cachefence: upstream ").count(), 5, "{text}");
    proxy.shutdown().await;
}
