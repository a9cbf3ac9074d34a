//! The application: what every part of the running proxy shares, and the
//! one place that wires it together from a [`Config`]. The parts (sessions,
//! the change-log consumer, the exporter, reload) take an `&App`; nothing
//! here imports them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::changelog::ChangeLogStats;
use crate::config::Config;
use crate::config::Live;
use crate::fence::Fences;
use crate::telemetry::exporter::Scrape;
use crate::telemetry::{CHANGELOG, FENCES, Family, Metrics, PROXY, Sample};

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
    pub metrics: Metrics,
    /// `None` when fences are off: the proxy is a pure passthrough.
    pub fences: Option<Fences>,
    /// The change-log consumer's counters, when `[postgres]` is configured.
    pub changelog: Option<Arc<ChangeLogStats>>,
}

impl App {
    /// Wires the parts for `config`. With fences on, this starts the
    /// invalidation workers (it needs a runtime).
    pub fn new(config: Config, metrics_addr: Option<SocketAddr>) -> App {
        let fences = config.fences.clone().map(|scope| {
            let fences = Fences::new(scope, Some((config.upstream.clone(), config.connect_timeout)));
            fences
                .admin_password
                .store(config.admin_password.clone().map(Arc::new));
            fences.history.set_max_keys(config.explain_keys);
            fences
        });
        App {
            fences,
            changelog: config.changelog.as_ref().map(|_| Arc::default()),
            live: Live::new(&config),
            metrics_addr,
            started: Instant::now(),
            config,
            metrics: Metrics::default(),
        }
    }
}

impl Scrape for App {
    /// Every family of the proxy, then of the fence layer and the change
    /// log when they run, in the order declared in [`crate::telemetry`].
    fn scrape<'a>(&'a self, out: &mut dyn FnMut(Sample<'a>)) -> Vec<&'static [&'static Family]> {
        self.metrics.uptime_seconds.set(self.started.elapsed().as_secs());
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
        lists
    }
}
