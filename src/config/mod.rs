//! Configuration: the TOML file and the command-line flags, merged and
//! validated into the runtime [`Config`].
//!
//! Every key of the file has a flag of the same name (`max_clients` ↔
//! `--max-clients`); a flag overrides the file, the file overrides the
//! default. Values are parsed while the file is deserialized, so an unknown
//! key or a bad value is reported by `toml` with the file, line and key.
//!
//! - [`settings`]: the one list of settings — type, default, what a reload
//!   does with each ([`Reload`]) and where it is written — and the
//!   [`Settings`] parsed from it.
//! - [`values`]: the values they are written in ([`Upstream`], [`Secret`],
//!   [`Span`], [`Size`], [`LogFormat`]).
//! - here: the runtime [`Config`], resolved from the settings.
//! - [`live`]: what a reload (`SIGHUP`, `CACHE.RELOAD`) changes in place.

pub mod cache;
pub mod live;
pub mod postgres;
pub mod settings;
pub mod template;
pub mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use crate::tls::ServerTls;
use cache::Scope;
use postgres::ChangeLogConfig;

pub use live::Live;
pub use settings::{Place, Reload, SETTINGS, Setting, Settings};
/// Keys `CACHE.EXPLAIN` keeps a history of, unless `explain_keys` says otherwise.
pub const DEFAULT_EXPLAIN_KEYS: usize = 10_000;

pub use cache::CacheSection;
pub use values::{LagWindow, LogFormat, Secret, Size, Span, Upstream};

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: String,
    pub upstream: Upstream,
    pub max_clients: usize,
    pub max_frame_size: usize,
    pub max_pending: usize,
    /// Reply bytes held for a client on a shared connection (0: no limit).
    pub client_output_limit: usize,
    pub timeout: Option<Duration>,
    pub tcp_keepalive: Option<Duration>,
    pub connect_timeout: Duration,
    pub reply_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    pub workers: usize,
    /// Shared upstream connections (0: one per client).
    pub shared_connections: usize,
    pub log_level: String,
    pub log_format: LogFormat,
    /// The fenced key space; `None` when fences are off.
    pub fences: Option<Scope>,
    /// `CACHE.AUTH` password for the admin commands; `None`: open.
    pub admin_password: Option<Secret>,
    /// Keys `CACHE.EXPLAIN` keeps a history of (0: off).
    pub explain_keys: usize,
    /// The Prometheus endpoint's address; `None`: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// TLS on the client listener; `None`: plain TCP. (TLS to the upstream
    /// is [`Upstream::tls`].)
    pub tls: Option<ServerTls>,
    /// The PostgreSQL change log; `None` without `[postgres] url`.
    pub changelog: Option<ChangeLogConfig>,
    /// The file the settings came from, if any.
    pub source: Option<PathBuf>,
    /// The command-line settings, applied over the file again on a reload.
    pub flags: Settings,
}

impl Default for Config {
    fn default() -> Self {
        Config::resolve(Settings::default(), None).expect("defaults are valid")
    }
}

impl Config {
    /// Reads `path` (if any), applies `flags` over it and validates the result.
    pub fn load(path: Option<&Path>, flags: Settings) -> anyhow::Result<Config> {
        let file = match path {
            Some(p) => Some(read_file(p)?),
            None => None,
        };
        let explicit = flags.clone().over(file.unwrap_or_default());
        let mut config =
            Config::resolve(explicit, path.map(Path::to_path_buf)).with_context(|| match path {
                Some(p) => format!("invalid configuration in {}", p.display()),
                None => "invalid configuration".to_string(),
            })?;
        config.source = path.map(Path::to_path_buf);
        config.flags = flags;
        Ok(config)
    }

