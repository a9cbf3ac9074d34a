//! Telemetry: every metric, declared once here — its field, its
//! `CACHE.STATS` name where it has one, its Prometheus family (name, type,
//! help, label) — and the two views that read the declarations:
//! `CACHE.STATS` (`admin::inspect::stats`) and the Prometheus endpoint ([`exporter`]). Beside them,
//! the `tracing` setup ([`logging`]).
//!
//! Code bumps the fields where things happen (`stats.misses.inc()`: one
//! relaxed atomic add); the types and the declaring macros are in
//! [`registry`]. A family may gather fields of several groups
//! (`cachefence_invalidated_keys_total`); a scrape writes the families in
//! the order of [`PROXY`], [`FENCES`] and [`CHANGELOG`], `CACHE.STATS` the
//! fields in the order they are declared.

pub mod exporter;
pub mod logging;
pub mod registry;

pub use registry::{
    Class, ClassCounts, Counter, Family, Gauge, Histogram, Info, Kind, LATENCY_BUCKETS, PerClass, Read,
    Sample, Value,
};
use registry::{families, metrics};

const VERSION: &str = env!("CARGO_PKG_VERSION");

families! {
    /// The proxy's families, written always.
    PROXY = [
        BUILD_INFO: Gauge "cachefence_build_info" by "version" [VERSION],
            "Always 1; the version is the label.";
        UPTIME: Gauge "cachefence_uptime_seconds", "Seconds since the proxy started.";
        CONNECTIONS_CURRENT: Gauge "cachefence_connections_current", "Client connections being served.";
        CONNECTIONS: Counter "cachefence_connections_total",
            "Client connections accepted (rejected ones included).";
        CONNECTIONS_REJECTED: Counter "cachefence_connections_rejected_total",
            "Clients turned away by max_clients.";
        COMMANDS: Counter "cachefence_commands_total" by "class" Class::NAMES,
            "Client commands by class: passthrough (forwarded as is), intercepted (a fenced key), admin (CACHE.*).";
        COMMAND_DURATION: Histogram "cachefence_command_duration_seconds" by "class" Class::NAMES,
            "From reading a batch of client requests to routing the reply to its last command, per command.";
        UPSTREAM_CONNECT_ERRORS: Counter "cachefence_upstream_connect_errors_total",
            "Upstream connections that could not be opened.";
        UPSTREAM_RECONNECTS: Counter "cachefence_upstream_reconnects_total",
            "Upstream reached again by a client that was served errors while it was away.";
        UPSTREAM_LOST: Counter "cachefence_upstream_lost_total", "Upstream connections lost with replies owed.";
        UPSTREAM_FAILOVERS: Counter "cachefence_upstream_failovers_total",
            "Master changes seen: through Sentinel (+switch-master, or a new answer), or a Redis Cluster master gone \
             from the slot map (a failover may show in more than one step).";
        SENTINEL_ERRORS: Counter "cachefence_sentinel_errors_total",
            "Sentinels that could not be reached or answered an error, and followed sentinels lost.";
        CLUSTER_REDIRECTS: Counter "cachefence_cluster_redirects_total",
            "MOVED and ASK replies of a Redis Cluster upstream followed for the client.";
        CLUSTER_MAP_REFRESHES: Counter "cachefence_cluster_map_refreshes_total",
            "Times a Redis Cluster upstream's slot map was loaded (CLUSTER SHARDS or SLOTS).";
        SHARED_OPENED: Counter "cachefence_shared_upstream_connections_opened_total",
            "Shared upstream connections opened (shared_connections > 0), replacements included.";
        SESSIONS_PINNED: Counter "cachefence_sessions_pinned_total",
            "Clients moved from a shared upstream connection to one of their own (MULTI, SUBSCRIBE, HELLO …).";
        SHARED_MERGED: Counter "cachefence_shared_merged_calls_total",
            "Fence script calls of different clients run as one batch call on a shared upstream connection.";
        CLIENTS_OUTPUT_CLOSED: Counter "cachefence_clients_output_closed_total",
            "Clients closed for not reading their replies while those stalled a shared upstream connection.";
        UPSTREAM_TIMEOUTS: Counter "cachefence_upstream_timeouts_total",
            "Upstream connections closed by reply_timeout.";
        PROTOCOL_ERRORS: Counter "cachefence_protocol_errors_total", "Clients closed for malformed requests.";
        TLS_HANDSHAKE_ERRORS: Counter "cachefence_tls_handshake_errors_total",
            "Client TLS handshakes that failed or timed out.";
        CONFIG_RELOADS: Counter "cachefence_config_reloads_total" by "result" ["applied", "rejected"],
            "Reloads of the config file (SIGHUP, CACHE.RELOAD) by result.";
    ];

    /// The fence layer's families, written when fences are on.
    FENCES = [
        MISSES: Counter "cachefence_misses_total", "Reads of fenced keys that found nothing.";
        TICKETS_ISSUED: Counter "cachefence_tickets_issued_total", "Lease tickets issued to readers that missed.";
        TICKETS_DROPPED: Counter "cachefence_tickets_dropped_total",
            "Misses this proxy could not remember (a bound was reached); their tickets are in the fence.";
        TICKETS_OUTSTANDING: Gauge "cachefence_tickets_outstanding",
            "Keys missed through this proxy whose SET has not come yet (the tickets are in the fences).";
        FILLS: Counter "cachefence_fills_total" by "result" ["accepted", "not_stored_nx"],
            "Fills (a SET after a miss) by result: stored, or not stored because NX found a value.";
        FILLS_REFUSED: Counter "cachefence_fills_refused_total"
            by "reason" ["fence_moved", "fence_missing", "expired", "lag_window", "pending_delete",
                "older_miss_outstanding"],
            "Fills refused as possibly stale, by reason.";
        WRITES: Counter "cachefence_writes_total" by "result" ["stored", "rejected"],
            "Writes to fenced keys without a ticket, by result.";
        INVALIDATED_KEYS: Counter "cachefence_invalidated_keys_total"
            by "source" ["client", "changelog", "admin", "retry", "second_delete"],
            "Keys sent to Redis to be deleted with their fence moved, by source: client (DEL, UNLINK, GETDEL, \
             on_write = \"invalidate\"), changelog, admin (CACHE.INVALIDATE), retry (a client delete delivered \
             late), second_delete (double_delete).";
        HERD_HOLDS: Counter "cachefence_herd_holds_total",
            "Misses held while another client filled the key (herd control).";
        HERD_HOLD_OUTCOMES: Counter "cachefence_herd_hold_outcomes_total" by "outcome" ["served", "timed_out"],
            "Held misses by how they ended: served (got the other client's value) or timed_out (after hold, \
             a ticket of their own).";
        SCRIPT_RELOADS: Counter "cachefence_script_reloads_total",
            "Fence script calls sent again with their source after NOSCRIPT.";
        PROBES: Counter "cachefence_write_probes_total",
            "Pipelined runs of fenced writes whose fences were asked for first (one MGET each).";
        PROBED_WRITES: Counter "cachefence_probed_writes_total" by "sent" ["plain", "script"],
            "Writes of probed runs by how they were sent: plain (no fence existed) or through the fence script.";
        DIRECT_READS: Counter "cachefence_direct_reads_total",
            "GETs sent as the miss script itself, their section's reads mostly missing (one round trip to Redis, not two).";
        UNDELIVERED_PENDING: Gauge "cachefence_undelivered_deletes", "Client deletes waiting to be retried.";
        UNDELIVERED: Counter "cachefence_undelivered_deletes_total" by "event" ["queued", "delivered", "dropped"],
            "Client deletes that could not be delivered, by what became of them.";
    ];

    /// The change-log consumer's families, written with `[postgres]`.
    CHANGELOG = [
        CHANGELOG_CONNECTED: Gauge "cachefence_changelog_connected",
            "1 while the change-log consumer is connected to PostgreSQL.";
        CHANGELOG_ROWS: Counter "cachefence_changelog_rows_total", "Outbox rows applied to Redis and deleted.";
        CHANGELOG_RETRIES: Counter "cachefence_changelog_retries_total",
            "Change-log batches rolled back and tried again.";
        CHANGELOG_LAG: Gauge "cachefence_changelog_lag_seconds",
            "Age of the oldest unconsumed outbox row at the last poll (0: none).";
    ];

    /// The replica-lag monitor's families, written with `[postgres] replicas`
    /// (with `cachefence_replica_lag_seconds`, one sample per replica).
    LAG = [
        LAG_MEASURED: Gauge "cachefence_lag_measured",
            "1 while every replica's lag is measured (lag_window = \"auto\").";
        LAG_WINDOW: Gauge "cachefence_lag_window_seconds",
            "The measured lag window at the last measurement: the largest replica lag over lag_interval (at \
             least lease_ttl + lag_poll), plus lag_margin; the window in force adds the time since.";
        LAG_OVER_CEILING: Counter "cachefence_lag_over_ceiling_seconds_total",
            "Time the measured window was above the smallest lag_window_max, or not measured: fills inside \
             the ceiling were refused.";
        LAG_POLL_ERRORS: Counter "cachefence_lag_poll_errors_total",
            "Lag measurements that failed: the primary or a replica could not be asked.";
    ];
}

