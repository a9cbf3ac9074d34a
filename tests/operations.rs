//! Operating the proxy (issue #6): live reload (`CACHE.RELOAD`, `SIGHUP`),
//! the Prometheus endpoint and `CACHE.EXPLAIN`, against real servers.

use testkit::{ConfigFile, FENCE_EVERY_KEY, Proxy, ProxyProcess, RawClient, RedisServer, eventually};

/// A config with one `[[cache]]` section for `user:*`.
fn users(upstream: &str, on_write: &str, extra: &str) -> String {
    format!(
        "upstream = \"{upstream}\"\n{extra}\n[[cache]]\npattern = \"user:*\"\non_write = \"{on_write}\"\n"
    )
}

const REJECTED: &str = "-ERR cachefence: writes to 'user:1' are rejected (on_write = \"reject\"); \
                        read it (miss) and fill it, or use CACHE.INVALIDATE\r\n";

#[tokio::test]
async fn cache_reload_changes_on_write_for_a_connected_client_and_a_bad_file_changes_nothing() {
    let redis = RedisServer::start();
    let file = ConfigFile::new("reload", &users(&redis.addr(), "write", ""));
    let proxy = Proxy::start_file(file.path()).await;
    // One client, connected throughout.
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET user:1 a").await, "+OK\r\n");

    file.write(&users(&redis.addr(), "reject", ""));
    let reply = client.call("CACHE.RELOAD").await;
    let file_name = file.path_str();
    assert_eq!(
        reply,
        format!(
            "*6\r\n$4\r\nfile\r\n${}\r\n{file_name}\r\n$7\r\napplied\r\n*1\r\n$5\r\ncache\r\n\
             $16\r\nrestart_required\r\n*0\r\n",
            file_name.len()
        )
    );
    assert_eq!(client.call("SET user:1 b").await, REJECTED);
    assert_eq!(client.call("GET user:1").await, "$1\r\na\r\n");
    // Keys outside the patterns were never affected.
    assert_eq!(client.call("SET other x").await, "+OK\r\n");

    // A file with an error: rejected whole, the old rules stay.
    file.write(&format!("{}max_clinets = 3\n", users(&redis.addr(), "write", "")));
    let reply = client.call("CACHE.RELOAD").await;
    assert!(
        reply.starts_with(
            "-ERR cachefence: reload rejected, the running configuration is kept: invalid config file "
        ),
        "{reply}"
    );
    assert!(reply.contains("max_clinets") && reply.ends_with("\r\n") && reply.matches("\r\n").count() == 1);
    assert_eq!(client.call("SET user:1 c").await, REJECTED);
    // An invalid value is rejected too.
    file.write(&users(&redis.addr(), "sometimes", ""));
    let reply = client.call("CACHE.RELOAD").await;
    assert!(reply.contains("unknown variant `sometimes`"), "{reply}");
    assert_eq!(client.call("SET user:1 c").await, REJECTED);

    // A change of the runtime's threads needs a restart: reported, not
    // applied; the rest of the file is applied. (The listen address would
    // be too, but here `listen` is given as a flag, which wins.)
    file.write(&users(
        &redis.addr(),
        "write",
        "workers = 1\nlisten = \"127.0.0.1:1\"",
    ));
    let reply = client.call("CACHE.RELOAD").await;
    assert!(
        reply.ends_with(
            "$7\r\napplied\r\n*1\r\n$5\r\ncache\r\n$16\r\nrestart_required\r\n*1\r\n$7\r\nworkers\r\n"
        ),
        "{reply}"
    );
    assert_eq!(client.call("SET user:1 d").await, "+OK\r\n");
    let mut other = RawClient::connect(proxy.addr).await;
    assert_eq!(other.call("GET user:1").await, "$1\r\nd\r\n");
    let stats = &proxy.ctx.live.stats;
    assert_eq!((stats.reloads.get(), stats.failures.get()), (2, 2));
    proxy.shutdown().await;
}

