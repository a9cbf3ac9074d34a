//! The configuration file, the flags and the binary's behaviour around them:
//! the documented example, `--check`, clear errors, secrets kept out of logs,
//! JSON logs, and draining on SIGTERM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cachefence::config::{Config, Place, SETTINGS, Settings, parse_settings};
use testkit::{ProxyProcess, RawClient, RedisServer, ScratchDir, cachefence_command, cmds};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml")
}

#[test]
fn example_config_documents_every_key_with_its_default() {
    let text = std::fs::read_to_string(example_path()).expect("config.example.toml exists");
    let example = parse_settings(&text).expect("config.example.toml parses");
    let documented: toml::Table = toml::from_str(&text).unwrap();
    let all: toml::Table = toml::Table::try_from(Settings::defaults()).unwrap();
    // No `[[cache]]` section is in force by default: the example shows one
    // commented out (its settings are checked in config::settings' tests).
    let missing: Vec<&String> = all
        .keys()
        .filter(|k| !documented.contains_key(*k) && *k != "cache")
        .collect();
    assert!(
        text.contains("\n# [[cache]]\n"),
        "config.example.toml shows a [[cache]] section"
    );
    assert!(!all.is_empty());
    assert!(
        missing.is_empty(),
        "keys not documented in config.example.toml: {missing:?}"
    );
    assert_eq!(
        Config::resolve(example, None).unwrap(),
        Config::resolve(Settings::default(), None).unwrap(),
        "the example's values are not the defaults"
    );
}

/// Every declared setting is in the README: a top-level key in the
/// Configuration section's table, a table (`[[cache]]`, `[postgres]`)
/// somewhere in the README.
#[test]
fn docs_document_every_declared_setting() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md")).unwrap();
    let start = readme
        .find("\n## Configuration\n")
        .expect("a Configuration section");
    let end = readme[start + 1..]
        .find("\n## ")
        .map_or(readme.len(), |e| start + 1 + e);
    let section = &readme[start..end];
    let missing: Vec<&str> = SETTINGS
        .iter()
        .filter(|s| match s.place {
            Place::TopLevel => !section
                .lines()
                .any(|l| l.starts_with('|') && l.contains(&format!("`{}`", s.name))),
            Place::Table(table) => !readme.contains(&format!("`{table}`")),
        })
        .map(|s| s.name)
        .collect();
    assert!(
        missing.is_empty(),
        "settings not documented in docs/configuration.md: {missing:?}"
    );
}

