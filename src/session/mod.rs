//! One client connection, paired 1:1 with its own upstream connection.
//!
//! Two directions run in one task and share the [`Pairing`] queue:
//!
//! - **requests** ([`forward_requests`]): read what the client sent, frame
//!   and classify every complete request, leave an [`Expect`] for each, and
//!   forward the whole batch in one write, byte for byte.
//! - **replies** ([`forward_replies`]): read what Redis sent, find frame
//!   boundaries, route each frame (reply to the head request, or
//!   unsolicited), and write the bytes to the client as they came —
//!   streaming a frame still in progress when nothing about it needs a look.
//!
//! Only the replies direction writes to the client, so replies the proxy
//! makes itself ([`Expect::Local`]) take their place in the same order.

pub mod pairing;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::resp::command::{Command, ReplyMode};
use crate::resp::encode;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{INLINE_MAX, ProtocolError, RequestFramer};
pub use pairing::{Expect, Pairing, Route};

/// Bytes read per system call at most, and the least free space offered to a
/// read; the buffers grow past this only for a frame that needs it.
const READ_CHUNK: usize = 16 * 1024;
const MIN_READ: usize = 4 * 1024;

/// What every session shares: the configuration and the counters.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub metrics: Metrics,
}

/// Serves one client until either side closes, the client idles past
/// `timeout`, or a shutdown drains it.
pub async fn run(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: Arc<Context>,
    shutdown: watch::Receiver<bool>,
) {
    let mut upstream = match upstream::connect(&ctx.config.upstream, ctx.config.connect_timeout).await {
        Ok(stream) => stream,
        Err(error) => {
            ctx.metrics.upstream_connect_errors.inc();
            warn!(%error, "cannot serve client: upstream connection failed");
            let reply = encode::error(&format!("ERR cachefence: {error}"));
            let _ = client.write_all(&reply).await;
            let _ = client.shutdown().await;
            return;
        }
    };
    debug!(%peer, "session started");
    let shared = Shared::default();
    let (mut client_rd, mut client_wr) = client.split();
    let (mut upstream_rd, mut upstream_wr) = upstream.split();
    let mut shutdown = shutdown;
    let requests = forward_requests(&mut client_rd, &mut upstream_wr, &shared, &ctx, &mut shutdown);
    let replies = forward_replies(&mut upstream_rd, &mut client_wr, &shared, &ctx);
    tokio::pin!(requests, replies);
    let end = tokio::select! {
        end = &mut replies => end,
        end = &mut requests => match end {
            RequestsEnd::Idle => SessionEnd::Idle,
            RequestsEnd::ClientGone => SessionEnd::ClientGone,
            // The replies direction finishes what is owed.
            RequestsEnd::ClientClosed | RequestsEnd::Shutdown | RequestsEnd::ProtocolError
            | RequestsEnd::UpstreamGone => replies.await,
        },
    };
    debug!(?end, "session ended");
}

#[derive(Debug)]
enum RequestsEnd {
    /// The client closed its side; the upstream was told the same.
    ClientClosed,
    /// Reading from the client failed.
    ClientGone,
    /// Idle past `timeout`.
    Idle,
    /// The server is shutting down.
    Shutdown,
    /// Malformed request; the error reply is queued.
    ProtocolError,
    /// Writing to the upstream failed.
    UpstreamGone,
}

#[derive(Debug)]
enum SessionEnd {
    Idle,
    ClientGone,
    /// Redis closed the connection (QUIT, CLIENT KILL, crash …).
    UpstreamClosed,
    /// Writing to the client failed.
    ClientWriteFailed,
    /// A reply of the proxy's closed the connection (protocol error).
    Closed,
    /// Shutdown: every pending reply was delivered.
    Drained,
    /// Redis sent bytes that are not RESP.
    MalformedReply,
}

/// State both directions share; locked only between awaits.
#[derive(Debug)]
struct Shared {
    pairing: Mutex<Pairing>,
    /// Wakes the replies direction: a local reply or a drain was queued.
    wake_replies: Notify,
    /// Wakes the requests direction: the pending queue has room again.
    room: Notify,
    /// Last time the client sent or received anything (Redis' lastinteraction).
    last_activity: Mutex<Instant>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            pairing: Mutex::default(),
            wake_replies: Notify::new(),
            room: Notify::new(),
            last_activity: Mutex::new(Instant::now()),
        }
    }
}

