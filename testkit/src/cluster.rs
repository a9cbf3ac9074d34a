//! A Redis Cluster of the test's own: three masters and a replica each
//! (`redis-server --cluster-enabled yes` ×6, `redis-cli --cluster create`),
//! on free loopback ports no higher than 55535 (a node's cluster bus
//! listens at its port + 10000).

use std::process::Command;

use crate::client::RawClient;
use crate::redis::RedisServer;
use crate::wait::eventually;

/// A 3-master, 3-replica cluster; stopped on drop.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

/// `redis-cli --cluster <args>`, which must succeed.
fn redis_cli_cluster(args: &[impl AsRef<std::ffi::OsStr> + std::fmt::Debug]) {
    let output = Command::new("redis-cli")
        .arg("--cluster")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `redis-cli --cluster` ({e}): install redis-tools"));
    assert!(
        output.status.success(),
        "redis-cli --cluster {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A free port whose cluster bus port is free too.
fn cluster_port() -> u16 {
    for _ in 0..200 {
        let port = crate::redis::free_port();
        if port <= 55535 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port with a free cluster bus port (port + 10000) in 200 tries");
}

impl Cluster {
    pub async fn start() -> Cluster {
        let mut nodes = Vec::new();
        while nodes.len() < 6 {
            let port = cluster_port();
            let conf = format!("nodes-{port}.conf");
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "2000",
                // A replica syncs at once (not 5 s later), and may take over
                // however long its master has been gone.
                "--repl-diskless-sync-delay",
                "0",
                "--cluster-replica-validity-factor",
                "0",
            ];
            if let Some(node) = RedisServer::try_start_on(port, &args) {
                nodes.push(node);
            }
        }
        let mut create: Vec<String> = vec!["create".into()];
        create.extend(nodes.iter().map(RedisServer::addr));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        redis_cli_cluster(&create);
        for node in &nodes {
            let mut client = RawClient::connect(node.addr()).await;
            eventually("every node says the cluster is ok", async || {
                client.call("CLUSTER INFO").await.contains("cluster_state:ok")
            })
            .await;
        }
        for node in &nodes {
            let mut client = RawClient::connect(node.addr()).await;
            eventually("every replica is in sync with its master", async || {
                let info = client.call("INFO replication").await;
                info.contains("role:master") || info.contains("master_link_status:up")
            })
            .await;
        }
        Cluster { nodes }
    }

    /// `redis-cluster://` with one seed (the rest is learnt from it).
    pub fn url(&self) -> String {
        format!("redis-cluster://{}", self.nodes[0].addr())
    }

    /// The nodes that are masters now.
    pub async fn masters(&self) -> Vec<&RedisServer> {
        let mut masters = Vec::new();
        for node in &self.nodes {
            let role = RawClient::connect(node.addr()).await.call("ROLE").await;
            if role.starts_with("*3\r\n$6\r\nmaster\r\n") {
                masters.push(node);
            }
        }
        masters
    }

    /// A connection straight to the master serving `key` now.
    pub async fn master_of(&self, key: &str) -> RawClient {
        for master in self.masters().await {
            let mut client = RawClient::connect(master.addr()).await;
            // Any other master answers MOVED.
            if !client.call(&format!("EXISTS {key}")).await.starts_with("-MOVED") {
                return client;
            }
        }
        panic!("no master serves {key}");
    }

    /// A node's id (`CLUSTER MYID`).
    pub async fn id(node: &RedisServer) -> String {
        let reply = RawClient::connect(node.addr()).await.call("CLUSTER MYID").await;
        reply.lines().nth(1).expect("an id").to_string()
    }

    /// Moves `slots` slots from master `from` to master `to` with
    /// `redis-cli --cluster reshard` (keys migrated with MIGRATE, clients
    /// see ASK and TRYAGAIN meanwhile). Blocks until it is done.
    pub fn reshard(&self, from: &str, to: &str, slots: u32) {
        let slots = slots.to_string();
        let addr = self.nodes[0].addr();
        redis_cli_cluster(&[
            "reshard",
            &addr,
            "--cluster-from",
            from,
            "--cluster-to",
            to,
            "--cluster-slots",
            &slots,
            "--cluster-yes",
            "--cluster-pipeline",
            "10",
        ]);
    }

    /// The replica of `master` (by `ROLE` of each node).
    pub async fn replica_of(&self, master: &RedisServer) -> &RedisServer {
        for node in &self.nodes {
            let role = RawClient::connect(node.addr()).await.call("ROLE").await;
            let port = format!("\r\n:{}\r\n", master.port);
            if role.starts_with("*5\r\n$5\r\nslave\r\n") && role.contains(&port) {
                return node;
            }
        }
        panic!("master {} has no replica", master.addr());
    }

    /// `CLUSTER FAILOVER` on `replica`, then waits until it is a master
    /// and every node says the cluster is ok.
    pub async fn failover(&self, replica: &RedisServer) {
        let mut client = RawClient::connect(replica.addr()).await;
        assert_eq!(client.call("CLUSTER FAILOVER").await, "+OK\r\n");
        eventually("the replica is a master", async || {
            client.call("ROLE").await.starts_with("*3\r\n$6\r\nmaster\r\n")
        })
        .await;
        for node in &self.nodes {
            let mut client = RawClient::connect(node.addr()).await;
            eventually("every node says the cluster is ok", async || {
                client.call("CLUSTER INFO").await.contains("cluster_state:ok")
            })
            .await;
        }
    }
}
