//! Real clients through the proxy: redis-cli (command mode, --pipe, -3),
//! the Rust `redis` crate (async, pipelines, pub/sub) and redis-benchmark.
//! Where a tool prints output, the same invocation against Redis directly is
//! the expected result.

use std::process::{Command, Stdio};

use futures_util::StreamExt;
use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, cmds};

fn tool(name: &str) -> Command {
    if Command::new(name).arg("--version").output().is_err() {
        panic!("`{name}` is not installed; the tests need redis-tools (`apt-get install -y redis-tools`)");
    }
    Command::new(name)
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = tool("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `HELLO`'s connection id: the proxy's clients share an upstream
/// connection, so Redis numbers its connections differently.
fn mask_id(output: &str) -> String {
    output
        .lines()
        .map(|line| match line.find("\"id\" => (integer) ") {
            Some(at) => format!("{}\"id\" => (integer) ID", &line[..at]),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cli_command_mode_matches_direct_redis() {
    let (direct, behind) = (RedisServer::start(), RedisServer::start());
    let proxy = Proxy::start(&behind.addr(), FENCE_EVERY_KEY).await;
    let script: &[&[&str]] = &[
        &["SET", "greeting", "hello world"],
        &["GET", "greeting"],
        &["RPUSH", "list", "a", "b", "c"],
        &["LRANGE", "list", "0", "-1"],
        &["HSET", "h", "f", "v"],
        &["HGETALL", "h"],
        &["INCRBYFLOAT", "n", "1.5"],
        &["GET", "nothing"],
        &["WRONGCOMMAND"],
        &["-3", "HGETALL", "h"],
        &["-3", "SMEMBERS", "list"],
        &["-3", "ZADD", "z", "1.5", "m"],
        &["-3", "ZSCORE", "z", "m"],
        &["-3", "GET", "nothing"],
        &["--no-raw", "-3", "HELLO", "3"],
    ];
    for args in script {
        let want = redis_cli(direct.port, args);
        let got = redis_cli(proxy.addr.port(), args);
        let want = mask_id(&want.replace(&direct.port.to_string(), "PORT"));
        let got = mask_id(&got.replace(&behind.port.to_string(), "PORT"));
        assert_eq!(got, want, "redis-cli {args:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cli_pipe_mass_insertion() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut input = Vec::new();
    for i in 0..20_000 {
        input.extend(cmds(&format!("SET key:{i} value:{i}")));
    }
    let mut child = tool("redis-cli")
        .args(["-p", &proxy.addr.port().to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("redis-cli --pipe");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("errors: 0, replies: 20000"), "{text}");
    // Every key is there (DBSIZE would also count the fences next to them).
    let mut direct = RawClient::connect(redis.addr()).await;
    let keys: Vec<String> = (0..20_000).map(|i| format!("key:{i}")).collect();
    assert_eq!(
        direct.call(&format!("EXISTS {}", keys.join(" "))).await,
        ":20000\r\n"
    );
    assert_eq!(direct.call("GET key:19999").await, "$11\r\nvalue:19999\r\n");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_crate_async_pipelines_and_pubsub_resp2() {
    redis_crate_session("").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_crate_async_pipelines_and_pubsub_resp3() {
    redis_crate_session("?protocol=resp3").await;
}

async fn redis_crate_session(options: &str) {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let url = format!("redis://{}/{options}", proxy.addr);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let v: String = redis::cmd("GET").arg("k").query_async(&mut conn).await.unwrap();
    assert_eq!(v, "v");

    let (a, b, n): (i64, i64, Option<String>) = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg("c")
        .cmd("INCRBY")
        .arg("c")
        .arg(41)
        .cmd("GET")
        .arg("absent")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((a, b, n), (1, 42, None));

    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.cmd("RPUSH").arg("l").arg(i);
    }
    let lens: Vec<i64> = pipe.query_async(&mut conn).await.unwrap();
    assert_eq!(lens.last(), Some(&1000));

    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("news").await.unwrap();
    pubsub.psubscribe("sport.*").await.unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg("news")
        .arg("hello")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    let _: i64 = redis::cmd("PUBLISH")
        .arg("sport.tennis")
        .arg("ace")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut messages = pubsub.on_message();
    let first = tokio::time::timeout(testkit::WAIT, messages.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.get_channel_name(), first.get_payload::<String>().unwrap()),
        ("news", "hello".into())
    );
    let second = tokio::time::timeout(testkit::WAIT, messages.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.get_pattern::<String>().unwrap(), "sport.*");
    assert_eq!(second.get_payload::<String>().unwrap(), "ace");
    drop(messages);
    drop(pubsub);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_benchmark_pipelined_runs_without_errors() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let port = proxy.addr.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        tool("redis-benchmark")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "get,set,lpush,incr",
                "-P",
                "16",
            ])
            .args(["-n", "20000", "-c", "20", "-r", "1000", "-q"])
            .output()
            .expect("running redis-benchmark")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let finished: Vec<&str> = stdout
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second") && !l.contains("rps="))
        .collect();
    assert_eq!(finished.len(), 4, "one result per test: {stdout}");
    assert!(
        !stdout.to_lowercase().contains("error") && !stderr.to_lowercase().contains("error"),
        "{stdout}\n{stderr}"
    );
    let mut direct = RawClient::connect(redis.addr()).await;
    let stats = direct.call("INFO commandstats").await;
    // The commands the fence script runs count too: each fenced write (the
    // 20000 SETs and 20000 INCRs) that went through it read its key's fence
    // with one GET; the others went plain after their pipeline's probe
    // (an MGET of its fences, which found none).
    let plain = proxy
        .ctx
        .fences
        .as_ref()
        .expect("fences on")
        .stats
        .probed_plain
        .get();
    assert!(plain > 0, "pipelined writes without fences go plain");
    let gets = format!("cmdstat_get:calls={}", 20000 + 40000 - plain);
    for command in [
        &gets,
        "cmdstat_set:calls=20000",
        "cmdstat_lpush:calls=20000",
        "cmdstat_incr:calls=20000",
    ] {
        assert!(stats.contains(command), "{command} missing in {stats}");
    }
    proxy.shutdown().await;
}