fn run_check(args: &[&str]) -> (bool, String) {
    let out = cachefence_command()
        .arg("--check")
        .args(args)
        .output()
        .expect("running cachefence");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_accepts_the_example_and_rejects_bad_files_naming_file_line_and_key() {
    let example = example_path();
    let (ok, text) = run_check(&["--config", example.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("configuration OK"), "{text}");

    let scratch = ScratchDir::new("config-test");
    let typo = scratch.write("typo.toml", "listen = \"127.0.0.1:7000\"\nmax_clinets = 5\n");
    let (ok, text) = run_check(&["--config", typo.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains(typo.to_str().unwrap()) && text.contains("line 2") && text.contains("max_clinets"),
        "{text}"
    );

    let bad_value = scratch.write("bad-value.toml", "\nconnect_timeout = \"soon\"\n");
    let (ok, text) = run_check(&["--config", bad_value.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains("line 2") && text.contains("connect_timeout") && text.contains("soon"),
        "{text}"
    );

    let bad_listen = scratch.write("bad-listen.toml", "listen = \"nowhere\"\n");
    let (ok, text) = run_check(&["--config", bad_listen.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains("bad-listen.toml") && text.contains("`listen`"),
        "{text}"
    );

    let (ok, text) = run_check(&["--config", "/nonexistent/cachefence.toml"]);
    assert!(!ok);
    assert!(
        text.contains("cannot read config file /nonexistent/cachefence.toml"),
        "{text}"
    );
}

#[test]
fn flags_override_the_file() {
    let scratch = ScratchDir::new("config-test");
    let file = scratch.write("override.toml", "max_clients = 0\n");
    let (ok, text) = run_check(&["--config", file.to_str().unwrap()]);
    assert!(!ok && text.contains("max_clients"), "{text}");
    let (ok, text) = run_check(&["--config", file.to_str().unwrap(), "--max-clients", "5"]);
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_in_flight_replies_then_exits_zero() {
    let redis = RedisServer::start();
    let mut proxy = ProxyProcess::start(&["--upstream", &redis.addr(), "--shutdown-timeout", "5s"]);
    let port = proxy.port;
    let mut busy = RawClient::connect(("127.0.0.1", port)).await;
    let mut idle = RawClient::connect(("127.0.0.1", port)).await;
    assert_eq!(idle.call("PING").await, "+PONG\r\n");
    busy.send(&cmds("DEBUG SLEEP 1")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("-TERM");
    // The in-flight reply still arrives, then the connection closes.
    let (bytes, closed) = busy.read_to_close().await;
    assert_eq!((bytes.as_slice(), closed), (&b"+OK\r\n"[..], true));
    let (bytes, closed) = idle.read_to_close().await;
    assert!(bytes.is_empty() && closed);
    let status = proxy.wait_exit();
    let logs = proxy.logs();
    assert!(status.success(), "exit {status}: {logs}");
    assert!(
        logs.contains("signal received") && logs.contains("SIGTERM"),
        "{logs}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting after exit"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_deadline_bounds_a_reply_that_never_comes() {
    let redis = RedisServer::start();
    let mut proxy = ProxyProcess::start(&["--upstream", &redis.addr(), "--shutdown-timeout", "300ms"]);
    let port = proxy.port;
    let mut blocked = RawClient::connect(("127.0.0.1", port)).await;
    blocked.send(&cmds("BLPOP nothing 0")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    proxy.signal("-INT");
    let status = proxy.wait_exit();
    let logs = proxy.logs();
    assert!(status.success(), "exit {status}: {logs}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(logs.contains("shutdown deadline passed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwords_never_appear_in_logs_and_json_logs_are_structured() {
    let redis = RedisServer::start_with(&["--requirepass", "hunter2-secret"]);
    let url = format!("redis://:hunter2-secret@{}", redis.addr());
    let mut proxy = ProxyProcess::start(&[
        "--upstream",
        &url,
        "--admin-password",
        "adm1n-hunter2",
        "--log-level",
        "trace",
        "--log-format",
        "json",
        "--cache",
        "user:*",
        "--cache",
        "session:*",
    ]);
    let port = proxy.port;
    let mut client = RawClient::connect(("127.0.0.1", port)).await;
    assert_eq!(client.call("SET k v").await, "+OK\r\n");
    // Admin password, wrong and right: neither reaches the logs.
    assert!(
        client
            .call("CACHE.AUTH hunter2-wrong")
            .await
            .starts_with("-WRONGPASS")
    );
    assert_eq!(client.call("CACHE.AUTH adm1n-hunter2").await, "+OK\r\n");
    // CACHE.INFO describes the proxy without any secret.
    let info = client.call("CACHE.INFO").await;
    assert!(
        info.starts_with("$") && info.contains("\r\n# cachefence\r\nversion:"),
        "{info}"
    );
    assert!(
        info.contains(&format!("\r\nupstream:{}\r\n", redis.addr())),
        "{info}"
    );
    assert!(
        info.contains(&format!("\r\nlisten:127.0.0.1:{port}\r\n")),
        "{info}"
    );
    assert!(
        info.contains("\r\nfenced_patterns:user:*,session:*\r\nchangelog_outbox:\r\nadmin_password:set\r\n"),
        "{info}"
    );
    // No [postgres] replicas: the replica-lag lines are there, empty.
    assert!(
        info.contains("\r\nreplica_lag_ms:\r\nlag_window_measured_ms:\r\nlag_window_in_force_ms:\r\n"),
        "{info}"
    );
    assert!(!info.contains("hunter2"), "a secret in CACHE.INFO: {info}");
    drop(client);
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.signal("-TERM");
    let status = proxy.wait_exit();
    let logs = proxy.logs();
    assert!(status.success());
    assert!(
        !logs.contains("hunter2"),
        "the password leaked into the logs:\n{logs}"
    );
    let lines: Vec<&str> = logs.lines().collect();
    assert!(!lines.is_empty());
    let listening = lines
        .iter()
        .find(|l| l.contains("cachefence listening"))
        .expect("a start-up line");
    let event: serde_json::Value = serde_json::from_str(listening).expect("JSON log line");
    assert_eq!(event["fields"]["upstream"], redis.addr());
    let conn_line = lines
        .iter()
        .find(|l| l.contains("session started"))
        .expect("a per-connection event");
    let event: serde_json::Value = serde_json::from_str(conn_line).unwrap();
    assert!(
        event["span"]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{conn_line}"
    );
    assert_eq!(event["span"]["upstream"], redis.addr());
}

/// No key is a cache until one is declared: by default every command keeps
/// Redis' own semantics (a SET after a miss and a concurrent DEL is stored,
/// no fence key appears) and the proxy says at start that nothing is
/// fenced. `--cache PATTERN` declares a cache with the defaults, among them
/// `on_write = "invalidate"`: a SET of such a key that is not a fill is an
/// invalidation, while other keys stay plain Redis.
#[tokio::test(flavor = "multi_thread")]
async fn nothing_is_fenced_by_default_and_cache_declares_the_cache_keys() {
    let redis = RedisServer::start();
    let mut direct = RawClient::connect(redis.addr()).await;

    let proxy = ProxyProcess::start(&["--upstream", &redis.addr()]);
    let (mut a, mut b) = (
        RawClient::connect(("127.0.0.1", proxy.port)).await,
        RawClient::connect(("127.0.0.1", proxy.port)).await,
    );
    assert_eq!(a.call("GET session:1").await, "$-1\r\n");
    assert_eq!(b.call("DEL session:1").await, ":0\r\n");
    assert_eq!(a.call("SET session:1 s").await, "+OK\r\n");
    assert_eq!(a.call("GET session:1").await, "$1\r\ns\r\n");
    assert_eq!(direct.call("KEYS cachefence*").await, "*0\r\n");
    let logs = proxy.logs();
    assert!(logs.contains("no key is a cache yet"), "{logs}");
    drop(proxy);

    let proxy = ProxyProcess::start(&["--upstream", &redis.addr(), "--cache", "user:*"]);
    let mut a = RawClient::connect(("127.0.0.1", proxy.port)).await;
    assert_eq!(a.call("SET user:1 v").await, "+OK\r\n");
    assert_eq!(
        a.call("GET user:1").await,
        "$-1\r\n",
        "on_write = invalidate by default"
    );
    assert_eq!(direct.call("EXISTS cachefence:{user:1}").await, ":1\r\n");
    assert_eq!(a.call("SET session:2 s").await, "+OK\r\n");
    assert_eq!(a.call("GET session:2").await, "$1\r\ns\r\n");
    // A fill after a miss is stored as before.
    assert_eq!(a.call("GET user:2").await, "$-1\r\n");
    assert_eq!(a.call("SET user:2 fresh").await, "+OK\r\n");
    assert_eq!(a.call("GET user:2").await, "$5\r\nfresh\r\n");
    assert!(!proxy.logs().contains("no key is a cache yet"));
}

#[test]
fn a_cache_section_must_say_which_keys() {
    let scratch = ScratchDir::new("config-test");
    let file = scratch.write("no-pattern.toml", "[[cache]]\nhold = \"0s\"\n");
    let (ok, text) = run_check(&["--config", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        text.contains("[[cache]] section 1") && text.contains("`pattern` is missing"),
        "{text}"
    );
}
