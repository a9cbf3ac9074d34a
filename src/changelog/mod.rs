//! The PostgreSQL change log: durable invalidation of cache keys from the
//! database's own record of what changed (races R2, R5, R6; contract C3).
//!
//! - the mappings themselves (`[postgres]`, key templates) are configuration:
//!   [`crate::config::postgres`], [`crate::config::template`].
//! - [`install`]: `cachefence pg install|uninstall` — the outbox table and
//!   one trigger per mapped table, which writes the keys of a row's old and
//!   new version into the outbox in the writer's own transaction and
//!   `NOTIFY`s.
//! - [`consumer`]: `LISTEN` plus a periodic poll; claims outbox rows with
//!   `FOR UPDATE SKIP LOCKED`, invalidates their keys through the same path
//!   as a client's `DEL`, and deletes the rows only after Redis acknowledged
//!   (at least once; several proxies share one outbox).
//! - [`audit`]: `cachefence audit` — samples cached keys, reads their rows
//!   back through the mappings' `values` expressions and reports how many
//!   cached values disagree with the database.
//! - [`replica_lag`]: with `[postgres] replicas`, measures the replicas'
//!   replay lag every `lag_poll`; `lag_window = "auto"` follows it (C2).

pub mod audit;
pub mod consumer;
pub mod install;
pub mod replica_lag;
