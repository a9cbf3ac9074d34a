//! The application: what every part of the running proxy shares, and the
//! one place that wires it together from a [`Config`]. The parts (sessions,
//! the change-log consumer, the exporter, reload) take an `&App`; nothing
//! here imports them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::telemetry::ChangeLogStats;
use tracing::{info, warn};

use crate::config::Live;
use crate::fence::Fences;
use crate::telemetry::exporter::Scrape;
use crate::telemetry::{CHANGELOG, FENCES, Family, LAG, Metrics, PROXY, Sample, Value};

/// The running proxy's shared state.
#[derive(Debug)]
pub struct App {
    /// The configuration the proxy started with; what a reload can change
    /// is read from `live`.
    pub config: Config,
    pub live: Live,
    /// When the proxy started.
    pub started: Instant,
    /// Where the Prometheus endpoint listens, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// Shared with the shared upstream connections' tasks.
    pub metrics: Arc<Metrics>,
    /// `None` when fences are off: the proxy is a pure passthrough.
    pub fences: Option<Fences>,
    /// The upstream connections clients share (`shared_connections` > 0).
    pub shared: Option<crate::redis::shared::SharedUpstreams>,
    /// Whether a new connection to Redis starts logged in, for clients on
    /// shared connections when the proxy has no credentials of its own
    /// (`None`: it logs every connection in, or every client has one of
    /// its own, where Redis itself answers).
    pub logins: Option<crate::redis::login::NewLogins>,
    /// The change-log consumer's counters, when `[postgres]` is configured.
    pub changelog: Option<Arc<ChangeLogStats>>,
    /// `cachefence_replica_lag_seconds` as a one-family list, one sample
    /// per `[postgres] replicas` entry (made at start: the replicas are not
    /// reloaded).
    replica_lag: Option<&'static [&'static Family]>,
}

impl App {
    /// Wires the parts for `config`. With fences on, this starts the
    /// invalidation workers, with a Sentinel upstream the task that follows
    /// the sentinels, with a Redis Cluster one the periodic slot map
    /// refresh (it needs a runtime).
    pub fn new(config: Config, metrics_addr: Option<SocketAddr>) -> App {
        if let Some(sentinel) = &config.upstream.sentinel {
            crate::redis::sentinel::follow(sentinel.clone(), config.connect_timeout);
        }
        // A proxy cannot know whether a master failed over before it started.
        if let Some(cluster) = &config.upstream.cluster {
            cluster.failovers.bound_from_now();
            crate::redis::cluster::follow(cluster.clone(), config.upstream.clone(), config.connect_timeout);
        }
        let fences = config.fences.clone().map(|scope| {
            let fences = Fences::new(scope, Some((config.upstream.clone(), config.connect_timeout)));
            fences
                .admin_password
                .store(config.admin_password.clone().map(Arc::new));
            fences.history.set_max_keys(config.explain_keys);
            fences
        });
        let replica_lag = config
            .changelog
            .as_ref()
            .filter(|c| !c.replicas.is_empty())
            .map(|c| replica_lag_family(c.replicas.iter().map(|r| r.name.clone()).collect()));
        let shared = (config.shared_connections > 0).then(|| {
            crate::redis::shared::SharedUpstreams::new(
                config.shared_connections,
                config.upstream.clone(),
                config.connect_timeout,
                config.reply_timeout,
            )
        });
        App {
            shared,
            logins: (config.shared_connections > 0 && config.upstream.password.is_none())
                .then(Default::default),
            replica_lag,
            fences,
            changelog: config
                .changelog
                .as_ref()
                .filter(|c| c.consumes())
                .map(|_| Arc::default()),
            live: Live::new(&config),
            metrics_addr,
            started: Instant::now(),
            config,
            metrics: Arc::new(Metrics::default()),
        }
    }
}

/// The per-replica lag family, its label values the replicas' names, as
/// the one-family list a scrape takes (leaked once per proxy: a family's
/// names are static).
fn replica_lag_family(names: Vec<String>) -> &'static [&'static Family] {
    let names: Vec<&'static str> = names.into_iter().map(|n| &*n.leak()).collect();
    let family: &'static Family = Box::leak(Box::new(
        Family::new(
            crate::telemetry::Kind::Gauge,
            "cachefence_replica_lag_seconds",
            "Each replica's replay lag at the last measurement (NaN: not measured).",
        )
        .by("replica", names.leak()),
    ));
    vec![family].leak()
}

impl App {
    /// The replica-lag gauge, when `[postgres] replicas` are measured.
    pub fn lag(&self) -> Option<&crate::fence::lag::LagGauge> {
        self.replica_lag?;
        self.fences.as_ref().map(|f| &*f.lag)
    }
}

