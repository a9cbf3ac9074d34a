//! The PostgreSQL change log (issue #5): `pg install`, the consumer, and the
//! races it closes (R2, R5, R6), each shown against plain Redis first.
//!
//! Every test uses a PostgreSQL schema of its own (created and dropped) and
//! private `redis-server`s.

use std::time::Duration;

use testkit::pg::Schema;
use testkit::{ConfigFile, Proxy, ProxyProcess, RawClient, RedisServer, eventually};

const USERS: &[&str] = &["user:{id}", "user:email:{email}"];

fn consumed(proxy: &Proxy) -> u64 {
    proxy
        .ctx
        .changelog
        .as_ref()
        .expect("a change log")
        .rows_consumed
        .get()
}

async fn users(test: &str) -> (Schema, String) {
    let pg = Schema::create(test).await;
    pg.exec("CREATE TABLE {s}.users (id int PRIMARY KEY, email text, name text NOT NULL)")
        .await;
    // The mapped keys are a cache: fenced, as a user declares them.
    let toml = format!(
        "{}[[cache]]\npattern = \"user:*\"\non_write = \"write\"\n",
        pg.toml(&[("users", USERS)])
    );
    pg.install(&toml).await;
    (pg, toml)
}

#[tokio::test(flavor = "multi_thread")]
async fn row_changes_invalidate_exactly_the_keys_of_the_old_and_new_rows() {
    let redis = RedisServer::start();
    let (pg, toml) = users("keys").await;
    let proxy = Proxy::start(&redis.addr(), &toml).await;
    let mut redis_client = RawClient::connect(redis.addr()).await;
    let candidates = [
        "user:1",
        "user:2",
        "user:3",
        "user:email:a@x",
        "user:email:b@x",
        "other",
    ];
    let mut rows = 0;
    // Sets every candidate key, runs `sql` (one row change), waits for the
    // change-log row to be applied, and returns the keys that were deleted.
    let mut step = async |sql: &str| -> Vec<&str> {
        for key in candidates {
            assert_eq!(redis_client.call(&format!("SET {key} cached")).await, "+OK\r\n");
        }
        pg.exec(sql).await;
        rows += 1;
        eventually("the change-log row is applied", async || consumed(&proxy) == rows).await;
        let mut gone = Vec::new();
        for key in candidates {
            if redis_client.call(&format!("EXISTS {key}")).await == ":0\r\n" {
                gone.push(key);
            }
        }
        gone
    };
    assert_eq!(
        step("INSERT INTO {s}.users VALUES (1, 'a@x', 'Ann')").await,
        ["user:1", "user:email:a@x"]
    );
    assert_eq!(
        step("UPDATE {s}.users SET email = 'b@x' WHERE id = 1").await,
        ["user:1", "user:email:a@x", "user:email:b@x"]
    );
    // The key column itself changes: both the old and the new key go.
    assert_eq!(
        step("UPDATE {s}.users SET id = 2 WHERE id = 1").await,
        ["user:1", "user:2", "user:email:b@x"]
    );
    assert_eq!(
        step("DELETE FROM {s}.users WHERE id = 2").await,
        ["user:2", "user:email:b@x"]
    );
    // A NULL column renders no key (nothing could be cached under it).
    assert_eq!(
        step("INSERT INTO {s}.users VALUES (3, NULL, 'Cy')").await,
        ["user:3"]
    );
    // A transaction that rolls back leaves nothing in the outbox.
    pg.exec("BEGIN; UPDATE {s}.users SET name = 'x'; ROLLBACK").await;
    assert_eq!(pg.outbox_len().await, 0);
    assert_eq!(consumed(&proxy), 5);
    let stats = proxy.ctx.changelog.as_ref().unwrap();
    assert_eq!(stats.keys_invalidated.get(), 2 + 3 + 3 + 2 + 1);
    // The same figures for operators, with the outbox lag and retries.
    let mut admin = RawClient::connect(proxy.addr).await;
    let text = admin.call("CACHE.STATS").await;
    for field in [
        "$19\r\nchangelog_connected\r\n:1\r\n",
        "$23\r\nchangelog_rows_consumed\r\n:5\r\n",
        "$26\r\nchangelog_keys_invalidated\r\n:11\r\n",
        "$17\r\nchangelog_retries\r\n:0\r\n",
        "$16\r\nchangelog_lag_ms\r\n:0\r\n",
    ] {
        assert!(text.contains(field), "{field:?} not in {text}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn install_is_idempotent_and_names_a_missing_column() {
    let (pg, toml) = users("install").await;
    pg.install(&toml).await; // twice: same objects, no error
    assert_eq!(
        pg.count(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = '{s}.users'::regclass AND NOT tgisinternal"
        )
        .await,
        1
    );
    let bad = pg.toml(&[("users", &["user:{id}", "user:email:{emial}"])]);
    let settings = cachefence::config::parse_settings(&bad).unwrap();
    let config = cachefence::config::Config::resolve(settings, None).unwrap();
    let error = cachefence::changelog::install::run(
        config.changelog.as_ref().unwrap(),
        cachefence::changelog::install::Action::Install,
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "[[postgres.table]] #1: table {}.users has no column `emial` (key template `user:email:{{emial}}`); its columns: id, email, name",
            pg.name
        )
    );
}

/// A cache-aside read: the cached value, or the row read from PostgreSQL
/// and stored (on the same connection, so through cachefence it is a fill).
async fn read_through(cache: &mut RawClient, pg: &Schema, id: i32) -> String {
    let key = format!("user:{id}");
    let reply = cache.call(&format!("GET {key}")).await;
    if reply != "$-1\r\n"
        && let Some(value) = reply.strip_prefix('$').and_then(|r| r.split("\r\n").nth(1))
    {
        return value.to_string();
    }
    let name = load(pg, id).await;
    cache.call(&format!("SET {key} {name}")).await;
    name
}

async fn load(pg: &Schema, id: i32) -> String {
    let sql = format!("SELECT name FROM {}.users WHERE id = {id}", pg.name);
    pg.client.query_one(&sql, &[]).await.unwrap().get(0)
}

/// Waits for the outbox to be consumed through cachefence; against plain
/// Redis nothing consumes it, so it waits as long as cachefence could take.
async fn settle(pg: &Schema, through_proxy: bool) {
    match through_proxy {
        true => eventually("the outbox is consumed", async || pg.outbox_len().await == 0).await,
        false => tokio::time::sleep(Duration::from_millis(500)).await,
    }
}

/// One race against plain Redis (`None`) or through cachefence; returns
/// what a reader sees afterwards and what the database holds.
async fn race(name: &str, through_proxy: bool) -> (String, String) {
    let redis = RedisServer::start();
    let (pg, toml) = users(name).await;
    pg.exec("INSERT INTO {s}.users VALUES (1, 'a@x', 'old')").await;
    let proxy = match through_proxy {
        true => Some(Proxy::start(&redis.addr(), &toml).await),
        false => None,
    };
    let addr = proxy.as_ref().map_or(redis.addr(), |p| p.addr.to_string());
    settle(&pg, through_proxy).await;
    let mut reader = RawClient::connect(&addr).await;
    let mut writer = RawClient::connect(&addr).await;
    match name {
        // R2, delete before write: the writer deletes, a reader misses and
        // reads the old row, the writer commits, the reader fills.
        "r2" => {
            assert_eq!(writer.call("DEL user:1").await, ":0\r\n");
            assert_eq!(reader.call("GET user:1").await, "$-1\r\n");
            let old = load(&pg, 1).await;
            pg.exec("UPDATE {s}.users SET name = 'new' WHERE id = 1").await;
            reader.call(&format!("SET user:1 {old}")).await;
        }
        // R5, failed invalidation: the value is cached; the writer commits
        // and crashes before its DEL.
        "r5" => {
            assert_eq!(read_through(&mut reader, &pg, 1).await, "old");
            pg.exec("BEGIN; UPDATE {s}.users SET name = 'new' WHERE id = 1; COMMIT")
                .await;
            drop(writer);
        }
        // R6, out-of-band write: someone runs UPDATE in psql; nobody deletes.
        "r6" => {
            assert_eq!(read_through(&mut reader, &pg, 1).await, "old");
            let psql = testkit::pg::connect().await;
            let sql = format!("UPDATE {}.users SET name = 'new' WHERE id = 1", pg.name);
            psql.batch_execute(&sql).await.unwrap();
        }
        other => unreachable!("{other}"),
    }
    settle(&pg, through_proxy).await;
    let seen = read_through(&mut reader, &pg, 1).await;
    if let Some(proxy) = proxy {
        proxy.shutdown().await;
    }
    (seen, load(&pg, 1).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn r2_delete_before_write() {
    assert_eq!(race("r2", false).await, ("old".into(), "new".into()), "control");
    assert_eq!(race("r2", true).await, ("new".into(), "new".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn r5_writer_commits_and_never_deletes() {
    assert_eq!(race("r5", false).await, ("old".into(), "new".into()), "control");
    assert_eq!(race("r5", true).await, ("new".into(), "new".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn r6_update_run_directly_in_psql() {
    assert_eq!(race("r6", false).await, ("old".into(), "new".into()), "control");
    assert_eq!(race("r6", true).await, ("new".into(), "new".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fill_whose_miss_preceded_the_commit_is_refused_once_the_row_is_applied() {
    let redis = RedisServer::start();
    let (pg, toml) = users("fill").await;
    pg.exec("INSERT INTO {s}.users VALUES (1, 'a@x', 'old')").await;
    for through_proxy in [false, true] {
        let proxy = Proxy::start(&redis.addr(), &toml).await;
        eventually("the outbox is consumed", async || pg.outbox_len().await == 0).await;
        pg.exec("UPDATE {s}.users SET name = 'old' WHERE id = 1").await;
        eventually("the outbox is consumed", async || pg.outbox_len().await == 0).await;
        let addr = match through_proxy {
            true => proxy.addr.to_string(),
            false => redis.addr(),
        };
        let mut reader = RawClient::connect(&addr).await;
        assert_eq!(reader.call("GET user:1").await, "$-1\r\n");
        let old = load(&pg, 1).await;
        let before = consumed(&proxy);
        pg.exec("UPDATE {s}.users SET name = 'new' WHERE id = 1").await;
        eventually("the change-log row is applied", async || {
            consumed(&proxy) == before + 1
        })
        .await;
        assert_eq!(reader.call(&format!("SET user:1 {old}")).await, "+OK\r\n");
        let mut direct = RawClient::connect(redis.addr()).await;
        let cached = direct.call("GET user:1").await;
        let fences = proxy.ctx.fences.as_ref().unwrap();
        match through_proxy {
            // Plain Redis stores the value read before the commit.
            false => assert_eq!(cached, "$3\r\nold\r\n", "control"),
            true => {
                assert_eq!(cached, "$-1\r\n");
                assert_eq!(fences.stats.refused_fence_moved.get(), 1);
            }
        }
        assert_eq!(
            direct.call("DEL user:1").await,
            if through_proxy { ":0\r\n" } else { ":1\r\n" }
        );
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_share_one_outbox_and_leave_no_row_behind() {
    let redis = RedisServer::start();
    let pg = Schema::create("two").await;
    pg.exec("CREATE TABLE {s}.items (id int PRIMARY KEY, n int NOT NULL)")
        .await;
    pg.exec("INSERT INTO {s}.items SELECT g, 0 FROM generate_series(1, 200) g")
        .await;
    let toml = pg
        .toml(&[("items", &["item:{id}"])])
        .replace("poll_interval", "batch_size = 7\npoll_interval")
        + "[[cache]]\npattern = \"item:*\"\non_write = \"write\"\n";
    pg.install(&toml).await;
    // Two cachefence processes, one outbox.
    let config = ConfigFile::new("two", &format!("upstream = \"{}\"\n{toml}", redis.addr()));
    let (a, b) = (
        ProxyProcess::start(&["--config", config.path_str()]),
        ProxyProcess::start(&["--config", config.path_str()]),
    );
    let consumed = async |p: &ProxyProcess| -> u64 {
        let stats = RawClient::connect(("127.0.0.1", p.port))
            .await
            .call("CACHE.STATS")
            .await;
        let field = "$23\r\nchangelog_rows_consumed\r\n:";
        let at = stats.find(field).expect("changelog_rows_consumed in CACHE.STATS") + field.len();
        stats[at..].split("\r\n").next().unwrap().parse().unwrap()
    };
    let mut direct = RawClient::connect(redis.addr()).await;
    for id in 1..=200 {
        direct.call(&format!("SET item:{id} cached")).await;
    }
    // 2 000 committed changes, 10 rows per transaction.
    for round in 0..200 {
        let first = round % 20 * 10 + 1;
        let sql = format!(
            "UPDATE {}.items SET n = n + 1 WHERE id BETWEEN {first} AND {}",
            pg.name,
            first + 9
        );
        pg.client.batch_execute(&sql).await.unwrap();
    }
    eventually("every row is consumed", async || {
        consumed(&a).await + consumed(&b).await >= 2000
    })
    .await;
    assert_eq!(pg.outbox_len().await, 0);
    let (by_a, by_b) = (consumed(&a).await, consumed(&b).await);
    assert_eq!(by_a + by_b, 2000, "a: {by_a}, b: {by_b}");
    eprintln!("two processes, one outbox: {by_a} + {by_b} rows");
    for id in 1..=200 {
        assert_eq!(
            direct.call(&format!("EXISTS item:{id}")).await,
            ":0\r\n",
            "item:{id}"
        );
    }
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_away_keeps_redis_traffic_flowing_and_rows_wait() {
    let redis = RedisServer::start();
    let (pg, toml) = users("away").await;
    // A database that does not exist: the consumer cannot connect.
    let broken = toml.replace("/test\"", "/cachefence_no_such_db\"");
    let proxy = Proxy::start(&redis.addr(), &broken).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("SET user:1 cached").await, "+OK\r\n");
    pg.exec("INSERT INTO {s}.users VALUES (1, 'a@x', 'Ann')").await;
    let stats = proxy.ctx.changelog.clone().unwrap();
    eventually("the consumer retried", async || stats.retries.get() >= 2).await;
    assert_eq!(stats.connected.get(), 0);
    assert_eq!(client.call("GET user:1").await, "$6\r\ncached\r\n");
    assert_eq!(pg.outbox_len().await, 1);
    proxy.shutdown().await;
    // With the right database, the waiting row is applied.
    let proxy = Proxy::start(&redis.addr(), &toml).await;
    eventually("the row is applied", async || consumed(&proxy) == 1).await;
    let mut client = RawClient::connect(proxy.addr).await;
    assert_eq!(client.call("GET user:1").await, "$-1\r\n");
    proxy.shutdown().await;
}

/// Cache-aside readers through the proxy until `stop`: GET, and on a miss
/// read the row and SET it on the same connection; any error drops the
/// connection and the half-done read (no SET on a new connection).
async fn reader(port: u16, table: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u64 {
    let db = testkit::pg::connect().await;
    let mut fills = 0;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let id = n % 50 + 1;
        let Ok(Ok(mut cache)) = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .map(|c| c.map(RawClient::from_stream)) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        for _ in 0..20 {
            let Some(reply) = cache
                .call_within(&format!("GET item:{id}"), Duration::from_secs(2))
                .await
            else {
                break;
            };
            if reply != "$-1\r\n" {
                continue;
            }
            let sql = format!("SELECT n FROM {table} WHERE id = {id}");
            let Ok(row) = db.query_one(&sql, &[]).await else {
                break;
            };
            let value: i32 = row.get(0);
            match cache
                .call_within(&format!("SET item:{id} {value}"), Duration::from_secs(2))
                .await
            {
                Some(reply) if reply == "+OK\r\n" => fills += 1,
                _ => break,
            }
        }
    }
    fills
}

#[tokio::test(flavor = "multi_thread")]
async fn durability_ten_thousand_updates_across_proxy_redis_and_postgres_restarts() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // Redis keeps its data across the restart (AOF, fsync always), so a
    // lost invalidation would show as a stale value afterwards.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let pg = Schema::create("durable").await;
    pg.exec("CREATE TABLE {s}.items (id int PRIMARY KEY, n int NOT NULL)")
        .await;
    pg.exec("INSERT INTO {s}.items SELECT g, 0 FROM generate_series(1, 50) g")
        .await;
    let app = format!("cf_consumer_{}", pg.name);
    let toml = pg
        .toml(&[("items", &["item:{id}"])])
        .replace("/test\"", &format!("/test?application_name={app}\""))
        + &format!("upstream = \"{}\"\nreply_timeout = \"2s\"\n", redis.addr());
    // `upstream` must precede the tables: put the top-level keys first.
    let (postgres, top) = toml.split_at(toml.find("upstream =").unwrap());
    let toml = format!("{top}{postgres}[[cache]]\npattern = \"item:*\"\non_write = \"write\"\n");
    pg.install(&toml).await;
    let config = ConfigFile::new("durable", &toml);
    let mut proxy = ProxyProcess::start(&["--config", config.path_str()]);
    let port = proxy.port;

    let stop = Arc::new(AtomicBool::new(false));
    let table = format!("{}.items", pg.name);
    let readers: Vec<_> = (0..4)
        .map(|_| tokio::spawn(reader(port, table.clone(), stop.clone())))
        .collect();
    // Caches every item through the proxy, so that an invalidation lost in
    // the fault that follows would leave a stale value behind.
    let warm = async || {
        let mut cache = RawClient::connect(("127.0.0.1", port)).await;
        for id in 1..=50 {
            if cache.call(&format!("GET item:{id}")).await == "$-1\r\n" {
                let n = pg
                    .count(&format!("SELECT n::bigint FROM {table} WHERE id = {id}"))
                    .await;
                assert_eq!(cache.call(&format!("SET item:{id} {n}")).await, "+OK\r\n");
            }
        }
    };
    let redis_addr = redis.addr();
    // After a phase: once the outbox is drained, every cached item equals
    // its row (the readers keep going; the writer is paused).
    let check = async |phase: &str| -> usize {
        let drained = std::time::Instant::now();
        while pg.outbox_len().await > 0 {
            assert!(
                drained.elapsed() < Duration::from_secs(60),
                "{phase}: the outbox was not drained"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut direct = RawClient::connect(&redis_addr).await;
        let mut cached = 0;
        for id in 1..=50 {
            let n = pg
                .count(&format!("SELECT n::bigint FROM {table} WHERE id = {id}"))
                .await;
            let value = direct.call(&format!("GET item:{id}")).await;
            if value != "$-1\r\n" {
                cached += 1;
                let fresh = format!("${}\r\n{n}\r\n", n.to_string().len());
                assert_eq!(value, fresh, "{phase}: item:{id} is stale");
            }
        }
        cached
    };
    // 10 000 row updates, 10 per transaction, in four phases of 250
    // transactions, each run during its fault. Before each fault every item
    // is cached, so an invalidation lost in it leaves a stale value.
    let mut round = 0;
    let mut update = async || {
        let first = round * 7 % 50;
        round += 1;
        let ids: Vec<String> = (0..10).map(|i| ((first + i * 5) % 50 + 1).to_string()).collect();
        let sql = format!("UPDATE {table} SET n = n + 1 WHERE id IN ({})", ids.join(","));
        pg.client.batch_execute(&sql).await.unwrap();
    };
    let mut cached = Vec::new();
    for phase in [
        "steady",
        "proxy killed",
        "redis down",
        "postgres connections terminated",
    ] {
        warm().await;
        match phase {
            "proxy killed" => proxy.kill(),
            "redis down" => redis.kill(),
            "postgres connections terminated" => {
                let sql = format!(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = '{app}'"
                );
                assert!(pg.count(&sql).await >= 1, "the consumer's connections were found");
            }
            _ => {}
        }
        for _ in 0..250 {
            update().await;
        }
        match phase {
            "proxy killed" => proxy.restart(),
            "redis down" => redis.restart(),
            _ => {}
        }
        cached.push(check(phase).await);
    }
    assert_eq!(pg.count("SELECT sum(n) FROM {s}.items").await, 10_000);
    stop.store(true, Ordering::Relaxed);
    let mut fills = 0;
    for reader in readers {
        fills += reader.await.unwrap();
    }
    assert!(fills > 0, "the readers filled the cache");
    eprintln!(
        "durability: {fills} reader fills; items cached after each phase {cached:?}, all equal to the database"
    );
}
