//! A Redis Cluster upstream (`upstream = "redis-cluster://h1:7000,h2:7001"`,
//! #19): the application keeps a plain client and one endpoint.
//!
//! Every upstream connection the proxy opens (a session's own, a shared
//! one, a worker's) is a [`router`] task behind an in-process pipe: the
//! rest of the proxy writes requests and reads replies in order exactly as
//! on a connection to one Redis, and the router sends each request to the
//! master owning its keys' slot, follows `MOVED` and `ASK`, retries
//! `TRYAGAIN`, splits the multi-key commands that a cluster client splits
//! and answers the `CLUSTER` questions of cluster-aware clients as a
//! one-node cluster at the proxy's own address. The slot map and the key
//! table are the process's ([`Cluster`]).

pub mod keys;
pub mod local;
pub mod router;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::OnceCell;
use tracing::{debug, info};

use super::{UpstreamError, call_reply};
use crate::config::Upstream;
use crate::resp::encode::command;
use crate::resp::value::Value;
use keys::{KeyTable, SLOTS};

/// A cluster node's port when the URL names none.
pub const DEFAULT_PORT: u16 = 6379;
/// The least time between two refreshes of the slot map asked for by
/// failing requests.
const MIN_REFRESH_GAP: Duration = Duration::from_millis(100);
/// The slot map is asked again this often even when nothing failed (a
/// failover or a reshard that no request has met yet).
const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// Asks the cluster for its slot map every [`REFRESH_EVERY`] for the life
/// of the process (needs a runtime).
pub fn follow(cluster: Arc<Cluster>, upstream: Upstream, timeout: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH_EVERY).await;
            let seen = cluster.current();
            if let Err(error) = cluster.refresh(&upstream, timeout, seen.as_ref()).await {
                tracing::warn!(%error, "the periodic cluster slot map refresh failed");
            }
        }
    });
}

/// Which master serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The masters, in the order `CLUSTER SLOTS` named them first.
    pub nodes: Vec<(String, u16)>,
    /// Per slot, an index into `nodes` (`u16::MAX`: no master).
    slots: Vec<u16>,
}

impl SlotMap {
    /// The map of a `CLUSTER SLOTS` reply.
    pub fn from_slots_reply(reply: &Value) -> Option<SlotMap> {
        let Value::Array(ranges) = reply else {
            return None;
        };
        let mut map = SlotMap {
            nodes: Vec::new(),
            slots: vec![u16::MAX; SLOTS],
        };
        // In slot order: the masters' positions (which SCAN cursors carry)
        // then do not depend on the order a node lists them in.
        let mut ranges: Vec<&Value> = ranges.iter().collect();
        ranges.sort_by_key(|range| match range {
            Value::Array(fields) => fields.first().and_then(Value::as_int).unwrap_or(i64::MAX),
            _ => i64::MAX,
        });
        for range in ranges {
            let Value::Array(fields) = range else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let (Some(ip), Some(Value::Int(port))) =
                (master.first().and_then(Value::as_bytes), master.get(1))
            else {
                return None;
            };
            let node = (
                String::from_utf8_lossy(ip).into_owned(),
                u16::try_from(*port).ok()?,
            );
            let index = match map.nodes.iter().position(|n| *n == node) {
                Some(index) => index,
                None => {
                    map.nodes.push(node);
                    map.nodes.len() - 1
                }
            };
            let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
            for slot in map.slots.get_mut(start..=end)? {
                *slot = index as u16;
            }
        }
        (!map.nodes.is_empty()).then_some(map)
    }

    /// The map of a `CLUSTER SHARDS` reply (Redis 7): per shard its slot
    /// ranges and the master among its nodes (an online one).
    pub fn from_shards_reply(reply: &Value) -> Option<SlotMap> {
        let Value::Array(shards) = reply else {
            return None;
        };
        let mut ranges = Vec::new();
        for shard in shards {
            let (Some(Value::Array(slots)), Some(Value::Array(nodes))) =
                (field(shard, b"slots"), field(shard, b"nodes"))
            else {
                return None;
            };
            let master = nodes.iter().find(|node| {
                field(node, b"role")
                    .and_then(Value::as_bytes)
                    .is_some_and(|r| &r[..] == b"master")
                    && field(node, b"health")
                        .and_then(Value::as_bytes)
                        .is_none_or(|h| &h[..] == b"online")
            });
            let Some(master) = master else { continue };
            let (Some(ip), Some(port)) = (
                field(master, b"ip").and_then(Value::as_bytes),
                field(master, b"port").and_then(Value::as_int),
            ) else {
                return None;
            };
            for pair in slots.chunks(2) {
                let [start, end] = pair else { return None };
                ranges.push(Value::Array(vec![
                    Value::Int(start.as_int()?),
                    Value::Int(end.as_int()?),
                    Value::Array(vec![Value::Bulk(ip.clone()), Value::Int(port)]),
                ]));
            }
        }
        SlotMap::from_slots_reply(&Value::Array(ranges))
    }

