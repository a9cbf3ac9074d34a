//! A real replica behind the proxy (#15 item 1): `redis-server --replicaof
//! <proxy>` makes its handshake (PING, REPLCONF, PSYNC) through cachefence,
//! loads the RDB and follows the command stream, which the proxy relays as
//! raw bytes; what was written through the proxy, before and after the
//! replica attached, reads back from the replica exactly.

use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, cmd, crc64, eventually};

const FENCES_OFF: &str = "fences = false\n";

/// Bytes a line protocol would trip on, and a value read in many pieces.
fn values() -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (b"plain".to_vec(), b"v1".to_vec()),
        (b"binary".to_vec(), b"a\r\nb\0c$3\r\n\xff".to_vec()),
        (
            b"large".to_vec(),
            (0..1_500_000u32).map(|i| (i % 251) as u8).collect(),
        ),
    ]
}

/// The value of `key` as a bulk reply frame.
fn bulk(value: &[u8]) -> Vec<u8> {
    let mut frame = format!("${}\r\n", value.len()).into_bytes();
    frame.extend_from_slice(value);
    frame.extend_from_slice(b"\r\n");
    frame
}

async fn call(client: &mut RawClient, args: &[&[u8]]) -> Vec<u8> {
    client.send(&cmd(args)).await;
    client.read_frame().await
}

/// Writes through the proxy, attaches a replica to the proxy, writes again,
/// and reads every value back from the replica.
async fn replica_follows_writes_through_the_proxy(toml: &str, master_args: &[&str]) {
    let master = RedisServer::start_with(master_args);
    let proxy = Proxy::start(&master.addr(), toml).await;
    let mut client = RawClient::connect(proxy.addr).await;
    // In the RDB.
    for (key, value) in values() {
        assert_eq!(call(&mut client, &[b"SET", &key, &value]).await, b"+OK\r\n");
    }
    assert_eq!(
        call(&mut client, &[b"RPUSH", b"list", b"a", b"b"]).await,
        b":2\r\n"
    );

    let port = proxy.addr.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let mut on_replica = RawClient::connect(replica.addr()).await;
    eventually("the replica's link through the proxy is up", async || {
        let info =
            String::from_utf8_lossy(&call(&mut on_replica, &[b"INFO", b"replication"]).await).into_owned();
        info.contains("master_link_status:up")
    })
    .await;

    // In the command stream.
    for (key, value) in values() {
        let key = [b"after-".as_slice(), &key].concat();
        assert_eq!(call(&mut client, &[b"SET", &key, &value]).await, b"+OK\r\n");
    }
    assert_eq!(call(&mut client, &[b"DEL", b"plain"]).await, b":1\r\n");
    assert_eq!(call(&mut client, &[b"INCR", b"counter"]).await, b":1\r\n");
    client.send(&cmd(&[b"MULTI"])).await;
    client.send(&cmd(&[b"RPUSH", b"list", b"c"])).await;
    client.send(&cmd(&[b"SET", b"last", b"done"])).await;
    client.send(&cmd(&[b"EXEC"])).await;
    for _ in 0..4 {
        client.read_frame().await;
    }
    eventually("the replica has the last write", async || {
        call(&mut on_replica, &[b"GET", b"last"]).await == b"$4\r\ndone\r\n"
    })
    .await;

    for (key, value) in values() {
        let after = [b"after-".as_slice(), &key].concat();
        assert_eq!(call(&mut on_replica, &[b"GET", &after]).await, bulk(&value));
        let before = call(&mut on_replica, &[b"GET", &key]).await;
        match key.as_slice() {
            b"plain" => assert_eq!(before, b"$-1\r\n", "deleted through the proxy"),
            _ => assert_eq!(before, bulk(&value)),
        }
    }
    assert_eq!(call(&mut on_replica, &[b"GET", b"counter"]).await, b"$1\r\n1\r\n");
    assert_eq!(
        call(&mut on_replica, &[b"LRANGE", b"list", b"0", b"-1"]).await,
        b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
    );
    // The master counts it as its replica, acknowledging the stream.
    let info = String::from_utf8_lossy(&call(&mut client, &[b"INFO", b"replication"]).await).into_owned();
    assert!(info.contains("connected_slaves:1"), "{info}");
    assert!(info.contains("state=online"), "{info}");
    drop(on_replica);
    drop(replica);
    proxy.shutdown().await;
}

/// Fences on, diskless RDB (`$EOF:<mark>`, the default of Redis 7, without
/// its 5 s delay).
#[tokio::test(flavor = "multi_thread")]
async fn replica_behind_the_proxy_with_fences_on() {
    replica_follows_writes_through_the_proxy(FENCE_EVERY_KEY, &["--repl-diskless-sync-delay", "0"]).await;
}

/// Fences off, RDB from disk (`$<len>`).
#[tokio::test(flavor = "multi_thread")]
async fn replica_behind_the_proxy_with_fences_off() {
    replica_follows_writes_through_the_proxy(FENCES_OFF, &["--repl-diskless-sync", "no"]).await;
}

/// `redis-cli --replica` through the proxy prints the commands it sees.
#[tokio::test(flavor = "multi_thread")]
async fn redis_cli_replica_through_the_proxy() {
    let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let proxy = Proxy::start(&master.addr(), FENCES_OFF).await;
    let port = proxy.addr.port().to_string();
    let mut cli = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port, "--replica"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli runs");
    let mut out = cli.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let mut client = RawClient::connect(proxy.addr).await;
    // Writes until redis-cli shows one (it prints only after its sync).
    let found = tokio::time::timeout(testkit::WAIT, async {
        let mut chunk = vec![0u8; 4096];
        for i in 0..500u32 {
            let value = format!("v{i}");
            call(&mut client, &[b"SET", b"seen", value.as_bytes()]).await;
            if let Ok(Ok(n)) = tokio::time::timeout(
                std::time::Duration::from_millis(20),
                tokio::io::AsyncReadExt::read(&mut out, &mut chunk),
            )
            .await
            {
                seen.extend_from_slice(&chunk[..n]);
            }
            if String::from_utf8_lossy(&seen).contains("\"SET\",\"seen\",\"v") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        found,
        Ok(true),
        "redis-cli printed: {}",
        String::from_utf8_lossy(&seen)
    );
    let _ = cli.kill().await;
    proxy.shutdown().await;
}

/// The proto-tests' `rdb` step checks payloads with this CRC64: it must be
/// Redis' own (the check value in Redis' `src/crc64.c`).
#[test]
fn crc64_is_redis_own() {
    assert_eq!(crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca);
}