    /// Fills unset keys with defaults and checks what cannot be checked one
    /// value at a time.
    pub fn resolve(explicit: Settings, source: Option<PathBuf>) -> anyhow::Result<Config> {
        let s = explicit.over(Settings::defaults());
        let listen = s.listen.expect("defaulted");
        listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| anyhow::anyhow!("key `listen`: bad address `{listen}`: {e}"))?;
        let mut upstream = s.upstream.expect("defaulted");
        if let Some(user) = s.upstream_user.filter(|u| !u.is_empty()) {
            upstream.user = Some(user);
        }
        if let Some(password) = s.upstream_password.filter(|p| !p.0.is_empty()) {
            upstream.password = Some(password);
        }
        if upstream.user.is_some() && upstream.password.is_none() {
            anyhow::bail!("key `upstream_user`: an upstream user needs `upstream_password` too");
        }
        if let Some(parsed) = &upstream.cluster {
            if s.upstream_tls == Some(true) {
                anyhow::bail!(
                    "key `upstream_tls`: TLS is not supported with a redis-cluster:// upstream yet"
                );
            }
            // A state of its own for this configuration.
            upstream.cluster = Some(std::sync::Arc::new(crate::redis::cluster::Cluster::new(
                parsed.seeds.clone(),
            )));
        }
        let sentinel_user = s.sentinel_user.filter(|u| !u.is_empty());
        let sentinel_password = s.sentinel_password.filter(|p| !p.0.is_empty());
        match &upstream.sentinel {
            Some(parsed) => {
                if sentinel_user.is_some() && sentinel_password.is_none() {
                    anyhow::bail!("key `sentinel_user`: a sentinel user needs `sentinel_password` too");
                }
                if s.upstream_tls == Some(true) {
                    anyhow::bail!(
                        "key `upstream_tls`: TLS is not supported with a redis-sentinel:// upstream yet"
                    );
                }
                // A state of its own for this configuration.
                let mut sentinel = crate::redis::sentinel::Sentinel::new(
                    parsed.sentinels.clone(),
                    parsed.master_name.clone(),
                );
                (sentinel.user, sentinel.password) = (sentinel_user, sentinel_password);
                upstream.sentinel = Some(std::sync::Arc::new(sentinel));
            }
            None if sentinel_user.is_some() || sentinel_password.is_some() => {
                let key = match sentinel_user {
                    Some(_) => "sentinel_user",
                    None => "sentinel_password",
                };
                anyhow::bail!("key `{key}`: set, but the upstream is not a redis-sentinel:// URL");
            }
            None => {}
        }
        let file = |value: Option<String>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
        let tls = match (
            file(s.tls_cert_file),
            file(s.tls_key_file),
            file(s.tls_ca_cert_file),
        ) {
            (Some(cert), Some(key), ca) => Some(ServerTls::load(cert, key, ca)?),
            (None, None, None) => None,
            (None, _, _) => anyhow::bail!(
                "key `tls_cert_file`: needed for client TLS (`tls_key_file` or `tls_ca_cert_file` is set)"
            ),
            (Some(_), None, _) => anyhow::bail!("key `tls_key_file`: needed with `tls_cert_file`"),
        };
        let (upstream_ca, server_name) = (
            file(s.upstream_tls_ca_cert_file),
            s.upstream_tls_server_name.filter(|n| !n.is_empty()),
        );
        if s.upstream_tls.expect("defaulted") {
            upstream.tls.get_or_insert_default();
        }
        match &mut upstream.tls {
            Some(tls) => {
                tls.ca_cert_file = upstream_ca;
                tls.server_name = server_name;
                tls.prepare(&upstream.host)?;
            }
            None if upstream_ca.is_some() || server_name.is_some() => {
                let key = match upstream_ca {
                    Some(_) => "upstream_tls_ca_cert_file",
                    None => "upstream_tls_server_name",
                };
                anyhow::bail!(
                    "key `{key}`: set, but TLS to the upstream is off (set `upstream_tls = true` or use a rediss:// upstream)"
                );
            }
            None => {}
        }
        let positive = |key: &str, n: u64| -> anyhow::Result<usize> {
            anyhow::ensure!(n > 0, "key `{key}`: must be greater than 0");
            Ok(usize::try_from(n)?)
        };
        let timeout = s.timeout.expect("defaulted").0;
        let connect_timeout = s.connect_timeout.expect("defaulted").0;
        let reply_timeout = s.reply_timeout.expect("defaulted").0;
        anyhow::ensure!(
            !connect_timeout.is_zero(),
            "key `connect_timeout`: must be greater than 0"
        );
        let metrics_listen = match s.metrics_listen.filter(|a| !a.is_empty()) {
            Some(addr) => Some(
                addr.parse::<std::net::SocketAddr>()
                    .map_err(|e| anyhow::anyhow!("key `metrics_listen`: bad address `{addr}`: {e}"))?,
            ),
            None => None,
        };
        let log_level = s.log_level.expect("defaulted");
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| anyhow::anyhow!("key `log_level`: bad filter `{log_level}`: {e}"))?;
        let fences = match s.fences.expect("defaulted") {
            true => Some(Scope::new(&s.cache.expect("defaulted"))?),
            false => None,
        };
        let changelog = s.postgres.expect("defaulted").resolve()?;
        for auto in fences.iter().flat_map(|f| f.policies()).filter(|p| p.lag_auto) {
            let Some(pg) = changelog.as_ref().filter(|c| !c.replicas.is_empty()) else {
                anyhow::bail!(
                    "[[cache]] `{}`: `lag_window = \"auto\"` measures the replicas' lag: set `[postgres] url` \
                     (the primary) and `replicas`",
                    auto.pattern
                );
            };
            // Below that, even a replica with no lag is over the ceiling.
            anyhow::ensure!(
                auto.lag_window > pg.lag_margin + pg.lag_poll,
                "[[cache]] `{}`: `lag_window_max` must exceed `[postgres] lag_poll` + `lag_margin` ({:?})",
                auto.pattern,
                pg.lag_margin + pg.lag_poll
            );
        }
        Ok(Config {
            listen,
            upstream,
            max_clients: positive("max_clients", s.max_clients.expect("defaulted").into())?,
            max_frame_size: positive("max_frame_size", s.max_frame_size.expect("defaulted").0)?,
            max_pending: positive("max_pending", s.max_pending.expect("defaulted").into())?,
            client_output_limit: usize::try_from(s.client_output_limit.expect("defaulted").0)
                .unwrap_or(usize::MAX),
            timeout: (!timeout.is_zero()).then_some(timeout),
            tcp_keepalive: Some(s.tcp_keepalive.expect("defaulted").0).filter(|t| !t.is_zero()),
            connect_timeout,
            reply_timeout: (!reply_timeout.is_zero()).then_some(reply_timeout),
            shutdown_timeout: s.shutdown_timeout.expect("defaulted").0,
            workers: s.workers.expect("defaulted") as usize,
            shared_connections: s.shared_connections.expect("defaulted") as usize,
            log_level,
            log_format: s.log_format.expect("defaulted"),
            fences,
            changelog,
            admin_password: s.admin_password.filter(|p| !p.0.is_empty()),
            metrics_listen,
            explain_keys: s.explain_keys.expect("defaulted") as usize,
            tls,
            source,
            flags: Settings::default(),
        })
    }
}

