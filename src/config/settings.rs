//! The one list of settings. Each is declared once, below, with its type,
//! its default, what a reload does with it and where it is written; from
//! that come the [`Settings`] the file and the flags are parsed into (one
//! `--flag` per top-level key), [`Settings::defaults`], and [`SETTINGS`],
//! from which a reload works out what changed and what needs a restart.
//!
//! An entry reads
//!
//! ```text
//! /// doc (the flag's help)
//! name: Type = default; reload [in group] [=> field];
//! ```
//!
//! - `reload` is `live` (a reload applies it in place), `restart` (a
//!   reload reports it and keeps the running value) or `fenced` (live while
//!   fences run; without them it does nothing, so it is reported as needing
//!   a restart, like `restart`).
//! - `in group`: the setting is one of several resolved into the runtime
//!   [`Config`]'s field `group` (the TLS files into `tls`, the upstream's
//!   credentials into `upstream`); a change is reported once, as `group`.
//! - `=> field`: the runtime field, when it is not named after the setting
//!   (`postgres` => `changelog`); `=> field.method()` compares that view of
//!   it (`fences` => `fences.is_some()`: on or off); `=> _`: the reload
//!   works it out itself (`[[cache]]`, from the running fences).
//!
//! The entries after `@file_only` are tables of the file, with no flag.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::cache::CacheSection;
use super::postgres::PostgresSection;
use super::{Config, LogFormat, Secret, Size, Span, Upstream};

/// What a reload does with a setting that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reload {
    /// Applied in place, to open connections too.
    Live,
    /// Reported by name; the running value is kept until a restart.
    Restart,
    /// `Live` while fences run; without fences, `Restart`.
    Fenced,
}

/// Where a setting is written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// A top-level key, with a `--flag` of the same name.
    TopLevel,
    /// A table (`[[cache]]`, `[postgres]`), file only.
    Table(&'static str),
}

/// One declared setting.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The key in the file (and, dashed, the flag).
    pub name: &'static str,
    pub reload: Reload,
    pub place: Place,
    /// The name a reload reports a change under: `name`, or its group's.
    pub reported_as: &'static str,
    /// How a reload compares and keeps it in the runtime [`Config`];
    /// `None`: the reload works it out itself.
    pub(crate) runtime: Option<Runtime>,
}

/// The part of the runtime [`Config`] a setting is resolved into.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Runtime {
    /// Whether the two configurations differ in it.
    pub differs: fn(&Config, &Config) -> bool,
    /// Puts the running value back into the next configuration.
    pub keep: fn(&mut Config, &Config),
}

/// The name a change is reported under.
macro_rules! reported_as {
    ($name:ident) => {
        stringify!($name)
    };
    ($name:ident $group:ident) => {
        stringify!($group)
    };
}

/// The [`Runtime`] of an entry, from its `in group` / `=> field` part.
macro_rules! runtime {
    ($name:ident) => {
        runtime!(@ $name)
    };
    ($name:ident in $group:ident) => {
        runtime!(@ $group)
    };
    ($name:ident => _) => {
        None
    };
    ($name:ident => $field:ident) => {
        runtime!(@ $field)
    };
    ($name:ident => $field:ident . $view:ident ()) => {
        Some(Runtime {
            differs: |old, next| old.$field.$view() != next.$field.$view(),
            keep: |next, old| next.$field = old.$field.clone(),
        })
    };
    (@ $field:ident) => {
        Some(Runtime {
            differs: |old, next| old.$field != next.$field,
            keep: |next, old| next.$field = old.$field.clone(),
        })
    };
}

