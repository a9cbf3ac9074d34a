//! The keys of the config file and their defaults, declared once: the
//! [`Settings`] the file and the flags are parsed into (one `--flag` per
//! top-level key).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{LogFormat, Secret, Size, Span, Upstream};
use crate::changelog::PostgresSection;
use crate::fence::CacheSection;

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
