//! The Prometheus endpoint: `GET /metrics` on `metrics_listen`, in the
//! text exposition format, rendered from the declarations in
//! [`crate::telemetry`] and the counters where they are kept.
//!
//! A deliberately small HTTP/1.1 server (one request per connection, then
//! close) instead of a framework: Prometheus needs nothing more, and every
//! bound is visible here — scrapes served at once, request head size, and a
//! time limit on reading the request and on writing the reply.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use super::{Family, Histogram, Kind, LATENCY_BUCKETS, Sample, Value};

/// What a scrape reads: every sample, and the family lists to write, in
/// order (the application implements it; the exporter knows no part of it).
pub trait Scrape: Send + Sync {
    fn scrape<'a>(&'a self, out: &mut dyn FnMut(Sample<'a>)) -> Vec<&'static [&'static Family]>;
}

/// Scrapes served at once; more wait in the listen backlog.
const MAX_SCRAPES: usize = 8;
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time to send the request, and to take the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes until `stop` turns true.
pub async fn serve(listener: TcpListener, ctx: Arc<dyn Scrape>, mut stop: watch::Receiver<bool>) {
    let addr = listener.local_addr().ok();
    info!(?addr, "metrics endpoint listening (GET /metrics)");
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
            _ = stop.changed() => return,
        };
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(error) = respond(socket, &*ctx).await {
                debug!(%peer, %error, "metrics endpoint: request failed");
            }
            drop(permit);
        });
    }
}

async fn respond(mut socket: TcpStream, ctx: &dyn Scrape) -> std::io::Result<()> {
    let head = match tokio::time::timeout(IO_TIMEOUT, read_head(&mut socket)).await {
        Ok(head) => head?,
        Err(_) => return Err(std::io::Error::other("request not complete in time")),
    };
    let reply = match request_line(&head) {
        Some((method, path)) => {
            let path = path.split('?').next().unwrap_or_default();
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => {
                    let body = render(ctx);
                    let head =
                        response_head("200 OK", "text/plain; version=0.0.4; charset=utf-8", body.len());
                    match method {
                        "HEAD" => head,
                        _ => head + &body,
                    }
                }
                ("GET" | "HEAD", _) => simple("404 Not Found", "not found; the metrics are at /metrics\n"),
                _ => simple("405 Method Not Allowed", "only GET /metrics\n"),
            }
        }
        None => simple("400 Bad Request", "bad request\n"),
    };
    tokio::time::timeout(IO_TIMEOUT, async {
        socket.write_all(reply.as_bytes()).await?;
        socket.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::other("reply not taken in time"))?
}

/// Reads up to the end of the request head (the body, if any, is ignored).
async fn read_head(socket: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(head);
        }
        head.extend_from_slice(&chunk[..n]);
        if memchr::memmem::find(&head, b"\r\n\r\n").is_some() || head.len() > MAX_HEAD {
            return Ok(head);
        }
    }
}

/// `(method, target)` of `METHOD target HTTP/1.x`.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let end = memchr::memmem::find(head, b"\r\n")?;
    let line = std::str::from_utf8(&head[..end]).ok()?;
    let mut words = line.split(' ');
    let (method, target, version) = (words.next()?, words.next()?, words.next()?);
    (words.next().is_none() && version.starts_with("HTTP/1.")).then_some((method, target))
}

fn response_head(status: &str, content_type: &str, length: usize) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
}

fn simple(status: &str, body: &str) -> String {
    response_head(status, "text/plain; charset=utf-8", body.len()) + body
}

/// The exposition of everything `ctx` samples.
pub fn render(ctx: &dyn Scrape) -> String {
    let mut samples = Vec::with_capacity(96);
    let lists = ctx.scrape(&mut |sample| {
        if sample.family.is_some() {
            samples.push(sample);
        }
    });
    let mut e = Exposition::default();
    for family in lists.into_iter().flatten() {
        e.family(family, &samples);
    }
    e.finish()
}