macro_rules! settings {
    (
        $(
            $(#[doc = $doc:literal])*
            $name:ident : $ty:ty = $default:expr ;
            $reload:ident $(in $group:ident)? $(=> $field:tt $(. $view:ident ())?)? ;
        )*
        @file_only {
            $(
                $(#[doc = $fdoc:literal])*
                $fname:ident : $fty:ty = $fdefault:expr ;
                $freload:ident $(=> $ffield:tt $(. $fview:ident ())?)? ; $table:literal
            )*
        }
    ) => {
        /// One set of settings, as the file or the flags give them: every
        /// field optional so that the two can be merged key by key. The
        /// keys of `cachefence.toml`; unknown keys are an error.
        #[derive(Debug, Default, Clone, PartialEq, Deserialize, Serialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[doc = $doc])* #[arg(long)] pub $name: Option<$ty>, )*
            $( $(#[doc = $fdoc])* #[arg(skip)] pub $fname: Option<$fty>, )*
        }

        impl Settings {
            /// Every key at its default value.
            pub fn defaults() -> Settings {
                Settings { $( $name: Some($default), )* $( $fname: Some($fdefault), )* }
            }

            /// Keys set in `self` win over `base`.
            pub fn over(self, base: Settings) -> Settings {
                Settings {
                    $( $name: self.$name.or(base.$name), )*
                    $( $fname: self.$fname.or(base.$fname), )*
                }
            }
        }

        /// Every setting, in the order declared (the order a reload reports
        /// them in).
        pub const SETTINGS: &[Setting] = &[
            $(
                Setting {
                    name: stringify!($name),
                    reload: settings!(@reload $reload),
                    place: Place::TopLevel,
                    reported_as: reported_as!($name $($group)?),
                    runtime: runtime!($name $(in $group)? $(=> $field $(. $view ())?)?),
                },
            )*
            $(
                Setting {
                    name: stringify!($fname),
                    reload: settings!(@reload $freload),
                    place: Place::Table($table),
                    reported_as: stringify!($fname),
                    runtime: runtime!($fname $(=> $ffield $(. $fview ())?)?),
                },
            )*
        ];
    };
    (@reload live) => { Reload::Live };
    (@reload restart) => { Reload::Restart };
    (@reload fenced) => { Reload::Fenced };
}

settings! {
    /// Address the proxy accepts clients on.
    listen: String = "127.0.0.1:6380".to_string();
    restart;
    /// Redis to forward to: `host:port`, `redis://[user:password@]host[:port][/db]`, the master Sentinel names: `redis-sentinel://[user:password@]host[:port],…/master[/db]`, or a Redis Cluster: `redis-cluster://[user:password@]host[:port],…`.
    upstream: Upstream = "127.0.0.1:6379".parse().expect("valid default");
    restart;
    /// ACL user for the proxy's upstream connections (overrides the URL's).
    upstream_user: String = String::new();
    restart in upstream;
    /// Password for the proxy's upstream connections (overrides the URL's); never logged.
    upstream_password: Secret = Secret::default();
    restart in upstream;
    /// ACL user for the proxy's connections to the sentinels of a `redis-sentinel://` upstream.
    sentinel_user: String = String::new();
    restart in upstream;
    /// Password for the proxy's connections to the sentinels (Sentinel's `requirepass`); never logged.
    sentinel_password: Secret = Secret::default();
    restart in upstream;
    /// Most client connections at once; more get `-ERR max number of clients reached`.
    max_clients: u32 = 10_000;
    live;
    /// Largest bulk string or request accepted from a client (Redis' proto-max-bulk-len).
    max_frame_size: Size = Size(512 << 20);
    live;
    /// Most requests in flight per connection; past it the proxy stops reading that client.
    max_pending: u32 = 1 << 20;
    live;
    /// Most reply bytes the proxy holds for a client on a shared upstream
    /// connection that does not read them; past it the client is closed, as
    /// by Redis' `client-output-buffer-limit` (0 = no limit).
    client_output_limit: Size = Size(256 << 20);
    restart;
    /// Close a client idle this long (0 = never; like Redis' `timeout`).
    timeout: Span = Span(Duration::ZERO);
    live;
    /// TCP keepalive on client connections, as Redis' `tcp-keepalive` (0 = off).
    tcp_keepalive: Span = Span(Duration::from_secs(300));
    live;
    /// Time allowed to connect to (and authenticate with) the upstream.
    connect_timeout: Span = Span(Duration::from_secs(2));
    restart;
    /// Longest silence from the upstream while a reply is due (blocking
    /// commands excepted); past it the client gets errors and is closed (0 = never).
    reply_timeout: Span = Span(Duration::from_secs(30));
    live;
    /// On SIGINT/SIGTERM, how long in-flight replies may take before exit.
    shutdown_timeout: Span = Span(Duration::from_secs(10));
    live;
    /// Upstream connections that clients' commands share, pipelined (0: each
    /// client gets a connection of its own). A client moves to its own
    /// connection before a command that needs one (MULTI, SUBSCRIBE, AUTH …).
    shared_connections: u32 = 1;
    restart;
    /// Worker threads (0 = one per available CPU).
    workers: u32 = 0;
    restart;
    /// Log level or filter (`info`, `debug`, `cachefence=trace`); RUST_LOG wins over the file's.
    log_level: String = "info".to_string();
    live;
    /// `text` or `json`.
    log_format: LogFormat = LogFormat::Text;
    restart;
    /// Version fences on the keys of the `[[cache]]` sections (false: a pure passthrough proxy).
    fences: bool = true;
    restart => fences.is_some();
    /// Password for the proxy's own admin commands (`CACHE.INVALIDATE`,
    /// `CACHE.RELOAD`), given with `CACHE.AUTH <password>`; separate from
    /// Redis' AUTH. Empty: no password.
    admin_password: Secret = Secret::default();
    fenced;
    /// Keys whose recent history `CACHE.EXPLAIN` keeps (16 events each; the key
    /// first recorded longest ago goes first). 0: off.
    explain_keys: u32 = super::DEFAULT_EXPLAIN_KEYS as u32;
    fenced;
    /// Address of the Prometheus endpoint (`GET /metrics`, plain HTTP). Empty: off.
    metrics_listen: String = String::new();
    restart;
    /// Certificate chain (PEM) the proxy presents to clients; with `tls_key_file`
    /// set too, the listener speaks TLS only. Empty: plain TCP.
    tls_cert_file: String = String::new();
    restart in tls;
    /// Private key (PEM) of `tls_cert_file`.
    tls_key_file: String = String::new();
    restart in tls;
    /// CA certificates (PEM): clients must present a certificate signed by one.
    /// Empty: no client certificates asked for.
    tls_ca_cert_file: String = String::new();
    restart in tls;
    /// TLS to the upstream (a `rediss://` upstream URL turns it on too).
    upstream_tls: bool = false;
    restart in upstream;
    /// CA certificates (PEM) Redis' certificate must chain to. Empty: the
    /// Mozilla root certificates (webpki-roots) built into the proxy.
    upstream_tls_ca_cert_file: String = String::new();
    restart in upstream;
    /// Name Redis' certificate must be valid for (also sent as SNI). Empty: the upstream host.
    upstream_tls_server_name: String = String::new();
    restart in upstream;
    @file_only {
        /// Which keys are a cache, and their rules (`[[cache]]` tables; the
        /// first match wins). None by default: no key is fenced until one
        /// is declared (`--cache PATTERN` or a `[[cache]]` section).
        cache: Vec<CacheSection> = Vec::new();
        live => _; "[[cache]]"
        /// The PostgreSQL change log (`[postgres]` and `[[postgres.table]]`).
        postgres: PostgresSection = PostgresSection::defaults();
        restart => changelog; "[postgres]"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_settings;

    const EXAMPLE: &str = include_str!("../../config.example.toml");

    #[test]
    fn the_example_file_holds_every_setting_at_its_default() {
        // No `[[cache]]` section is in force by default, so the file shows
        // one commented out; uncommented, it is a section at the defaults.
        let settings = parse_settings(EXAMPLE).unwrap();
        assert_eq!(settings.cache, None);
        assert_eq!(settings.over(Settings::defaults()), Settings::defaults());
        let written: toml::Table = toml::from_str(EXAMPLE).unwrap();
        for setting in SETTINGS.iter().filter(|s| s.name != "cache") {
            assert!(
                written.contains_key(setting.name),
                "`{}` is not in config.example.toml",
                setting.name
            );
        }
        let section: String = EXAMPLE
            .lines()
            .skip_while(|l| *l != "# [[cache]]")
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", &l[2.min(l.len())..]))
            .collect();
        let uncommented = parse_settings(&section).unwrap();
        let cache = uncommented.cache.expect("the commented [[cache]] section");
        assert_eq!(cache, [CacheSection::for_pattern("user:*")]);
        let written: toml::Table = toml::from_str(&section).unwrap();
        let written = written["cache"].as_array().unwrap()[0]
            .as_table()
            .unwrap()
            .clone();
        let every: toml::Table = toml::Table::try_from(CacheSection::for_pattern("user:*")).unwrap();
        assert_eq!(
            written.keys().collect::<Vec<_>>(),
            every.keys().collect::<Vec<_>>(),
            "every [[cache]] setting is in the example's section"
        );
    }

    #[test]
    fn every_key_of_the_file_is_declared_once() {
        let keys: toml::Table = toml::Table::try_from(Settings::defaults()).unwrap();
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len(), "a setting declared twice");
        let mut keys: Vec<&str> = keys.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, names);
    }

    #[test]
    fn only_the_reload_itself_works_out_the_fenced_sections() {
        let special: Vec<&str> = SETTINGS
            .iter()
            .filter(|s| s.runtime.is_none())
            .map(|s| s.name)
            .collect();
        assert_eq!(special, ["cache"]);
        let tables: Vec<(&str, Place)> = SETTINGS
            .iter()
            .filter(|s| s.place != Place::TopLevel)
            .map(|s| (s.name, s.place))
            .collect();
        assert_eq!(
            tables,
            [
                ("cache", Place::Table("[[cache]]")),
                ("postgres", Place::Table("[postgres]"))
            ]
        );
    }
}
