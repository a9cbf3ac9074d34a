//! The one test harness of cachefence: what the integration tests
//! (`tests/*.rs`) and the proto-tests runner (`proto-tests/runner.rs`) start
//! and talk to. A dev-only crate (`publish = false`), a dev-dependency of
//! cachefence, split by concern:
//!
//! - [`redis`]: a scratch `redis-server` per test, on a free loopback port;
//! - [`sentinel`]: a master, a replica and three sentinels of the test's own;
//! - [`cluster`]: a Redis Cluster of three masters and three replicas;
//! - [`proxy`]: the proxy in process ([`Proxy`]), as a child process
//!   ([`ProxyProcess`]: signals, RLIMIT_NOFILE, logs, restarts, `/proc`
//!   figures), and the binary for one-shot subcommands
//!   ([`cachefence_command`]);
//! - [`client`]: a raw RESP client and request/reply helpers;
//! - [`pg`]: a PostgreSQL schema per test, created and dropped;
//! - [`pg_replica`]: a PostgreSQL primary and streaming replica of the
//!   test's own, with an apply delay it can change, stop and start;
//! - [`race`]: the scaffolding of the cache-aside race tests (a database
//!   stand-in with a lagging replica, plain Redis or cachefence to run on);
//! - [`files`]: scratch files and directories (the `tempfile` crate);
//! - [`wait`]: the shared timeout and polling.
//!
//! A missing `redis-server` or an unreachable PostgreSQL is a test failure
//! with a message saying so, never a skip.

pub mod client;
pub mod cluster;
pub mod files;
pub mod pg;
pub mod pg_replica;
pub mod proxy;
pub mod race;
pub mod redis;
pub mod sentinel;
pub mod wait;

pub use client::{RawClient, RdbTransfer, cmd, cmds, crc64, escape, frame_len};
pub use files::{ConfigFile, ScratchDir};
pub use proxy::{
    FENCE_EVERY_KEY, Nofile, Proxy, ProxyProcess, binary, cachefence_command, info_field, info_number,
};
pub use race::{Database, Setup, Target};
pub use redis::{RedisServer, free_port};
pub use sentinel::Sentinels;
pub use wait::{WAIT, eventually, eventually_within};