    /// The master of `slot`, if one serves it.
    pub fn node(&self, slot: u16) -> Option<&(String, u16)> {
        self.nodes.get(usize::from(*self.slots.get(usize::from(slot))?))
    }

    /// `slot` is served by `node` now (a `MOVED` says so).
    fn moved(&mut self, slot: u16, node: (String, u16)) {
        let index = match self.nodes.iter().position(|n| *n == node) {
            Some(index) => index,
            None => {
                self.nodes.push(node);
                self.nodes.len() - 1
            }
        };
        if let Some(entry) = self.slots.get_mut(usize::from(slot)) {
            *entry = index as u16;
        }
    }
}

/// The value of `name` in a reply map (RESP2: a flat array of names and
/// values).
fn field<'a>(map: &'a Value, name: &[u8]) -> Option<&'a Value> {
    let Value::Array(items) = map else { return None };
    items
        .chunks(2)
        .find(|pair| pair[0].as_bytes().is_some_and(|n| &n[..] == name))
        .and_then(|pair| pair.get(1))
}

/// The seeds, the slot map and the key table, shared by every connection.
#[derive(Debug)]
pub struct Cluster {
    pub seeds: Vec<(String, u16)>,
    map: RwLock<Option<Arc<SlotMap>>>,
    table: OnceCell<Arc<KeyTable>>,
    /// One refresh at a time; the others wait for its map. Holds when the
    /// last one ended.
    refreshing: tokio::sync::Mutex<Option<std::time::Instant>>,
    /// The proxy's own address, which `CLUSTER SLOTS` and the like name
    /// (set at start).
    pub advertise: RwLock<(String, u16)>,
    pub stats: ClusterStats,
    /// A master that left the map (a replica promoted in its place): its
    /// last fence moves may be lost, so tickets from before admit no fill
    /// ([`crate::fence::failover`]).
    pub failovers: Arc<crate::fence::failover::Failovers>,
    /// Open connections per node (routers' connections to masters).
    pub connections: dashmap::DashMap<(String, u16), u64>,
    /// Per node: failed connects, connections lost, slot map requests
    /// that failed.
    pub errors: dashmap::DashMap<(String, u16), u64>,
    /// The per-node `/metrics` families for the nodes seen so far.
    families: std::sync::Mutex<NodeFamilies>,
}

/// The per-node `/metrics` families. A family's label values are static,
/// so the list is made (and leaked) anew only when a node is seen for the
/// first time: bounded by the nodes a process ever meets.
#[derive(Debug, Default)]
struct NodeFamilies {
    names: Vec<((String, u16), &'static str)>,
    list: Option<&'static [&'static crate::telemetry::Family]>,
}

/// Counters for `CACHE.INFO` and `/metrics`.
#[derive(Debug, Default)]
pub struct ClusterStats {
    pub refreshes: AtomicU64,
    pub moved: AtomicU64,
    pub asked: AtomicU64,
    pub tryagain: AtomicU64,
    pub node_errors: AtomicU64,
}

impl PartialEq for Cluster {
    fn eq(&self, other: &Cluster) -> bool {
        self.seeds == other.seeds
    }
}

impl Eq for Cluster {}

impl Cluster {
    pub fn new(seeds: Vec<(String, u16)>) -> Cluster {
        Cluster {
            seeds,
            map: RwLock::default(),
            table: OnceCell::new(),
            refreshing: tokio::sync::Mutex::new(None),
            advertise: RwLock::new(("127.0.0.1".to_string(), 6380)),
            stats: ClusterStats::default(),
            failovers: Arc::default(),
            connections: dashmap::DashMap::new(),
            errors: dashmap::DashMap::new(),
            families: std::sync::Mutex::default(),
        }
    }

