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
            ];
            if let Some(node) = RedisServer::try_start_on(port, &args) {
                nodes.push(node);
            }
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(node.addr());
        }
        let output = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `redis-cli --cluster create` ({e}): install redis-tools"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        for node in &nodes {
            let mut client = RawClient::connect(node.addr()).await;
            eventually("every node says the cluster is ok", async || {
                client.call("CLUSTER INFO").await.contains("cluster_state:ok")
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
}
