//! What a cluster-aware client asks of its "cluster": cachefence answers as
//! a one-node cluster at its own address that owns every slot, so Lettuce,
//! redis-py's `RedisCluster` or go-redis' `ClusterClient` pointed at the
//! proxy send everything to it and never see a `MOVED`.

use bytes::Bytes;

use crate::resp::encode::error;

/// The reply to `CLUSTER <sub> …` when the proxy answers it itself
/// (`None`: the subcommand goes to the cluster, such as `KEYSLOT`).
/// `resp3`: the client's protocol.
pub fn cluster_reply(sub: &[u8], (host, port): (&str, u16), resp3: bool) -> Option<Bytes> {
    let id = node_id(host, port);
    let sub = sub.to_ascii_uppercase();
    let reply = match &sub[..] {
        b"SLOTS" => format!(
            "*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n{}:{port}\r\n{}",
            bulk(host),
            bulk(&id)
        ),
        b"SHARDS" => {
            let node = [
                ("id", bulk(&id)),
                ("port", format!(":{port}\r\n")),
                ("ip", bulk(host)),
                ("endpoint", bulk(host)),
                ("role", bulk("master")),
                ("replication-offset", ":0\r\n".to_string()),
                ("health", bulk("online")),
            ];
            let fields: String = node.iter().map(|(k, v)| format!("{}{v}", bulk(k))).collect();
            let (shard, map) = match resp3 {
                true => ("%2\r\n", format!("%{}\r\n", node.len())),
                false => ("*4\r\n", format!("*{}\r\n", node.len() * 2)),
            };
            format!(
                "*1\r\n{shard}{}*2\r\n:0\r\n:16383\r\n{}*1\r\n{map}{fields}",
                bulk("slots"),
                bulk("nodes")
            )
        }
        b"NODES" => bulk(&format!(
            "{id} {host}:{port}@{} myself,master - 0 0 1 connected 0-16383\n",
            u32::from(port) + 10000
        )),
        b"INFO" => bulk(
            "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n\
             cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\n\
             cluster_size:1\r\ncluster_current_epoch:1\r\ncluster_my_epoch:1\r\n",
        ),
        b"MYID" => bulk(&id),
        b"MYSHARDID" => bulk(&id),
        b"REPLICAS" | b"SLAVES" => "*0\r\n".to_string(),
        // Commands that change the cluster are the operator's, on the nodes.
        b"ADDSLOTS" | b"ADDSLOTSRANGE" | b"DELSLOTS" | b"DELSLOTSRANGE" | b"FAILOVER" | b"FORGET"
        | b"MEET" | b"REPLICATE" | b"RESET" | b"SETSLOT" | b"FLUSHSLOTS" | b"BUMPEPOCH"
        | b"SET-CONFIG-EPOCH" | b"SAVECONFIG" => {
            return Some(error(
                "ERR cachefence: CLUSTER changes are made on the cluster's nodes, not through the proxy",
            ));
        }
        _ => return None,
    };
    Some(Bytes::from(reply))
}

/// A 40-character node id of the proxy's address (stable across restarts).
fn node_id(host: &str, port: u16) -> String {
    sha1_smol::Sha1::from(format!("cachefence {host}:{port}"))
        .digest()
        .to_string()
}

fn bulk(text: &str) -> String {
    format!("${}\r\n{text}\r\n", text.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::value::Value;

    const ME: (&str, u16) = ("127.0.0.1", 6380);

    fn decoded(sub: &[u8], resp3: bool) -> Value {
        let reply = cluster_reply(sub, ME, resp3).expect("answered here");
        Value::decode(&reply, resp3).expect("one whole frame")
    }

    #[test]
    fn slots_name_the_proxy_for_every_slot() {
        let id = node_id("127.0.0.1", 6380);
        let reply = cluster_reply(b"slots", ME, false).unwrap();
        assert_eq!(
            reply,
            format!("*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:6380\r\n$40\r\n{id}\r\n")
        );
        assert_eq!(id.len(), 40);
    }

    #[test]
    fn every_answer_is_one_whole_frame() {
        for sub in [
            &b"SHARDS"[..],
            b"NODES",
            b"INFO",
            b"MYID",
            b"MYSHARDID",
            b"REPLICAS",
            b"MEET",
        ] {
            for resp3 in [false, true] {
                decoded(sub, resp3);
            }
        }
        let Value::Bulk(nodes) = decoded(b"nodes", false) else {
            panic!("NODES is a bulk")
        };
        assert!(nodes.ends_with(b" 127.0.0.1:6380@16380 myself,master - 0 0 1 connected 0-16383\n"));
        assert_eq!(cluster_reply(b"KEYSLOT", ME, false), None);
    }
}
