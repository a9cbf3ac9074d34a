//! Live reload (`SIGHUP`, `CACHE.RELOAD`): the settings that change while
//! clients stay connected, and the reload that re-reads the config file.
//!
//! A reload reads the file again, applies the same command-line flags over
//! it and validates the whole result before touching anything: an invalid
//! file changes nothing. Then it applies what can change in place —
//! `[[cache]]` sections, limits, timeouts, `log_level`, `admin_password` —
//! and reports the settings that differ but need a restart (the listen
//! address, the upstream, TLS, the change log, …), which keep their running
//! values.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Config;
use crate::session::Context;
pub use crate::telemetry::ReloadStats;

/// The settings sessions read while they run, as atomics: a read costs a
/// plain load, a reload a store.
#[derive(Debug)]
pub struct Live {
    max_clients: AtomicUsize,
    max_frame_size: AtomicUsize,
    max_pending: AtomicUsize,
    /// Nanoseconds; 0: off.
    timeout: AtomicU64,
    tcp_keepalive: AtomicU64,
    reply_timeout: AtomicU64,
    shutdown_timeout: AtomicU64,
    /// The configuration in force (restart-only settings keep their
    /// running values); reloads diff against it, one at a time.
    applied: Mutex<Config>,
    pub stats: ReloadStats,
}

