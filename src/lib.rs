//! cachefence: a Redis-protocol proxy that refuses stale cache fills.
//!
//! # Layout
//!
//! Data flows through the modules in this order:
//!
//! - [`server`]: accepts clients, enforces `max_clients`, drains on shutdown.
//! - [`session`]: one task per client, paired 1:1 with its own upstream
//!   connection; forwards requests in batches and pairs replies in order
//!   ([`session::pairing`]), opening the upstream in [`session::upstream`].
//! - [`resp`]: framing of requests ([`resp::request`], Redis' own grammar)
//!   and replies ([`resp::reply`]), command classification
//!   ([`resp::command`]: where an intercepted command is recognised), and
//!   encoding of the replies the proxy makes itself ([`resp::encode`]).
//! - [`fence`]: version fences and lease tickets — which commands are
//!   intercepted, the Lua script that checks and moves fences in Redis.
//!   Beside them, [`fence::history`] keeps each key's recent events for
//!   `CACHE.EXPLAIN`.
//! - [`changelog`]: the PostgreSQL outbox — key templates, `pg install`, the
//!   consumer that turns committed row changes into invalidations, and
//!   `cachefence audit` ([`changelog::audit`]).
//! - [`net`]: the streams sessions run on (plain TCP, or TLS either side);
//!   [`tls`]: certificates and keys, read and checked at start.
//! - [`config`]: the TOML file and flags, merged and validated, every
//!   setting declared once in [`config::settings`] (live or restart);
//!   [`config::live`]: the settings a reload (`SIGHUP`, `CACHE.RELOAD`)
//!   changes in place, and the reload.
//! - [`metrics`], [`exporter`], [`logging`]: counters and histograms, the
//!   Prometheus endpoint that renders them, and `tracing` setup.
//!
//! `main.rs` only parses flags, loads the config and runs [`server::Server`].

pub mod changelog;
pub mod config;
pub mod exporter;
pub mod fence;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod resp;
pub mod server;
pub mod session;
pub mod tls;