#[tokio::test]
async fn reloaded_limits_apply_to_new_and_open_connections() {
    let redis = RedisServer::start();
    let file = ConfigFile::new("limits", &users(&redis.addr(), "write", ""));
    let proxy = Proxy::start_file(file.path()).await;
    let mut first = RawClient::connect(proxy.addr).await;
    assert_eq!(first.call("PING").await, "+PONG\r\n");

    file.write(&users(
        &redis.addr(),
        "write",
        "max_clients = 1\nmax_frame_size = \"1kb\"",
    ));
    let reply = first.call("CACHE.RELOAD").await;
    assert!(
        reply.contains("*2\r\n$11\r\nmax_clients\r\n$14\r\nmax_frame_size\r\n"),
        "{reply}"
    );
    // The open connection stays; a second one is turned away, as by Redis.
    let mut second = RawClient::connect(proxy.addr).await;
    assert_eq!(
        second.read_frame().await,
        b"-ERR max number of clients reached\r\n"
    );
    // The open connection has the new frame limit.
    let big = format!("SET k {}", "x".repeat(2000));
    assert_eq!(
        first.call(&big).await,
        "-ERR Protocol error: invalid bulk length\r\n"
    );
    drop(first);

    file.write(&users(&redis.addr(), "write", ""));
    let mut third = None;
    eventually("the first client's place is free", async || {
        let mut client = RawClient::connect(proxy.addr).await;
        let admitted = client.call("PING").await == "+PONG\r\n";
        admitted.then(|| third = Some(client)).is_some()
    })
    .await;
    let mut third = third.expect("admitted");
    assert_eq!(third.call("CACHE.RELOAD").await.matches("max_").count(), 2);
    let mut fourth = RawClient::connect(proxy.addr).await;
    assert_eq!(fourth.call(&big).await, "+OK\r\n");
    proxy.shutdown().await;
}

#[tokio::test]
async fn cache_reload_is_an_admin_command() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(
        "reload-auth",
        &users(&redis.addr(), "write", "admin_password = \"s3cret\""),
    );
    let proxy = Proxy::start_file(file.path()).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(
        client.call("CACHE.RELOAD").await,
        "-NOAUTH cachefence: CACHE.RELOAD needs CACHE.AUTH <admin password> first\r\n"
    );
    // A reload can change the password itself; the old one no longer works.
    file.write(&users(&redis.addr(), "write", "admin_password = \"n3w\""));
    assert_eq!(client.call("CACHE.AUTH s3cret").await, "+OK\r\n");
    assert!(
        client
            .call("CACHE.RELOAD")
            .await
            .contains("$14\r\nadmin_password\r\n")
    );
    let mut other = RawClient::connect(proxy.addr).await;
    assert_eq!(
        other.call("CACHE.AUTH s3cret").await,
        "-WRONGPASS cachefence: invalid admin password\r\n"
    );
    assert_eq!(other.call("CACHE.AUTH n3w").await, "+OK\r\n");
    proxy.shutdown().await;
}

/// A proxy started without a config file has nothing to reload.
#[tokio::test]
async fn cache_reload_without_a_config_file_says_so() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), FENCE_EVERY_KEY).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(
        client.call("CACHE.RELOAD").await,
        "-ERR cachefence: reload rejected, the running configuration is kept: \
         no config file to reload (cachefence was started without --config)\r\n"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_the_file_and_a_bad_file_is_logged_and_ignored() {
    let redis = RedisServer::start();
    let file = ConfigFile::new("sighup", &users(&redis.addr(), "write", "log_level = \"warn\""));
    let mut proxy = ProxyProcess::start(&["--config", file.path_str()]);
    let mut client = RawClient::connect(proxy.addr()).await;
    assert_eq!(client.call("SET user:1 a").await, "+OK\r\n");
    // At `warn`, the start's INFO line is not logged.
    assert!(!proxy.logs().contains("cachefence listening"), "{}", proxy.logs());

    // The new level applies to the reload's own INFO line.
    file.write(&users(&redis.addr(), "reject", "log_level = \"info\""));
    proxy.signal("-HUP");
    eventually("the reload rejects writes", async || {
        client
            .call("SET user:2 b")
            .await
            .starts_with("-ERR cachefence: writes to 'user:2' are rejected")
    })
    .await;
    eventually("the reload is logged", async || {
        proxy.logs().contains("configuration reloaded")
    })
    .await;

    file.write("upstream = [\n");
    proxy.signal("-HUP");
    eventually("the bad reload is logged", async || {
        proxy
            .logs()
            .contains("reload rejected; the running configuration is kept")
    })
    .await;
    proxy.assert_running();
    assert_eq!(client.call("SET user:1 c").await, REJECTED);
    assert_eq!(client.call("GET user:1").await, "$1\r\na\r\n");

    // Back to `warn`: the change applies, and its INFO line is not logged.
    file.write(&users(&redis.addr(), "write", "log_level = \"warn\""));
    proxy.signal("-HUP");
    eventually("writes are stored again", async || {
        client.call("SET user:3 d").await == "+OK\r\n"
    })
    .await;
    assert_eq!(proxy.logs().matches("configuration reloaded").count(), 1);
}

/// `GET <path>` over plain HTTP/1.1; the whole response.
async fn http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to /metrics");
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(testkit::WAIT, socket.read_to_string(&mut response))
        .await
        .expect("the endpoint answers in time")
        .expect("reading the response");
    response
}