impl Shared {
    fn pairing(&self) -> MutexGuard<'_, Pairing> {
        self.pairing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last_activity(&self) -> Instant {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply of the proxy's own in request order.
    fn reply_locally(&self, reply: Bytes, close: bool) {
        self.pairing().push(Expect::Local { reply, close });
        self.wake_replies.notify_one();
    }
}

/// Client → upstream.
async fn forward_requests<R, W>(
    client: &mut R,
    upstream: &mut W,
    shared: &Shared,
    ctx: &Context,
    shutdown: &mut watch::Receiver<bool>,
) -> RequestsEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let config = &ctx.config;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut framer = RequestFramer::new(config.max_frame_size);
    let mut reply_mode = ReplyMode::On;
    let drain = || {
        shared.pairing().draining = true;
        shared.wake_replies.notify_one();
        RequestsEnd::Shutdown
    };
    if *shutdown.borrow() {
        return drain();
    }
    loop {
        while shared.pairing().pending() >= config.max_pending {
            tokio::select! {
                _ = shared.room.notified() => {}
                _ = shutdown.changed() => return drain(),
            }
        }
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_CHUNK);
        }
        let read = loop {
            let idle_deadline = config.timeout.map(|t| shared.last_activity() + t);
            tokio::select! {
                read = client.read_buf(&mut buf) => break read,
                _ = shutdown.changed() => return drain(),
                _ = sleep_until(idle_deadline) => {
                    let timeout = config.timeout.expect("a deadline implies a timeout");
                    if shared.pairing().is_idle() && shared.last_activity().elapsed() >= timeout {
                        debug!(?timeout, "closing idle client");
                        return RequestsEnd::Idle;
                    }
                }
            }
        };
        match read {
            Ok(0) => {
                // Half-close upstream too: Redis then sees what it would
                // have seen without the proxy.
                let _ = upstream.shutdown().await;
                return RequestsEnd::ClientClosed;
            }
            Ok(_) => shared.touch(),
            Err(error) => {
                debug!(%error, "client read failed");
                return RequestsEnd::ClientGone;
            }
        }
        let (complete, failure) = frame_requests(&buf, &mut framer, &mut reply_mode, shared, ctx);
        if complete > 0 {
            if let Err(error) = upstream.write_all(&buf[..complete]).await {
                debug!(%error, "upstream write failed");
                return RequestsEnd::UpstreamGone;
            }
            buf.advance(complete);
        }
        if let Some(error) = failure {
            ctx.metrics.protocol_errors.inc();
            debug!(%error, "closing client after protocol error");
            shared.reply_locally(encode::error(&format!("ERR {error}")), true);
            return RequestsEnd::ProtocolError;
        }
    }
}

/// Frames every complete request at the front of `buf` and queues what each
/// expects back. Returns how many bytes they span and the protocol error
/// that stopped framing, if any.
fn frame_requests(
    buf: &[u8],
    framer: &mut RequestFramer,
    reply_mode: &mut ReplyMode,
    shared: &Shared,
    ctx: &Context,
) -> (usize, Option<ProtocolError>) {
    let mut pairing = shared.pairing();
    let mut complete = 0;
    let mut commands = 0;
    let failure = loop {
        match framer.next(&buf[complete..]) {
            Ok(Some(frame)) => {
                let request = &buf[complete..complete + frame.len];
                complete += frame.len;
                if frame.argc == 0 {
                    continue; // Redis ignores it and sends nothing.
                }
                commands += 1;
                let command = Command::classify(&frame, request);
                if let Some(expect) = Expect::for_command(command, reply_mode) {
                    pairing.push(expect);
                }
            }
            Ok(None) if buf.len() - complete > ctx.config.max_frame_size + INLINE_MAX => {
                break Some(ProtocolError(format!(
                    "request larger than max_frame_size ({} bytes)",
                    ctx.config.max_frame_size
                )));
            }
            Ok(None) => break None,
            Err(error) => break Some(error),
        }
    };
    ctx.metrics.commands.add(commands);
    (complete, failure)
}

