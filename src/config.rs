//! Configuration: the TOML file and the command-line flags, merged and
//! validated into the runtime [`Config`].
//!
//! Every key of the file has a flag of the same name (`max_clients` ↔
//! `--max-clients`); a flag overrides the file, the file overrides the
//! default. Values are parsed while the file is deserialized, so an unknown
//! key or a bad value is reported by `toml` with the file, line and key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::changelog::{ChangeLogConfig, PostgresSection};
use crate::fence::{CacheSection, Scope};
use crate::tls::{ServerTls, UpstreamTls};

/// Where the proxy connects, parsed from `host:port` or
/// `redis[s]://[user:password@]host[:port][/db]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub db: u32,
    /// TLS to Redis (`rediss://` or `upstream_tls`); `None`: plain TCP.
    pub tls: Option<UpstreamTls>,
}

impl Upstream {
    /// `host:port`, the form used in logs and error replies (no credentials).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.addr())
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("addr", &self.addr())
            .field("user", &self.user)
            .field("password", &self.password)
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish()
    }
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (rest, url, tls) = match (s.strip_prefix("redis://"), s.strip_prefix("rediss://")) {
            (Some(rest), _) => (rest, true, false),
            (_, Some(rest)) => (rest, true, true),
            _ if s.contains("://") => {
                return Err(format!(
                    "unsupported scheme in `{s}` (only redis:// and rediss:// are supported)"
                ));
            }
            _ => (s, false, false),
        };
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((c, r)) if url => (Some(c), r),
            _ => (None, rest),
        };
        let (authority, db) = match rest.split_once('/') {
            Some((a, "")) => (a, 0),
            Some((a, db)) => (a, db.parse().map_err(|_| format!("bad database number `{db}`"))?),
            None => (rest, 0),
        };
        let (host, port) = split_host_port(authority, if url { Some(6379) } else { None })?;
        let (user, password) = match credentials {
            None => (None, None),
            Some(c) => match c.split_once(':') {
                Some((u, p)) => (
                    (!u.is_empty()).then(|| percent_decode(u)),
                    Some(Secret(percent_decode(p))),
                ),
                None => (Some(percent_decode(c)), None),
            },
        };
        Ok(Upstream {
            host,
            port,
            user,
            password,
            db,
            tls: tls.then(UpstreamTls::default),
        })
    }
}

fn split_host_port(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("expected host:port, got `{authority}`");
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("bad port `{p}` in `{authority}`"))?,
        None => default_port.ok_or_else(bad)?,
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A password: printed as `***` by `Debug` and `Display`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(Secret(s.to_string()))
    }
}

/// A duration written `250ms`, `10s`, `2m`, or a bare number of seconds.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Span(pub Duration);

impl FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("bad duration `{s}` (expected e.g. 250ms, 10s, 2m)"))?;
        let d = match unit.trim() {
            "ms" => Duration::from_millis(n),
            "" | "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            other => return Err(format!("bad duration unit `{other}` in `{s}` (use ms, s or m)")),
        };
        Ok(Span(d))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

/// A size in bytes written `536870912`, `64kb`, `512mb` or `1gb`
/// (powers of 1024, as in redis.conf).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        let split = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
        let (number, unit) = lower.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("bad size `{s}` (expected e.g. 65536, 64kb, 512mb)"))?;
        let scale = match unit.trim() {
            "" | "b" => 1,
            "k" | "kb" => 1 << 10,
            "m" | "mb" => 1 << 20,
            "g" | "gb" => 1 << 30,
            other => return Err(format!("bad size unit `{other}` in `{s}` (use kb, mb or gb)")),
        };
        n.checked_mul(scale)
            .map(Size)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n > 0 && n.is_multiple_of(1 << 20) => write!(f, "{}mb", n >> 20),
            n if n > 0 && n.is_multiple_of(1 << 10) => write!(f, "{}kb", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| format!("bad log format `{s}` (use text or json)"))
    }
}

