//! `cachefence audit` (issue #6): cached values sampled from a real Redis
//! and compared with their rows in a real PostgreSQL, through the built
//! binary. Each test has its own `redis-server` and PostgreSQL schema.

use std::time::Duration;

use serde_json::{Value, json};

use testkit::pg::Schema;
use testkit::{ConfigFile, RawClient, RedisServer, WAIT, cachefence_command, cmd};

/// What the application caches under `user:{id}`: the row as JSON.
const USER_VALUE: &str = "row_to_json(t)::text";

/// A `users` table of `rows` rows and a config mapping it: `user:{id}`
/// with a value expression, `user:email:{email}` without.
async fn users(test: &str, redis: &RedisServer, rows: i32) -> (Schema, ConfigFile) {
    let pg = Schema::create(test).await;
    pg.exec("CREATE TABLE {s}.users (id int PRIMARY KEY, email text UNIQUE, name text NOT NULL)")
        .await;
    pg.exec(&format!(
        "INSERT INTO {{s}}.users SELECT g, 'u' || g || '@x.org', 'name ' || g FROM generate_series(1, {rows}) g"
    ))
    .await;
    let toml = format!(
        "upstream = \"{}\"\n{}values = {{ \"user:{{id}}\" = \"{USER_VALUE}\" }}\n",
        redis.addr(),
        pg.toml(&[("users", &["user:{id}", "user:email:{email}"])])
    );
    let config = ConfigFile::new("audit", &toml);
    (pg, config)
}

/// The value the application would cache for row `id`, as PostgreSQL
/// renders it now.
async fn rendered(pg: &Schema, id: i32) -> String {
    let sql = format!("SELECT {USER_VALUE} FROM {}.users t WHERE id = $1", pg.name);
    pg.client.query_one(&sql, &[&id]).await.expect(&sql).get(0)
}

/// Caches `user:{id}` for every id, exactly as the expression renders it.
async fn cache_rows(pg: &Schema, redis: &mut RawClient, ids: std::ops::RangeInclusive<i32>) {
    for id in ids {
        let value = rendered(pg, id).await;
        redis
            .send(&cmd(&[b"SET", format!("user:{id}").as_bytes(), value.as_bytes()]))
            .await;
        assert_eq!(redis.read_frame().await, b"+OK\r\n");
    }
}

/// Runs `cachefence --config <config> audit <args>`: exit code, stdout.
async fn audit(config: &ConfigFile, args: &[&str]) -> (i32, String) {
    let run = tokio::process::Command::from(cachefence_command())
        .arg("--config")
        .arg(config.path())
        .arg("audit")
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT * 3, run)
        .await
        .expect("the audit finished in time")
        .expect("running cachefence audit");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code().expect("an exit code");
    eprintln!("audit {args:?}: exit {code}\n{stdout}{stderr}");
    (code, stdout)
}

/// The JSON report's counts, in one value to compare at once.
fn counts(report: &Value) -> Value {
    json!({
        "sampled": report["sampled"],
        "compared": report["compared"],
        "equal": report["equal"],
        "in_flight": report["in_flight"],
        "stale": report["stale"],
        "stale_row_missing": report["stale_row_missing"],
        "not_comparable": report["not_comparable"],
        "scan_complete": report["scan_complete"],
    })
}

