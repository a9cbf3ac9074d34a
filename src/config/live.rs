//! Live reload (`SIGHUP`, `CACHE.RELOAD`): the settings that change while
//! clients stay connected, and the diff that says what a reload applies.
//! The reload itself re-wires the running parts, so it lives with the
//! wiring: `App::reload` in `src/app.rs`.
//!
//! A reload reads the file again, applies the same command-line flags over
//! it and validates the whole result before touching anything: an invalid
//! file changes nothing. Then it applies what can change in place —
//! `[[cache]]` sections, limits, timeouts, `log_level`, `admin_password` —
//! and reports the settings that differ but need a restart (the listen
//! address, the upstream, TLS, the change log, …), which keep their running
//! values. Which is which is declared once, in [`super::settings`]; the
//! diff walks that list.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::{Config, Reload, SETTINGS};
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

    /// Puts the live settings of `c` in force.
    pub fn store(&self, c: &Config) {
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

    /// The configuration in force, locked: a reload holds it from reading
    /// the file to storing the result.
    pub fn lock_applied(&self) -> std::sync::MutexGuard<'_, Config> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration in force.
    pub fn applied(&self) -> Config {
        self.applied.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What differs between the running configuration and the next, walking
/// the declared [`SETTINGS`] in order: the names of the changes applied in
/// place, and those of the changes that need a restart, whose running
/// values are put back into `next`. Each change is reported once, under
/// its name or its group's. `cache_changed`: the `[[cache]]` sections
/// differ from the running fences' (known only to the caller, which
/// builds the next scope, and only when fences run and stay on).
pub fn diff(
    old: &Config,
    next: &mut Config,
    fences_run: bool,
    cache_changed: bool,
) -> (Vec<&'static str>, Vec<&'static str>) {
    let mut changed = Vec::new();
    let mut restart = Vec::new();
    for setting in SETTINGS {
        let differs = match setting.runtime {
            Some(runtime) => (runtime.differs)(old, next),
            None => cache_changed,
        };
        let live = match setting.reload {
            Reload::Live => true,
            Reload::Restart => false,
            Reload::Fenced => fences_run,
        };
        let report = if live { &mut changed } else { &mut restart };
        if !differs || report.contains(&setting.reported_as) {
            continue;
        }
        report.push(setting.reported_as);
        if let (false, Some(runtime)) = (live, setting.runtime) {
            (runtime.keep)(next, old);
        }
    }
    (changed, restart)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{LogFormat, Settings, parse_settings};

    fn config(toml: &str) -> Config {
        Config::resolve(parse_settings(toml).unwrap(), None).unwrap()
    }

    #[test]
    fn a_live_change_applies_and_a_restart_change_keeps_its_running_value() {
        let old = config("max_clients = 10\nworkers = 2\n");
        let mut next = config("max_clients = 20\nworkers = 4\n");
        let (applied, restart) = diff(&old, &mut next, true, false);
        assert_eq!((applied, restart), (vec!["max_clients"], vec!["workers"]));
        assert_eq!((next.max_clients, next.workers), (20, 2));
        let mut same = old.clone();
        assert_eq!(diff(&old, &mut same, true, false), (vec![], vec![]));
        assert_eq!(same, old);
    }

    #[test]
    fn changes_are_reported_in_the_declared_order() {
        let old = config("");
        let mut next = config(
            "max_clients = 1\nreply_timeout = 1\nlog_level = \"debug\"\ntimeout = 1\n\
             metrics_listen = \"127.0.0.1:9\"\nlisten = \"127.0.0.1:1\"\nlog_format = \"json\"\n",
        );
        let (applied, restart) = diff(&old, &mut next, true, true);
        assert_eq!(
            applied,
            ["max_clients", "timeout", "reply_timeout", "log_level", "cache"]
        );
        assert_eq!(restart, ["listen", "log_format", "metrics_listen"]);
        assert_eq!(
            (next.listen.as_str(), next.log_format, next.metrics_listen),
            ("127.0.0.1:6380", LogFormat::Text, None)
        );
    }

    #[test]
    fn without_fences_their_settings_need_a_restart() {
        let old = config("fences = false\n");
        let changed = "fences = false\nadmin_password = \"pw\"\nexplain_keys = 5\n";
        let mut next = config(changed);
        let (applied, restart) = diff(&old, &mut next, false, false);
        assert!(applied.is_empty());
        assert_eq!(restart, ["admin_password", "explain_keys"]);
        assert_eq!(
            (&next.admin_password, next.explain_keys),
            (&None, old.explain_keys)
        );
        let (old, mut next) = (config(""), config(&changed.replace("false", "true")));
        let (applied, restart) = diff(&old, &mut next, true, false);
        assert_eq!(
            (applied, restart),
            (vec!["admin_password", "explain_keys"], vec![])
        );
        assert_eq!(next.explain_keys, 5);
    }

    #[test]
    fn a_group_is_reported_once_and_fences_by_on_or_off() {
        let old = config("");
        let mut next = config(
            "upstream_user = \"u\"\nupstream_password = \"p\"\nupstream_tls = true\n\
             upstream_tls_server_name = \"cache.local\"\nfences = false\n",
        );
        let (applied, restart) = diff(&old, &mut next, true, false);
        assert!(applied.is_empty());
        assert_eq!(restart, ["upstream", "fences"]);
        assert_eq!(next.upstream, old.upstream);
        assert!(next.fences.is_some());
        // Other `[[cache]]` sections alone are not `fences` switched.
        let mut next = config("[[cache]]\npattern = \"user:*\"\n");
        assert_eq!(diff(&old, &mut next, true, true), (vec!["cache"], vec![]));
        // The flags' settings are compared like the file's.
        let flags = Settings {
            connect_timeout: Some("5s".parse().unwrap()),
            ..Default::default()
        };
        let mut next = Config::resolve(flags, None).unwrap();
        assert_eq!(
            diff(&old, &mut next, true, false),
            (vec![], vec!["connect_timeout"])
        );
    }
}