/// Upstream → client.
async fn forward_replies<R, W>(upstream: &mut R, client: &mut W, shared: &Shared, ctx: &Context) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scanner = ReplyScanner::default();
    // Replies of the proxy's own to insert after a given offset of `buf`.
    let mut inserts: Vec<(usize, Bytes)> = Vec::new();
    loop {
        // Local replies owed before any further upstream frame.
        let (close, drained) = {
            let mut pairing = shared.pairing();
            let close = take_locals(&mut pairing, 0, &mut inserts);
            let drained = pairing.draining && pairing.pending() == 0 && !scanner.in_frame();
            (close, drained)
        };
        if !inserts.is_empty() {
            if write_with_inserts(client, &[], &mut inserts).await.is_err() {
                return SessionEnd::ClientWriteFailed;
            }
            shared.touch();
        }
        if close {
            let _ = client.shutdown().await;
            return SessionEnd::Closed;
        }
        if drained {
            let _ = client.shutdown().await;
            return SessionEnd::Drained;
        }
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            read = upstream.read_buf(&mut buf) => read,
            _ = shared.wake_replies.notified() => continue,
        };
        match read {
            Ok(0) => {
                return upstream_lost(client, shared, ctx, scanner.in_frame(), "closed the connection").await;
            }
            Err(error) => {
                return upstream_lost(client, shared, ctx, scanner.in_frame(), &error.to_string()).await;
            }
            Ok(_) => {}
        }
        let (upto, close) = {
            let mut pairing = shared.pairing();
            let before = pairing.pending();
            let mut close = false;
            loop {
                match scanner.advance(&buf) {
                    Ok(Some(frame)) => {
                        pairing.route(frame.kind, &buf[frame.start..frame.end]);
                        if take_locals(&mut pairing, frame.end, &mut inserts) {
                            close = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        warn!(%error, "closing connection: upstream sent bytes that are not RESP");
                        return SessionEnd::MalformedReply;
                    }
                }
            }
            if pairing.pending() < before {
                shared.room.notify_one();
            }
            let upto = match (close, scanner.frame_kind()) {
                (true, _) => inserts.last().map_or(0, |(at, _)| *at),
                (false, Some(kind)) if !pairing.may_stream(kind) => scanner.frame_start(),
                (false, _) => scanner.scanned(),
            };
            (upto, close)
        };
        if write_with_inserts(client, &buf[..upto], &mut inserts)
            .await
            .is_err()
        {
            return SessionEnd::ClientWriteFailed;
        }
        shared.touch();
        if close {
            let _ = client.shutdown().await;
            return SessionEnd::Closed;
        }
        buf.advance(upto);
        scanner.consume(upto);
    }
}

/// Moves the local replies at the head of the queue into `inserts`, to go
/// after offset `at`. Returns true if one of them closes the connection.
fn take_locals(pairing: &mut Pairing, at: usize, inserts: &mut Vec<(usize, Bytes)>) -> bool {
    while let Some((reply, close)) = pairing.take_local() {
        inserts.push((at, reply));
        if close {
            return true;
        }
    }
    false
}

/// Writes `bytes` with the local replies spliced in at their offsets.
async fn write_with_inserts<W: AsyncWrite + Unpin>(
    client: &mut W,
    bytes: &[u8],
    inserts: &mut Vec<(usize, Bytes)>,
) -> std::io::Result<()> {
    let mut written = 0;
    for (at, reply) in inserts.drain(..) {
        client.write_all(&bytes[written..at]).await?;
        client.write_all(&reply).await?;
        written = at;
    }
    if written < bytes.len() {
        client.write_all(&bytes[written..]).await?;
    }
    Ok(())
}

/// The upstream connection ended: every request still owed a reply gets an
/// error (unless part of a reply was already sent, which an error would
/// corrupt), and the client is closed.
async fn upstream_lost<W: AsyncWrite + Unpin>(
    client: &mut W,
    shared: &Shared,
    ctx: &Context,
    mid_frame: bool,
    reason: &str,
) -> SessionEnd {
    let owed = shared.pairing().abandon();
    if owed > 0 {
        ctx.metrics.upstream_lost.inc();
        warn!(owed, reason, "upstream connection lost with replies pending");
        if !mid_frame {
            let addr = ctx.config.upstream.addr();
            let error = encode::error(&format!("ERR cachefence: upstream {addr} {reason}"));
            for _ in 0..owed {
                if client.write_all(&error).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = client.shutdown().await;
    SessionEnd::UpstreamClosed
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
