//! `lag_window = "auto"` (#16) against a real PostgreSQL primary and
//! streaming replica, started by the test ([`Replicated`]): the window
//! follows the replica's measured lag as its apply delay rises and falls,
//! no read is staler than the window a fill was judged by, and a stopped
//! replica makes fills inside the ceiling refused. Plain Redis in front of
//! the same workload is the control: it serves values far staler; and a
//! fixed window shorter than the lag lets values staler than it through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::pg_replica::Replicated;
use testkit::{Proxy, RawClient, RedisServer, eventually, eventually_within};

const KEYS: i32 = 100;

/// The two tests start two PostgreSQL servers each and judge timing: one
/// at a time on a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The config of the proxy in front of `pg`; `lease_ttl = "1s"`, so the
/// window looks back max(`interval`, 1 s + `lag_poll`).
fn auto_config(pg: &Replicated, ceiling: &str, interval: &str) -> String {
    format!(
        "[[cache]]\npattern = \"row:*\"\nlease_ttl = \"1s\"\nhold = \"100ms\"\nlag_window = \"auto\"\n\
         lag_window_max = \"{ceiling}\"\n\n\
         [postgres]\nurl = \"{}\"\nreplicas = [\"{}\"]\nlag_poll = \"50ms\"\nlag_margin = \"50ms\"\n\
         lag_interval = \"{interval}\"\n",
        pg.primary_url(),
        pg.replica_url()
    )
}

async fn create_rows(pg: &Replicated) {
    let primary = pg.primary().await;
    primary
        .batch_execute(&format!(
            "CREATE TABLE rows (id int PRIMARY KEY, version int NOT NULL);
             INSERT INTO rows SELECT g, 1 FROM generate_series(1, {KEYS}) g"
        ))
        .await
        .expect("creating the rows");
    let replica = pg.replica().await;
    eventually("the replica has the rows", async || {
        replica
            .query_one("SELECT count(*) FROM rows", &[])
            .await
            .is_ok_and(|row| row.get::<_, i64>(0) == i64::from(KEYS))
    })
    .await;
}

/// What the workload saw: per key the (ack time, version) of every
/// acknowledged invalidation, and every cache hit (sent, key, version).
#[derive(Default)]
struct Seen {
    acks: HashMap<i32, Vec<(Instant, i32)>>,
    hits: Vec<(Instant, i32, i32)>,
}

impl Seen {
    /// How stale each hit was: from the first acknowledged invalidation of
    /// a newer version than it returned to when it was sent (only the stale
    /// ones), with the time it was sent.
    fn stale_hits(&self) -> Vec<(Instant, Duration)> {
        self.hits
            .iter()
            .filter_map(|&(sent, key, version)| {
                let first = self
                    .acks
                    .get(&key)?
                    .iter()
                    .filter(|(at, v)| *v > version && *at <= sent)
                    .map(|(at, _)| *at)
                    .min()?;
                Some((sent, sent - first))
            })
            .collect()
    }

    /// The stalest hit (zero: none stale).
    fn worst(&self) -> Duration {
        self.stale_hits()
            .iter()
            .map(|(_, s)| *s)
            .max()
            .unwrap_or_default()
    }
}

