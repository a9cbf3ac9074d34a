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

/// The replies to `lines` sent in one write, escaped.
async fn pipelined(client: &mut RawClient, lines: &[&str]) -> Vec<String> {
    client
        .send(&lines.iter().flat_map(|l| cmds(l)).collect::<Vec<u8>>())
        .await;
    let mut got = Vec::new();
    for _ in lines {
        got.push(escape(&client.read_frame().await));
    }
    got
}

/// The replies to `lines` pipelined on `client` right after Redis (at
/// `direct`) lost the script and its command counts were reset.
async fn pipelined_after_script_flush(
    direct: &mut RawClient,
    client: &mut RawClient,
    lines: &[&str],
) -> Vec<String> {
    assert_eq!(direct.call("SCRIPT FLUSH").await, "+OK\r\n");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    pipelined(client, lines).await
}

/// `SET k<i> v<i> EX 60` for i in 0..16, in one write, each answered `+OK`.
async fn sixteen_pipelined_sets(client: &mut RawClient) {
    let sets: Vec<String> = (0..16).map(|i| format!("SET k{i} v{i} EX 60")).collect();
    let lines: Vec<&str> = sets.iter().map(String::as_str).collect();
    assert_eq!(pipelined(client, &lines).await, vec!["+OK\\r\\n"; 16]);
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

/// The fence layer's counters of `proxy`: probes, and writes sent plain
/// and through the script after one.
fn probe_counts(proxy: &Proxy) -> [u64; 3] {
    let stats = &proxy.ctx.fences.as_ref().expect("fences on").stats;
    [
        stats.probes.get(),
        stats.probed_plain.get(),
        stats.probed_script.get(),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn sixteen_pipelined_sets_without_fences_are_one_probe_and_sixteen_plain_sets() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    sixteen_pipelined_sets(&mut client).await;
    assert_eq!(calls(&mut direct, "mget").await, 1, "one probe of the 16 fences");
    assert_eq!(calls(&mut direct, "evalsha").await, 0, "no fence: no script");
    assert_eq!(calls(&mut direct, "set").await, 16, "each SET ran");
    assert_eq!(probe_counts(&proxy), [1, 16, 0]);
    for i in [0, 15] {
        let value = cached(&mut direct, &format!("k{i}")).await;
        assert_eq!(value.as_deref(), Some(format!("v{i}").as_str()));
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_sets_whose_fences_exist_go_to_one_script_call_in_their_place() {
    let redis = RedisServer::start();
    // The misses are another proxy's: this one has no memory of them, only
    // the fences in Redis say they are outstanding.
    let (proxy, other) = (
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
    );
    let mut direct = RawClient::connect(redis.addr()).await;
    let mut reader = RawClient::connect(other.addr).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    assert_eq!(reader.call("GET k3").await, "$-1\r\n");
    assert_eq!(reader.call("GET k4").await, "$-1\r\n");
    assert_eq!(direct.call("EXISTS cachefence:{k3}").await, ":1\r\n");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    sixteen_pipelined_sets(&mut client).await;
    assert_eq!(calls(&mut direct, "mget").await, 1);
    assert_eq!(
        calls(&mut direct, "evalsha").await,
        1,
        "k3 and k4: one batch call"
    );
    assert_eq!(calls(&mut direct, "set").await, 16, "14 plain, 2 in the script");
    assert_eq!(probe_counts(&proxy), [1, 14, 2]);
    // Judged as fills of the other proxy's misses (ticket scope: every
    // client), and stored; their fences retired with the fills.
    for i in [2, 3, 4, 5] {
        let value = cached(&mut direct, &format!("k{i}")).await;
        assert_eq!(value.as_deref(), Some(format!("v{i}").as_str()));
    }
    assert_eq!(direct.call("EXISTS cachefence:{k3}").await, ":0\r\n");
    proxy.shutdown().await;
    other.shutdown().await;
}

/// R1 with the writer pipelining: a reader misses `user:x` on one proxy and
/// reads X=1; X becomes 2 and a writer pipelines `writes` on another proxy;
/// the reader fills X=1. With `direct`, every client talks to Redis.
async fn r1_pipelined(
    redis: &RedisServer,
    proxies: Option<(&Proxy, &Proxy)>,
    writes: &[&str],
) -> Option<String> {
    let (reader_at, writer_at) = match proxies {
        Some((a, b)) => (a.addr.to_string(), b.addr.to_string()),
        None => (redis.addr(), redis.addr()),
    };
    let mut reader = RawClient::connect(reader_at.as_str()).await;
    let mut writer = RawClient::connect(writer_at.as_str()).await;
    assert_eq!(reader.call("GET user:x").await, "$-1\r\n");
    pipelined(&mut writer, writes).await;
    assert_eq!(reader.call("SET user:x 1 EX 60").await, "+OK\r\n");
    let mut direct = RawClient::connect(redis.addr()).await;
    let value = cached(&mut direct, "user:x").await;
    assert_eq!(direct.call("FLUSHALL").await, "+OK\r\n");
    value
}

#[tokio::test(flavor = "multi_thread")]
async fn a_probed_write_still_refuses_the_stale_fill_of_a_miss_outstanding_elsewhere() {
    let redis = RedisServer::start();
    let (a, b) = (
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
        Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await,
    );
    for (writes, through) in [
        // on_write = "write": the write stores X=2, the stale fill must not replace it.
        (&["SET user:x 2", "SET user:y 1", "SET user:z 1"][..], Some("2")),
        (&["DEL user:y", "DEL user:x", "DEL user:z"][..], None),
        (&["MSET user:y 1 user:x 2", "INCR user:n"][..], Some("2")),
    ] {
        assert_eq!(
            r1_pipelined(&redis, None, writes).await.as_deref(),
            Some("1"),
            "control: plain Redis keeps the stale fill after {writes:?}"
        );
        let before = probe_counts(&b);
        assert_eq!(
            r1_pipelined(&redis, Some((&a, &b)), writes).await.as_deref(),
            through,
            "through cachefence the stale fill is refused after {writes:?}"
        );
        let after = probe_counts(&b);
        assert_eq!(after[0] - before[0], 1, "the writes were probed: {writes:?}");
        assert_eq!(
            after[2] - before[2],
            1,
            "the write of user:x went to the script: {writes:?}"
        );
    }
    a.shutdown().await;
    b.shutdown().await;
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

/// R1 for a burst of misses larger than the proxy's queue of its own calls
/// (1024 per connection): A pipelines `GET`s of `keys` missing keys, a
/// writer deletes them all (A's reads are now stale), A fills them all.
/// Returns how many stale fills were stored.
async fn stale_fills_after_a_burst_of_misses(addr: &str, redis: &RedisServer, keys: usize) -> usize {
    let names: Vec<String> = (0..keys).map(|i| format!("burst:{i}")).collect();
    let (mut a, mut writer) = (RawClient::connect(addr).await, RawClient::connect(addr).await);
    let gets: Vec<u8> = names.iter().flat_map(|k| cmds(&format!("GET {k}"))).collect();
    a.send(&gets).await;
    for k in &names {
        assert_eq!(a.read_frame().await, b"$-1\r\n", "{k} missed");
    }
    let del: Vec<&[u8]> = std::iter::once(&b"DEL"[..])
        .chain(names.iter().map(|k| k.as_bytes()))
        .collect();
    writer.send(&testkit::cmd(&del)).await;
    assert_eq!(writer.read_frame().await, b":0\r\n");
    let sets: Vec<u8> = names
        .iter()
        .flat_map(|k| cmds(&format!("SET {k} stale EX 60")))
        .collect();
    a.send(&sets).await;
    for k in &names {
        assert_eq!(a.read_frame().await, b"+OK\r\n", "{k} filled");
    }
    let mut direct = RawClient::connect(redis.addr()).await;
    let exists: Vec<&[u8]> = std::iter::once(&b"EXISTS"[..])
        .chain(names.iter().map(|k| k.as_bytes()))
        .collect();
    direct.send(&testkit::cmd(&exists)).await;
    let count = direct.read_frame().await;
    std::str::from_utf8(&count[1..count.len() - 2])
        .unwrap()
        .parse()
        .unwrap()
}

/// More misses at once than the proxy queues calls of its own for: each
/// still gets its miss script before its nil reaches the client (the
/// replies wait for room), so none of the stale fills is stored. They
/// used to be released without a ticket past the queue, and their fills
/// then counted as writes.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_misses_past_the_call_queue_keeps_every_ticket() {
    const KEYS: usize = 3000;
    let redis = RedisServer::start();
    assert_eq!(
        stale_fills_after_a_burst_of_misses(&redis.addr(), &redis, KEYS).await,
        KEYS,
        "control: plain Redis stores every stale fill"
    );
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    assert_eq!(
        stale_fills_after_a_burst_of_misses(&proxy.addr.to_string(), &redis, KEYS).await,
        0,
        "through cachefence every stale fill is refused"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_that_finds_the_script_gone_is_sent_again_with_it() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let mut client = RawClient::connect(proxy.addr).await;
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    assert_eq!(direct.call("LPUSH l x").await, ":1\r\n");
    // Outstanding misses: fills and a delete that need the script.
    assert_eq!(reader.call("GET k1").await, "$-1\r\n");
    assert_eq!(reader.call("GET k2").await, "$-1\r\n");
    assert_eq!(reader.call("GET k3").await, "$-1\r\n");
    // Not a probe (one write has a plain form): one batch of all four.
    let lines = ["SET k1 a", "INCR l", "SET k2 b EX 60", "SET k3 c"];
    let got = pipelined_after_script_flush(&mut direct, &mut client, &lines).await;
    assert_eq!(
        got,
        [
            "+OK\\r\\n",
            "-WRONGTYPE Operation against a key holding the wrong kind of value\\r\\n",
            "+OK\\r\\n",
            "+OK\\r\\n"
        ]
    );
    assert_eq!(cached(&mut direct, "k2").await.as_deref(), Some("b"));
    assert_eq!(calls(&mut direct, "mget").await, 0, "not probed");
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

    // A probed run whose scripted part meets NOSCRIPT: sent again too.
    assert_eq!(reader.call("GET k5").await, "$-1\r\n");
    let lines = ["DEL k4", "DEL k5", "INCR l", "SET k6 d"];
    let got = pipelined_after_script_flush(&mut direct, &mut client, &lines).await;
    assert_eq!(
        got,
        [
            ":0\\r\\n",
            ":0\\r\\n",
            "-WRONGTYPE Operation against a key holding the wrong kind of value\\r\\n",
            "+OK\\r\\n"
        ]
    );
    assert_eq!(calls(&mut direct, "mget").await, 1, "probed");
    assert_eq!(
        calls(&mut direct, "evalsha").await,
        1,
        "DEL k5 (its fence exists), NOSCRIPT"
    );
    assert_eq!(calls(&mut direct, "eval").await, 1, "sent again with the source");
    // The DEL moved k5's fence: the reader's fill is refused.
    assert_eq!(reader.call("SET k5 stale").await, "+OK\r\n");
    assert_eq!(cached(&mut direct, "k5").await, None);
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

/// Everything a client sends in one write and then half-closes, at `addr`.
async fn sent_then_half_closed(addr: &str, lines: &[&str]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let all: Vec<u8> = lines.iter().flat_map(|l| cmds(l)).collect();
    stream.write_all(&all).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    read.expect("the connection ends within 10 s").expect("read");
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_half_closes_behind_probed_runs_gets_every_reply_in_order() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    // Two probed runs, a read of what the first wrote between them, and
    // the end of the input right behind the second.
    let lines = [
        "SET a 1",
        "SET b 2",
        "GET a",
        "DEL b",
        "SET c 3 EX 60",
        "INCR c",
        "GET c",
    ];
    let direct = sent_then_half_closed(&redis.addr(), &lines).await;
    assert_eq!(
        escape(&direct),
        "+OK\\r\\n+OK\\r\\n$1\\r\\n1\\r\\n:1\\r\\n+OK\\r\\n:4\\r\\n$1\\r\\n4\\r\\n"
    );
    let mut flush = RawClient::connect(redis.addr()).await;
    assert_eq!(flush.call("FLUSHALL").await, "+OK\r\n");
    let before = probe_counts(&proxy)[0];
    let through = sent_then_half_closed(&proxy.addr.to_string(), &lines).await;
    assert_eq!(escape(&through), escape(&direct));
    assert_eq!(probe_counts(&proxy)[0] - before, 2, "both runs were probed");
    proxy.shutdown().await;
}

/// A shutdown drains every connection: writes whose probe is in flight
/// when it begins are still sent and answered.
#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_while_a_probe_is_in_flight_still_sends_and_answers_its_writes() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET warm 1").await, "+OK\r\n");
    redis.pause();
    client
        .send(
            &["SET a 1", "DEL b"]
                .iter()
                .flat_map(|l| cmds(l))
                .collect::<Vec<u8>>(),
        )
        .await;
    // The probe reaches the paused Redis; then the shutdown begins.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let shutdown = tokio::spawn(proxy.shutdown());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    redis.resume();
    let replies = [client.read_frame().await, client.read_frame().await];
    assert_eq!(replies, [&b"+OK\r\n"[..], b":0\r\n"]);
    shutdown.await.expect("the proxy shut down");
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(cached(&mut direct, "a").await.as_deref(), Some("1"));
}

/// Redis keeps scripts for the whole server, not per connection: once the
/// proxy sent the fence script's source, a new client's first fenced
/// command calls it by its SHA (a client that connects per request does not
/// send 20 KB of Lua each time); after Redis lost it (`SCRIPT FLUSH`), the
/// `NOSCRIPT` is answered by sending the call again with the source.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_client_calls_the_script_by_its_sha_once_the_proxy_sent_it() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    let mut first = RawClient::connect(proxy.addr).await;
    assert_eq!(first.call("SET a 1").await, "+OK\r\n");
    assert_eq!(calls(&mut direct, "eval").await, 1, "the first call loads it");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    for i in 0..5 {
        let mut client = RawClient::connect(proxy.addr).await;
        assert_eq!(client.call(&format!("SET b{i} 1")).await, "+OK\r\n");
    }
    assert_eq!(calls(&mut direct, "eval").await, 0);
    assert_eq!(calls(&mut direct, "evalsha").await, 5);
    assert_eq!(direct.call("SCRIPT FLUSH").await, "+OK\r\n");
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET c 1").await, "+OK\r\n");
    assert_eq!(cached(&mut direct, "c").await.as_deref(), Some("1"));
    assert_eq!(calls(&mut direct, "evalsha").await, 1, "answered NOSCRIPT");
    assert_eq!(calls(&mut direct, "eval").await, 1, "sent again with the source");
    proxy.shutdown().await;
}
