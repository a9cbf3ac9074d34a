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
//! - [`config`]: the TOML file and flags, merged and validated; [`live`]:
//!   the settings a reload (`SIGHUP`, `CACHE.RELOAD`) changes in place.
//! - [`telemetry`]: counters and histograms, each declared once with its
//!   `CACHE.STATS` name and Prometheus family (types and macros in
//!   [`telemetry::registry`]); the Prometheus endpoint that renders them
//!   ([`telemetry::exporter`]); `tracing` setup ([`telemetry::logging`]).
//!
//! `main.rs` only parses flags, loads the config and runs [`server::Server`].

pub mod changelog;
pub mod config;
pub mod fence;
pub mod live;
pub mod net;
pub mod resp;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
