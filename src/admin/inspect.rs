//! The read-only `CACHE.*` commands: what the proxy is and what it saw.

use bytes::Bytes;

use super::COMMANDS;
use crate::app::App;
use crate::fence::Fences;
use crate::fence::plan::{Plan, rewrite};
use crate::fence::script::{ScriptCall, fence_key};
use crate::fence::translate::ScriptReply;
use crate::resp::value::Reply;
use crate::telemetry::Sample;

/// `CACHE.HELP`: one line per command.
pub fn help() -> Reply {
    Reply::Array(
        COMMANDS
            .iter()
            .map(|c| Reply::Bulk(Bytes::from_static(c.help.as_bytes())))
            .collect(),
    )
}

/// `CACHE.STATS`: every counter of the fence layer's groups (and the
/// change log's, when it runs) that has a stats name, in declaration order.
pub fn stats(fences: &Fences, app: &App) -> Reply {
    let mut fields = Vec::with_capacity(40);
    let mut keep = |sample: Sample<'_>| {
        if let Some(name) = sample.stats {
            let name = Reply::Bulk(Bytes::from_static(name.as_bytes()));
            fields.push((name, Reply::Int(sample.value.as_u64() as i64)));
        }
    };
    fences.visit_stats(&mut keep);
    if let Some(changelog) = &app.changelog {
        changelog.visit(&mut keep);
    }
    if let Some(lag) = app.lag() {
        lag.stats.visit(&mut keep);
    }
    Reply::Map(fields)
}

/// `CACHE.INFO`: the proxy itself, as Redis' `INFO` formats a section.
/// Addresses only, never a URL or a password.
/// A Sentinel upstream's state: the master named last, the failovers seen
/// and the counters of [`crate::redis::sentinel::SentinelStats`].
fn sentinel_lines(sentinel: &crate::redis::sentinel::Sentinel) -> Vec<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let master = sentinel.last_master().map_or(String::new(), |(host, port)| {
        crate::redis::sentinel::host_port(&host, port)
    });
    vec![
        format!("sentinel_master_name:{}", sentinel.master_name),
        format!("sentinel_master:{master}"),
        format!("sentinel_failovers:{}", sentinel.failovers.count()),
        format!("sentinel_asked:{}", sentinel.stats.asked.load(Relaxed)),
        format!("sentinel_errors:{}", sentinel.stats.errors.load(Relaxed)),
        format!("sentinel_not_master:{}", sentinel.stats.not_master.load(Relaxed)),
    ]
    .into_iter()
    .chain(replay_lines(&sentinel.failovers))
    .collect()
}

/// Keys deleted again after failovers, and those forgotten for room
/// ([`crate::fence::failover::Failovers::replay`]).
fn replay_lines(failovers: &crate::fence::failover::Failovers) -> [String; 2] {
    use std::sync::atomic::Ordering::Relaxed;
    [
        format!("failover_replayed_keys:{}", failovers.replayed.load(Relaxed)),
        format!("failover_unreplayed_keys:{}", failovers.unreplayed.load(Relaxed)),
    ]
}

/// A Redis Cluster upstream: its masters and the router's counters.
fn cluster_lines(cluster: &crate::redis::cluster::Cluster) -> Vec<String> {
    use std::sync::atomic::Ordering::Relaxed;
    let masters: Vec<String> = cluster
        .current()
        .map(|map| {
            map.nodes
                .iter()
                .map(|(host, port)| crate::redis::sentinel::host_port(host, *port))
                .collect()
        })
        .unwrap_or_default();
    let stats = &cluster.stats;
    let mut connections: Vec<String> = cluster
        .connections
        .iter()
        .map(|entry| {
            let (host, port) = entry.key();
            format!(
                "{}={}",
                crate::redis::sentinel::host_port(host, *port),
                entry.value()
            )
        })
        .collect();
    connections.sort();
    vec![
        format!("cluster_masters:{}", masters.join(",")),
        format!("cluster_connections:{}", connections.join(",")),
        format!("cluster_failovers:{}", cluster.failovers.count()),
        format!("cluster_map_refreshes:{}", stats.refreshes.load(Relaxed)),
        format!("cluster_moved:{}", stats.moved.load(Relaxed)),
        format!("cluster_ask:{}", stats.asked.load(Relaxed)),
        format!("cluster_tryagain:{}", stats.tryagain.load(Relaxed)),
        format!("cluster_node_errors:{}", stats.node_errors.load(Relaxed)),
    ]
    .into_iter()
    .chain(replay_lines(&cluster.failovers))
    .collect()
}