fn nanos(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn duration(nanos: u64) -> Option<Duration> {
    (nanos > 0).then(|| Duration::from_nanos(nanos))
}

impl Live {
    pub fn new(config: &Config) -> Live {
        let live = Live {
            max_clients: AtomicUsize::new(0),
            max_frame_size: AtomicUsize::new(0),
            max_pending: AtomicUsize::new(0),
            timeout: AtomicU64::new(0),
            tcp_keepalive: AtomicU64::new(0),
            reply_timeout: AtomicU64::new(0),
            shutdown_timeout: AtomicU64::new(0),
            applied: Mutex::new(config.clone()),
            stats: ReloadStats::default(),
        };
        live.store(config);
        live
    }

    fn store(&self, c: &Config) {
        self.max_clients.store(c.max_clients, Ordering::Relaxed);
        self.max_frame_size.store(c.max_frame_size, Ordering::Relaxed);
        self.max_pending.store(c.max_pending, Ordering::Relaxed);
        self.timeout.store(nanos(c.timeout), Ordering::Relaxed);
        self.tcp_keepalive
            .store(nanos(c.tcp_keepalive), Ordering::Relaxed);
        self.reply_timeout
            .store(nanos(c.reply_timeout), Ordering::Relaxed);
        self.shutdown_timeout
            .store(nanos(Some(c.shutdown_timeout)), Ordering::Relaxed);
    }

    pub fn max_clients(&self) -> usize {
        self.max_clients.load(Ordering::Relaxed)
    }
    pub fn max_frame_size(&self) -> usize {
        self.max_frame_size.load(Ordering::Relaxed)
    }
    pub fn max_pending(&self) -> usize {
        self.max_pending.load(Ordering::Relaxed)
    }
    pub fn timeout(&self) -> Option<Duration> {
        duration(self.timeout.load(Ordering::Relaxed))
    }
    pub fn tcp_keepalive(&self) -> Option<Duration> {
        duration(self.tcp_keepalive.load(Ordering::Relaxed))
    }
    pub fn reply_timeout(&self) -> Option<Duration> {
        duration(self.reply_timeout.load(Ordering::Relaxed))
    }
    pub fn shutdown_timeout(&self) -> Duration {
        duration(self.shutdown_timeout.load(Ordering::Relaxed)).unwrap_or_default()
    }

    /// The configuration in force.
    pub fn applied(&self) -> Config {
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone()
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

/// Re-reads the config file and applies it; on an error (no file, a file
/// that does not parse or validate) nothing changes. Logged either way.
pub fn reload(ctx: &Context, trigger: &'static str) -> anyhow::Result<Reloaded> {
    let result = try_reload(ctx);
    match &result {
        Ok(done) => {
            ctx.live.stats.reloads.inc();
            info!(
                trigger,
                file = %done.file,
                applied = ?done.applied,
                restart_required = ?done.restart_required,
                "configuration reloaded"
            );
            if !done.restart_required.is_empty() {
                warn!(
                    settings = ?done.restart_required,
                    "changed settings that only take effect after a restart; running values kept"
                );
            }
        }
        Err(error) => {
            ctx.live.stats.failures.inc();
            warn!(
                trigger,
                error = format!("{error:#}"),
                "reload rejected; the running configuration is kept"
            );
        }
    }
    result
}

fn try_reload(ctx: &Context) -> anyhow::Result<Reloaded> {
    let mut applied = ctx.live.applied.lock().unwrap_or_else(|p| p.into_inner());
    let Some(path) = applied.source.clone() else {
        anyhow::bail!("no config file to reload (cachefence was started without --config)");
    };
    let mut next = Config::load(Some(&path), applied.flags.clone())?;
    // Everything the new file says is valid: from here on nothing fails
    // but a scope with too many distinct policies, checked first.
    let scope = match (&ctx.fences, &next.fences) {
        (Some(fences), Some(file)) if !fences.scope().same_sections(file) => {
            Some(fences.scope().succeeded_by(file)?)
        }
        _ => None,
    };
    let old = &*applied;
    let mut changed = Vec::new();
    let mut restart = Vec::new();
    let mut note = |key: &'static str, differs: bool, live: bool| match (differs, live) {
        (false, _) => {}
        (true, true) => changed.push(key),
        (true, false) => restart.push(key),
    };
    note("max_clients", old.max_clients != next.max_clients, true);
    note("max_frame_size", old.max_frame_size != next.max_frame_size, true);
    note("max_pending", old.max_pending != next.max_pending, true);
    note("timeout", old.timeout != next.timeout, true);
    note("tcp_keepalive", old.tcp_keepalive != next.tcp_keepalive, true);
    note("reply_timeout", old.reply_timeout != next.reply_timeout, true);
    note(
        "shutdown_timeout",
        old.shutdown_timeout != next.shutdown_timeout,
        true,
    );
    note("log_level", old.log_level != next.log_level, true);
    note(
        "admin_password",
        old.admin_password != next.admin_password,
        ctx.fences.is_some(),
    );
    note(
        "explain_keys",
        old.explain_keys != next.explain_keys,
        ctx.fences.is_some(),
    );
    let fences_switched = old.fences.is_some() != next.fences.is_some();
    note("fences", fences_switched, false);
    note("cache", !fences_switched && scope.is_some(), true);
    note("listen", old.listen != next.listen, false);
    note("upstream", old.upstream != next.upstream, false);
    note(
        "connect_timeout",
        old.connect_timeout != next.connect_timeout,
        false,
    );
    note("workers", old.workers != next.workers, false);
    note("log_format", old.log_format != next.log_format, false);
    note("tls", old.tls != next.tls, false);
    note("postgres", old.changelog != next.changelog, false);
    note("metrics_listen", old.metrics_listen != next.metrics_listen, false);
    if old.log_level != next.log_level
        && let Err(error) = crate::telemetry::logging::set_level(&next.log_level)
    {
        anyhow::bail!("key `log_level`: {error}");
    }
    // What needs a restart keeps its running value in the applied config.
    next.listen = old.listen.clone();
    next.upstream = old.upstream.clone();
    next.connect_timeout = old.connect_timeout;
    next.workers = old.workers;
    next.log_format = old.log_format;
    next.tls = old.tls.clone();
    next.changelog = old.changelog.clone();
    next.metrics_listen = old.metrics_listen;
    if fences_switched {
        next.fences = old.fences.clone();
    }
    if ctx.fences.is_none() {
        // Without fences these do nothing until a restart with fences on:
        // reported each time, like the other restart-only settings.
        next.admin_password = old.admin_password.clone();
        next.explain_keys = old.explain_keys;
    }
    if let Some(fences) = &ctx.fences {
        if let Some(scope) = scope {
            fences.scope.store(std::sync::Arc::new(scope));
        }
        fences
            .admin_password
            .store(next.admin_password.clone().map(std::sync::Arc::new));
        fences.history.set_max_keys(next.explain_keys);
    }
    ctx.live.store(&next);
    *applied = next;
    Ok(Reloaded {
        file: path.display().to_string(),
        applied: changed,
        restart_required: restart,
    })
}