fn not_comparable(pairs: &[(&str, u64)]) -> Value {
    let mut reasons = json!({
        "total": pairs.iter().map(|(_, n)| n).sum::<u64>(),
        "no_value_expression": 0, "ambiguous_template": 0, "not_a_string": 0,
        "key_does_not_parse": 0, "several_rows": 0, "value_null": 0, "vanished": 0,
    });
    for (reason, n) in pairs {
        reasons[*reason] = json!(n);
    }
    reasons
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_finds_exactly_the_values_changed_behind_the_caches_back() {
    let redis = RedisServer::start();
    let (pg, config) = users("audit_stale", &redis, 50).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    cache_rows(&pg, &mut direct, 1..=50).await;

    // Every cached value is what its row renders.
    let (code, stdout) = audit(&config, &["--json", "--settle", "200ms"]).await;
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(
        counts(&report),
        json!({
            "sampled": 50, "compared": 50, "equal": 50, "in_flight": 0, "stale": 0,
            "stale_row_missing": 0, "not_comparable": not_comparable(&[]), "scan_complete": true,
        })
    );
    assert_eq!(report["stale_ratio"], json!(0.0));
    assert_eq!(report["nines"], Value::Null);
    assert_eq!(report["nines_at_least"], json!(50f64.log10()));
    assert_eq!(report["stale_keys"], json!([]));

    // Behind the cache's back (no trigger, no proxy): two rows change, one
    // is deleted. And keys the audit cannot compare: a list under a
    // template's shape, a key of the template without a value expression,
    // and a key whose id is not an integer.
    let before: Vec<String> = [5, 9, 3]
        .iter()
        .map(|id| format!("{{\"id\":{id},\"email\":\"u{id}@x.org\",\"name\":\"name {id}\"}}"))
        .collect();
    assert_eq!(rendered(&pg, 5).await, before[0], "row_to_json's rendering");
    pg.exec("UPDATE {s}.users SET name = 'changed' WHERE id IN (5, 9)")
        .await;
    pg.exec("DELETE FROM {s}.users WHERE id = 3").await;
    for command in [
        "RPUSH user:1000 x",
        "SET user:email:u7@x.org 7",
        "SET user:abc nonsense",
    ] {
        direct.call(command).await;
    }

    let (code, stdout) = audit(&config, &["--json", "--settle", "200ms"]).await;
    assert_eq!(code, 3, "stale values found");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(
        counts(&report),
        json!({
            "sampled": 53, "compared": 50, "equal": 47, "in_flight": 0, "stale": 2,
            "stale_row_missing": 1, "scan_complete": true,
            "not_comparable": not_comparable(&[
                ("no_value_expression", 1), ("not_a_string", 1), ("key_does_not_parse", 1),
            ]),
        })
    );
    assert_eq!(report["stale_ratio"], json!(3.0 / 50.0));
    assert_eq!(report["nines"], json!((1.0 / (3.0f64 / 50.0)).log10()));
    let mut stale = report["stale_keys"].as_array().expect("stale keys").clone();
    stale.sort_by_key(|s| s["key"].as_str().map(str::to_string));
    let table = format!("{}.users", pg.name);
    let listed = |key: &str, cached: &str, database: Option<&str>| {
        json!({
            "key": key, "table": table, "template": "user:{id}",
            "cached": cached, "cached_len": cached.len(),
            "database": database, "database_len": database.map(str::len),
        })
    };
    let (now_5, now_9) = (
        before[0].replace("name 5", "changed"),
        before[1].replace("name 9", "changed"),
    );
    assert_eq!(
        stale,
        [
            listed("user:3", &before[2], None),
            listed("user:5", &before[0], Some(&now_5)),
            listed("user:9", &before[1], Some(&now_9)),
        ]
    );
    let templates = json!([
        {"table": table, "template": "user:{id}", "sampled": 52, "compared": 50, "equal": 47,
         "in_flight": 0, "stale": 2, "stale_row_missing": 1, "not_comparable": 2},
        {"table": table, "template": "user:email:{email}", "sampled": 1, "compared": 0, "equal": 0,
         "in_flight": 0, "stale": 0, "stale_row_missing": 0, "not_comparable": 1},
    ]);
    assert_eq!(report["templates"], templates);

    // The same for people.
    let (code, text) = audit(&config, &["--settle", "200ms"]).await;
    assert_eq!(code, 3);
    for line in [
        ", 53 keys sampled (asked for 1000: every key of the templates), settle delay 200ms\n",
        "  compared                  50\n",
        "    stale                    2\n",
        "    stale_row_missing        1   cached, but no row renders the key\n",
        "  not_comparable             3\n",
        "    not_a_string             1   a hash, list, set... in Redis\n",
        "stale ratio: 0.0600 (3 of 50 compared)\nnines: 1.2\n",
        "stale keys (3 of 3):\n",
        "  user:3  (",
        "    database: no row\n",
        &format!("    database: {now_9:?}\n"),
    ] {
        assert!(text.contains(line), "{line:?} not in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_in_flight_that_settles_within_the_delay_is_not_stale() {
    let redis = RedisServer::start();
    let (pg, config) = users("audit_in_flight", &redis, 10).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    cache_rows(&pg, &mut direct, 1..=10).await;
    // Both rows change; the cache learns of row 1 only (as an invalidation
    // and refill would), 300 ms after the audit first read it. Row 2 is
    // the control: it never settles.
    pg.exec("UPDATE {s}.users SET name = 'new' WHERE id IN (1, 2)")
        .await;
    let fixed = rendered(&pg, 1).await;
    assert_eq!(direct.call("CONFIG RESETSTAT").await, "+OK\r\n");
    let fixer = async {
        let mut client = RawClient::connect(redis.addr()).await;
        // The audit's first look is one pipeline of 10 GETs.
        testkit::eventually("the audit read the cached values", async || {
            client
                .call("INFO commandstats")
                .await
                .contains("cmdstat_get:calls=10,")
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.send(&cmd(&[b"SET", b"user:1", fixed.as_bytes()])).await;
        assert_eq!(client.read_frame().await, b"+OK\r\n");
    };
    let ((code, stdout), ()) = tokio::join!(audit(&config, &["--json", "--settle", "1s"]), fixer);
    assert_eq!(code, 3, "the control is stale");
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(
        counts(&report),
        json!({
            "sampled": 10, "compared": 10, "equal": 8, "in_flight": 1, "stale": 1,
            "stale_row_missing": 0, "not_comparable": not_comparable(&[]), "scan_complete": true,
        })
    );
    assert_eq!(report["settle_ms"], 1000);
    let keys: Vec<&str> = report["stale_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["user:2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_stops_at_the_sample_size() {
    let redis = RedisServer::start();
    let (pg, config) = users("audit_sample", &redis, 30).await;
    let mut direct = RawClient::connect(redis.addr()).await;
    cache_rows(&pg, &mut direct, 1..=30).await;
    let (code, stdout) = audit(&config, &["--json", "--sample", "7"]).await;
    assert_eq!(code, 0);
    let report: Value = serde_json::from_str(&stdout).expect("a JSON report");
    assert_eq!(
        (&report["sampled"], &report["equal"], &report["sample"]),
        (&json!(7), &json!(7), &json!(7))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_exit_1_with_a_clear_message() {
    let run = |config: &ConfigFile| {
        let output = cachefence_command()
            .arg("--config")
            .arg(config.path())
            .arg("audit")
            .output()
            .expect("running cachefence audit");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // No [postgres] section.
    let plain = ConfigFile::new("audit-plain", "upstream = \"127.0.0.1:1\"\n");
    let (code, stderr) = run(&plain);
    assert_eq!(code, Some(1));
    assert!(stderr.contains("`audit` needs `[postgres] url`"), "{stderr}");

    // Redis unreachable.
    let mut redis = RedisServer::start();
    let (pg, config) = users("audit_errors", &redis, 1).await;
    redis.kill();
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("audit failed: cannot connect to Redis: upstream 127.0.0.1:"),
        "{stderr}"
    );

    // A value expression PostgreSQL rejects, named with its entry.
    let text = config.read().replace(USER_VALUE, "t.nmae");
    config.write(&text);
    let (code, stderr) = run(&config);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains(&format!(
            "[[postgres.table]] #1 (`{}.users`), key template `user:{{id}}`: its `values` expression `t.nmae` cannot be used: ERROR: column t.nmae does not exist",
            pg.name
        )),
        "{stderr}"
    );
}
