//! Failures and limits: unreachable, killed and paused upstreams; client
//! limits, oversized frames, idle timeout; connection lifetimes.

use std::time::{Duration, Instant};

use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, cmd, cmds, eventually, free_port};

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_answers_errors_then_serves_the_same_client() {
    let port = free_port();
    let upstream = format!("127.0.0.1:{port}");
    let proxy = Proxy::start(
        &upstream,
        &format!("connect_timeout = \"500ms\"\n{FENCE_EVERY_KEY}"),
    )
    .await;

    let mut client = RawClient::connect(proxy.addr).await;
    let refused =
        format!("-ERR cachefence: upstream {upstream} unreachable (Connection refused (os error 111))");
    assert_eq!(client.call("PING").await, format!("{refused}\r\n"));
    // A delete of a fenced key is answered with an error and queued (C3).
    assert_eq!(
        client.call("DEL k").await,
        format!("{refused}; the delete will be retried\r\n")
    );
    // Tried at the connection, then again before each request.
    assert_eq!(proxy.ctx.metrics.upstream_connect_errors.get(), 3);
    let undelivered = &proxy.ctx.fences.as_ref().unwrap().undelivered;
    assert_eq!(undelivered.len(), 1);

    // Redis appears on that port: the same connection is served, and the
    // queued delete reaches it.
    let redis = RedisServer::start_on(port);
    assert_eq!(client.call("PING").await, "+PONG\r\n");
    eventually("the queued delete is delivered", async || undelivered.is_empty()).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("EXISTS cachefence:{k}").await, ":1\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_killed_mid_connection_answers_every_pending_request() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
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
    // One connection per client: a new client needs a handshake of its own
    // (on a shared connection it would queue behind the others instead).
    let proxy = Proxy::start(
        &upstream,
        &format!("shared_connections = 0\nconnect_timeout = \"300ms\"\n{FENCE_EVERY_KEY}"),
    )
    .await;

    let mut before = RawClient::connect(proxy.addr).await;
    assert_eq!(before.call("SET k 1").await, "+OK\r\n");
    redis.pause();
    // A new client cannot be authenticated upstream in time.
    let started = Instant::now();
    let mut late = RawClient::connect(proxy.addr).await;
    assert_eq!(
        late.call("PING").await,
        format!(
            "-ERR cachefence: upstream {} unreachable (no answer within 300ms)\r\n",
            redis.addr()
        )
    );
    assert!(started.elapsed() < Duration::from_secs(3));
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
    let good = Proxy::start(&format!("redis://:s3cret@{}/2", redis.addr()), FENCE_EVERY_KEY).await;
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
    // Each client's own upstream connection (tests/shared.rs: QUIT on a
    // shared one).
    let proxy = Proxy::start(
        &redis.addr(),
        &format!("shared_connections = 0\n{FENCE_EVERY_KEY}"),
    )
    .await;
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
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
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
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
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

/// C3 against plain Redis: a delete that cannot be delivered is simply lost,
/// and the value it was meant to remove outlives the outage.
#[tokio::test(flavor = "multi_thread")]
async fn control_a_delete_that_cannot_be_delivered_is_lost_with_plain_redis() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let mut client = RawClient::connect(redis.addr()).await;
    assert_eq!(client.call("SET k old").await, "+OK\r\n");
    redis.kill();
    // The writer's DEL fails: nothing reaches Redis.
    assert!(tokio::net::TcpStream::connect(redis.addr()).await.is_err());
    redis.restart();
    let mut client = RawClient::connect(redis.addr()).await;
    assert_eq!(client.call("GET k").await, "$3\r\nold\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delete_that_cannot_be_delivered_is_retried_and_its_key_reads_as_a_miss() {
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let proxy = Proxy::start(
        &redis.addr(),
        &format!("connect_timeout = \"300ms\"\n{FENCE_EVERY_KEY}"),
    )
    .await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET k old").await, "+OK\r\n");
    redis.kill();
    // Its connection is seen gone (a shared one too): a client that comes
    // now finds Redis unreachable.
    let gone = client.call("PING").await;
    assert!(gone.starts_with("-ERR cachefence: upstream"), "{gone}");
    let mut writer = RawClient::connect(proxy.addr).await;
    let reply = writer.call("DEL k").await;
    assert!(reply.ends_with("; the delete will be retried\r\n"), "{reply}");
    // While it is pending: reads miss, fills are refused.
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    let mget = reader.call("MGET k").await;
    assert!(mget.starts_with("-ERR cachefence: upstream"), "{mget}");
    redis.restart();
    let mut reader = RawClient::connect(proxy.addr).await;
    let fences = proxy.ctx.fences.as_ref().unwrap();
    assert_eq!(reader.call("CACHE.FILL k cf1.1.1 stale").await, "+STALE\r\n");
    eventually("the delete reaches Redis", async || fences.undelivered.is_empty()).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("GET k").await, "$-1\r\n");
    assert_eq!(direct.call("EXISTS cachefence:{k}").await, ":1\r\n");
    assert_eq!(fences.undelivered.stats.delivered.get(), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_upstream_times_out_its_replies_and_deletes_are_retried() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.addr(),
        &format!("reply_timeout = \"300ms\"\n{FENCE_EVERY_KEY}"),
    )
    .await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET k old").await, "+OK\r\n");
    // A blocking command may wait longer than reply_timeout.
    let mut blocked = RawClient::connect(proxy.addr).await;
    blocked.send(&cmds("BLPOP list 0")).await;
    assert_eq!(blocked.read_quiet(Duration::from_millis(500)).await, b"");
    redis.pause();
    let started = Instant::now();
    client.send(&[cmds("GET k"), cmds("DEL k")].concat()).await;
    let (bytes, closed) = client.read_to_close().await;
    let error = format!(
        "-ERR cachefence: upstream {} did not reply within 300ms\r\n",
        redis.addr()
    );
    assert_eq!(String::from_utf8_lossy(&bytes), error.repeat(2));
    assert!(closed && started.elapsed() < Duration::from_secs(3));
    assert_eq!(proxy.ctx.metrics.upstream_timeouts.get(), 1);
    let fences = proxy.ctx.fences.as_ref().unwrap();
    assert_eq!(fences.undelivered.len(), 1);
    // The key reads as a miss through the proxy while Redis is stopped.
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("GET k").await, "$-1\r\n");
    redis.resume();
    eventually("the delete reaches Redis", async || fences.undelivered.is_empty()).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("GET k").await, "$-1\r\n");
    assert_eq!(direct.call("LPUSH list x").await, ":1\r\n");
    assert_eq!(blocked.read_frame().await, b"*2\r\n$4\r\nlist\r\n$1\r\nx\r\n");
    // No session is left behind.
    drop((reader, blocked));
    eventually("every session ended", async || {
        proxy.ctx.metrics.connections_current.get() == 0
    })
    .await;
    proxy.shutdown().await;
}