    /// A node failed: counted in total and for the node.
    pub fn node_failed(&self, node: &(String, u16)) {
        self.stats.node_errors.fetch_add(1, Ordering::Relaxed);
        *self.errors.entry(node.clone()).or_default() += 1;
    }

    /// `/metrics`: connections and errors per node
    /// (`cachefence_cluster_node_connections`,
    /// `cachefence_cluster_node_errors_total`, label `node`). Returns the
    /// families to write.
    pub fn scrape_nodes<'a>(
        &self,
        out: &mut dyn FnMut(crate::telemetry::Sample<'a>),
    ) -> &'static [&'static crate::telemetry::Family] {
        use crate::telemetry::{Family, Kind, Sample, Value};
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let seen: Vec<(String, u16)> = self
            .connections
            .iter()
            .map(|e| e.key().clone())
            .chain(self.errors.iter().map(|e| e.key().clone()))
            .collect();
        let mut grew = false;
        for node in seen {
            if !families.names.iter().any(|(n, _)| *n == node) {
                let name: &'static str = super::sentinel::host_port(&node.0, node.1).leak();
                families.names.push((node, name));
                grew = true;
            }
        }
        if grew || families.list.is_none() {
            let values: &'static [&'static str] =
                families.names.iter().map(|(_, n)| *n).collect::<Vec<_>>().leak();
            let per_node = |kind, name, help| -> &'static Family {
                Box::leak(Box::new(Family::new(kind, name, help).by("node", values)))
            };
            let connections = per_node(
                Kind::Gauge,
                "cachefence_cluster_node_connections",
                "Open connections to each Redis Cluster node (the routers' connections to masters).",
            );
            let errors = per_node(
                Kind::Counter,
                "cachefence_cluster_node_errors_total",
                "Per Redis Cluster node: connects that failed, connections lost, slot map requests that failed.",
            );
            families.list = Some(vec![connections, errors].leak());
        }
        let list = families.list.expect("made above");
        for (node, name) in &families.names {
            let read = |map: &dashmap::DashMap<(String, u16), u64>| map.get(node).map_or(0, |v| *v);
            for (family, value) in [(list[0], read(&self.connections)), (list[1], read(&self.errors))] {
                out(Sample {
                    field: family.name,
                    kind: family.kind,
                    stats: None,
                    family: Some(family),
                    label: Some(name),
                    value: Value::Int(value),
                });
            }
        }
        list
    }

    /// `redis-cluster://h1:p1,h2:p2`, without credentials.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|(h, p)| super::sentinel::host_port(h, *p))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// The slot map known now, if any.
    pub fn current(&self) -> Option<Arc<SlotMap>> {
        self.map.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The slot map, asked of the cluster if none is known yet.
    pub async fn map(&self, upstream: &Upstream, timeout: Duration) -> Result<Arc<SlotMap>, UpstreamError> {
        match self.current() {
            Some(map) => Ok(map),
            None => self.refresh(upstream, timeout, None).await,
        }
    }

    /// Asks the known masters, then the seeds, for `CLUSTER SLOTS`; the
    /// first answer is the new map. `seen`: the map the caller found stale
    /// (if another refresh replaced it meanwhile, that one is taken).
    pub async fn refresh(
        &self,
        upstream: &Upstream,
        timeout: Duration,
        seen: Option<&Arc<SlotMap>>,
    ) -> Result<Arc<SlotMap>, UpstreamError> {
        let mut last = self.refreshing.lock().await;
        if let (Some(seen), Some(now)) = (seen, self.current()) {
            // Another refresh replaced it meanwhile, or one ended a moment
            // ago (a node that is down fails every request sent to it: the
            // cluster is not asked again for each).
            if !Arc::ptr_eq(seen, &now) || last.is_some_and(|at| at.elapsed() < MIN_REFRESH_GAP) {
                return Ok(now);
            }
        }
        *last = Some(std::time::Instant::now());
        let mut candidates: Vec<(String, u16)> = self.current().map(|m| m.nodes.clone()).unwrap_or_default();
        for seed in &self.seeds {
            if !candidates.contains(seed) {
                candidates.push(seed.clone());
            }
        }
        let mut reasons = Vec::new();
        for (host, port) in candidates {
            match self.ask_slots(upstream, &host, port, timeout).await {
                Ok(map) => {
                    self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                    let map = Arc::new(map);
                    let previous = self
                        .map
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .replace(map.clone());
                    if previous.as_deref() != Some(&*map) {
                        info!(masters = map.nodes.len(), "cluster slot map loaded");
                    }
                    let gone: Vec<&(String, u16)> = previous
                        .iter()
                        .flat_map(|p| p.nodes.iter())
                        .filter(|n| !map.nodes.contains(n))
                        .collect();
                    if !gone.is_empty() {
                        info!(
                            ?gone,
                            "a cluster master is no longer one (a failover): tickets from before it fill nothing"
                        );
                        self.failovers.record();
                        // The new map is in force: replayed deletes go by it.
                        self.failovers.replay();
                    }
                    return Ok(map);
                }
                Err(reason) => {
                    self.node_failed(&(host.clone(), port));
                    debug!(node = %super::sentinel::host_port(&host, port), %reason, "no slot map from this node");
                    reasons.push(format!("{}: {reason}", super::sentinel::host_port(&host, port)));
                }
            }
        }
        Err(UpstreamError::Unreachable {
            addr: self.url(),
            reason: format!("no node gave the slot map ({})", reasons.join("; ")),
        })
    }

    async fn ask_slots(
        &self,
        upstream: &Upstream,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<SlotMap, String> {
        let mut stream = super::connect_to(upstream, host, port, timeout)
            .await
            .map_err(|e| e.detail())?;
        // CLUSTER SHARDS (Redis 7), else CLUSTER SLOTS (deprecated there).
        let shards = command(&[b"CLUSTER", b"SHARDS"]);
        match tokio::time::timeout(timeout, call_reply(&mut stream, &shards)).await {
            Ok(Ok(reply)) => {
                if let Some(map) = Value::decode(&reply, false)
                    .as_ref()
                    .and_then(SlotMap::from_shards_reply)
                {
                    return Ok(map);
                }
            }
            Ok(Err(super::CallError::Refused(_))) => {}
            Ok(Err(error)) => return Err(format!("CLUSTER SHARDS: {error}")),
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        }
        let request = command(&[b"CLUSTER", b"SLOTS"]);
        let reply = match tokio::time::timeout(timeout, call_reply(&mut stream, &request)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => return Err(format!("CLUSTER SLOTS: {error}")),
            Err(_) => return Err(format!("no answer within {timeout:?}")),
        };
        Value::decode(&reply, false)
            .as_ref()
            .and_then(SlotMap::from_slots_reply)
            .ok_or_else(|| "CLUSTER SLOTS: no slots served".to_string())
    }

    /// `slot` moved to `node` (a `MOVED` reply): the map is updated at once
    /// (a full refresh follows in the background).
    /// A node that was no master before taking slots over is a replica
    /// promoted (or a new master): counted as a failover at once, before
    /// the request is sent there again.
    pub fn moved(&self, slot: u16, node: (String, u16)) {
        self.stats.moved.fetch_add(1, Ordering::Relaxed);
        let mut held = self.map.write().unwrap_or_else(|p| p.into_inner());
        let mut failover = false;
        if let Some(map) = held.as_mut() {
            if !map.nodes.contains(&node) {
                failover = true;
                info!(node = %super::sentinel::host_port(&node.0, node.1), "a new master serves a slot (a failover): tickets from before it fill nothing");
                self.failovers.record();
            }
            Arc::make_mut(map).moved(slot, node);
        }
        drop(held);
        if failover {
            // The slot's new master is in the map: replayed deletes go there.
            self.failovers.replay();
        }
    }

    /// The key table, from the first node's `COMMAND` the first time.
    pub async fn table(
        &self,
        upstream: &Upstream,
        timeout: Duration,
    ) -> Result<Arc<KeyTable>, UpstreamError> {
        self.table
            .get_or_try_init(|| async {
                let map = self.map(upstream, timeout).await?;
                let (host, port) = map.nodes[0].clone();
                let addr = super::sentinel::host_port(&host, port);
                let unreachable = |reason: String| UpstreamError::Unreachable {
                    addr: addr.clone(),
                    reason,
                };
                let mut stream = super::connect_to(upstream, &host, port, timeout).await?;
                let request = command(&[b"COMMAND"]);
                let reply = tokio::time::timeout(timeout * 4, call_reply(&mut stream, &request))
                    .await
                    .map_err(|_| unreachable("no answer to COMMAND".to_string()))?
                    .map_err(|e| unreachable(format!("COMMAND: {e}")))?;
                Value::decode(&reply, false)
                    .as_ref()
                    .and_then(KeyTable::from_command_reply)
                    .map(Arc::new)
                    .ok_or_else(|| unreachable("COMMAND: not a command table".to_string()))
            })
            .await
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn range(start: i64, end: i64, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::Bulk(Bytes::from_static(b"127.0.0.1")),
                Value::Int(port),
                Value::Bulk(Bytes::from_static(b"id")),
            ]),
        ])
    }

    fn shard(slots: &[i64], nodes: Vec<(&str, i64, &str, &str)>) -> Value {
        let bulk = |s: &str| Value::Bulk(Bytes::copy_from_slice(s.as_bytes()));
        let nodes = nodes
            .into_iter()
            .map(|(ip, port, role, health)| {
                Value::Array(vec![
                    bulk("id"),
                    bulk("x"),
                    bulk("port"),
                    Value::Int(port),
                    bulk("ip"),
                    bulk(ip),
                    bulk("role"),
                    bulk(role),
                    bulk("health"),
                    bulk(health),
                ])
            })
            .collect();
        Value::Array(vec![
            bulk("slots"),
            Value::Array(slots.iter().map(|s| Value::Int(*s)).collect()),
            bulk("nodes"),
            Value::Array(nodes),
        ])
    }

    #[test]
    fn a_shards_reply_maps_slots_to_each_shards_online_master() {
        let reply = Value::Array(vec![
            shard(
                &[0, 5460, 10923, 10930],
                vec![
                    ("127.0.0.1", 7003, "replica", "online"),
                    ("127.0.0.1", 7000, "master", "online"),
                ],
            ),
            shard(
                &[5461, 10922, 10931, 16383],
                vec![("127.0.0.1", 7001, "master", "online")],
            ),
        ]);
        let map = SlotMap::from_shards_reply(&reply).expect("a map");
        let node = |port| Some(("127.0.0.1".to_string(), port));
        assert_eq!(map.node(0).cloned(), node(7000));
        assert_eq!(map.node(10925).cloned(), node(7000));
        assert_eq!(map.node(5461).cloned(), node(7001));
        assert_eq!(map.node(16383).cloned(), node(7001));
        // A shard whose master is failing serves nothing until a new one is named.
        let down = Value::Array(vec![
            shard(&[0, 100], vec![("127.0.0.1", 7000, "master", "fail")]),
            shard(&[101, 16383], vec![("127.0.0.1", 7001, "master", "online")]),
        ]);
        let map = SlotMap::from_shards_reply(&down).expect("a map");
        assert_eq!(map.node(0), None);
        assert_eq!(map.node(101).cloned(), node(7001));
    }

    #[test]
    fn a_slots_reply_maps_every_slot_to_its_master() {
        let reply = Value::Array(vec![
            range(0, 5460, 7000),
            range(5461, 10922, 7001),
            range(10923, 16383, 7002),
        ]);
        let mut map = SlotMap::from_slots_reply(&reply).expect("a map");
        assert_eq!(map.nodes.len(), 3);
        assert_eq!(map.node(0), Some(&("127.0.0.1".to_string(), 7000)));
        assert_eq!(map.node(5461), Some(&("127.0.0.1".to_string(), 7001)));
        assert_eq!(map.node(16383), Some(&("127.0.0.1".to_string(), 7002)));
        map.moved(0, ("127.0.0.1".to_string(), 7003));
        assert_eq!(map.node(0), Some(&("127.0.0.1".to_string(), 7003)));
        assert_eq!(map.node(1), Some(&("127.0.0.1".to_string(), 7000)));
        // Listed in any order, the masters are numbered in slot order.
        let shuffled = Value::Array(vec![
            range(10923, 16383, 7002),
            range(0, 5460, 7000),
            range(5461, 10922, 7001),
        ]);
        let ports: Vec<u16> = SlotMap::from_slots_reply(&shuffled)
            .unwrap()
            .nodes
            .iter()
            .map(|n| n.1)
            .collect();
        assert_eq!(ports, vec![7000, 7001, 7002]);
        let partial = SlotMap::from_slots_reply(&Value::Array(vec![range(0, 10, 7000)])).unwrap();
        assert_eq!(partial.node(11), None);
        assert!(SlotMap::from_slots_reply(&Value::Array(vec![range(0, 16384, 7000)])).is_none());
    }
}
