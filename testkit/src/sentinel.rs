//! A Redis Sentinel deployment of the test's own: a master, a replica and
//! three sentinels (`redis-server --sentinel`, no extra package), on free
//! loopback ports.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::RawClient;
use crate::files::ScratchDir;
use crate::redis::{RedisServer, free_port};
use crate::wait::{WAIT, eventually};

/// What the sentinels call the master.
pub const MASTER_NAME: &str = "mymaster";

/// One `redis-server --sentinel`; killed on drop.
struct SentinelProcess {
    port: u16,
    child: Child,
    _dir: ScratchDir,
}

impl SentinelProcess {
    /// With `password`, the sentinel asks for it (`requirepass`) and gives
    /// it to the other sentinels.
    fn start(master_port: u16, password: Option<&str>) -> SentinelProcess {
        let port = free_port();
        let dir = ScratchDir::new(&format!("sentinel-{port}"));
        let log = dir.file("sentinel.log");
        let conf = dir.write(
            "sentinel.conf",
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n{auth}",
                dir = dir.path().display(),
                log = log.display(),
                auth = password.map_or(String::new(), |p| format!(
                    "requirepass {p}\nsentinel sentinel-pass {p}\n"
                )),
            ),
        );
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `redis-server --sentinel` ({e}). The tests need Redis 7 installed: \
                     `apt-get install -y redis-server`, or run `bash scripts/test.sh`, which installs it."
                )
            });
        let deadline = Instant::now() + WAIT;
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("+monitor master")
        {
            assert!(
                Instant::now() < deadline,
                "sentinel on port {port} did not start monitoring within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        SentinelProcess {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A master, its replica and three sentinels watching them.
pub struct Sentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<SentinelProcess>,
}

impl Sentinels {
    /// Starts them; `replica_args` go to the replica's `redis-server`.
    pub async fn start(replica_args: &[&str]) -> Sentinels {
        Self::start_with(replica_args, None).await
    }

    /// [`Sentinels::start`], the sentinels asking for `password` if given.
    pub async fn start_with(replica_args: &[&str], password: Option<&str>) -> Sentinels {
        let master = RedisServer::start();
        let master_port = master.port.to_string();
        let mut args = vec!["--replicaof", "127.0.0.1", &master_port];
        args.extend_from_slice(replica_args);
        let replica = RedisServer::start_with(&args);
        let mut on_replica = RawClient::connect(replica.addr()).await;
        eventually("the replica's link to the master is up", async || {
            on_replica
                .call("INFO replication")
                .await
                .contains("master_link_status:up")
        })
        .await;
        let sentinels = (0..3)
            .map(|_| SentinelProcess::start(master.port, password))
            .collect();
        Sentinels {
            master,
            replica,
            sentinels,
        }
    }

    /// `redis-sentinel://` with every sentinel, for the proxy's `upstream`.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis-sentinel://{}/{MASTER_NAME}", addrs.join(","))
    }

    /// Waits until every sentinel knows the two others (they find each
    /// other through the master every 2 s): without that, a master that
    /// dies has no quorum to fail it over.
    pub async fn wait_until_acquainted(&self) {
        for sentinel in &self.sentinels {
            let mut client = RawClient::connect(("127.0.0.1", sentinel.port)).await;
            eventually("the sentinels know each other", async || {
                let reply = client.call(&format!("SENTINEL MASTER {MASTER_NAME}")).await;
                reply.contains("num-other-sentinels\r\n$1\r\n2\r\n")
            })
            .await;
        }
    }

    /// The port of the master the first sentinel names.
    pub async fn master_port(&self) -> u16 {
        let mut sentinel = RawClient::connect(("127.0.0.1", self.sentinels[0].port)).await;
        let reply = sentinel
            .call(&format!("SENTINEL GET-MASTER-ADDR-BY-NAME {MASTER_NAME}"))
            .await;
        let port = reply.lines().nth(4).unwrap_or_default();
        port.parse()
            .unwrap_or_else(|_| panic!("no master address in {reply:?}"))
    }

    /// `SENTINEL FAILOVER` on the first sentinel (asked again while it has
    /// no replica it deems good yet), then waits until it names the
    /// replica as the master.
    pub async fn failover(&self) {
        let mut sentinel = RawClient::connect(("127.0.0.1", self.sentinels[0].port)).await;
        eventually("a sentinel accepts SENTINEL FAILOVER", async || {
            sentinel.call(&format!("SENTINEL FAILOVER {MASTER_NAME}")).await == "+OK\r\n"
        })
        .await;
        let replica = self.replica.port;
        eventually("the sentinels name the replica as the master", async || {
            self.master_port().await == replica
        })
        .await;
    }
}