/// Values that are read from a string (or, for sizes and durations, a number)
/// in TOML through their `FromStr`, so errors carry the key's location.
macro_rules! serde_via_str {
    ($($ty:ty),*) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw { Text(String), Number(u64) }
                let text = match Raw::deserialize(d)? {
                    Raw::Text(s) => s,
                    Raw::Number(n) => n.to_string(),
                };
                text.parse().map_err(serde::de::Error::custom)
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
    )*};
}
serde_via_str!(Upstream, Span, Size);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// One set of settings, as the file or the flags give them: every field
/// optional so that the two can be merged key by key.
macro_rules! settings {
    (
        $( $(#[doc = $doc:literal])* $name:ident : $ty:ty = $default:expr ;)*
        @file_only {
            $( $(#[doc = $fdoc:literal])* $fname:ident : $fty:ty = $fdefault:expr ;)*
        }
    ) => {
        /// The keys of `cachefence.toml`. Unknown keys are an error.
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
                Settings { $( $name: self.$name.or(base.$name), )* $( $fname: self.$fname.or(base.$fname), )* }
            }
        }
    };
}

settings! {
    /// Address the proxy accepts clients on.
    listen: String = "127.0.0.1:6380".to_string();
    /// Redis to forward to: `host:port` or `redis://[user:password@]host[:port][/db]`.
    upstream: Upstream = "127.0.0.1:6379".parse().expect("valid default");
    /// ACL user for the proxy's upstream connections (overrides the URL's).
    upstream_user: String = String::new();
    /// Password for the proxy's upstream connections (overrides the URL's); never logged.
    upstream_password: Secret = Secret::default();
    /// Most client connections at once; more get `-ERR max number of clients reached`.
    max_clients: u32 = 10_000;
    /// Largest bulk string or request accepted from a client (Redis' proto-max-bulk-len).
    max_frame_size: Size = Size(512 << 20);
    /// Most requests in flight per connection; past it the proxy stops reading that client.
    max_pending: u32 = 1 << 20;
    /// Close a client idle this long (0 = never; like Redis' `timeout`).
    timeout: Span = Span(Duration::ZERO);
    /// TCP keepalive on client connections, as Redis' `tcp-keepalive` (0 = off).
    tcp_keepalive: Span = Span(Duration::from_secs(300));
    /// Time allowed to connect to (and authenticate with) the upstream.
    connect_timeout: Span = Span(Duration::from_secs(2));
    /// Longest silence from the upstream while a reply is due (blocking
    /// commands excepted); past it the client gets errors and is closed (0 = never).
    reply_timeout: Span = Span(Duration::from_secs(30));
    /// On SIGINT/SIGTERM, how long in-flight replies may take before exit.
    shutdown_timeout: Span = Span(Duration::from_secs(10));
    /// Worker threads (0 = one per available CPU).
    workers: u32 = 0;
    /// Log level or filter (`info`, `debug`, `cachefence=trace`); RUST_LOG wins over the file's.
    log_level: String = "info".to_string();
    /// `text` or `json`.
    log_format: LogFormat = LogFormat::Text;
    /// Version fences on the keys of the `[[cache]]` sections (false: a pure passthrough proxy).
    fences: bool = true;
    /// Password for the proxy's own admin commands (`CACHE.INVALIDATE`,
    /// `CACHE.RELOAD`), given with `CACHE.AUTH <password>`; separate from
    /// Redis' AUTH. Empty: no password.
    admin_password: Secret = Secret::default();
    /// Keys whose recent history `CACHE.EXPLAIN` keeps (16 events each; the key
    /// first recorded longest ago goes first). 0: off.
    explain_keys: u32 = crate::fence::DEFAULT_EXPLAIN_KEYS as u32;
    /// Address of the Prometheus endpoint (`GET /metrics`, plain HTTP). Empty: off.
    metrics_listen: String = String::new();
    /// Certificate chain (PEM) the proxy presents to clients; with `tls_key_file`
    /// set too, the listener speaks TLS only. Empty: plain TCP.
    tls_cert_file: String = String::new();
    /// Private key (PEM) of `tls_cert_file`.
    tls_key_file: String = String::new();
    /// CA certificates (PEM): clients must present a certificate signed by one.
    /// Empty: no client certificates asked for.
    tls_ca_cert_file: String = String::new();
    /// TLS to the upstream (a `rediss://` upstream URL turns it on too).
    upstream_tls: bool = false;
    /// CA certificates (PEM) Redis' certificate must chain to. Empty: the
    /// Mozilla root certificates (webpki-roots) built into the proxy.
    upstream_tls_ca_cert_file: String = String::new();
    /// Name Redis' certificate must be valid for (also sent as SNI). Empty: the upstream host.
    upstream_tls_server_name: String = String::new();
    @file_only {
        /// Fenced key patterns and their rules (`[[cache]]` tables; the first match wins).
        cache: Vec<CacheSection> = vec![CacheSection::defaults()];
        /// The PostgreSQL change log (`[postgres]` and `[[postgres.table]]`).
        postgres: PostgresSection = PostgresSection::defaults();
    }
}

/// The validated configuration the proxy runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: String,
    pub upstream: Upstream,
    pub max_clients: usize,
    pub max_frame_size: usize,
    pub max_pending: usize,
    pub timeout: Option<Duration>,
    pub tcp_keepalive: Option<Duration>,
    pub connect_timeout: Duration,
    pub reply_timeout: Option<Duration>,
    pub shutdown_timeout: Duration,
    pub workers: usize,
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
        Ok(Config {
            listen,
            upstream,
            max_clients: positive("max_clients", s.max_clients.expect("defaulted").into())?,
            max_frame_size: positive("max_frame_size", s.max_frame_size.expect("defaulted").0)?,
            max_pending: positive("max_pending", s.max_pending.expect("defaulted").into())?,
            timeout: (!timeout.is_zero()).then_some(timeout),
            tcp_keepalive: Some(s.tcp_keepalive.expect("defaulted").0).filter(|t| !t.is_zero()),
            connect_timeout,
            reply_timeout: (!reply_timeout.is_zero()).then_some(reply_timeout),
            shutdown_timeout: s.shutdown_timeout.expect("defaulted").0,
            workers: s.workers.expect("defaulted") as usize,
            log_level,
            log_format: s.log_format.expect("defaulted"),
            fences: match s.fences.expect("defaulted") {
                true => Some(Scope::new(&s.cache.expect("defaulted"))?),
                false => None,
            },
            changelog: s.postgres.expect("defaulted").resolve()?,
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
    fn upstream_urls_and_addresses_parse() {
        let u: Upstream = "redis://app:p%40ss@cache.local:6400/3".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("cache.local", 6400, 3));
        assert_eq!(u.user.as_deref(), Some("app"));
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("p@ss"));
        let u: Upstream = "redis://:secret@127.0.0.1".parse().unwrap();
        assert_eq!((u.port, u.user.clone(), u.db), (6379, None, 0));
        let u: Upstream = "[::1]:7000".parse().unwrap();
        assert_eq!(u.addr(), "[::1]:7000");
        assert!("localhost".parse::<Upstream>().is_err());
        assert!("http://x:1".parse::<Upstream>().is_err());
        assert_eq!(u.tls, None);
        let u: Upstream = "rediss://:pw@cache.local/2".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("cache.local", 6379, 2));
        assert_eq!(u.tls, Some(crate::tls::UpstreamTls::default()));
        assert!("h:notaport".parse::<Upstream>().is_err());
    }

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
    fn durations_and_sizes_parse() {
        assert_eq!("250ms".parse::<Span>().unwrap().0, Duration::from_millis(250));
        assert_eq!("10".parse::<Span>().unwrap().0, Duration::from_secs(10));
        assert_eq!("2m".parse::<Span>().unwrap().0, Duration::from_secs(120));
        assert!("10h".parse::<Span>().is_err());
        assert_eq!("512mb".parse::<Size>().unwrap().0, 512 << 20);
        assert_eq!("64KB".parse::<Size>().unwrap().0, 64 << 10);
        assert!("12xb".parse::<Size>().is_err());
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
}
