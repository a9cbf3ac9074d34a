//! Failures and limits: unreachable, killed and paused upstreams; client
//! limits, oversized frames, idle timeout; connection lifetimes.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, RawClient, RedisServer, WAIT, cmd, cmds, free_port};

/// Polls `check` every 20 ms until it holds, for at most `WAIT`.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_answers_an_error_and_recovers_for_new_clients() {
    let port = free_port();
    let upstream = format!("127.0.0.1:{port}");
    let proxy = Proxy::start(&upstream, "connect_timeout = \"500ms\"").await;

    let mut client = RawClient::connect(proxy.addr).await;
    let (bytes, closed) = client.read_to_close().await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.starts_with(&format!("-ERR cachefence: upstream {upstream} unreachable ("))
            && text.ends_with(")\r\n"),
        "{text}"
    );
    assert!(closed);
    assert_eq!(proxy.ctx.metrics.upstream_connect_errors.get(), 1);

    // Redis appears on that port: the next client is served.
    let _redis = RedisServer::start_on(port);
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("PING").await, "+PONG\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_killed_mid_connection_answers_every_pending_request() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "").await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET k v").await, "+OK\r\n");
    // A blocked BLPOP and a PING queued behind it are both pending.
    client.send(&[cmds("BLPOP empty 0"), cmds("PING")].concat()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.kill();
    let (bytes, closed) = client.read_to_close().await;
    let error = format!(
        "-ERR cachefence: upstream {} closed the connection\r\n",
        redis.addr()
    );
    assert_eq!(String::from_utf8_lossy(&bytes), error.repeat(2));
    assert!(closed);
    assert_eq!(proxy.ctx.metrics.upstream_lost.get(), 1);

    // The proxy itself keeps running and serves new clients once Redis is back.
    redis.restart();
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("GET k").await, "$-1\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn paused_upstream_times_out_the_handshake_then_resumes_without_loss() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let upstream = format!("redis://:s3cret@{}", redis.addr());
    let proxy = Proxy::start(&upstream, "connect_timeout = \"300ms\"").await;

    let mut before = RawClient::connect(proxy.addr).await;
    assert_eq!(before.call("SET k 1").await, "+OK\r\n");
    redis.pause();
    // A new client cannot be authenticated upstream in time.
    let started = Instant::now();
    let mut late = RawClient::connect(proxy.addr).await;
    let (bytes, closed) = late.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        format!(
            "-ERR cachefence: upstream {} unreachable (no answer within 300ms)\r\n",
            redis.addr()
        )
    );
    assert!(closed && started.elapsed() < Duration::from_secs(3));
    // The existing client's request waits while Redis is stopped, then gets
    // its reply.
    before.send(&cmds("INCR k")).await;
    assert_eq!(before.read_quiet(Duration::from_millis(200)).await, b"");
    redis.resume();
    assert_eq!(before.read_frame().await, b":2\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_authenticates_its_upstream_connections_and_reports_refusals() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let good = Proxy::start(&format!("redis://:s3cret@{}/2", redis.addr()), "").await;
    let mut client = RawClient::connect(good.addr).await;
    assert_eq!(client.call("SET k in-db-2").await, "+OK\r\n");
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("AUTH s3cret").await, "+OK\r\n");
    assert_eq!(direct.call("SELECT 2").await, "+OK\r\n");
    assert_eq!(direct.call("GET k").await, "$7\r\nin-db-2\r\n");

    let bad = Proxy::start(&redis.addr(), "upstream_password = \"wrong\"").await;
    let mut client = RawClient::connect(bad.addr).await;
    let (bytes, closed) = client.read_to_close().await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.starts_with(&format!(
            "-ERR cachefence: upstream {} refused the proxy's AUTH (WRONGPASS",
            redis.addr()
        )),
        "{text}"
    );
    assert!(closed);
    good.shutdown().await;
    bad.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn max_clients_turns_extra_clients_away_like_redis() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "max_clients = 2").await;
    let mut first = RawClient::connect(proxy.addr).await;
    let mut second = RawClient::connect(proxy.addr).await;
    assert_eq!(first.call("PING").await, "+PONG\r\n");
    assert_eq!(second.call("PING").await, "+PONG\r\n");
    let mut third = RawClient::connect(proxy.addr).await;
    let (bytes, closed) = third.read_to_close().await;
    assert_eq!(bytes, b"-ERR max number of clients reached\r\n");
    assert!(closed);
    assert_eq!(proxy.ctx.metrics.connections_rejected.get(), 1);
    // A slot frees up when a client leaves.
    drop(first);
    let addr = proxy.addr;
    eventually("a new client is admitted", async || {
        let mut c = RawClient::connect(addr).await;
        c.send(&cmds("PING")).await;
        c.read_frame_within(Duration::from_secs(1)).await.as_deref() == Some(b"+PONG\r\n")
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_frames_are_refused_and_nothing_is_executed() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "max_frame_size = \"1kb\"").await;

    // One bulk longer than the limit: Redis' own error text.
    let mut client = RawClient::connect(proxy.addr).await;
    client
        .send(b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$1025\r\n")
        .await;
    let (bytes, closed) = client.read_to_close().await;
    assert_eq!(bytes, b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n");
    assert!(closed);

    // Many small arguments adding up past the limit (plus header slack).
    let mut client = RawClient::connect(proxy.addr).await;
    let value = vec![b'x'; 1000];
    let mut args: Vec<&[u8]> = vec![b"RPUSH", b"list"];
    args.extend(std::iter::repeat_n(value.as_slice(), 100));
    let request = cmd(&args);
    client.send(&request[..request.len() - 10]).await;
    let (bytes, closed) = client.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        "-ERR Protocol error: request larger than max_frame_size (1024 bytes)\r\n"
    );
    assert!(closed);

    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("EXISTS big list").await, ":0\r\n");
    assert_eq!(proxy.ctx.metrics.protocol_errors.get(), 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_clients_are_closed_but_blocked_and_subscribed_ones_are_not() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "timeout = 1").await;
    let mut idle = RawClient::connect(proxy.addr).await;
    let mut blocked = RawClient::connect(proxy.addr).await;
    let mut subscriber = RawClient::connect(proxy.addr).await;
    assert_eq!(idle.call("PING").await, "+PONG\r\n");
    subscriber.send(&cmds("SUBSCRIBE ch")).await;
    assert_eq!(
        subscriber.read_frame().await,
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
    );
    let started = Instant::now();
    blocked.send(&cmds("BLPOP l 2.5")).await;

    let (bytes, closed) = idle.read_to_close().await;
    assert!(bytes.is_empty() && closed);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // The blocked client gets its timeout reply, not a closed connection.
    assert_eq!(blocked.read_frame().await, b"*-1\r\n");
    let mut publisher = RawClient::connect(redis.addr()).await;
    assert_eq!(publisher.call("PUBLISH ch hi").await, ":1\r\n");
    assert_eq!(
        subscriber.read_frame().await,
        b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
    );
    proxy.shutdown().await;
}