pub fn info(fences: &Fences, app: &App) -> Reply {
    let config = &app.config;
    let scope = fences.scope();
    let patterns: Vec<&str> = scope.policies().map(|p| p.pattern.as_str()).collect();
    let source = config.source.as_ref().map(|p| p.display().to_string());
    let outbox = config.changelog.as_ref().map(|c| c.outbox.to_string());
    let auto: Vec<String> = scope
        .policies()
        .filter(|p| p.lag_auto)
        .map(|p| {
            let judged = fences.lag.judge(p);
            format!(
                "{}={}:{}",
                p.pattern,
                judged.window.as_millis(),
                judged.policy.as_str()
            )
        })
        .collect();
    let ms =
        |d: Option<std::time::Duration>| d.map_or("unmeasured".to_string(), |d| d.as_millis().to_string());
    let replicas: Vec<String> = app
        .lag()
        .map(|lag| lag.replicas())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, lag)| format!("{name}={}", ms(lag)))
        .collect();
    let lines = [
        "# cachefence".to_string(),
        format!("version:{}", env!("CARGO_PKG_VERSION")),
        format!("uptime_in_seconds:{}", app.started.elapsed().as_secs()),
        format!("process_id:{}", std::process::id()),
        format!("config_file:{}", source.as_deref().unwrap_or("")),
        format!("listen:{}", config.listen),
        format!("upstream:{}", config.upstream.addr()),
        format!("upstream_db:{}", config.upstream.db),
        "fences:on".to_string(),
        format!("fenced_patterns:{}", patterns.join(",")),
        format!("changelog_outbox:{}", outbox.as_deref().unwrap_or("")),
        format!(
            "admin_password:{}",
            match fences.admin_password.load().is_some() {
                true => "set",
                false => "none",
            }
        ),
        // lag_window = "auto": each replica's lag, the measured window, and
        // per auto section the window in force (ms); empty without
        // `[postgres] replicas`.
        format!("replica_lag_ms:{}", replicas.join(",")),
        format!(
            "lag_window_measured_ms:{}",
            app.lag().map_or(String::new(), |lag| ms(lag.window()))
        ),
        format!("lag_window_in_force_ms:{}", auto.join(",")),
    ];
    let mut lines = lines.to_vec();
    if let Some(sentinel) = &config.upstream.sentinel {
        lines.extend(sentinel_lines(sentinel));
    }
    if let Some(cluster) = &config.upstream.cluster {
        lines.extend(cluster_lines(cluster));
    }
    lines.push(String::new());
    Reply::Bulk(lines.join("\r\n").into())
}

/// `CACHE.EXPLAIN key`: the key's recent events here, oldest first.
pub fn explain(fences: &Fences, key: &[u8]) -> Reply {
    Reply::Array(
        fences
            .history
            .explain(key)
            .iter()
            .map(|event| Reply::Bulk(event.describe().into()))
            .collect(),
    )
}

/// `CACHE.FENCE key`: the fence as Redis holds it (read by the script).
pub fn fence(key: Bytes) -> Plan {
    let call = ScriptCall::new(vec![fence_key(&key).into()], vec![Bytes::from_static(b"peek")]);
    rewrite(call, ScriptReply::FenceInfo { key })
}
