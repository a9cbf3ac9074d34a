//! Counters, bumped where things happen. Issue #6 exports them to
//! Prometheus; for now they are read by tests and logs.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        if n > 0 {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn set(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Client connections accepted (including rejected ones).
    pub connections_total: Counter,
    /// Client connections being served now.
    pub connections_current: Gauge,
    /// Clients turned away by `max_clients`.
    pub connections_rejected: Counter,
    /// Requests forwarded (commands, not bytes).
    pub commands: Counter,
    /// Upstream connections that could not be opened.
    pub upstream_connect_errors: Counter,
    /// Upstream connections lost with replies pending.
    pub upstream_lost: Counter,
    /// Upstream connections closed by `reply_timeout`.
    pub upstream_timeouts: Counter,
    /// Clients closed for malformed requests.
    pub protocol_errors: Counter,
    /// Clients on the TLS listener whose handshake failed or timed out.
    pub tls_handshake_errors: Counter,
}
