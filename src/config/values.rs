//! The values settings are written in: the upstream address, passwords,
//! durations, sizes and the log format, each parsed through its `FromStr`
//! so that a bad value is reported with the key's file and line.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::tls::UpstreamTls;

/// Where the proxy connects, parsed from `host:port`,
/// `redis[s]://[user:password@]host[:port][/db]` or
/// `redis-sentinel://[user:password@]host[:port],host[:port]…/master[/db]`
/// (the credentials and database are the master's).
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub db: u32,
    /// TLS to Redis (`rediss://` or `upstream_tls`); `None`: plain TCP.
    pub tls: Option<UpstreamTls>,
    /// The master the sentinels name (`redis-sentinel://`); `host` and
    /// `port` are then the first sentinel's, not Redis'. Shared by every
    /// clone: what the sentinels said last, and the failovers seen.
    pub sentinel: Option<std::sync::Arc<crate::redis::sentinel::Sentinel>>,
    /// A Redis Cluster (`redis-cluster://`); `host` and `port` are then the
    /// first seed's. Shared by every clone: the slot map and key table.
    pub cluster: Option<std::sync::Arc<crate::redis::cluster::Cluster>>,
}

impl Upstream {
    /// `host:port`, the form used in logs and error replies (no credentials).
    pub fn addr(&self) -> String {
        if let Some(sentinel) = &self.sentinel {
            return sentinel.url();
        }
        if let Some(cluster) = &self.cluster {
            return cluster.url();
        }
        crate::redis::sentinel::host_port(&self.host, self.port)
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
            .field("sentinel", &self.sentinel.as_ref().map(|s| s.url()))
            .field("cluster", &self.cluster.as_ref().map(|c| c.url()))
            .finish()
    }
}

impl FromStr for Upstream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("redis-sentinel://") {
            return sentinel_upstream(rest);
        }
        if let Some(rest) = s.strip_prefix("redis-cluster://") {
            return cluster_upstream(rest);
        }
        let (rest, url, tls) = match (s.strip_prefix("redis://"), s.strip_prefix("rediss://")) {
            (Some(rest), _) => (rest, true, false),
            (_, Some(rest)) => (rest, true, true),
            _ if s.contains("://") => {
                return Err(format!(
                    "unsupported scheme in `{s}` (only redis://, rediss://, redis-sentinel:// and redis-cluster:// are supported)"
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
        let (user, password) = split_credentials(credentials);
        Ok(Upstream {
            host,
            port,
            user,
            password,
            db,
            tls: tls.then(UpstreamTls::default),
            sentinel: None,
            cluster: None,
        })
    }
}

/// `user:password@` and what follows it.
fn split_at_credentials(rest: &str) -> (Option<&str>, &str) {
    match rest.rsplit_once('@') {
        Some((c, r)) => (Some(c), r),
        None => (None, rest),
    }
}

/// An upstream of several nodes (sentinels, cluster seeds): `host` and
/// `port` are the first node's.
fn of_nodes(nodes: &[(String, u16)], credentials: Option<&str>, db: u32) -> Upstream {
    let (user, password) = split_credentials(credentials);
    let (host, port) = nodes[0].clone();
    Upstream {
        host,
        port,
        user,
        password,
        db,
        tls: None,
        sentinel: None,
        cluster: None,
    }
}

/// `[user:password@]host[:port],host[:port]…/master[/db]`, after
/// `redis-sentinel://`.
fn sentinel_upstream(rest: &str) -> Result<Upstream, String> {
    let (credentials, rest) = split_at_credentials(rest);
    let (authorities, path) = rest
        .split_once('/')
        .ok_or_else(|| format!("expected sentinels then `/<master name>`, got `{rest}`"))?;
    let (master, db) = match path.split_once('/') {
        Some((m, "")) => (m, 0),
        Some((m, db)) => (m, db.parse().map_err(|_| format!("bad database number `{db}`"))?),
        None => (path, 0),
    };
    if master.is_empty() {
        return Err(format!("no master name after the sentinels in `{rest}`"));
    }
    let sentinels = authorities
        .split(',')
        .map(|a| split_host_port(a, Some(crate::redis::sentinel::DEFAULT_PORT)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut upstream = of_nodes(&sentinels, credentials, db);
    upstream.sentinel = Some(std::sync::Arc::new(crate::redis::sentinel::Sentinel::new(
        sentinels,
        percent_decode(master),
    )));
    Ok(upstream)
}

/// `[user:password@]host[:port],host[:port]…` after `redis-cluster://`:
/// seed nodes (any of the cluster's; the rest is learnt from them).
fn cluster_upstream(rest: &str) -> Result<Upstream, String> {
    let (credentials, rest) = split_at_credentials(rest);
    let authorities = rest.strip_suffix('/').unwrap_or(rest);
    if authorities.contains('/') {
        return Err(format!(
            "a Redis Cluster has only database 0: no `/<db>` after the nodes in `{rest}`"
        ));
    }
    let seeds = authorities
        .split(',')
        .map(|a| split_host_port(a, Some(crate::redis::cluster::DEFAULT_PORT)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut upstream = of_nodes(&seeds, credentials, 0);
    upstream.cluster = Some(std::sync::Arc::new(crate::redis::cluster::Cluster::new(seeds)));
    Ok(upstream)
}

/// `user:password`, `:password` or `user` (percent-decoded).
fn split_credentials(credentials: Option<&str>) -> (Option<String>, Option<Secret>) {
    match credentials {
        None => (None, None),
        Some(c) => match c.split_once(':') {
            Some((u, p)) => (
                (!u.is_empty()).then(|| percent_decode(u)),
                Some(Secret(percent_decode(p))),
            ),
            None => (Some(percent_decode(c)), None),
        },
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

/// `lag_window`: a fixed duration, or `auto` (sized from the replicas'
/// measured lag, up to `lag_window_max`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LagWindow {
    Fixed(Span),
    Auto,
}

impl FromStr for LagWindow {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(LagWindow::Auto),
            other => other
                .parse()
                .map(LagWindow::Fixed)
                .map_err(|e| format!("{e}, or \"auto\"")),
        }
    }
}

impl fmt::Display for LagWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LagWindow::Fixed(span) => span.fmt(f),
            LagWindow::Auto => f.write_str("auto"),
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
serde_via_str!(Upstream, Span, Size, LagWindow);

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
    fn a_sentinel_upstream_names_its_sentinels_and_master() {
        let u: Upstream = "redis-sentinel://u:p%40ss@s1:26380,s2,[::1]:5/my%20master/3"
            .parse()
            .unwrap();
        let sentinel = u.sentinel.as_ref().expect("a sentinel upstream");
        assert_eq!(
            sentinel.sentinels,
            vec![
                ("s1".to_string(), 26380),
                ("s2".to_string(), 26379),
                ("::1".to_string(), 5)
            ]
        );
        assert_eq!(sentinel.master_name, "my master");
        assert_eq!(
            (u.user.as_deref(), u.password.as_ref().map(Secret::expose)),
            (Some("u"), Some("p@ss"))
        );
        assert_eq!(u.db, 3);
        assert_eq!(u.addr(), "redis-sentinel://s1:26380,s2:26379,[::1]:5/my master");
        let plain: Upstream = "redis-sentinel://127.0.0.1/m".parse().unwrap();
        assert_eq!(plain.db, 0);
        assert!(plain.password.is_none());
        for bad in [
            "redis-sentinel://s1:1",
            "redis-sentinel://s1:1/",
            "redis-sentinel://s1:x/m",
            "redis-sentinel://,s1/m",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
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
}