/// Names of the clients Redis currently has.
async fn client_names(redis: &RedisServer) -> String {
    let mut direct = RawClient::connect(redis.addr()).await;
    direct.call("CLIENT LIST").await
}

#[tokio::test(flavor = "multi_thread")]
async fn quit_and_disconnect_close_the_upstream_connection() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "").await;
    let mut quitter = RawClient::connect(proxy.addr).await;
    let mut leaver = RawClient::connect(proxy.addr).await;
    assert_eq!(quitter.call("CLIENT SETNAME quitter").await, "+OK\r\n");
    assert_eq!(leaver.call("CLIENT SETNAME leaver").await, "+OK\r\n");
    let names = client_names(&redis).await;
    assert!(
        names.contains("name=quitter") && names.contains("name=leaver"),
        "{names}"
    );

    quitter.send(&cmds("QUIT")).await;
    let (bytes, closed) = quitter.read_to_close().await;
    assert_eq!((bytes.as_slice(), closed), (&b"+OK\r\n"[..], true));
    drop(leaver);
    let redis = &redis;
    eventually("Redis has dropped both upstream connections", async || {
        let names = client_names(redis).await;
        !names.contains("name=quitter") && !names.contains("name=leaver")
    })
    .await;
    eventually("the proxy counts no open connection", async || {
        proxy.ctx.metrics.connections_current.get() == 0
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_pipelined_commands_in_one_write() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "").await;
    let mut client = RawClient::connect(proxy.addr).await;
    let pipeline = cmds("INCR counter").repeat(10_000);
    client.send(&pipeline).await;
    for i in 1..=10_000 {
        assert_eq!(client.read_frame().await, format!(":{i}\r\n").as_bytes());
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_mib_values_round_trip() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), "").await;
    let mut client = RawClient::connect(proxy.addr).await;
    let value: Vec<u8> = (0..64 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    client.send(&cmd(&[b"SET", b"big", &value])).await;
    assert_eq!(client.read_frame().await, b"+OK\r\n");
    client.send(&cmds("GET big")).await;
    let reply = client.read_frame().await;
    let header = format!("${}\r\n", value.len());
    assert!(reply.starts_with(header.as_bytes()));
    assert!(reply[header.len()..reply.len() - 2] == value[..], "value differs");
    assert_eq!(client.call("STRLEN big").await, format!(":{}\r\n", value.len()));
    proxy.shutdown().await;
}
