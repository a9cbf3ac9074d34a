//! The Prometheus endpoint: `GET /metrics` on `metrics_listen`, in the
//! text exposition format, rendered from the counters where they are kept.
//!
//! A deliberately small HTTP/1.1 server (one request per connection, then
//! close) instead of a framework: Prometheus needs nothing more, and every
//! bound is visible here — scrapes served at once, request head size, and a
//! time limit on reading the request and on writing the reply.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::session::Context;
use crate::telemetry::{Class, Exposition};

/// Scrapes served at once; more wait in the listen backlog.
const MAX_SCRAPES: usize = 8;
/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time to send the request, and to take the reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves scrapes until `stop` turns true.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
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
            if let Err(error) = respond(socket, &ctx).await {
                debug!(%peer, %error, "metrics endpoint: request failed");
            }
            drop(permit);
        });
    }
}

async fn respond(mut socket: TcpStream, ctx: &Context) -> std::io::Result<()> {
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

/// Every metric, named per Prometheus' conventions.
pub fn render(ctx: &Context) -> String {
    let m = &ctx.metrics;
    let mut e = Exposition::default();
    e.gauges(
        "cachefence_build_info",
        "Always 1; the version is the label.",
        "version",
        &[(env!("CARGO_PKG_VERSION"), 1)],
    );
    e.gauge(
        "cachefence_uptime_seconds",
        "Seconds since the proxy started.",
        ctx.started.elapsed().as_secs(),
    );
    e.gauge(
        "cachefence_connections_current",
        "Client connections being served.",
        m.connections_current.get(),
    );
    e.counter(
        "cachefence_connections_total",
        "Client connections accepted (rejected ones included).",
        m.connections_total.get(),
    );
    e.counter(
        "cachefence_connections_rejected_total",
        "Clients turned away by max_clients.",
        m.connections_rejected.get(),
    );
    let by_class = |f: &dyn Fn(usize) -> u64| -> Vec<(&'static str, u64)> {
        Class::ALL.iter().map(|c| (c.as_str(), f(*c as usize))).collect()
    };
    e.counters(
        "cachefence_commands_total",
        "Client commands by class: passthrough (forwarded as is), intercepted (a fenced key), admin (CACHE.*).",
        "class",
        &by_class(&|i| m.commands[i].get()),
    );
    let latency: Vec<(&str, &crate::telemetry::Histogram)> = Class::ALL
        .iter()
        .map(|c| (c.as_str(), &m.latency[*c as usize]))
        .collect();
    e.histograms(
        "cachefence_command_duration_seconds",
        "From reading a batch of client requests to routing the reply to its last command, per command.",
        "class",
        &latency,
    );
    e.counter(
        "cachefence_upstream_connect_errors_total",
        "Upstream connections that could not be opened.",
        m.upstream_connect_errors.get(),
    );
    e.counter(
        "cachefence_upstream_reconnects_total",
        "Upstream reached again by a client that was served errors while it was away.",
        m.upstream_reconnects.get(),
    );
    e.counter(
        "cachefence_upstream_lost_total",
        "Upstream connections lost with replies owed.",
        m.upstream_lost.get(),
    );
    e.counter(
        "cachefence_upstream_timeouts_total",
        "Upstream connections closed by reply_timeout.",
        m.upstream_timeouts.get(),
    );
    e.counter(
        "cachefence_protocol_errors_total",
        "Clients closed for malformed requests.",
        m.protocol_errors.get(),
    );
    e.counter(
        "cachefence_tls_handshake_errors_total",
        "Client TLS handshakes that failed or timed out.",
        m.tls_handshake_errors.get(),
    );
    e.counters(
        "cachefence_config_reloads_total",
        "Reloads of the config file (SIGHUP, CACHE.RELOAD) by result.",
        "result",
        &[
            ("applied", ctx.live.stats.reloads.get()),
            ("rejected", ctx.live.stats.failures.get()),
        ],
    );
    if let Some(fences) = &ctx.fences {
        let s = &fences.stats;
        e.counter(
            "cachefence_misses_total",
            "Reads of fenced keys that found nothing.",
            s.misses.get(),
        );
        e.counter(
            "cachefence_tickets_issued_total",
            "Lease tickets issued to readers that missed.",
            s.tickets_issued.get(),
        );
        e.counter(
            "cachefence_tickets_dropped_total",
            "Misses that got no ticket (a bound was reached).",
            s.tickets_dropped.get(),
        );
        e.gauge(
            "cachefence_tickets_outstanding",
            "Tickets held now.",
            fences.tickets_outstanding(),
        );
        e.counters(
            "cachefence_fills_total",
            "Fills (a SET after a miss) by result: stored, or not stored because NX found a value.",
            "result",
            &[
                ("accepted", s.fills_accepted.get()),
                ("not_stored_nx", s.fills_not_stored_nx.get()),
            ],
        );
        e.counters(
            "cachefence_fills_refused_total",
            "Fills refused as possibly stale, by reason.",
            "reason",
            &[
                ("fence_moved", s.refused_fence_moved.get()),
                ("fence_missing", s.refused_fence_missing.get()),
                ("expired", s.refused_expired.get()),
                ("lag_window", s.refused_lag_window.get()),
                ("pending_delete", s.refused_pending_delete.get()),
            ],
        );
        e.counters(
            "cachefence_writes_total",
            "Writes to fenced keys without a ticket, by result.",
            "result",
            &[("stored", s.writes.get()), ("rejected", s.writes_rejected.get())],
        );
        let changelog = ctx.changelog.as_ref().map_or(0, |c| c.keys_invalidated.get());
        let second = fences.second_deletes.as_ref().map_or(0, |w| w.stats.done.get());
        e.counters(
            "cachefence_invalidated_keys_total",
            "Keys sent to Redis to be deleted with their fence moved, by source: client (DEL, UNLINK, GETDEL, on_write = \"invalidate\"), \
             changelog, admin (CACHE.INVALIDATE), retry (a client delete delivered late), second_delete (double_delete).",
            "source",
            &[
                ("client", s.keys_invalidated_client.get()),
                ("changelog", changelog),
                ("admin", s.keys_invalidated_admin.get()),
                ("retry", fences.undelivered.stats.delivered.get()),
                ("second_delete", second),
            ],
        );
        e.counter(
            "cachefence_herd_holds_total",
            "Misses held while another client filled the key (herd control).",
            s.holds.get(),
        );
        e.counters(
            "cachefence_herd_hold_outcomes_total",
            "Held misses by how they ended: served (got the other client's value) or timed_out (after hold, \
             a ticket of their own).",
            "outcome",
            &[
                ("served", s.holds_served.get()),
                ("timed_out", s.holds_timed_out.get()),
            ],
        );
        e.counter(
            "cachefence_script_reloads_total",
            "Fence script calls sent again with their source after NOSCRIPT.",
            s.script_reloads.get(),
        );
        let u = &fences.undelivered;
        e.gauge(
            "cachefence_undelivered_deletes",
            "Client deletes waiting to be retried.",
            u.len(),
        );
        e.counters(
            "cachefence_undelivered_deletes_total",
            "Client deletes that could not be delivered, by what became of them.",
            "event",
            &[
                ("queued", u.stats.queued.get()),
                ("delivered", u.stats.delivered.get()),
                ("dropped", u.stats.dropped.get()),
            ],
        );
    }
    if let Some(c) = &ctx.changelog {
        e.gauge(
            "cachefence_changelog_connected",
            "1 while the change-log consumer is connected to PostgreSQL.",
            c.connected.get(),
        );
        e.counter(
            "cachefence_changelog_rows_total",
            "Outbox rows applied to Redis and deleted.",
            c.rows_consumed.get(),
        );
        e.counter(
            "cachefence_changelog_retries_total",
            "Change-log batches rolled back and tried again.",
            c.retries.get(),
        );
        e.gauge(
            "cachefence_changelog_lag_seconds",
            "Age of the oldest unconsumed outbox row at the last poll (0: none).",
            c.lag_ms.get() as f64 / 1000.0,
        );
    }
    e.finish()
}

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
}