impl Scrape for App {
    /// Every family of the proxy, then of the fence layer and the change
    /// log when they run, in the order declared in [`crate::telemetry`].
    fn scrape<'a>(&'a self, out: &mut dyn FnMut(Sample<'a>)) -> Vec<&'static [&'static Family]> {
        self.metrics.uptime_seconds.set(self.started.elapsed().as_secs());
        if let Some(sentinel) = &self.config.upstream.sentinel {
            use std::sync::atomic::Ordering::Relaxed;
            self.metrics
                .upstream_failovers
                .catch_up(sentinel.failovers.count());
            self.metrics
                .sentinel_errors
                .catch_up(sentinel.stats.errors.load(Relaxed));
        }
        if let Some(cluster) = &self.config.upstream.cluster {
            use std::sync::atomic::Ordering::Relaxed;
            let stats = &cluster.stats;
            self.metrics
                .upstream_failovers
                .catch_up(cluster.failovers.count());
            let redirects = stats.moved.load(Relaxed) + stats.asked.load(Relaxed);
            self.metrics.cluster_redirects.catch_up(redirects);
            self.metrics
                .cluster_map_refreshes
                .catch_up(stats.refreshes.load(Relaxed));
        }
        self.metrics.visit(out);
        self.live.stats.visit(out);
        let mut lists = vec![PROXY];
        if let Some(fences) = &self.fences {
            fences.visit_stats(out);
            lists.push(FENCES);
        }
        if let Some(changelog) = &self.changelog {
            changelog.visit(out);
            lists.push(CHANGELOG);
        }
        if let Some(cluster) = &self.config.upstream.cluster {
            lists.push(cluster.scrape_nodes(out));
        }
        if let Some(lag) = self.lag() {
            lag.stats.visit(out);
            lists.push(LAG);
            if let Some(list) = self.replica_lag {
                let family = list[0];
                for (name, lag) in lag.replicas() {
                    let label = family
                        .label
                        .and_then(|(_, values)| values.iter().find(|v| **v == name));
                    out(Sample {
                        field: "replica_lag",
                        kind: family.kind,
                        stats: None,
                        family: Some(family),
                        label: label.copied(),
                        // Not measured: NaN, as Prometheus writes an unknown value.
                        value: Value::Float(lag.map_or(f64::NAN, |l| l.as_secs_f64())),
                    });
                }
                lists.push(list);
            }
        }
        lists
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The file read.
    pub file: String,
    /// Settings that changed and are in force now.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but keep their running value
    /// until a restart.
    pub restart_required: Vec<&'static str>,
}

/// The target of the reload's log lines: the module's path before it moved
/// into `config`, so that they, and filters such as
/// `RUST_LOG=cachefence::live=warn`, stay as they were.
const LOG_TARGET: &str = "cachefence::live";

impl App {
    /// Re-reads the config file and applies it; on an error (no file, a file
    /// that does not parse or validate) nothing changes. Logged either way.
    pub fn reload(&self, trigger: &'static str) -> anyhow::Result<Reloaded> {
        let result = self.try_reload();
        match &result {
            Ok(done) => {
                self.live.stats.reloads.inc();
                info!(
                    target: LOG_TARGET,
                    trigger,
                    file = %done.file,
                    applied = ?done.applied,
                    restart_required = ?done.restart_required,
                    "configuration reloaded"
                );
                if !done.restart_required.is_empty() {
                    warn!(
                        target: LOG_TARGET,
                        settings = ?done.restart_required,
                        "changed settings that only take effect after a restart; running values kept"
                    );
                }
            }
            Err(error) => {
                self.live.stats.failures.inc();
                warn!(
                    target: LOG_TARGET,
                    trigger,
                    error = format!("{error:#}"),
                    "reload rejected; the running configuration is kept"
                );
            }
        }
        result
    }

    fn try_reload(&self) -> anyhow::Result<Reloaded> {
        let mut applied = self.live.lock_applied();
        let Some(path) = applied.source.clone() else {
            anyhow::bail!("no config file to reload (cachefence was started without --config)");
        };
        let mut next = Config::load(Some(&path), applied.flags.clone())?;
        // Everything the new file says is valid: from here on nothing fails
        // but a scope with too many distinct policies, checked first.
        let scope = match (&self.fences, &next.fences) {
            (Some(fences), Some(file)) if !fences.scope().same_sections(file) => {
                Some(fences.scope().succeeded_by(file)?)
            }
            _ => None,
        };
        let old = &*applied;
        let (changed, restart) =
            crate::config::live::diff(old, &mut next, self.fences.is_some(), scope.is_some());
        if old.log_level != next.log_level
            && let Err(error) = crate::telemetry::logging::set_level(&next.log_level)
        {
            anyhow::bail!("key `log_level`: {error}");
        }
        if let Some(fences) = &self.fences {
            if let Some(scope) = scope {
                fences.scope.store(std::sync::Arc::new(scope));
            }
            fences
                .admin_password
                .store(next.admin_password.clone().map(std::sync::Arc::new));
            fences.history.set_max_keys(next.explain_keys);
        }
        self.live.store(&next);
        *applied = next;
        Ok(Reloaded {
            file: path.display().to_string(),
            applied: changed,
            restart_required: restart,
        })
    }
}