/// A Redis that accepts connections but is still loading its data answers
/// `-LOADING` to everything: a fenced delete it refused is retried (C3) —
/// here by a fake upstream that stays in that state.
#[tokio::test(flavor = "multi_thread")]
async fn a_delete_refused_with_loading_is_retried() {
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = fake.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = fake.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {
                    let reply = b"-LOADING Redis is loading the dataset in memory\r\n";
                    if socket.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(&upstream, FENCE_EVERY_KEY).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(
        client.call("DEL k").await,
        "-LOADING Redis is loading the dataset in memory\r\n"
    );
    let undelivered = &proxy.ctx.fences.as_ref().unwrap().undelivered;
    assert!(undelivered.is_pending(0, b"k"));
    assert_eq!(client.call("GET k").await, "$-1\r\n");
    eventually("the retry worker tried again", async || {
        undelivered.stats.retries.get() >= 1
    })
    .await;
    assert!(undelivered.is_pending(0, b"k"));
    proxy.shutdown().await;
}

/// A TCP relay in front of `upstream` that holds every chunk Redis sends
/// for `delay` before passing it on (a slow network or a slow server).
async fn slow_relay(upstream: String, delay: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
                let _ = server_wr.shutdown().await;
            });
            tokio::spawn(async move {
                let mut chunk = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = server_rd.read(&mut chunk).await {
                    tokio::time::sleep(delay).await;
                    if client_wr.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
                let _ = client_wr.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_upstream_still_refuses_stale_fills_and_tickets_past_lease_ttl() {
    let redis = RedisServer::start();
    let relay = slow_relay(redis.addr(), Duration::from_millis(50)).await;
    let proxy = Proxy::start(
        &relay,
        "[[cache]]\npattern = \"*\"\non_write = \"write\"\nlease_ttl = \"300ms\"\nhold = \"0s\"\n",
    )
    .await;
    let mut direct = RawClient::connect(redis.addr()).await;
    // R1 through the slow link: plain Redis (the control) keeps the stale
    // value; through cachefence the fill is refused.
    for (key, addr, expected) in [
        ("plain", relay.clone(), "$5\r\nstale\r\n"),
        ("fenced", proxy.addr.to_string(), "$-1\r\n"),
    ] {
        let (mut reader, mut writer) = (RawClient::connect(&addr).await, RawClient::connect(&addr).await);
        assert_eq!(reader.call(&format!("GET {key}")).await, "$-1\r\n");
        assert_eq!(writer.call(&format!("DEL {key}")).await, ":0\r\n");
        assert_eq!(reader.call(&format!("SET {key} stale")).await, "+OK\r\n");
        assert_eq!(direct.call(&format!("GET {key}")).await, expected, "{key}");
    }
    let fences = proxy.ctx.fences.as_ref().unwrap();
    assert_eq!(fences.stats.refused_fence_moved.get(), 1);
    // A ticket older than lease_ttl is refused even though nothing moved the
    // fence (the slow link adds its 50 ms per round trip on top).
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("GET late").await, "$-1\r\n");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reader.call("SET late v").await, "+OK\r\n");
    assert_eq!(direct.call("GET late").await, "$-1\r\n");
    assert_eq!(fences.stats.refused_expired.get(), 1);
    // A fill within lease_ttl over the same slow link is stored.
    assert_eq!(reader.call("GET quick").await, "$-1\r\n");
    assert_eq!(reader.call("SET quick v").await, "+OK\r\n");
    assert_eq!(direct.call("GET quick").await, "$1\r\nv\r\n");
    assert_eq!(fences.tickets_outstanding(), 0);
    proxy.shutdown().await;
}

/// While a delete waits for its retry, MGET answers nil for that key and
/// the other values as Redis sent them. (Redis here cannot run the fence
/// script, so the retry keeps failing and the key stays queued.)
#[tokio::test(flavor = "multi_thread")]
async fn mget_reads_a_key_whose_delete_waits_as_nil() {
    let redis = RedisServer::start_with(&["--rename-command", "EVAL", "", "--rename-command", "EVALSHA", ""]);
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    assert_eq!(direct.call("MSET a 1 b 2").await, "+OK\r\n");
    let undelivered = &proxy.ctx.fences.as_ref().unwrap().undelivered;
    undelivered.push(0, &[bytes::Bytes::from_static(b"b")]);
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("MGET a b c").await, "*3\r\n$1\r\n1\r\n$-1\r\n$-1\r\n");
    assert_eq!(client.call("GET b").await, "$-1\r\n");
    assert_eq!(client.call("GET a").await, "$1\r\n1\r\n");
    assert!(undelivered.is_pending(0, b"b"));
    assert_eq!(direct.call("GET b").await, "$1\r\n2\r\n");
    proxy.shutdown().await;
}