/// Prometheus' text format, written one family at a time.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// `family` with its samples among `samples`: one per label value, in
    /// the order declared; a value none of them has is written 0.
    pub fn family(&mut self, family: &Family, samples: &[Sample<'_>]) {
        let name = family.name;
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            family.help,
            family.kind.as_str()
        );
        let find = |label: Option<&str>| {
            samples
                .iter()
                .find(|s| s.family.is_some_and(|f| f.name == name) && s.label == label)
                .map_or(
                    match family.kind {
                        Kind::Histogram => Value::Histogram(&NO_OBSERVATIONS),
                        _ => Value::Int(0),
                    },
                    |s| s.value,
                )
        };
        match family.label {
            None => self.sample(name, "", find(None)),
            Some((label, values)) => {
                for value in values {
                    self.sample(name, &format!("{label}=\"{value}\""), find(Some(value)));
                }
            }
        }
    }

    /// One sample (a histogram's buckets, sum and count); `labels` is
    /// `name="value"`, or empty.
    fn sample(&mut self, name: &str, labels: &str, value: Value<'_>) {
        match value {
            Value::Int(n) => self.line(name, labels, n),
            Value::Float(x) => self.line(name, labels, x),
            Value::Histogram(histogram) => {
                let comma = if labels.is_empty() { "" } else { "," };
                let bucket = format!("{name}_bucket");
                let cumulative = histogram.cumulative();
                for (le, n) in LATENCY_BUCKETS.iter().zip(&cumulative) {
                    self.line(&bucket, &format!("{labels}{comma}le=\"{le}\""), n);
                }
                let total = *cumulative.last().expect("an +Inf bucket");
                self.line(&bucket, &format!("{labels}{comma}le=\"+Inf\""), total);
                self.line(&format!("{name}_sum"), labels, histogram.sum_seconds());
                self.line(&format!("{name}_count"), labels, total);
            }
        }
    }

    fn line(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = match labels.is_empty() {
            true => writeln!(self.out, "{name} {value}"),
            false => writeln!(self.out, "{name}{{{labels}}} {value}"),
        };
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// What a histogram family writes for a label value no field reports.
static NO_OBSERVATIONS: Histogram = Histogram::new();

/// Binds the endpoint's listener (at start, so a bad address stops the proxy).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse() {
        assert_eq!(
            request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_line(b"GET / HTTP/2 x\r\n\r\n"), None);
        assert_eq!(request_line(b"no line end"), None);
    }

    use crate::telemetry::{Counter, Gauge, PerClass};
    use std::time::Duration;

    static HITS: Family = Family::new(Kind::Counter, "x_hits_total", "Hits.");
    static DEPTH: Family = Family::new(Kind::Gauge, "x_depth", "Depth now.");
    static LAG: Family = Family::new(Kind::Gauge, "x_lag_seconds", "Lag.");
    static FILLS: Family =
        Family::new(Kind::Counter, "x_fills_total", "Fills by result.").by("result", &["stored", "dropped"]);
    static LATENCY: Family =
        Family::new(Kind::Histogram, "x_seconds", "Latency.").by("class", &crate::telemetry::Class::NAMES);

    crate::telemetry::registry::metrics! {
        pub struct Group {
            hits: Counter, prom HITS;
            depth: Gauge, prom DEPTH;
            lag_ms: Gauge, prom LAG / 1000.0;
            stored: Counter, prom FILLS["stored"];
            latency: PerClass<Histogram>, prom LATENCY;
        }
    }

    fn text(family: &Family, group: &Group) -> String {
        let mut samples = Vec::new();
        group.visit(&mut |s| samples.push(s));
        samples.retain(|s| s.family.is_some_and(|f| std::ptr::eq(f, family)));
        let mut e = Exposition::default();
        e.family(family, &samples);
        e.finish()
    }

    #[test]
    fn a_counter_is_written_with_its_help_and_type() {
        let group = Group::default();
        group.hits.add(42);
        assert_eq!(
            text(&HITS, &group),
            "# HELP x_hits_total Hits.\n# TYPE x_hits_total counter\nx_hits_total 42\n"
        );
    }

    #[test]
    fn a_gauge_is_written_as_an_integer_or_divided_as_a_float() {
        let group = Group::default();
        group.depth.set(7);
        group.lag_ms.set(1500);
        assert_eq!(
            text(&DEPTH, &group),
            "# HELP x_depth Depth now.\n# TYPE x_depth gauge\nx_depth 7\n"
        );
        assert_eq!(
            text(&LAG, &group),
            "# HELP x_lag_seconds Lag.\n# TYPE x_lag_seconds gauge\nx_lag_seconds 1.5\n"
        );
    }

    #[test]
    fn a_labelled_family_writes_every_declared_value_in_order() {
        let group = Group::default();
        group.stored.add(3);
        assert_eq!(
            text(&FILLS, &group),
            "# HELP x_fills_total Fills by result.\n# TYPE x_fills_total counter\n\
             x_fills_total{result=\"stored\"} 3\n\
             x_fills_total{result=\"dropped\"} 0\n"
        );
    }

    #[test]
    fn a_histogram_writes_cumulative_buckets_sum_and_count() {
        let group = Group::default();
        let h = &group.latency[1];
        h.observe(Duration::from_micros(30), 2);
        h.observe(Duration::from_millis(3), 1);
        h.observe(Duration::from_secs(60), 1);
        let text = text(&LATENCY, &group);
        let intercepted: String = text
            .lines()
            .filter(|l| l.starts_with('#') || l.contains("\"intercepted\""))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            intercepted,
            "# HELP x_seconds Latency.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.00005\"} 2\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.0001\"} 2\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.00025\"} 2\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.0005\"} 2\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.001\"} 2\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.0025\"} 2\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.005\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.01\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.025\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.05\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.1\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.25\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"0.5\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"1\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"2.5\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"10\"} 3\n\
             x_seconds_bucket{class=\"intercepted\",le=\"+Inf\"} 4\n\
             x_seconds_sum{class=\"intercepted\"} 60.00306\n\
             x_seconds_count{class=\"intercepted\"} 4\n"
        );
        // The other classes are written too, empty.
        assert!(
            text.contains(
                "x_seconds_bucket{class=\"admin\",le=\"+Inf\"} 0\nx_seconds_sum{class=\"admin\"} 0\n"
            )
        );
    }
}
