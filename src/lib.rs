//! cachefence: a Redis-protocol proxy that refuses stale cache fills.
//!
//! # Layout
//!
//! In the order data flows. Dependencies point one way — `telemetry` ←
//! `config` ← `redis` ← `fence` ← `changelog`, `app`, `admin` ← `session`
//! ← `server` (`resp`, `net` and `tls` below them all) — and [`app`] is the
//! one place that wires the parts, and re-wires them on a reload.
//!
//! - [`server`]: accepts clients, enforces `max_clients`, drains on shutdown.
//! - [`session`]: one task per client, on the shared upstream connections
//!   or one of its own ([`session::upstream`] decides per command):
//!   [`session::requests`] (client → Redis, in batches),
//!   [`session::replies`] (Redis → client, paired in order by
//!   [`session::pairing`], written through [`session::outbox`]), and
//!   [`session::offline`] (serving while Redis is unreachable).
//! - [`admin`]: the `CACHE.*` commands, parsed once, one file per family.
//! - [`fence`]: version fences and lease tickets. Where a GET miss, a fill
//!   or a write is decided: [`fence::plan`] (request rules) and
//!   [`fence::translate`] (reply rules); pipelined writes that skip the
//!   script where no fence exists: [`fence::probe`]; herd holds in [`fence::herd`]; where
//!   every invalidation ends: [`fence::epilogue`]; the Lua script in
//!   [`fence::script`]; each key's recent events for `CACHE.EXPLAIN` in
//!   [`fence::history`]; the lag window in force for `lag_window = "auto"`
//!   in [`fence::lag`]; the workers that send invalidations of their own
//!   (retried deletes, second deletes) beside them.
//! - [`changelog`]: the PostgreSQL outbox — `pg install`, the consumer that
//!   turns committed row changes into invalidations, and `cachefence audit`
//!   ([`changelog::audit`]); the replicas' lag monitor
//!   ([`changelog::replica_lag`]).
//! - [`redis`]: the Redis client the proxy uses for itself (connect with
//!   TLS/AUTH/SELECT, one call that must succeed), and the shared upstream
//!   connections ([`redis::shared`]: many sessions' requests pipelined on
//!   one connection, replies routed back in order).
//! - [`resp`]: framing of requests ([`resp::request`], Redis' own grammar)
//!   and replies ([`resp::reply`]), command classification
//!   ([`resp::command`]), and the encoding of replies the proxy builds.
//! - [`net`]: the streams sessions run on (plain TCP, or TLS either side);
//!   [`tls`]: certificates and keys, read and checked at start.
//! - [`config`]: the TOML file and flags, merged and validated, every
//!   setting declared once in [`config::settings`] (live or restart); the
//!   `[[cache]]` policies ([`config::cache`]), the `[postgres]` mappings and
//!   key templates ([`config::postgres`], [`config::template`]);
//!   [`config::live`]: the settings a reload (`SIGHUP`, `CACHE.RELOAD`)
//!   changes in place.
//! - [`telemetry`]: counters and histograms, each declared once with its
//!   `CACHE.STATS` name and Prometheus family (types and macros in
//!   [`telemetry::registry`]); the Prometheus endpoint that renders them
//!   ([`telemetry::exporter`]); `tracing` setup ([`telemetry::logging`]).
//!
//! `main.rs` only parses flags, loads the config and runs [`server::Server`].

pub mod admin;
pub mod app;
pub mod changelog;
pub mod config;
pub mod fence;
pub mod net;
pub mod redis;
pub mod resp;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod tls;