/// Cache-aside against `target` (the proxy or Redis) for `phases` of
/// (replica apply delay, duration): 2 writers UPDATE a random row on the
/// primary and DEL its key; 4 readers GET a random key and, on a miss, read
/// the row from the replica and SET it.
async fn workload(pg: &Replicated, target: &str, phases: &[(u64, u64)], during: impl Fn(Instant)) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..2 {
        let (seen, stop, target) = (seen.clone(), stop.clone(), target.to_string());
        let primary = pg.primary().await;
        tasks.push(tokio::spawn(async move {
            let mut client = RawClient::connect(&target).await;
            let mut n: i32 = w * 7919;
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
                let id = n % KEYS + 1;
                let row = primary
                    .query_one(
                        "UPDATE rows SET version = version + 1 WHERE id = $1 RETURNING version",
                        &[&id],
                    )
                    .await
                    .expect("UPDATE on the primary");
                let version: i32 = row.get(0);
                client.call(&format!("DEL row:{id}")).await;
                let at = Instant::now();
                seen.lock()
                    .unwrap()
                    .acks
                    .entry(id)
                    .or_default()
                    .push((at, version));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    for r in 0..4 {
        let (seen, stop, target) = (seen.clone(), stop.clone(), target.to_string());
        let replica = pg.replica().await;
        tasks.push(tokio::spawn(async move {
            let mut client = RawClient::connect(&target).await;
            let mut n: i32 = 104_729 + r * 31;
            for _ in 0..1_000_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12_345) & 0x7fff_ffff;
                let id = n % KEYS + 1;
                let sent = Instant::now();
                let reply = client.call(&format!("GET row:{id}")).await;
                if let Some(value) = reply.strip_prefix('$').and_then(|r| r.split("\r\n").nth(1))
                    && !reply.starts_with("$-1")
                {
                    seen.lock().unwrap().hits.push((sent, id, value.parse().unwrap()));
                }
                if reply == "$-1\r\n" {
                    let row = replica
                        .query_one("SELECT version FROM rows WHERE id = $1", &[&id])
                        .await
                        .expect("SELECT on the replica");
                    let version: i32 = row.get(0);
                    client.call(&format!("SET row:{id} {version} EX 60")).await;
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }));
    }
    for &(delay_ms, seconds) in phases {
        pg.set_apply_delay(Duration::from_millis(delay_ms)).await;
        let end = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < end {
            during(Instant::now());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a workload task did not stop")
            .expect("a workload task failed");
    }
    Arc::try_unwrap(seen)
        .ok()
        .expect("tasks are done")
        .into_inner()
        .unwrap()
}

/// The apply delay rises from 0.3 s to 2 s and falls back.
const PHASES: [(u64, u64); 3] = [(300, 3), (2000, 5), (300, 5)];

#[tokio::test(flavor = "multi_thread")]
async fn the_auto_window_follows_the_replica_lag_and_bounds_every_stale_read() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pg = Replicated::start(Duration::from_millis(300));
    create_rows(&pg).await;

    // Control: plain Redis keeps what a lagging replica said until the
    // key's next delete.
    let redis = RedisServer::start();
    let control = workload(&pg, &redis.addr(), &PHASES, |_| {}).await;
    let worst = control.worst();
    assert!(
        worst > Duration::from_millis(3000),
        "control: plain Redis serves values staler than any window ({worst:?})"
    );

    // A fixed window shorter than the lag (1 s against 2 s) lets values
    // staler than the window in: what a guessed window risks.
    let redis = RedisServer::start();
    let fixed = Proxy::start(
        &redis.addr(),
        "[[cache]]\npattern = \"row:*\"\nlag_window = \"1s\"\n",
    )
    .await;
    let seen = workload(&pg, &fixed.addr.to_string(), &PHASES, |_| {}).await;
    let worst = seen.worst();
    assert!(
        worst > Duration::from_millis(1500),
        "a fixed 1 s window under a 2 s lag: stale past the window ({worst:?})"
    );
    fixed.shutdown().await;

    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), &auto_config(&pg, "5s", "1s")).await;
    let lag = proxy.ctx.fences.as_ref().expect("fences on").lag.clone();
    eventually("the lag is measured", async || lag.window().is_some()).await;
    let windows = Arc::new(Mutex::new(Vec::<(Instant, Duration)>::new()));
    let seen = {
        let (windows, lag) = (windows.clone(), lag.clone());
        workload(&pg, &proxy.addr.to_string(), &PHASES, move |at| {
            let window = lag.window().expect("measured throughout");
            windows.lock().unwrap().push((at, window));
        })
        .await
    };
    let windows = windows.lock().unwrap().clone();
    let start = windows[0].0;
    let during = |from: u64, to: u64| {
        windows
            .iter()
            .filter(move |(at, _)| {
                (Duration::from_secs(from)..Duration::from_secs(to)).contains(&(*at - start))
            })
            .map(|(_, w)| *w)
    };
    // The window followed the lag: up to about 2 s, and back down.
    let high = during(5, 8).max().unwrap();
    let low = during(11, 13).max().unwrap();
    assert!(
        high >= Duration::from_millis(1900),
        "window under a 2 s apply delay: {high:?}"
    );
    assert!(
        high <= Duration::from_millis(2800),
        "window under a 2 s apply delay: {high:?}"
    );
    assert!(
        low <= Duration::from_millis(900),
        "window after the delay fell to 0.3 s: {low:?}"
    );

    // Every stale read is within the window its fill was judged by: the
    // largest in force between the invalidation it lacks and the read.
    let stale = seen.stale_hits();
    assert!(
        !stale.is_empty(),
        "the replica's lag showed in some reads (inside the window)"
    );
    for (sent, staleness) in &stale {
        let bound = windows
            .iter()
            .filter(|(at, _)| {
                *at + *staleness + Duration::from_millis(500) >= *sent
                    && *at <= *sent + Duration::from_millis(100)
            })
            .map(|(_, w)| *w)
            .max()
            .unwrap_or_default();
        assert!(
            *staleness <= bound + Duration::from_millis(20),
            "a read {:?} into the run was {staleness:?} stale, outside the window ({bound:?})",
            *sent - start
        );
    }
    let stats = proxy.ctx.fences.as_ref().unwrap().stats.refused_lag_window.get();
    assert!(
        stats > 0,
        "fills inside the window with two invalidations were refused"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_refuses_fills_inside_the_ceiling_until_it_is_measured_again() {
    let _one = ONE_AT_A_TIME.lock().await;
    let pg = Replicated::start(Duration::ZERO);
    create_rows(&pg).await;
    let redis = RedisServer::start();
    let proxy = Proxy::start(&redis.addr(), &auto_config(&pg, "1s", "200ms")).await;
    let fences = proxy.ctx.fences.as_ref().expect("fences on");
    let lag = fences.lag.clone();
    let mut client = RawClient::connect(proxy.addr).await;
    eventually("the lag is measured", async || {
        lag.window().is_some_and(|w| w < Duration::from_millis(500))
    })
    .await;

    // Measured: a fill inside the window is stored with a TTL ending the
    // window after the invalidation.
    assert_eq!(client.call("DEL row:1").await, ":0\r\n");
    assert_eq!(client.call("GET row:1").await, "$-1\r\n");
    assert_eq!(client.call("SET row:1 1 EX 60").await, "+OK\r\n");
    let ttl = client.call("PTTL row:1").await;
    let ttl: i64 = ttl.trim_start_matches(':').trim_end().parse().unwrap();
    assert!(
        (1..=1000).contains(&ttl),
        "stored for the measured window (under the 1 s ceiling) only: {ttl} ms"
    );
    let info = String::from_utf8(client.call("CACHE.INFO").await.into_bytes()).unwrap();
    assert!(
        info.contains(&format!("replica_lag_ms:127.0.0.1:{}=", pg.replica_port)),
        "{info}"
    );
    assert!(info.contains("\r\nlag_window_in_force_ms:row:*="), "{info}");

    // Stopped: its lag grows past the ceiling.
    pg.stop_replica().await;
    eventually_within(
        "the lag passes the ceiling",
        Duration::from_secs(10),
        async || lag.window().is_none_or(|w| w > Duration::from_secs(1)),
    )
    .await;
    let refused = fences.stats.refused_lag_window.get();
    assert_eq!(client.call("DEL row:2").await, ":0\r\n");
    assert_eq!(client.call("GET row:2").await, "$-1\r\n");
    assert_eq!(
        client.call("SET row:2 1 EX 60").await,
        "+OK\r\n",
        "refused as on_stale_fill says"
    );
    assert_eq!(client.call("GET row:2").await, "$-1\r\n", "not stored");
    assert_eq!(fences.stats.refused_lag_window.get(), refused + 1);
    let explain = client.call("CACHE.EXPLAIN row:2").await;
    assert!(
        explain.contains("fill refused (lag_window): the miss was within lag_window (1s)"),
        "{explain}"
    );
    // A key not invalidated inside the ceiling is filled as ever.
    assert_eq!(client.call("GET row:3").await, "$-1\r\n");
    assert_eq!(client.call("SET row:3 1 EX 60").await, "+OK\r\n");
    assert_eq!(client.call("GET row:3").await, "$1\r\n1\r\n");
    let stats = client.call("CACHE.STATS").await;
    assert!(stats.contains("lag_over_ceiling_ms"), "{stats}");
    let metrics = cachefence::telemetry::exporter::render(&*proxy.ctx);
    assert!(
        metrics.contains(&format!(
            "cachefence_replica_lag_seconds{{replica=\"127.0.0.1:{}\"}} ",
            pg.replica_port
        )),
        "{metrics}"
    );
    assert!(metrics.contains("cachefence_lag_measured "), "{metrics}");
    assert!(
        metrics.contains("cachefence_lag_over_ceiling_seconds_total "),
        "{metrics}"
    );

    // Back: measured below the ceiling again, fills follow the window.
    pg.start_replica().await;
    eventually_within("the lag is measured again", Duration::from_secs(15), async || {
        lag.window().is_some_and(|w| w < Duration::from_millis(500))
    })
    .await;
    assert!(fences.lag.stats.over_ceiling_ms.get() > 0);
    assert_eq!(client.call("DEL row:4").await, ":0\r\n");
    assert_eq!(client.call("GET row:4").await, "$-1\r\n");
    assert_eq!(client.call("SET row:4 1 EX 60").await, "+OK\r\n");
    assert_eq!(client.call("GET row:4").await, "$1\r\n1\r\n");
    proxy.shutdown().await;
}