/// One scrape: sample name (with labels) → value.
async fn scrape(addr: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    let response = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
    assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    let mut typed = std::collections::HashSet::new();
    let mut samples = std::collections::HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(family.to_string()), "family {family} twice");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (name, value) = line.rsplit_once(' ').expect("`name value`");
        let family = name.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| family.strip_suffix(s).filter(|b| typed.contains(*b)))
            .unwrap_or(family);
        assert!(typed.contains(base), "sample {name} without a TYPE line");
        assert!(base.starts_with("cachefence_"), "{name}");
        samples.insert(name.to_string(), value.parse().expect("a number"));
    }
    samples
}

#[tokio::test]
async fn the_metrics_endpoint_counts_what_the_proxy_does() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.addr(),
        "metrics_listen = \"127.0.0.1:0\"\n[[cache]]\npattern = \"user:*\"\non_write = \"write\"\n",
    )
    .await;
    let addr = proxy.ctx.metrics_addr.expect("the endpoint is on");
    let before = scrape(addr).await;
    let value = |s: &std::collections::HashMap<String, f64>, name: &str| -> f64 {
        *s.get(name).unwrap_or_else(|| panic!("no sample {name}"))
    };
    assert_eq!(
        value(&before, "cachefence_commands_total{class=\"passthrough\"}"),
        0.0
    );
    assert_eq!(value(&before, "cachefence_build_info{version=\"0.1.0\"}"), 1.0);

    let mut reader = RawClient::connect(proxy.addr).await;
    let mut writer = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("PING").await, "+PONG\r\n");
    // A miss and its fill, accepted.
    assert_eq!(reader.call("GET user:1").await, "$-1\r\n");
    assert_eq!(reader.call("SET user:1 v1").await, "+OK\r\n");
    // A miss, an invalidation by another client, and the fill refused.
    assert_eq!(reader.call("GET user:2").await, "$-1\r\n");
    assert_eq!(writer.call("DEL user:2 user:3").await, ":0\r\n");
    assert_eq!(reader.call("SET user:2 old").await, "+OK\r\n");
    assert_eq!(
        writer.call("CACHE.INVALIDATE user:1 user:4 user:5").await,
        ":1\r\n"
    );
    // Pipelined: three passthrough commands in one batch.
    writer.send(b"PING\r\nECHO a\r\nPING\r\n").await;
    assert_eq!(writer.read_frame().await, b"+PONG\r\n");
    assert_eq!(writer.read_frame().await, b"$1\r\na\r\n");
    assert_eq!(writer.read_frame().await, b"+PONG\r\n");

    let after = scrape(addr).await;
    let expect = [
        ("cachefence_connections_current", 2.0),
        ("cachefence_connections_total", 2.0),
        ("cachefence_commands_total{class=\"passthrough\"}", 4.0),
        ("cachefence_commands_total{class=\"intercepted\"}", 5.0),
        ("cachefence_commands_total{class=\"admin\"}", 1.0),
        (
            "cachefence_command_duration_seconds_count{class=\"passthrough\"}",
            4.0,
        ),
        (
            "cachefence_command_duration_seconds_count{class=\"intercepted\"}",
            5.0,
        ),
        ("cachefence_command_duration_seconds_count{class=\"admin\"}", 1.0),
        (
            "cachefence_command_duration_seconds_bucket{class=\"admin\",le=\"+Inf\"}",
            1.0,
        ),
        ("cachefence_misses_total", 2.0),
        ("cachefence_tickets_issued_total", 2.0),
        ("cachefence_fills_total{result=\"accepted\"}", 1.0),
        ("cachefence_fills_refused_total{reason=\"fence_moved\"}", 1.0),
        ("cachefence_fills_refused_total{reason=\"expired\"}", 0.0),
        ("cachefence_invalidated_keys_total{source=\"client\"}", 2.0),
        ("cachefence_invalidated_keys_total{source=\"admin\"}", 3.0),
        ("cachefence_invalidated_keys_total{source=\"changelog\"}", 0.0),
        ("cachefence_tickets_outstanding", 0.0),
        ("cachefence_upstream_connect_errors_total", 0.0),
        ("cachefence_config_reloads_total{result=\"applied\"}", 0.0),
    ];
    for (name, want) in expect {
        assert_eq!(value(&after, name), want, "{name}");
    }
    let sum = value(
        &after,
        "cachefence_command_duration_seconds_sum{class=\"intercepted\"}",
    );
    assert!(sum > 0.0 && sum < 5.0, "{sum}");

    // Anything but GET /metrics.
    let other = http(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
    let post = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{post}");
    let junk = http(addr, "\x16\x03\x01 nonsense\r\n\r\n").await;
    assert!(junk.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{junk}");
    proxy.shutdown().await;
}

/// The lines of `CACHE.EXPLAIN key`, each without its timestamp (checked).
async fn explain(client: &mut RawClient, key: &str) -> Vec<String> {
    let stamp = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z $").unwrap();
    let reply = client.call(&format!("CACHE.EXPLAIN {key}")).await;
    let mut lines = reply.split("\r\n");
    let count: usize = lines.next().unwrap().strip_prefix('*').unwrap().parse().unwrap();
    let mut events = Vec::new();
    for _ in 0..count {
        let _length = lines.next().unwrap();
        let line = lines.next().unwrap();
        assert!(stamp.is_match(&line[..25]), "{line}");
        events.push(line[25..].to_string());
    }
    events
}

#[tokio::test]
async fn cache_explain_tells_why_a_fill_was_refused() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.addr(),
        "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\n",
    )
    .await;
    let mut reader = RawClient::connect(proxy.addr).await;
    assert_eq!(reader.call("PING").await, "+PONG\r\n");
    let mut writer = RawClient::connect(proxy.addr).await;
    assert_eq!(writer.call("PING").await, "+PONG\r\n");
    assert_eq!(explain(&mut reader, "user:7").await, Vec::<String>::new());

    // The fence version now, as CACHE.FENCE reports it.
    let version = async |client: &mut RawClient| -> String {
        let fence = client.call("CACHE.FENCE user:7").await;
        let at = fence.find("$7\r\nversion\r\n$").expect("a version") + 13;
        fence[at..].split("\r\n").nth(1).unwrap().to_string()
    };
    // The read/write race (R1): the fill of the read made before the DEL is dropped.
    assert_eq!(reader.call("GET user:7").await, "$-1\r\n");
    let first = version(&mut writer).await;
    assert_eq!(writer.call("DEL user:7").await, ":0\r\n");
    assert_eq!(reader.call("SET user:7 old").await, "+OK\r\n");
    // The next read misses again and its fill is stored.
    assert_eq!(reader.call("GET user:7").await, "$-1\r\n");
    let second = version(&mut writer).await;
    assert_ne!(first, second);
    assert_eq!(reader.call("SET user:7 new").await, "+OK\r\n");
    assert_eq!(writer.call("CACHE.INVALIDATE user:7").await, ":1\r\n");
    assert_eq!(writer.call("SET user:7 direct").await, "+OK\r\n");
    // Keys outside the fenced patterns have no history.
    assert_eq!(writer.call("SET other 1").await, "+OK\r\n");

    assert_eq!(
        explain(&mut writer, "user:7").await,
        [
            &format!("conn 1 miss: ticket at fence version {first}"),
            "conn 2 invalidated by a client (DEL/UNLINK/GETDEL or on_write)",
            "conn 1 fill refused (fence_moved): an invalidation, a write or another fill came after the miss",
            &format!("conn 1 miss: ticket at fence version {second}"),
            "conn 1 fill stored: the fence had not moved since the miss",
            "conn 2 invalidated by CACHE.INVALIDATE",
            "conn 2 write stored without a ticket (on_write = write): the fence moved",
        ]
    );
    assert_eq!(explain(&mut writer, "other").await, Vec::<String>::new());
    assert_eq!(
        writer.call("CACHE.EXPLAIN").await,
        "-ERR wrong number of arguments for 'cache.explain' command\r\n"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_fences_the_endpoint_has_the_proxy_metrics_only() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.addr(),
        "fences = false\nmetrics_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let addr = proxy.ctx.metrics_addr.expect("the endpoint is on");
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET user:1 a").await, "+OK\r\n");
    // Without fences CACHE.* goes to Redis like any other command.
    assert!(
        client
            .call("CACHE.STATS")
            .await
            .starts_with("-ERR unknown command 'CACHE.STATS'")
    );
    let samples = scrape(addr).await;
    assert_eq!(samples["cachefence_commands_total{class=\"passthrough\"}"], 2.0);
    assert_eq!(samples["cachefence_commands_total{class=\"intercepted\"}"], 0.0);
    assert_eq!(samples["cachefence_connections_current"], 1.0);
    assert!(samples.contains_key("cachefence_uptime_seconds"));
    assert!(
        !samples
            .keys()
            .any(|k| k.starts_with("cachefence_misses") || k.contains("changelog"))
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn cache_explain_shows_second_deletes_and_retried_deletes() {
    let mut redis = RedisServer::start();
    let proxy = Proxy::start(
        &redis.addr(),
        "[[cache]]\npattern = \"user:*\"\non_write = \"write\"\ndouble_delete = \"100ms\"\n",
    )
    .await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("DEL user:8").await, ":0\r\n");
    eventually("the second delete is recorded", async || {
        explain(&mut client, "user:8").await.len() == 2
    })
    .await;
    assert_eq!(
        explain(&mut client, "user:8").await,
        [
            "conn 1 invalidated by a client (DEL/UNLINK/GETDEL or on_write)",
            "proxy invalidated again by double_delete",
        ]
    );
    // A delete sent while Redis is away is retried once it is back.
    redis.kill();
    let mut offline = RawClient::connect(proxy.addr).await;
    assert_eq!(
        offline.call("DEL user:9").await,
        format!(
            "-ERR cachefence: upstream {} unreachable (Connection refused (os error 111)); the delete will be retried\r\n",
            redis.addr()
        )
    );
    redis.restart();
    eventually("the retried delete is recorded", async || {
        let mut c = RawClient::connect(proxy.addr).await;
        explain(&mut c, "user:9").await
            == ["proxy invalidated by the retry of a client delete Redis could not take before"]
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_endpoint_reports_the_change_log() {
    let redis = RedisServer::start();
    let pg = testkit::pg::Schema::create("metrics").await;
    pg.exec("CREATE TABLE {s}.users (id int PRIMARY KEY, email text, name text NOT NULL)")
        .await;
    let toml = pg.toml(&[("users", &["user:{id}", "user:email:{email}"])]);
    pg.install(&toml).await;
    let proxy = Proxy::start(
        &redis.addr(),
        &format!("metrics_listen = \"127.0.0.1:0\"\n{toml}"),
    )
    .await;
    let addr = proxy.ctx.metrics_addr.expect("the endpoint is on");
    eventually("the consumer is connected", async || {
        scrape(addr).await["cachefence_changelog_connected"] == 1.0
    })
    .await;
    let before = scrape(addr).await;
    assert_eq!(before["cachefence_changelog_rows_total"], 0.0);
    assert_eq!(
        before["cachefence_invalidated_keys_total{source=\"changelog\"}"],
        0.0
    );

    // One row inserted (2 keys), then updated with a new email (3 keys).
    // One at a time: a batch of both would delete the 3 distinct keys once.
    let mut rows = 0.0;
    for (sql, keys) in [
        ("INSERT INTO {s}.users VALUES (1, 'a@x', 'Ann')", 2.0),
        ("UPDATE {s}.users SET email = 'b@x' WHERE id = 1", 5.0),
    ] {
        pg.exec(sql).await;
        rows += 1.0;
        eventually("the row is applied", async || {
            scrape(addr).await["cachefence_changelog_rows_total"] == rows
        })
        .await;
        assert_eq!(
            scrape(addr).await["cachefence_invalidated_keys_total{source=\"changelog\"}"],
            keys,
            "{sql}"
        );
    }
    let after = scrape(addr).await;
    assert_eq!(after["cachefence_invalidated_keys_total{source=\"client\"}"], 0.0);
    assert_eq!(after["cachefence_changelog_retries_total"], 0.0);
    assert_eq!(after["cachefence_changelog_lag_seconds"], 0.0);
    assert_eq!(pg.outbox_len().await, 0);
    proxy.shutdown().await;
}
