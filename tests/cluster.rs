//! A Redis Cluster upstream (#19 items 1–4): three masters and three
//! replicas of the test's own, a plain (non-cluster) client through
//! cachefence.

use testkit::cluster::Cluster;
use testkit::{Proxy, RawClient, cmd};

/// Fences on the `cache:` keys only; the rest is passthrough.
const CACHE_KEYS: &str = "[[cache]]\npattern = \"cache:*\"\non_write = \"write\"\n";

async fn call(client: &mut RawClient, args: &[&str]) -> String {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    client.send(&cmd(&args)).await;
    String::from_utf8_lossy(&client.read_frame().await).into_owned()
}

fn bulk(value: &str) -> String {
    format!("${}\r\n{value}\r\n", value.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_reaches_every_master_through_one_endpoint() {
    let cluster = Cluster::start().await;
    let proxy = Proxy::start(&cluster.url(), CACHE_KEYS).await;
    let mut client = RawClient::connect(proxy.addr).await;

    // Keys land on all three masters, and read back.
    let keys: Vec<String> = (0..30).map(|i| format!("key:{i}")).collect();
    for key in &keys {
        assert_eq!(
            call(&mut client, &["SET", key, &format!("v-{key}")]).await,
            "+OK\r\n"
        );
    }
    for key in &keys {
        assert_eq!(call(&mut client, &["GET", key]).await, bulk(&format!("v-{key}")));
        let mut owner = cluster.master_of(key).await;
        assert_eq!(call(&mut owner, &["GET", key]).await, bulk(&format!("v-{key}")));
    }
    for master in cluster.masters().await {
        let size = RawClient::connect(master.addr()).await.call("DBSIZE").await;
        assert_ne!(size, ":0\r\n", "every master holds some of the keys");
    }

    // Split and merged in order.
    let mut mget = vec!["MGET", "key:0", "nope", "key:1", "key:2"];
    let expected = format!(
        "*4\r\n{}$-1\r\n{}{}",
        bulk("v-key:0"),
        bulk("v-key:1"),
        bulk("v-key:2")
    );
    assert_eq!(call(&mut client, &mget).await, expected);
    mget.truncate(1);
    assert_eq!(
        call(&mut client, &["EXISTS", "key:0", "key:1", "nope", "key:0"]).await,
        ":3\r\n"
    );
    assert_eq!(call(&mut client, &["DBSIZE"]).await, ":30\r\n");
    assert_eq!(
        call(&mut client, &["MSET", "m:a", "1", "m:b", "2", "m:c", "3"]).await,
        "+OK\r\n"
    );
    assert_eq!(
        call(&mut client, &["MGET", "m:a", "m:b", "m:c"]).await,
        format!("*3\r\n{}{}{}", bulk("1"), bulk("2"), bulk("3"))
    );
    assert_eq!(
        call(&mut client, &["DEL", "m:a", "m:b", "m:c", "nope"]).await,
        ":3\r\n"
    );
    let keys_reply = call(&mut client, &["KEYS", "key:*"]).await;
    assert!(keys_reply.starts_with("*30\r\n"), "{keys_reply}");

    // SCAN walks every master.
    let mut cursor = "0".to_string();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..1000 {
        let reply = call(&mut client, &["SCAN", &cursor, "COUNT", "7"]).await;
        let lines: Vec<&str> = reply.split("\r\n").collect();
        cursor = lines[2].to_string();
        seen.extend(
            lines
                .iter()
                .filter(|l| l.starts_with("key:"))
                .map(|l| l.to_string()),
        );
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(cursor, "0", "SCAN ends");
    assert_eq!(seen.len(), 30);

    // Cross-slot where Redis Cluster refuses; SELECT as in cluster mode.
    assert_eq!(
        call(&mut client, &["RENAME", "key:0", "key:1"]).await,
        "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(
        call(&mut client, &["SELECT", "1"]).await,
        "-ERR SELECT is not allowed in cluster mode\r\n"
    );
    assert_eq!(call(&mut client, &["SELECT", "0"]).await, "+OK\r\n");

    // A transaction on one slot.
    client.send(&testkit::cmds("MULTI")).await;
    client.send(&testkit::cmds("INCR {u1}:n")).await;
    client.send(&testkit::cmds("INCR {u1}:m")).await;
    client.send(&testkit::cmds("EXEC")).await;
    let mut replies = String::new();
    for _ in 0..4 {
        replies.push_str(&String::from_utf8_lossy(&client.read_frame().await));
    }
    assert_eq!(replies, "+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:1\r\n:1\r\n");

    // A blocking command waits on its key's master.
    let mut blocked = RawClient::connect(proxy.addr).await;
    blocked.send(&testkit::cmds("BLPOP queue 5")).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(call(&mut client, &["LPUSH", "queue", "job"]).await, ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&blocked.read_frame().await),
        format!("*2\r\n{}{}", bulk("queue"), bulk("job"))
    );

    // Pub/sub.
    let mut subscriber = RawClient::connect(proxy.addr).await;
    assert_eq!(
        subscriber.call("SUBSCRIBE news").await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(call(&mut client, &["PUBLISH", "news", "hello"]).await, ":1\r\n");
    assert_eq!(
        String::from_utf8_lossy(&subscriber.read_frame().await),
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );

    // A cluster-aware client is told the proxy is the whole cluster.
    let slots = client.call("CLUSTER SLOTS").await;
    let me = format!(
        "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n{}:{}\r\n",
        bulk("127.0.0.1"),
        proxy.addr.port()
    );
    assert!(slots.starts_with(&me), "{slots}");
}

/// A proxy refuses fills of tickets from its first second (it cannot know
/// whether a master failed over before it started): tests that fill wait.
async fn past_the_start_bound() {
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
}

/// Every key fenced, writes stored.
const FENCED: &str = "[[cache]]\npattern = \"*\"\non_write = \"write\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_commands_across_slots_are_split_by_slot() {
    let cluster = Cluster::start().await;
    let proxy = Proxy::start(&cluster.url(), FENCED).await;
    past_the_start_bound().await;
    let mut client = RawClient::connect(proxy.addr).await;

    // A pipeline of fenced writes to keys of every master: one batch call
    // for the proxy, one per slot for the cluster.
    let keys: Vec<String> = (0..16).map(|i| format!("user:{i}")).collect();
    let mut pipeline = Vec::new();
    for key in &keys {
        pipeline.extend(cmd(&[b"SET", key.as_bytes(), format!("v{key}").as_bytes()]));
    }
    client.send(&pipeline).await;
    for _ in &keys {
        assert_eq!(client.read_frame().await, b"+OK\r\n");
    }
    for key in &keys {
        let mut owner = cluster.master_of(key).await;
        assert_eq!(call(&mut owner, &["GET", key]).await, bulk(&format!("v{key}")));
    }

    // Misses, then fills on the same connection.
    for key in ["page:1", "page:2", "page:3"] {
        assert_eq!(call(&mut client, &["GET", key]).await, "$-1\r\n");
        assert_eq!(
            call(&mut client, &["SET", key, "filled", "EX", "60"]).await,
            "+OK\r\n"
        );
        assert_eq!(call(&mut client, &["GET", key]).await, bulk("filled"));
    }

    // Pipelined misses, then pipelined fills: each run is one batch call
    // (the fences exist, so no plain write), split by slot.
    let pages: Vec<String> = (0..12).map(|i| format!("doc:{i}")).collect();
    let mut gets = Vec::new();
    let mut sets = Vec::new();
    for page in &pages {
        gets.extend(cmd(&[b"GET", page.as_bytes()]));
        sets.extend(cmd(&[b"SET", page.as_bytes(), b"body", b"EX", b"60"]));
    }
    client.send(&gets).await;
    for _ in &pages {
        assert_eq!(client.read_frame().await, b"$-1\r\n");
    }
    client.send(&sets).await;
    for _ in &pages {
        assert_eq!(client.read_frame().await, b"+OK\r\n");
    }
    for page in &pages {
        let mut owner = cluster.master_of(page).await;
        assert_eq!(call(&mut owner, &["GET", page]).await, bulk("body"));
        let ttl = call(&mut owner, &["TTL", page]).await;
        assert!(ttl == ":60\r\n" || ttl == ":59\r\n", "{ttl}");
    }

    // An invalidation of keys in several slots, fences moved on each.
    assert_eq!(
        call(&mut client, &["DEL", "user:0", "user:1", "user:2", "nope"]).await,
        ":3\r\n"
    );
    assert_eq!(
        call(&mut client, &["MGET", "user:0", "user:1", "user:3"]).await,
        format!("*3\r\n$-1\r\n$-1\r\n{}", bulk("vuser:3"))
    );
    assert_eq!(
        call(&mut client, &["MSET", "user:0", "a", "user:1", "b"]).await,
        "+OK\r\n"
    );
    assert_eq!(
        call(&mut client, &["MGET", "user:0", "user:1"]).await,
        format!("*2\r\n{}{}", bulk("a"), bulk("b"))
    );
}

/// R1 on a cluster: the reader misses and reads X=1; the writer writes
/// X=2 and deletes; the reader fills X=1. Straight to the key's master
/// (the control) the stale value stays; through cachefence it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r1_on_a_cluster_fill_is_refused() {
    let cluster = Cluster::start().await;
    for through_proxy in [false, true] {
        let proxy = match through_proxy {
            true => {
                let proxy = Proxy::start(&cluster.url(), FENCED).await;
                past_the_start_bound().await;
                Some(proxy)
            }
            false => None,
        };
        let key = format!("user:x:{through_proxy}");
        let (mut reader, mut writer) = match &proxy {
            Some(proxy) => (
                RawClient::connect(proxy.addr).await,
                RawClient::connect(proxy.addr).await,
            ),
            None => (cluster.master_of(&key).await, cluster.master_of(&key).await),
        };
        let db = testkit::Database::new("1");
        assert_eq!(call(&mut reader, &["GET", &key]).await, "$-1\r\n");
        let read = db.primary("x");
        db.write("x", "2");
        assert_eq!(call(&mut writer, &["DEL", &key]).await, ":0\r\n");
        assert_eq!(
            call(&mut reader, &["SET", &key, &read, "EX", "60"]).await,
            "+OK\r\n"
        );
        let cached = call(&mut cluster.master_of(&key).await, &["GET", &key]).await;
        match through_proxy {
            false => assert_eq!(cached, bulk("1"), "control: the stale value stays"),
            true => assert_eq!(cached, "$-1\r\n", "through cachefence the stale fill is refused"),
        }
    }
}

/// Fenced writes of many clients that do not pipeline: merged into batch
/// calls on the shared connection, split by slot for the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_fenced_writes_are_merged_then_split_by_slot() {
    let cluster = Cluster::start().await;
    let proxy = Proxy::start(&cluster.url(), FENCED).await;
    let mut tasks = Vec::new();
    for c in 0..20 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = RawClient::connect(addr).await;
            for i in 0..50 {
                let key = format!("c{c}:k{i}");
                assert_eq!(
                    call(&mut client, &["SET", &key, &format!("{c}-{i}")]).await,
                    "+OK\r\n"
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(call(&mut client, &["DBSIZE"]).await, ":1000\r\n");
    for c in [0, 7, 19] {
        for i in [0, 25, 49] {
            let key = format!("c{c}:k{i}");
            let mut owner = cluster.master_of(&key).await;
            assert_eq!(call(&mut owner, &["GET", &key]).await, bulk(&format!("{c}-{i}")));
        }
    }
}