metrics! {
    /// The proxy's counters (`Context::metrics`); not in `CACHE.STATS`.
    pub struct Metrics {
        build_info: Info, prom BUILD_INFO[VERSION];
        /// Set from `Context::started` by each scrape.
        uptime_seconds: Gauge, prom UPTIME;
        /// Client connections being served now.
        connections_current: Gauge, prom CONNECTIONS_CURRENT;
        /// Client connections accepted (including rejected ones).
        connections_total: Counter, prom CONNECTIONS;
        /// Clients turned away by `max_clients`.
        connections_rejected: Counter, prom CONNECTIONS_REJECTED;
        /// Requests by [`Class`] (commands, not bytes).
        commands: PerClass<Counter>, prom COMMANDS;
        /// From reading a batch of requests to routing the reply to its last
        /// one, per command, by [`Class`].
        latency: PerClass<Histogram>, prom COMMAND_DURATION;
        /// Upstream connections that could not be opened.
        upstream_connect_errors: Counter, prom UPSTREAM_CONNECT_ERRORS;
        /// Upstream reached again by a client served errors while it was away.
        upstream_reconnects: Counter, prom UPSTREAM_RECONNECTS;
        /// Upstream connections lost with replies pending.
        upstream_lost: Counter, prom UPSTREAM_LOST;
        /// Caught up from the Sentinel upstream's own counts at each scrape.
        upstream_failovers: Counter, prom UPSTREAM_FAILOVERS;
        /// Caught up from the Sentinel upstream's own counts at each scrape.
        sentinel_errors: Counter, prom SENTINEL_ERRORS;
        /// Caught up from the Redis Cluster upstream's own counts at each scrape.
        cluster_redirects: Counter, prom CLUSTER_REDIRECTS;
        cluster_map_refreshes: Counter, prom CLUSTER_MAP_REFRESHES;
        /// Shared upstream connections opened.
        shared_opened: Counter, prom SHARED_OPENED;
        /// Sessions moved off a shared connection.
        sessions_pinned: Counter, prom SESSIONS_PINNED;
        /// Fence script calls merged into batch calls on shared connections.
        shared_merged: Counter, prom SHARED_MERGED;
        /// Clients closed for not reading replies that stalled a shared connection.
        clients_output_closed: Counter, prom CLIENTS_OUTPUT_CLOSED;
        /// Upstream connections closed by `reply_timeout`.
        upstream_timeouts: Counter, prom UPSTREAM_TIMEOUTS;
        /// Clients closed for malformed requests.
        protocol_errors: Counter, prom PROTOCOL_ERRORS;
        /// Clients on the TLS listener whose handshake failed or timed out.
        tls_handshake_errors: Counter, prom TLS_HANDSHAKE_ERRORS;
    }

    /// Config reloads (`Live::stats`).
    pub struct ReloadStats {
        reloads: Counter, prom CONFIG_RELOADS["applied"];
        failures: Counter, prom CONFIG_RELOADS["rejected"];
    }

    /// Counters of the consistency layer (`Fences::stats`).
    pub struct FenceStats {
        misses: Counter, stats "misses", prom MISSES;
        tickets_issued: Counter, stats "tickets_issued", prom TICKETS_ISSUED;
        /// Set from `Fences::tickets_outstanding` when read (by
        /// `CACHE.STATS` (`admin::inspect::stats`) and a scrape), not kept up to date.
        tickets_outstanding: Gauge, stats "tickets_outstanding", prom TICKETS_OUTSTANDING;
        tickets_dropped: Counter, stats "tickets_dropped", prom TICKETS_DROPPED;
        fills_accepted: Counter, stats "fills_accepted", prom FILLS["accepted"];
        fills_not_stored_nx: Counter, stats "fills_not_stored_nx", prom FILLS["not_stored_nx"];
        refused_fence_moved: Counter, stats "fills_refused_fence_moved", prom FILLS_REFUSED["fence_moved"];
        refused_fence_missing: Counter, stats "fills_refused_fence_missing", prom FILLS_REFUSED["fence_missing"];
        refused_expired: Counter, stats "fills_refused_expired", prom FILLS_REFUSED["expired"];
        refused_lag_window: Counter, stats "fills_refused_lag_window", prom FILLS_REFUSED["lag_window"];
        refused_pending_delete: Counter, stats "fills_refused_pending_delete",
            prom FILLS_REFUSED["pending_delete"];
        refused_older_miss_outstanding: Counter, stats "fills_refused_older_miss_outstanding",
            prom FILLS_REFUSED["older_miss_outstanding"];
        writes: Counter, stats "writes", prom WRITES["stored"];
        writes_rejected: Counter, stats "writes_rejected", prom WRITES["rejected"];
        invalidations: Counter, stats "invalidations";
        /// Keys of client invalidations (`DEL`, `UNLINK`, `GETDEL`,
        /// `on_write = "invalidate"`) sent to Redis.
        keys_invalidated_client: Counter, prom INVALIDATED_KEYS["client"];
        /// Keys of `CACHE.INVALIDATE` sent to Redis.
        keys_invalidated_admin: Counter, prom INVALIDATED_KEYS["admin"];
        script_reloads: Counter, stats "script_reloads", prom SCRIPT_RELOADS;
        /// Pipelined runs of writes whose fences were asked for first.
        probes: Counter, stats "write_probes", prom PROBES;
        /// … their writes sent plain, and through the script.
        probed_plain: Counter, stats "probed_writes_plain", prom PROBED_WRITES["plain"];
        probed_script: Counter, stats "probed_writes_script", prom PROBED_WRITES["script"];
        /// `GET`s sent as the miss script ([`crate::fence::direct`]).
        direct_reads: Counter, stats "direct_reads", prom DIRECT_READS;
        /// Misses that waited for another client's fill (herd control).
        holds: Counter, stats "holds", prom HERD_HOLDS;
        /// … and got the value it filled.
        holds_served: Counter, stats "holds_served", prom HERD_HOLD_OUTCOMES["served"];
        /// … and gave up after `hold` (then got a ticket of their own).
        holds_timed_out: Counter, stats "holds_timed_out", prom HERD_HOLD_OUTCOMES["timed_out"];
    }

    /// Counters of the `double_delete` worker (`SecondDeletes::stats`).
    pub struct SecondDeleteStats {
        done: Counter, stats "second_deletes_done", prom INVALIDATED_KEYS["second_delete"];
        dropped: Counter, stats "second_deletes_dropped";
        failed: Counter, stats "second_deletes_failed";
    }

    /// Counters of the retried client deletes (`Undelivered::stats`).
    pub struct UndeliveredStats {
        /// Keys waiting for a retried delete: set from `Undelivered::len`
        /// when read, not kept up to date.
        pending: Gauge, stats "undelivered_deletes_pending", prom UNDELIVERED_PENDING;
        /// Keys queued for a retried delete.
        queued: Counter, stats "undelivered_deletes_queued", prom UNDELIVERED["queued"];
        /// Keys whose retried delete Redis acknowledged.
        delivered: Counter, stats "undelivered_deletes_delivered", prom INVALIDATED_KEYS["retry"],
            prom UNDELIVERED["delivered"];
        /// Retry rounds that failed (upstream still away).
        retries: Counter, stats "undelivered_deletes_retries";
        /// Keys not queued because the queue was full.
        dropped: Counter, stats "undelivered_deletes_dropped", prom UNDELIVERED["dropped"];
        /// Reads answered nil and fills refused because the key was waiting.
        reads_missed: Counter, stats "undelivered_reads_missed";
    }

    /// Counters of the change-log consumer (`Context::changelog`).
    pub struct ChangeLogStats {
        /// 1 while the consumer is connected to PostgreSQL.
        connected: Gauge, stats "changelog_connected", prom CHANGELOG_CONNECTED;
        /// Outbox rows applied to Redis and deleted.
        rows_consumed: Counter, stats "changelog_rows_consumed", prom CHANGELOG_ROWS;
        /// Keys invalidated from those rows.
        keys_invalidated: Counter, stats "changelog_keys_invalidated", prom INVALIDATED_KEYS["changelog"];
        /// Batches rolled back and tried again (PostgreSQL or Redis failed).
        retries: Counter, stats "changelog_retries", prom CHANGELOG_RETRIES;
        /// Age of the oldest unconsumed row at the last poll, ms (0: empty).
        lag_ms: Gauge, stats "changelog_lag_ms", prom CHANGELOG_LAG / 1000.0;
    }

    /// The replica-lag monitor's readings (`LagGauge::stats`).
    pub struct LagStats {
        /// 1 while every replica's lag is measured.
        measured: Gauge, stats "lag_measured", prom LAG_MEASURED;
        /// The measured window, ms (0 while not measured).
        window_ms: Gauge, stats "lag_window_ms", prom LAG_WINDOW / 1000.0;
        /// Time over the smallest ceiling or unmeasured, ms.
        over_ceiling_ms: Counter, stats "lag_over_ceiling_ms", prom LAG_OVER_CEILING / 1000.0;
        /// Measurements that failed.
        poll_errors: Counter, stats "lag_poll_errors", prom LAG_POLL_ERRORS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Every sample of every group, from groups at their defaults.
    fn all_samples(out: &mut dyn FnMut(Sample<'static>)) {
        fn leak<T: Default>() -> &'static T {
            Box::leak(Box::default())
        }
        leak::<Metrics>().visit(out);
        leak::<ReloadStats>().visit(out);
        leak::<FenceStats>().visit(out);
        leak::<SecondDeleteStats>().visit(out);
        leak::<UndeliveredStats>().visit(out);
        leak::<ChangeLogStats>().visit(out);
        leak::<LagStats>().visit(out);
    }

    fn families() -> impl Iterator<Item = &'static Family> {
        [PROXY, FENCES, CHANGELOG, LAG].into_iter().flatten().copied()
    }

    #[test]
    fn every_family_has_a_unique_prometheus_name() {
        let mut names = HashSet::new();
        for family in families() {
            assert!(family.name.starts_with("cachefence_"), "{}", family.name);
            assert!(names.insert(family.name), "{} declared twice", family.name);
        }
        // A histogram's series must not collide with another family either.
        for family in families().filter(|f| f.kind == Kind::Histogram) {
            for suffix in ["_bucket", "_sum", "_count"] {
                let series = format!("{}{suffix}", family.name);
                assert!(!names.contains(series.as_str()), "{series}");
            }
        }
    }

    #[test]
    fn every_sample_is_declared_once_and_every_declared_sample_is_read() {
        let mut seen = HashSet::new();
        let mut stats = HashSet::new();
        all_samples(&mut |s| {
            if let Some(name) = s.stats {
                assert!(stats.insert(name), "CACHE.STATS name {name} twice");
                assert_ne!(s.kind, Kind::Histogram, "{name}: CACHE.STATS reports integers");
            }
            let Some(family) = s.family else { return };
            assert!(
                families().any(|f| std::ptr::eq(f, family)),
                "{}: family {} is in no list",
                s.field,
                family.name
            );
            assert_eq!(s.kind, family.kind, "{}: type of {}", s.field, family.name);
            match (family.label, s.label) {
                (None, None) => {}
                (Some((_, values)), Some(value)) => {
                    assert!(values.contains(&value), "{}: {value} not declared", family.name)
                }
                (declared, read) => panic!("{}: label {declared:?}, read {read:?}", family.name),
            }
            assert!(
                seen.insert((family.name, s.label)),
                "{}{{{:?}}} read twice",
                family.name,
                s.label
            );
        });
        for family in families() {
            match family.label {
                None => assert!(seen.contains(&(family.name, None)), "{} unread", family.name),
                Some((_, values)) => {
                    for value in values {
                        assert!(
                            seen.contains(&(family.name, Some(*value))),
                            "{}{{{value}}} unread",
                            family.name
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn per_class_metrics_are_labelled_by_class() {
        let metrics = Metrics::default();
        metrics.commands[Class::Admin as usize].add(3);
        let mut read = Vec::new();
        metrics.visit(&mut |s| {
            if s.field == "commands" {
                read.push((s.label, s.value.as_u64()));
            }
        });
        assert_eq!(
            read,
            [
                (Some("passthrough"), 0),
                (Some("intercepted"), 0),
                (Some("admin"), 3)
            ]
        );
    }

    #[test]
    fn cache_stats_names_keep_their_order() {
        let mut names = Vec::new();
        let mut keep = |s: Sample<'_>| names.extend(s.stats);
        FenceStats::default().visit(&mut keep);
        SecondDeleteStats::default().visit(&mut keep);
        UndeliveredStats::default().visit(&mut keep);
        ChangeLogStats::default().visit(&mut keep);
        LagStats::default().visit(&mut keep);
        assert_eq!(
            names,
            [
                "misses",
                "tickets_issued",
                "tickets_outstanding",
                "tickets_dropped",
                "fills_accepted",
                "fills_not_stored_nx",
                "fills_refused_fence_moved",
                "fills_refused_fence_missing",
                "fills_refused_expired",
                "fills_refused_lag_window",
                "fills_refused_pending_delete",
                "fills_refused_older_miss_outstanding",
                "writes",
                "writes_rejected",
                "invalidations",
                "script_reloads",
                "write_probes",
                "probed_writes_plain",
                "probed_writes_script",
                "direct_reads",
                "holds",
                "holds_served",
                "holds_timed_out",
                "second_deletes_done",
                "second_deletes_dropped",
                "second_deletes_failed",
                "undelivered_deletes_pending",
                "undelivered_deletes_queued",
                "undelivered_deletes_delivered",
                "undelivered_deletes_retries",
                "undelivered_deletes_dropped",
                "undelivered_reads_missed",
                "changelog_connected",
                "changelog_rows_consumed",
                "changelog_keys_invalidated",
                "changelog_retries",
                "changelog_lag_ms",
                "lag_measured",
                "lag_window_ms",
                "lag_over_ceiling_ms",
                "lag_poll_errors",
            ]
        );
    }
}
