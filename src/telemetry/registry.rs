//! Counters, gauges and latency histograms, bumped where things happen;
//! `CACHE.STATS` and the Prometheus endpoint ([`crate::telemetry::exporter`]) read them.

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
    /// Requests by [`Class`] (commands, not bytes).
    pub commands: [Counter; 3],
    /// From reading a batch of requests to routing the reply to its last
    /// one, per command, by [`Class`].
    pub latency: [Histogram; 3],
    /// Upstream connections that could not be opened.
    pub upstream_connect_errors: Counter,
    /// Upstream connections lost with replies pending.
    pub upstream_lost: Counter,
    /// Upstream connections closed by `reply_timeout`.
    pub upstream_timeouts: Counter,
    /// Upstream reached again by a client served errors while it was away.
    pub upstream_reconnects: Counter,
    /// Clients closed for malformed requests.
    pub protocol_errors: Counter,
    /// Clients on the TLS listener whose handshake failed or timed out.
    pub tls_handshake_errors: Counter,
}

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`).
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

/// A latency histogram with fixed buckets: observing is a few relaxed
/// atomic adds, no lock and no allocation.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [Counter; LATENCY_BUCKETS.len() + 1],
    sum_nanos: Counter,
    count: Counter,
}

impl Histogram {
    /// Records `n` observations of `latency`.
    pub fn observe(&self, latency: std::time::Duration, n: u64) {
        if n == 0 {
            return;
        }
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].add(n);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.add(nanos.saturating_mul(n));
        self.count.add(n);
    }

    pub fn count(&self) -> u64 {
        self.count.get()
    }

    /// Cumulative counts per bucket, `+Inf` last.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut total = 0;
        self.buckets
            .iter()
            .map(|b| {
                total += b.get();
                total
            })
            .collect()
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos.get() as f64 / 1e9
    }
}

/// How a command was handled, for counts and latency by class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Forwarded unchanged.
    Passthrough = 0,
    /// A fenced key's command, rewritten or watched (fences).
    Intercepted = 1,
    /// `CACHE.*`, answered by the proxy.
    Admin = 2,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Passthrough, Class::Intercepted, Class::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Passthrough => "passthrough",
            Class::Intercepted => "intercepted",
            Class::Admin => "admin",
        }
    }
}

/// Commands of one batch per [`Class`].
pub type ClassCounts = [u32; 3];

/// Prometheus' text format, written one family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        use std::fmt::Write;
        let _ = match labels.is_empty() {
            true => writeln!(self.out, "{name} {value}"),
            false => writeln!(self.out, "{name}{{{labels}}} {value}"),
        };
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        self.sample(name, "", value);
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, "gauge", help);
        self.sample(name, "", value);
    }

    /// A counter family with one label: `label="value"` per sample.
    pub fn counters(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
        self.header(name, "counter", help);
        for (value, n) in samples {
            self.sample(name, &format!("{label}=\"{value}\""), n);
        }
    }

    /// A gauge family with one label.
    pub fn gauges(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, u64)]) {
        self.header(name, "gauge", help);
        for (value, n) in samples {
            self.sample(name, &format!("{label}=\"{value}\""), n);
        }
    }

    /// A histogram family with one label.
    pub fn histograms(&mut self, name: &str, help: &str, label: &str, samples: &[(&str, &Histogram)]) {
        self.header(name, "histogram", help);
        for (value, histogram) in samples {
            let cumulative = histogram.cumulative();
            for (le, n) in LATENCY_BUCKETS.iter().zip(&cumulative) {
                self.sample(
                    &format!("{name}_bucket"),
                    &format!("{label}=\"{value}\",le=\"{le}\""),
                    n,
                );
            }
            let total = *cumulative.last().expect("an +Inf bucket");
            self.sample(
                &format!("{name}_bucket"),
                &format!("{label}=\"{value}\",le=\"+Inf\""),
                total,
            );
            self.sample(
                &format!("{name}_sum"),
                &format!("{label}=\"{value}\""),
                histogram.sum_seconds(),
            );
            self.sample(&format!("{name}_count"), &format!("{label}=\"{value}\""), total);
        }
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(30), 2);
        h.observe(Duration::from_millis(3), 1);
        h.observe(Duration::from_secs(60), 1);
        let mut e = Exposition::default();
        e.histograms("x_seconds", "Latency.", "class", &[("a", &h)]);
        let text = e.finish();
        assert!(text.starts_with("# HELP x_seconds Latency.\n# TYPE x_seconds histogram\n"));
        assert!(
            text.contains("x_seconds_bucket{class=\"a\",le=\"0.00005\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_bucket{class=\"a\",le=\"0.0025\"} 2\n"));
        assert!(text.contains("x_seconds_bucket{class=\"a\",le=\"0.005\"} 3\n"));
        assert!(text.contains("x_seconds_bucket{class=\"a\",le=\"10\"} 3\n"));
        assert!(text.contains("x_seconds_bucket{class=\"a\",le=\"+Inf\"} 4\n"));
        assert!(text.contains("x_seconds_sum{class=\"a\"} 60.00306\n"), "{text}");
        assert!(text.contains("x_seconds_count{class=\"a\"} 4\n"));
    }
}