fn read_file(path: &Path) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    parse_settings(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Parses the text of a config file.
pub fn parse_settings(text: &str) -> anyhow::Result<Settings> {
    Ok(toml::from_str(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let u: Upstream = "redis://u:hunter2@h:1".parse().unwrap();
        let config = Config::resolve(
            Settings {
                upstream: Some(u),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let shown = format!("{config:?} {}", config.upstream);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_line_and_key() {
        let err = parse_settings("listen = \"127.0.0.1:1\"\nmax_clinets = 3\n").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("line 2") && text.contains("max_clinets"), "{text}");
        let err = parse_settings("\n\ntimeout = \"3 weeks\"\n").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("line 3") && text.contains("timeout"), "{text}");
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file = parse_settings("max_clients = 5\ntimeout = 7\n").unwrap();
        let flags = Settings {
            max_clients: Some(9),
            ..Default::default()
        };
        let config = Config::resolve(flags.over(file), None).unwrap();
        assert_eq!(config.max_clients, 9);
        assert_eq!(config.timeout, Some(Duration::from_secs(7)));
        assert_eq!(config.max_frame_size, 512 << 20);
    }

    fn resolve_text(text: &str) -> anyhow::Result<Config> {
        Config::resolve(parse_settings(text)?, None)
    }

    #[test]
    fn lag_window_auto_needs_replicas_and_names_its_ceiling() {
        let auto = "[[cache]]\npattern = \"user:*\"\nlag_window = \"auto\"\n";
        let err = format!("{:#}", resolve_text(auto).unwrap_err());
        assert!(
            err.contains("`lag_window = \"auto\"` measures the replicas' lag"),
            "{err}"
        );
        let with = format!(
            "{auto}lag_window_max = \"3s\"\n[postgres]\nurl = \"postgres://u@h/db\"\n\
             replicas = [\"postgres://u@r1:5433/db\"]\n"
        );
        let config = resolve_text(&with).unwrap();
        let policy = config.fences.as_ref().unwrap().policies().next().unwrap().clone();
        assert!(policy.lag_auto);
        assert_eq!(policy.lag_window, Duration::from_secs(3), "the ceiling");
        let tight = with.replace("lag_window_max = \"3s\"", "lag_window_max = \"200ms\"");
        let err = format!("{:#}", resolve_text(&tight).unwrap_err());
        assert!(
            err.contains("must exceed `[postgres] lag_poll` + `lag_margin`"),
            "{err}"
        );
        let twice = with.replace(
            "replicas = [\"postgres://u@r1:5433/db\"]",
            "replicas = [\"postgres://u@r1:5433/db\", \"postgres://v@r1:5433/x\"]",
        );
        let err = format!("{:#}", resolve_text(&twice).unwrap_err());
        assert!(err.contains("r1:5433 is listed twice"), "{err}");
        let changelog = config.changelog.unwrap();
        assert_eq!(changelog.replicas[0].name, "r1:5433");
        assert!(!changelog.consumes(), "replicas and no table: the lag only");
        let fixed = "[[cache]]\npattern = \"user:*\"\nlag_window = \"1s\"\nlag_window_max = \"3s\"\n";
        let err = format!("{:#}", resolve_text(fixed).unwrap_err());
        assert!(err.contains("`lag_window_max` is the ceiling"), "{err}");
        let err = format!(
            "{:#}",
            resolve_text("[[cache]]\npattern = \"u\"\nlag_window = \"soon\"\n").unwrap_err()
        );
        assert!(err.contains("or \"auto\""), "{err}");
        let err = format!(
            "{:#}",
            resolve_text("[postgres]\nreplicas = [\"postgres://u@r1/db\"]\n").unwrap_err()
        );
        assert!(
            err.contains("`replicas` are measured against the primary's url"),
            "{err}"
        );
    }
}
