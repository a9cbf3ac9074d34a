//! Redis' own test units run through cachefence as an external server
//! (#15): each scenario that found a difference with fences on, replayed
//! against plain Redis and through the proxy, which must answer the same
//! bytes.

use testkit::{FENCE_EVERY_KEY, Proxy, RawClient, RedisServer, cmd};

/// The replies to `requests`, sent one at a time to `addr`.
async fn replies(addr: &str, requests: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut client = RawClient::connect(addr).await;
    let mut out = Vec::new();
    for request in requests {
        client.send(request).await;
        out.push(client.read_frame().await);
    }
    out
}

/// `protocol.tcl` "test large number of args" (MSET with 20 002
/// arguments) and a plain `DEL`/`UNLINK` of 20 000 keys: past Lua's unpack
/// limit, the fence script must still run them, as one command.
#[tokio::test(flavor = "multi_thread")]
async fn fenced_commands_of_any_size_redis_accepts() {
    let mut mset: Vec<Vec<u8>> = vec![b"MSET".to_vec()];
    for i in 0..10_001 {
        mset.push(format!("k{i}").into_bytes());
        mset.push(format!("v{i}").into_bytes());
    }
    let keys = |name: &str, n: usize| {
        let mut words = vec![name.as_bytes().to_vec()];
        words.extend((0..n).map(|i| format!("k{i}").into_bytes()));
        words
    };
    let frame = |words: &[Vec<u8>]| {
        let words: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
        cmd(&words)
    };
    let requests = [
        frame(&mset),
        cmd(&[b"MGET", b"k0", b"k7000", b"k10000", b"k10001"]),
        frame(&keys("DEL", 7_500)),
        frame(&keys("UNLINK", 20_000)),
        cmd(&[b"EXISTS", b"k0", b"k10000"]),
    ];
    let redis = RedisServer::start();
    let expected = replies(&redis.addr(), &requests).await;
    assert_eq!(expected[0], b"+OK\r\n");
    assert_eq!(
        expected[1],
        b"*4\r\n$2\r\nv0\r\n$5\r\nv7000\r\n$6\r\nv10000\r\n$-1\r\n"
    );
    assert_eq!(expected[2], b":7500\r\n");
    assert_eq!(expected[3], b":2501\r\n");
    assert_eq!(expected[4], b":0\r\n");
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let got = replies(&proxy.addr.to_string(), &requests).await;
    for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(expected),
            "request {i}"
        );
    }
    proxy.shutdown().await;
}

/// All bytes `addr` sends for an `EVAL` whose script returns a table that
/// contains itself, followed by `PING`: read until the `+PONG` (bounded).
async fn recursive_reply(addr: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let eval = cmd(&[b"EVAL", b"local a = {}; local b = {a}; a[1] = b; return a", b"0"]);
    stream.write_all(&[eval, cmd(&[b"PING"])].concat()).await.unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !out.ends_with(b"+PONG\r\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "no PONG within 10 s ({} bytes)",
            out.len()
        );
        let mut chunk = [0u8; 65536];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("a read within 10 s")
            .unwrap();
        assert!(n > 0, "connection closed after {} bytes", out.len());
        out.extend_from_slice(&chunk[..n]);
        assert!(out.len() < 1 << 20, "more than 1 MiB");
    }
    out
}

/// `scripting.tcl` "Script return recursive object": Redis answers an
/// array nested some 8000 deep ending in "reached lua stack limit"; the
/// proxy passed it as it is only up to 1024 levels and closed the
/// connection past them, in every mode.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_nested_thousands_deep_passes_as_it_is() {
    let redis = RedisServer::start();
    let expected = recursive_reply(&redis.addr()).await;
    assert!(expected.starts_with(b"*1\r\n*1\r\n*1\r\n"));
    assert!(expected.ends_with(b"-ERR reached lua stack limit\r\n+PONG\r\n"));
    assert!(expected.len() > 1024 * 4, "deeper than the old limit");
    for toml in [FENCE_EVERY_KEY, "fences = false"] {
        let proxy = Proxy::start(&redis.addr(), toml).await;
        let got = recursive_reply(&proxy.addr.to_string()).await;
        assert!(
            got == expected,
            "{toml}: {} bytes differ from Redis' {}",
            got.len(),
            expected.len()
        );
    }
}
