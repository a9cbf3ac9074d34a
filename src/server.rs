//! The accept loop: connection limit, one task per client, graceful
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::app::App;
use crate::changelog::consumer;
use crate::config::Config;
use crate::net::Stream;
use crate::resp::encode;
use crate::session;

/// A bound listener, ready to [`run`](Server::run).
pub struct Server {
    listener: TcpListener,
    /// The Prometheus endpoint's, when `metrics_listen` is set.
    metrics: Option<TcpListener>,
    ctx: Arc<App>,
    /// Installed before the listener is visible to anyone: a SIGHUP sent
    /// as soon as the port answers reloads instead of killing the process.
    hangups: mpsc::Receiver<()>,
}

impl Server {
    pub async fn bind(config: Config) -> anyhow::Result<Server> {
        let listener =
            listen(&config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                crate::telemetry::exporter::bind(addr)
                    .with_context(|| format!("cannot listen on {addr} (metrics_listen)"))?,
            ),
            None => None,
        };
        let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
        // Cluster-aware clients are told the proxy is the whole cluster.
        if let (Some(cluster), Ok(addr)) = (&config.upstream.cluster, listener.local_addr()) {
            *cluster.advertise.write().unwrap_or_else(|p| p.into_inner()) =
                (addr.ip().to_string(), addr.port());
        }
        let hangups = hangups();
        Ok(Server {
            listener,
            metrics,
            hangups,
            ctx: Arc::new(App::new(config, metrics_addr)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The running proxy's shared state (tests inspect it).
    pub fn context(&self) -> Arc<App> {
        self.ctx.clone()
    }

    /// Serves clients until `shutdown` completes, then stops accepting and
    /// lets connections deliver their in-flight replies for up to
    /// `shutdown_timeout` before returning.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let Server {
            listener,
            metrics,
            ctx,
            mut hangups,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every session holds a sender; `recv` returns `None` once all are gone.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        if let (Some(config), Some(fences)) = (&ctx.config.changelog, &ctx.fences)
            && !config.replicas.is_empty()
        {
            let monitor = crate::changelog::replica_lag::run(
                config.clone(),
                fences.lag.clone(),
                fences.scope.clone(),
                stop_rx.clone(),
            );
            tokio::spawn(monitor.instrument(info_span!("replica_lag")));
        }
        if let (Some(config), Some(stats)) = (&ctx.config.changelog, &ctx.changelog)
            && config.consumes()
        {
            let target = consumer::Target {
                upstream: ctx.config.upstream.clone(),
                connect_timeout: ctx.config.connect_timeout,
                fences: ctx.fences.as_ref().map(|f| (f.scope.clone(), f.epilogue.clone())),
            };
            let consumer = consumer::run(config.clone(), target, stats.clone(), stop_rx.clone());
            tokio::spawn(consumer.instrument(info_span!("changelog")));
        }
        if let Some(metrics) = metrics {
            let exporter = crate::telemetry::exporter::serve(metrics, ctx.clone(), stop_rx.clone());
            tokio::spawn(exporter.instrument(info_span!("metrics")));
        }
        tokio::pin!(shutdown);
        loop {
            let (socket, peer) = tokio::select! {
                _ = &mut shutdown => break,
                Some(()) = hangups.recv() => {
                    let _ = ctx.reload("SIGHUP");
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            ctx.metrics.connections_total.inc();
            let _ = socket.set_nodelay(true);
            if let Some(interval) = ctx.live.tcp_keepalive() {
                // As Redis' `tcp-keepalive`: a peer gone without FIN or RST
                // is found, and its upstream connection closed.
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(interval)
                    .with_interval((interval / 3).max(std::time::Duration::from_secs(1)))
                    .with_retries(3);
                let _ = socket2::SockRef::from(&socket).set_tcp_keepalive(&keepalive);
            }
            let tls = ctx.config.tls.as_ref().map(|tls| tls.acceptor().clone());
            // Only this loop adds connections: the check and the count agree.
            let max_clients = ctx.live.max_clients();
            if ctx.metrics.connections_current.get() >= max_clients as u64 {
                ctx.metrics.connections_rejected.inc();
                warn!(%peer, max_clients, "client rejected: max number of clients reached");
                tokio::spawn(reject(socket, tls));
                continue;
            }
            let slot = Slot::take(ctx.clone());
            let span = info_span!("conn", %peer, upstream = %ctx.config.upstream);
            let (ctx, mut stop_rx, done) = (ctx.clone(), stop_rx.clone(), done_tx.clone());
            tokio::spawn(
                async move {
                    let _slot = slot;
                    let client = match tls {
                        None => Some(Stream::Plain(socket)),
                        Some(tls) => tokio::select! {
                            client = handshake(&tls, socket, &ctx, TLS_HANDSHAKE_TIMEOUT) => client,
                            _ = stop_rx.changed() => None,
                        },
                    };
                    if let Some(client) = client {
                        session::run(client, peer, ctx.clone(), stop_rx).await;
                    }
                    drop(done);
                }
                .instrument(span),
            );
        }
        drop(listener);
        let open = ctx.metrics.connections_current.get();
        info!(open, "shutting down: stopped accepting, draining connections");
        let _ = stop_tx.send(true);
        drop(done_tx);
        let deadline = ctx.live.shutdown_timeout();
        match tokio::time::timeout(deadline, done_rx.recv()).await {
            Ok(_) => info!("shutdown complete"),
            Err(_) => warn!(
                open = ctx.metrics.connections_current.get(),
                ?deadline,
                "shutdown deadline passed; closing remaining connections"
            ),
        }
        Ok(())
    }
}

/// Redis' `tcp-backlog` default: a burst of connects (a pool starting) is
/// queued, not dropped into SYN retries.
const BACKLOG: u32 = 511;

fn listen(addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr.parse()?;
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(BACKLOG)?)
}

/// How long a client on the TLS listener has to complete its handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS handshake of a client on the TLS listener; `None` (logged and
/// counted) if it fails or takes longer than `timeout`.
async fn handshake(
    tls: &TlsAcceptor,
    socket: TcpStream,
    ctx: &App,
    timeout: std::time::Duration,
) -> Option<Stream> {
    let error = match tokio::time::timeout(timeout, tls.accept(socket)).await {
        Ok(Ok(stream)) => return Some(Stream::from(stream)),
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("not complete within {timeout:?}"),
    };
    ctx.metrics.tls_handshake_errors.inc();
    debug!(%error, "client TLS handshake failed");
    None
}

/// A client's place under `max_clients`, counted in
/// `connections_current` until dropped — also when its task panics.
struct Slot(Arc<App>);

impl Slot {
    fn take(ctx: Arc<App>) -> Slot {
        ctx.metrics.connections_current.inc();
        Slot(ctx)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.metrics.connections_current.dec();
    }
}

/// Turns a client away the way Redis does (on the TLS listener, after the
/// handshake).
async fn reject(socket: TcpStream, tls: Option<TlsAcceptor>) {
    let limit = std::time::Duration::from_secs(1);
    let _ = tokio::time::timeout(limit, async {
        let mut client = match tls {
            None => Stream::Plain(socket),
            Some(tls) => match tls.accept(socket).await {
                Ok(stream) => Stream::from(stream),
                Err(_) => return,
            },
        };
        let reply = encode::error("ERR max number of clients reached");
        if client.write_all(&reply).await.is_ok() {
            let _ = client.shutdown().await;
        }
    })
    .await;
}

/// SIGHUPs, as a stream (a reload each). Nothing arrives where there are
/// no signals or the handler cannot be installed (logged).
fn hangups() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    // One pending reload is enough: it reads the newest file.
                    if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                        return;
                    }
                }
            });
        }
        Err(error) => warn!(%error, "cannot install a SIGHUP handler: reload with CACHE.RELOAD"),
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}

/// Resolves on SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => info!(signal = "SIGINT", "signal received"),
            _ = term.recv() => info!(signal = "SIGTERM", "signal received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
