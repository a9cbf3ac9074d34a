//! One client connection, paired 1:1 with its own upstream connection.
//!
//! Two directions run in one task and share the [`Pairing`] queue:
//!
//! - **requests** ([`forward_requests`]): read what the client sent, frame
//!   and classify every complete request, leave an [`Expect`] for each, and
//!   forward the whole batch in one write — byte for byte, except the
//!   commands the fence layer rewrites ([`fenced`]). It is the only writer
//!   to the upstream, so the proxy's own script calls (a miss script after a
//!   nil `GET`) reach it as [`Injection`]s and take their place in order.
//! - **replies** ([`forward_replies`]): read what Redis sent, find frame
//!   boundaries, route each frame (reply to the head request, unsolicited,
//!   or a fence reply to translate), and write the bytes to the client as
//!   they came — streaming a frame still in progress when nothing about it
//!   needs a look. A reply waiting for the proxy's own script holds every
//!   later reply behind it ([`Outbox`]), so the client sees Redis' order.

pub mod fenced;
pub mod pairing;
pub mod upstream;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, warn};

use crate::config::Config;
use crate::fence::Fences;
use crate::live::Live;
use crate::net::{Split, Stream};
use crate::resp::command::{Command, Fenced, ReplyMode};
use crate::resp::encode;
use crate::resp::reply::ReplyScanner;
use crate::resp::request::{INLINE_MAX, ProtocolError, RequestFramer};
use crate::resp::value::{Reply, Value};
use crate::telemetry::{Class, ClassCounts, Metrics};
use fenced::{FenceExpect, FenceSession, Plan, ScriptReply};
pub use pairing::{Expect, LocalReply, Pairing, Route};

/// Bytes read per system call at most, and the least free space offered to a
/// read; the buffers grow past this only for a frame that needs it.
const READ_CHUNK: usize = 16 * 1024;
const MIN_READ: usize = 4 * 1024;
/// The proxy's own calls waiting to be written upstream, per connection.
const MAX_INJECTIONS: usize = 1024;
/// How often a session without `reply_timeout` looks whether a reload set one.
const REPLY_TIMEOUT_OFF_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// What every session shares: the configuration, the counters and the
/// fence layer's soft state.
#[derive(Debug)]
pub struct Context {
    /// The configuration the proxy started with; what a reload can change
    /// is read from `live`.
    pub config: Config,
    pub live: crate::live::Live,
    /// When the proxy started.
    pub started: std::time::Instant,
    /// Where the Prometheus endpoint listens, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Metrics,
    /// `None` when fences are off: the proxy is a pure passthrough.
    pub fences: Option<Fences>,
    /// The change-log consumer's counters, when `[postgres]` is configured.
    pub changelog: Option<Arc<crate::changelog::ChangeLogStats>>,
}

/// A script call the proxy sends upstream on its own behalf (a miss, or a
/// call sent again after `NOSCRIPT`), with what its reply means.
#[derive(Debug)]
pub struct Injection {
    pub call: fenced::ScriptCall,
    /// Send the script's source (Redis lost it).
    pub reload: bool,
    pub expect: Expect,
}

/// Serves one client until either side closes, the client idles past
/// `timeout`, or a shutdown drains it.
pub async fn run(mut client: Stream, peer: SocketAddr, ctx: Arc<Context>, shutdown: watch::Receiver<bool>) {
    let mut shutdown = shutdown;
    let (upstream, unread) = match upstream::connect(&ctx.config.upstream, ctx.config.connect_timeout).await {
        Ok(stream) => (stream, BytesMut::new()),
        Err(error @ upstream::UpstreamError::Rejected { .. }) => {
            // The proxy's own credentials are wrong: nothing will change that.
            ctx.metrics.upstream_connect_errors.inc();
            warn!(%error, "cannot serve client: upstream connection failed");
            let reply = encode::error(&format!("ERR cachefence: {error}"));
            let _ = client.write_all(&reply).await;
            let _ = client.shutdown().await;
            return;
        }
        Err(error) => match unreachable(&mut client, &ctx, error, &mut shutdown).await {
            Some(connected) => connected,
            None => return,
        },
    };
    debug!(%peer, "session started");
    // Chosen once per connection: without TLS on either side, both sockets
    // are split lock-free and the session is the same code as before TLS.
    match (client, upstream) {
        (Stream::Plain(mut client), Stream::Plain(mut upstream)) => {
            serve(&mut client, &mut upstream, unread, &ctx, &mut shutdown).await
        }
        (mut client, mut upstream) => serve(&mut client, &mut upstream, unread, &ctx, &mut shutdown).await,
    }
}

/// Runs both directions until the session ends.
async fn serve<S: Split>(
    client: &mut S,
    upstream: &mut S,
    unread: BytesMut,
    ctx: &Context,
    shutdown: &mut watch::Receiver<bool>,
) {
    let shared = Shared::default();
    shared.pairing().db = ctx.config.upstream.db;
    let fence = ctx.fences.as_ref().map(FenceSession::new);
    let herd_wake = Arc::new(Notify::new());
    let (inject_tx, inject_rx) = mpsc::channel(MAX_INJECTIONS);
    let (mut client_rd, mut client_wr) = client.halves();
    let (mut upstream_rd, mut upstream_wr) = upstream.halves();
    let end = {
        let requests = forward_requests(
            (&mut client_rd, unread),
            &mut upstream_wr,
            &shared,
            ctx,
            fence.as_ref(),
            inject_rx,
            shutdown,
        );
        let herd = Herd {
            waits: Vec::new(),
            mgets: std::collections::HashMap::new(),
            wake: herd_wake.clone(),
            injections: inject_tx,
        };
        let replies = forward_replies(
            &mut upstream_rd,
            &mut client_wr,
            &shared,
            ctx,
            fence.as_ref(),
            herd,
        );
        tokio::pin!(requests, replies);
        tokio::select! {
            end = &mut replies => end,
            end = &mut requests => match end {
                RequestsEnd::Idle => SessionEnd::Idle,
                RequestsEnd::ClientGone => SessionEnd::ClientGone,
                // The replies direction finishes what is owed.
                RequestsEnd::UpstreamGone | RequestsEnd::RepliesDone => replies.await,
            },
        }
    };
    if matches!(end, SessionEnd::Closed) {
        linger(&mut client_rd).await;
    }
    if let Some(fence) = &fence {
        fence.forget_all();
    }
    debug!(?end, "session ended");
}

/// The upstream cannot be reached: each request the client sends is
/// answered with the error — a delete of fenced keys is also queued and
/// retried until Redis takes it (C3) — and the upstream is tried again
/// before each new batch. `Some` once it answers: the connection and what
/// the client sent that is still unanswered.
async fn unreachable(
    client: &mut Stream,
    ctx: &Context,
    mut error: upstream::UpstreamError,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(Stream, BytesMut)> {
    let config = &ctx.config;
    let mut framer = RequestFramer::new(ctx.live.max_frame_size());
    let mut buf = BytesMut::new();
    loop {
        ctx.metrics.upstream_connect_errors.inc();
        debug!(%error, "upstream unreachable: answering with errors");
        let (mut replies, mut done, mut close) = (BytesMut::new(), 0, false);
        while !close {
            let frame = match framer.next(&buf[done..]) {
                Ok(Some(frame)) => frame,
                Ok(None) if buf.len() - done <= ctx.live.max_frame_size() + INLINE_MAX => break,
                Ok(None) => {
                    let text = format!(
                        "ERR Protocol error: request larger than max_frame_size ({} bytes)",
                        ctx.live.max_frame_size()
                    );
                    replies.extend_from_slice(&encode::error(&text));
                    break;
                }
                Err(protocol) => {
                    replies.extend_from_slice(&encode::error(&format!("ERR {protocol}")));
                    close = true;
                    break;
                }
            };
            let request = &buf[done..done + frame.len];
            done += frame.len;
            if frame.argc == 0 {
                continue;
            }
            let reply = match Command::classify(&frame, request) {
                Command::Closing => {
                    close = true;
                    encode::error(&format!("ERR cachefence: {error}"))
                }
                // A key whose delete waits reads as a miss (RESP2: HELLO failed too).
                Command::Fenced(Fenced::Get | Fenced::GetEx)
                    if frame.arg(request, 1).is_some_and(|key| {
                        ctx.fences.as_ref().is_some_and(|f| {
                            f.is_fenced(key) && f.undelivered.is_pending(config.upstream.db, key)
                        })
                    }) =>
                {
                    Bytes::from_static(b"$-1\r\n")
                }
                Command::Fenced(Fenced::Delete) if ctx.fences.is_some() => {
                    let fences = ctx.fences.as_ref().expect("checked");
                    let keys: Vec<Bytes> = fenced::all_args(&frame, request)
                        .split_off(1)
                        .into_iter()
                        .filter(|k| fences.is_fenced(k))
                        .collect();
                    match !keys.is_empty() && fences.undelivered.push(config.upstream.db, &keys) {
                        true => {
                            encode::error(&format!("ERR cachefence: {error}; the delete will be retried"))
                        }
                        false => encode::error(&format!("ERR cachefence: {error}")),
                    }
                }
                _ => encode::error(&format!("ERR cachefence: {error}")),
            };
            replies.extend_from_slice(&reply);
        }
        buf.advance(done);
        if send(client, &replies).await.is_err() || close {
            let _ = client.shutdown().await;
            return None;
        }
        let idle = sleep_until(ctx.live.timeout().map(|t| Instant::now() + t));
        let read = tokio::select! {
            read = client.read_buf(&mut buf) => read,
            _ = shutdown.changed() => return None,
            _ = idle => return None,
        };
        if !matches!(read, Ok(n) if n > 0) {
            return None;
        }
        match upstream::connect(&config.upstream, config.connect_timeout).await {
            Ok(stream) => {
                ctx.metrics.upstream_reconnects.inc();
                debug!("upstream reachable again");
                return Some((stream, buf));
            }
            Err(again) => error = again,
        }
    }
}

/// After a closing error reply: read and drop what the client still sends,
/// briefly, so that closing with unread input (which makes the kernel send
/// RST) cannot destroy the reply before the client reads it.
async fn linger<R: AsyncRead + Unpin>(client: &mut R) {
    let mut scratch = [0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        while matches!(client.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[derive(Debug)]
enum RequestsEnd {
    /// Reading from the client failed.
    ClientGone,
    /// Idle past `timeout`.
    Idle,
    /// Writing to the upstream failed.
    UpstreamGone,
    /// The replies direction ended (it owns the injection sender). After the
    /// client's end, a shutdown or a protocol error the requests direction
    /// stops reading but keeps sending injections until then.
    RepliesDone,
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

    /// Records activity, which only the idle `timeout` needs.
    fn touch(&self, live: &Live) {
        if live.timeout().is_some() {
            *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
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
    (client, unread): (&mut R, BytesMut),
    upstream: &mut W,
    shared: &Shared,
    ctx: &Context,
    fence: Option<&FenceSession<'_>>,
    mut injections: mpsc::Receiver<Injection>,
    shutdown: &mut watch::Receiver<bool>,
) -> RequestsEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = unread;
    // Requests read before the upstream answered are framed first.
    let mut unframed = !buf.is_empty();
    let mut state = RequestState {
        framer: RequestFramer::new(ctx.live.max_frame_size()),
        reply_mode: ReplyMode::On,
        in_multi: false,
        multi_pubsub: false,
        discarding: false,
    };
    // After a shutdown or the client's end, keep writing the proxy's own
    // calls: replies already owed may depend on them.
    let mut reading = !*shutdown.borrow();
    if !reading {
        drain(shared);
    }
    loop {
        let room = shared.pairing().has_room(ctx.live.max_pending());
        state.framer.set_max_bulk_len(ctx.live.max_frame_size());
        let timeout = ctx.live.timeout();
        if buf.capacity() - buf.len() < MIN_READ {
            buf.reserve(READ_CHUNK);
        }
        // Past due while a reply is owed (the client is not idle): look
        // again one `timeout` later instead of spinning on a past deadline.
        let idle_deadline = timeout.filter(|_| reading).map(|t| {
            let at = shared.last_activity() + t;
            match at <= Instant::now() && !shared.pairing().is_idle() {
                true => Instant::now() + t,
                false => at,
            }
        });
        let read = if std::mem::take(&mut unframed) {
            Ok(buf.len())
        } else {
            tokio::select! {
            read = client.read_buf(&mut buf), if reading && room => read,
            _ = shared.room.notified(), if reading && !room => continue,
            injection = injections.recv(), if fence.is_some() => {
                let Some(injection) = injection else { return RequestsEnd::RepliesDone };
                let fence = fence.expect("injections imply fences");
                let bytes = fence.encode(&injection.call, injection.reload);
                shared.pairing().push(injection.expect);
                if let Err(error) = send(upstream, &bytes).await {
                    debug!(%error, "upstream write failed");
                    return RequestsEnd::UpstreamGone;
                }
                continue;
            }
            _ = shutdown.changed(), if reading => {
                reading = false;
                drain(shared);
                continue;
            }
            _ = sleep_until(idle_deadline) => {
                let timeout = timeout.expect("a deadline implies a timeout");
                if shared.pairing().is_idle() && shared.last_activity().elapsed() >= timeout {
                    debug!(?timeout, "closing idle client");
                    return RequestsEnd::Idle;
                }
                continue;
            }
            }
        };
        match read {
            Ok(0) => {
                // Half-close upstream too: Redis then sees what it would
                // have seen without the proxy.
                let _ = upstream.shutdown().await;
                reading = false;
                continue;
            }
            Ok(_) => shared.touch(&ctx.live),
            Err(error) => {
                debug!(%error, "client read failed");
                return RequestsEnd::ClientGone;
            }
        }
        if state.discarding {
            buf.clear();
            continue;
        }
        let batch = frame_requests(&buf, &mut state, shared, ctx, fence);
        let written = match &batch.rewritten {
            Some(bytes) => send(upstream, bytes).await,
            None if batch.complete > 0 => send(upstream, &buf[..batch.complete]).await,
            None => Ok(()),
        };
        if let Err(error) = written {
            debug!(%error, "upstream write failed");
            return RequestsEnd::UpstreamGone;
        }
        buf.advance(batch.complete);
        if batch.wake {
            shared.wake_replies.notify_one();
        }
        if let Some(error) = batch.failure {
            ctx.metrics.protocol_errors.inc();
            if state.reply_mode == ReplyMode::On {
                debug!(%error, "closing client after protocol error");
                shared.reply_locally(encode::error(&format!("ERR {error}")), true);
                reading = false;
            } else {
                // As Redis: the error reply is suppressed, so the close that
                // would follow it never comes; further input is ignored.
                debug!(%error, "protocol error with replies off: ignoring further input");
                state.discarding = true;
                buf.clear();
            }
        }
    }
}

fn drain(shared: &Shared) {
    shared.pairing().draining = true;
    shared.wake_replies.notify_one();
}

/// What the requests direction keeps between reads.
struct RequestState {
    framer: RequestFramer,
    reply_mode: ReplyMode,
    /// Inside `MULTI`: fenced commands are queued as they are (a limit).
    in_multi: bool,
    /// The transaction queued (un)subscriptions: its `EXEC` reply moves
    /// the subscription counts.
    multi_pubsub: bool,
    /// A protocol error under `CLIENT REPLY OFF`: input is read and dropped.
    discarding: bool,
}

/// One read's worth of complete requests.
struct Batch {
    /// Bytes of `buf` they span.
    complete: usize,
    /// What to send instead of `buf[..complete]`, when a command was
    /// rewritten or answered locally.
    rewritten: Option<BytesMut>,
    /// The replies direction must look: some requests are answered by the
    /// proxy.
    wake: bool,
    failure: Option<ProtocolError>,
}

/// Frames every complete request at the front of `buf` and queues what each
/// expects back.
fn frame_requests(
    buf: &[u8],
    state: &mut RequestState,
    shared: &Shared,
    ctx: &Context,
    fence: Option<&FenceSession<'_>>,
) -> Batch {
    let mut pairing = shared.pairing();
    let mut batch = Batch {
        complete: 0,
        rewritten: None,
        wake: false,
        failure: None,
    };
    // Bytes of `buf` already copied into `rewritten`.
    let mut copied = 0;
    let mut classes: ClassCounts = [0; 3];
    // The `[[cache]]` sections, loaded once per batch (at its first fenced command).
    let mut scope = None;
    loop {
        let frame = match state.framer.next(&buf[batch.complete..]) {
            Ok(Some(frame)) => frame,
            Ok(None) if buf.len() - batch.complete > ctx.live.max_frame_size() + INLINE_MAX => {
                batch.failure = Some(ProtocolError(format!(
                    "request larger than max_frame_size ({} bytes)",
                    ctx.live.max_frame_size()
                )));
                break;
            }
            Ok(None) => break,
            Err(error) => {
                batch.failure = Some(error);
                break;
            }
        };
        let start = batch.complete;
        let request = &buf[start..start + frame.len];
        batch.complete += frame.len;
        if frame.argc == 0 {
            continue; // Redis ignores it and sends nothing.
        }
        let command = Command::classify(&frame, request);
        let (mut exec_with_pubsub, mut exec_fenced) = (false, false);
        match command {
            Command::Multi => (state.in_multi, state.multi_pubsub) = (true, false),
            Command::Subscribe(..) | Command::Unsubscribe(..) if state.in_multi => state.multi_pubsub = true,
            Command::EndMulti => {
                exec_with_pubsub = state.in_multi && state.multi_pubsub;
                exec_fenced = state.in_multi && fence.is_some();
                state.in_multi = false;
            }
            Command::Reset => state.in_multi = false,
            _ => {}
        }
        // Where Redis would refuse the command anyway (unauthenticated,
        // RESP2 subscribed) or its reply is not its own (MULTI, CLIENT REPLY),
        // it goes as it is.
        let interceptable = state.reply_mode == ReplyMode::On && pairing.may_intercept();
        let queued = state.in_multi && fence.is_some() && interceptable && command != Command::Multi;
        let plan = match (fence, command) {
            // Reads inside MULTI answer later, in EXEC: no miss handling there.
            (Some(_), Command::Fenced(Fenced::Get | Fenced::GetEx | Fenced::MGet)) if state.in_multi => None,
            (Some(fence), Command::Fenced(fenced)) if interceptable => {
                let scope = scope.get_or_insert_with(|| fence.fences.scope());
                fence.plan(scope, fenced, &frame, request, state.in_multi, pairing.db)
            }
            (Some(fence), Command::Admin) if interceptable && !state.in_multi => {
                Some(fence.admin(&frame, request, pairing.db, ctx))
            }
            _ => None,
        };
        let class = match (&plan, command) {
            (None, _) => Class::Passthrough,
            (Some(_), Command::Admin) => Class::Admin,
            (Some(_), _) => Class::Intercepted,
        };
        classes[class as usize] += 1;
        let (replacement, expect) = match plan {
            // In MULTI: rewritten with the script's source (a NOSCRIPT would
            // only show in EXEC, too late to resend), translated in EXEC.
            Some(Plan::Rewrite(call, FenceExpect::Script { reply, .. })) if queued => {
                (Some(call.encode(true)), Some(Expect::Queued(Some(reply))))
            }
            Some(Plan::Local(_)) | Some(Plan::Forward(_)) | None if queued => (
                None,
                Expect::for_command(command, &mut state.reply_mode).map(|_| Expect::Queued(None)),
            ),
            None => match Expect::for_command(command, &mut state.reply_mode) {
                Some(_) if exec_with_pubsub || exec_fenced => (None, Some(Expect::Exec)),
                expect => (None, expect),
            },
            Some(Plan::Forward(expect)) => (None, Some(Expect::fence(expect))),
            Some(Plan::Rewrite(call, expect)) => {
                let fence = fence.expect("plans imply fences");
                (Some(fence.encode(&call, false)), Some(Expect::fence(expect)))
            }
            Some(Plan::Local(reply)) => {
                batch.wake = true;
                (Some(Bytes::new()), Some(Expect::fence(FenceExpect::Local(reply))))
            }
        };
        if let Some(expect) = expect {
            pairing.push(expect);
        }
        if let Some(bytes) = replacement {
            let out = batch
                .rewritten
                .get_or_insert_with(|| BytesMut::with_capacity(buf.len() + bytes.len()));
            out.extend_from_slice(&buf[copied..start]);
            out.extend_from_slice(&bytes);
            copied = batch.complete;
        }
    }
    if let Some(out) = &mut batch.rewritten {
        out.extend_from_slice(&buf[copied..batch.complete]);
    }
    if classes != [0; 3] {
        for class in Class::ALL {
            ctx.metrics.commands[class as usize].add(u64::from(classes[class as usize]));
        }
        // Latency is only timed where someone can read it (a clock read
        // per batch on each side).
        if ctx.metrics_addr.is_some() {
            pairing.mark(Instant::now(), classes);
        }
    }
    batch
}

/// What goes to the client, in order: ranges of the read buffer while
/// nothing is held, and replies held behind one that waits for the proxy's
/// own script call.
#[derive(Debug, Default)]
struct Outbox {
    pieces: Vec<Piece>,
    held: VecDeque<Slot>,
    /// Entries ever released from the front of `held`: a slot's number is
    /// its absolute position, so finding it costs nothing.
    released: u64,
    /// A closing reply is queued: close once everything before it is out.
    closing: bool,
    /// Where several pieces are gathered into one write.
    gathered: BytesMut,
}

#[derive(Debug)]
enum Piece {
    Range(Range<usize>),
    Bytes(Bytes),
}

#[derive(Debug)]
enum Slot {
    Ready(Bytes),
    Waiting,
}

impl Outbox {
    /// A frame of the read buffer goes to the client as is.
    fn forward(&mut self, buf: &[u8], range: Range<usize>) {
        if !self.held.is_empty() {
            self.held
                .push_back(Slot::Ready(Bytes::copy_from_slice(&buf[range])));
        } else if let Some(Piece::Range(last)) = self.pieces.last_mut()
            && last.end == range.start
        {
            last.end = range.end;
        } else {
            self.pieces.push(Piece::Range(range));
        }
    }

    /// Bytes of the proxy's own take the place of a frame.
    fn send(&mut self, bytes: Bytes) {
        if self.held.is_empty() {
            self.pieces.push(Piece::Bytes(bytes));
        } else {
            self.held.push_back(Slot::Ready(bytes));
        }
    }

    /// A reply that must wait: everything after it is held too.
    fn hold(&mut self) -> u64 {
        let slot = self.released + self.held.len() as u64;
        self.held.push_back(Slot::Waiting);
        slot
    }

    /// The held reply is known; releases what is no longer blocked.
    fn resolve(&mut self, slot: u64, bytes: Bytes) {
        let index = slot
            .checked_sub(self.released)
            .and_then(|i| usize::try_from(i).ok());
        if let Some(entry @ Slot::Waiting) = index.and_then(|i| self.held.get_mut(i)) {
            *entry = Slot::Ready(bytes);
        }
        while let Some(Slot::Ready(_)) = self.held.front() {
            if let Some(Slot::Ready(bytes)) = self.held.pop_front() {
                self.released += 1;
                self.pieces.push(Piece::Bytes(bytes));
            }
        }
    }

    fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Writes the pieces: one range as it is (the passthrough case, no
    /// copy), several gathered into one write.
    async fn write<W: AsyncWrite + Unpin>(&mut self, client: &mut W, buf: &[u8]) -> std::io::Result<()> {
        match self.pieces.as_slice() {
            [] => return Ok(()),
            [Piece::Range(range)] => send(client, &buf[range.clone()]).await?,
            [Piece::Bytes(bytes)] => send(client, bytes).await?,
            pieces => {
                self.gathered.clear();
                for piece in pieces {
                    match piece {
                        Piece::Range(range) => self.gathered.extend_from_slice(&buf[range.clone()]),
                        Piece::Bytes(bytes) => self.gathered.extend_from_slice(bytes),
                    }
                }
                send(client, &self.gathered).await?;
                // Do not keep a large one-off buffer for the connection's life.
                if self.gathered.capacity() > 4 * READ_CHUNK {
                    self.gathered = BytesMut::new();
                }
            }
        }
        self.pieces.clear();
        Ok(())
    }
}

/// Upstream → client.
async fn forward_replies<R, W>(
    upstream: &mut R,
    client: &mut W,
    shared: &Shared,
    ctx: &Context,
    fence: Option<&FenceSession<'_>>,
    mut herd: Herd,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scanner = ReplyScanner::default();
    let mut outbox = Outbox::default();
    // `reply_timeout` without a timer or a clock read per request: a check
    // every `reply_timeout` fires when a reply was owed at this check and the
    // last one and nothing came from Redis in between (so after 1 to 2 times
    // `reply_timeout` of silence). Without a `reply_timeout` the check only
    // looks every few seconds whether a reload set one.
    let period = || ctx.live.reply_timeout().unwrap_or(REPLY_TIMEOUT_OFF_RECHECK);
    let mut check = Box::pin(tokio::time::sleep(period()));
    let (mut reads, mut reads_at_check, mut due_at_check) = (0u64, 0u64, false);
    loop {
        // Local replies owed before any further upstream frame.
        let (close, drained) = {
            let mut pairing = shared.pairing();
            let close = take_locals(&mut pairing, &mut outbox);
            observe_latency(&mut pairing, &ctx.metrics);
            let drained =
                pairing.draining && pairing.pending() == 0 && !scanner.in_frame() && !outbox.is_holding();
            (close, drained)
        };
        if outbox.write(client, &[]).await.is_err() {
            return SessionEnd::ClientWriteFailed;
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
            // Bytes already there count before the reply check does.
            biased;
            read = upstream.read_buf(&mut buf) => read,
            _ = shared.wake_replies.notified() => continue,
            _ = herd.wake.notified(), if !herd.waits.is_empty() => {
                herd.poll(fence.expect("herd waits imply fences"), &mut outbox, true);
                continue;
            }
            _ = sleep_until(herd.next_poll()) => {
                herd.poll(fence.expect("herd waits imply fences"), &mut outbox, false);
                continue;
            }
            _ = &mut check => {
                let due = ctx.live.reply_timeout().is_some()
                    && (shared.pairing().awaits_upstream() || scanner.in_frame());
                if due && due_at_check && reads == reads_at_check {
                    ctx.metrics.upstream_timeouts.inc();
                    let reason = format!("did not reply within {:?}", period());
                    return upstream_lost(client, shared, ctx, fence, scanner.in_frame(), &reason).await;
                }
                (due_at_check, reads_at_check) = (due, reads);
                check.as_mut().reset(tokio::time::Instant::now() + period());
                continue;
            }
        };
        reads += 1;
        match read {
            Ok(0) => {
                return upstream_lost(
                    client,
                    shared,
                    ctx,
                    fence,
                    scanner.in_frame(),
                    "closed the connection",
                )
                .await;
            }
            Err(error) => {
                return upstream_lost(client, shared, ctx, fence, scanner.in_frame(), &error.to_string())
                    .await;
            }
            Ok(_) => {}
        }
        let (upto, close) = {
            let mut pairing = shared.pairing();
            let before = pairing.pending();
            let mut close = false;
            let mut upto = 0;
            loop {
                match scanner.advance(&buf) {
                    Ok(Some(frame)) => {
                        let range = frame.start..frame.end;
                        match pairing.route(frame.kind, &buf[range.clone()]) {
                            Route::Reply | Route::Unsolicited => outbox.forward(&buf, range),
                            // A hit costs nothing: forwarded like any reply.
                            Route::Fence(FenceExpect::Get { .. }) if !is_nil(&buf[range.clone()]) => {
                                outbox.forward(&buf, range)
                            }
                            Route::Fence(expect) => {
                                let (resp3, db) = (pairing.is_resp3(), pairing.db);
                                let fence = fence.expect("fence expectations imply fences");
                                on_fence_reply(
                                    expect,
                                    &buf[range],
                                    (resp3, db),
                                    fence,
                                    &mut outbox,
                                    &mut herd,
                                );
                            }
                        }
                        upto = frame.end;
                        if take_locals(&mut pairing, &mut outbox) {
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
                observe_latency(&mut pairing, &ctx.metrics);
            }
            if !close {
                match scanner.frame_kind() {
                    Some(kind) if outbox.is_holding() || !pairing.may_stream(kind) => {}
                    Some(_) => {
                        // Stream the frame in progress.
                        outbox.forward(&buf, scanner.frame_start()..scanner.scanned());
                        upto = scanner.scanned();
                    }
                    None => upto = scanner.scanned(),
                }
            }
            (upto, close)
        };
        if outbox.write(client, &buf).await.is_err() {
            return SessionEnd::ClientWriteFailed;
        }
        shared.touch(&ctx.live);
        if close {
            let _ = client.shutdown().await;
            return SessionEnd::Closed;
        }
        buf.advance(upto);
        scanner.consume(upto);
    }
}

/// A frame answering an intercepted request.
fn on_fence_reply(
    expect: FenceExpect,
    frame: &[u8],
    (resp3, db): (bool, u32),
    fence: &FenceSession<'_>,
    outbox: &mut Outbox,
    herd: &mut Herd,
) {
    let noscript = frame.starts_with(b"-NOSCRIPT");
    match expect {
        FenceExpect::Get { key, policy } if is_nil(frame) => {
            // A miss: hold the nil until the miss script has run.
            fence.fences.stats.misses.inc();
            let slot = outbox.hold();
            let forced = fence.fences.scope().policy_at(policy).hold.is_zero();
            let call = fence.miss_call(&key, policy, forced);
            let reply = ScriptReply::Miss {
                key,
                policy,
                nil: Bytes::copy_from_slice(frame),
                forced,
            };
            inject(&herd.injections, call, reply, slot, false, outbox, frame);
        }
        // Hits are forwarded by the caller as ranges; this copy keeps the match total.
        FenceExpect::Get { .. } => outbox.send(Bytes::copy_from_slice(frame)),
        FenceExpect::MGet { keys } => {
            let Some(Value::Array(items)) = Value::decode(frame, resp3) else {
                return outbox.send(Bytes::copy_from_slice(frame));
            };
            let misses: Vec<usize> = (0..items.len())
                .filter(|&i| items[i] == Value::Nil && keys.get(i).is_some_and(Option::is_some))
                .collect();
            // Keys whose delete is still being retried read as nil.
            let undelivered: Vec<usize> = match fence.fences.undelivered.is_empty() {
                true => Vec::new(),
                false => (0..items.len())
                    .filter(|&i| items[i] != Value::Nil)
                    .filter(|&i| matches!(&keys.get(i), Some(Some((key, _))) if fence.undelivered(db, key)))
                    .collect(),
            };
            if misses.is_empty() && undelivered.is_empty() {
                return outbox.send(Bytes::copy_from_slice(frame));
            }
            let elements: Vec<Reply> = items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Bulk(b) if !undelivered.contains(&i) => Reply::Bulk(b),
                    _ => Reply::Nil,
                })
                .collect();
            if misses.is_empty() {
                return outbox.send(Reply::Array(elements).encode(resp3));
            }
            // Hold the array until every nil of a fenced key had its miss script.
            fence.fences.stats.misses.add(misses.len() as u64);
            let slot = outbox.hold();
            herd.mgets.insert(
                slot,
                MGetMisses {
                    elements,
                    waiting: misses.len(),
                },
            );
            for index in misses {
                let (key, policy) = keys[index].clone().expect("a fenced key");
                let call = fence.miss_call(&key, policy, true);
                let reply = ScriptReply::MGetMiss { key, policy, index };
                inject(&herd.injections, call, reply, slot, false, outbox, frame);
            }
        }
        FenceExpect::Script { call, reply, slot } if noscript => {
            // The script cache was flushed: send it again with its source.
            fence.fences.stats.script_reloads.inc();
            let slot = slot.unwrap_or_else(|| outbox.hold());
            inject(&herd.injections, call, reply, slot, true, outbox, frame);
        }
        FenceExpect::Script {
            reply: reply @ ScriptReply::Miss { .. },
            slot: Some(slot),
            ..
        } => match fence.miss(&reply, frame, resp3) {
            fenced::MissOutcome::Reply(bytes) => {
                if herd.waited(slot) {
                    let served = !bytes.starts_with(b"$-1") && !bytes.starts_with(b"_");
                    let stats = &fence.fences.stats;
                    if served {
                        &stats.holds_served
                    } else {
                        &stats.holds_timed_out
                    }
                    .inc();
                }
                outbox.resolve(slot, bytes);
            }
            fenced::MissOutcome::Wait => herd.wait(fence, slot, reply),
        },
        FenceExpect::Script {
            reply: reply @ ScriptReply::MGetMiss { index, .. },
            slot: Some(slot),
            ..
        } => {
            let value = match fence.miss(&reply, frame, resp3) {
                fenced::MissOutcome::Reply(bytes) if !bytes.is_empty() => Value::decode(&bytes, false),
                _ => None,
            };
            if let Some(state) = herd.mgets.get_mut(&slot) {
                if let Some(Value::Bulk(v)) = value {
                    state.elements[index] = Reply::Bulk(v);
                }
                state.waiting -= 1;
                if state.waiting == 0 {
                    let elements = herd.mgets.remove(&slot).map(|s| s.elements).unwrap_or_default();
                    outbox.resolve(slot, Reply::Array(elements).encode(resp3));
                }
            }
        }
        FenceExpect::Script {
            reply, slot: None, ..
        } => outbox.send(fence.translate(&reply, frame, resp3, db)),
        FenceExpect::Script {
            reply,
            slot: Some(slot),
            ..
        } => outbox.resolve(slot, fence.translate(&reply, frame, resp3, db)),
        FenceExpect::Local(reply) => outbox.send(reply.encode(resp3)),
        FenceExpect::Exec(queued) => outbox.send(exec_reply(frame, &queued, fence, (resp3, db))),
    }
}

/// An `EXEC` array with the replies of rewritten commands translated and
/// every other element exactly as Redis sent it.
fn exec_reply(
    frame: &[u8],
    queued: &[Option<ScriptReply>],
    fence: &FenceSession<'_>,
    (resp3, db): (bool, u32),
) -> Bytes {
    let Some(header) = memchr::memchr(b'\n', frame).map(|i| i + 1) else {
        return Bytes::copy_from_slice(frame);
    };
    let mut out = BytesMut::with_capacity(frame.len() + 16);
    out.extend_from_slice(&frame[..header]);
    let elements = &frame[header..];
    let mut scanner = ReplyScanner::default();
    let mut start = 0;
    for translation in queued {
        let Ok(Some(element)) = scanner.advance(elements) else {
            return Bytes::copy_from_slice(frame);
        };
        let bytes = &elements[start..element.end];
        match translation {
            Some(reply) => out.extend_from_slice(&fence.translate(reply, bytes, resp3, db)),
            None => out.extend_from_slice(bytes),
        }
        start = element.end;
    }
    out.extend_from_slice(&elements[start..]);
    out.freeze()
}

/// Asks the requests direction to send one of the proxy's own calls; if
/// that is impossible, the held reply is released as it is.
fn inject(
    injections: &mpsc::Sender<Injection>,
    call: fenced::ScriptCall,
    reply: ScriptReply,
    slot: u64,
    reload: bool,
    outbox: &mut Outbox,
    fallback: &[u8],
) {
    let expect = Expect::fence(FenceExpect::Script {
        call: call.clone(),
        reply: reply.clone(),
        slot: Some(slot),
    });
    if injections.try_send(Injection { call, reload, expect }).is_err() {
        warn!("too many calls of the proxy's own in flight; releasing a reply unfenced");
        let release = match reply {
            ScriptReply::Miss { nil, .. } => nil,
            _ => Bytes::copy_from_slice(fallback),
        };
        outbox.resolve(slot, release);
    }
}

/// Misses in progress: those held while another client fills the key
/// (herd control, C7), and `MGET` replies waiting for their misses.
struct Herd {
    waits: Vec<HerdWait>,
    mgets: std::collections::HashMap<u64, MGetMisses>,
    /// Woken by [`Fences::wake`] when a fill, refusal or invalidation of a
    /// watched key passes through this process.
    wake: Arc<Notify>,
    injections: mpsc::Sender<Injection>,
}

/// An `MGET` reply being rebuilt: its elements, and how many miss scripts
/// are still to answer.
struct MGetMisses {
    elements: Vec<Reply>,
    waiting: usize,
}

struct HerdWait {
    slot: u64,
    reply: ScriptReply,
    /// After this, take a ticket regardless (nil goes to the client).
    deadline: Instant,
    /// When to ask Redis again (the lease holder may be another process).
    next_poll: Instant,
    /// Asked again; its answer is on the way.
    in_flight: bool,
}

impl Herd {
    /// How often a held miss asks Redis again, for leaders in other processes.
    fn poll_every(hold: std::time::Duration) -> std::time::Duration {
        (hold / 10).clamp(
            std::time::Duration::from_millis(2),
            std::time::Duration::from_millis(25),
        )
    }

    /// Holds a miss whose lease another client has.
    fn wait(&mut self, fence: &FenceSession<'_>, slot: u64, reply: ScriptReply) {
        let ScriptReply::Miss { key, policy, .. } = &reply else {
            return;
        };
        let hold = fence.fences.scope().policy_at(*policy).hold;
        fence.fences.watch(key, &self.wake);
        let now = Instant::now();
        match self.waits.iter_mut().find(|w| w.slot == slot) {
            Some(wait) => {
                wait.in_flight = false;
                wait.next_poll = now + Self::poll_every(hold);
            }
            None => {
                fence.fences.stats.holds.inc();
                self.waits.push(HerdWait {
                    slot,
                    reply,
                    deadline: now + hold,
                    next_poll: now + Self::poll_every(hold),
                    in_flight: false,
                });
            }
        }
    }

    /// The miss held in `slot` is answered; forgets it. Whether it waited.
    fn waited(&mut self, slot: u64) -> bool {
        let before = self.waits.len();
        self.waits.retain(|w| w.slot != slot);
        self.waits.len() < before
    }

    fn next_poll(&self) -> Option<Instant> {
        self.waits
            .iter()
            .filter(|w| !w.in_flight)
            .map(|w| w.next_poll.min(w.deadline))
            .min()
    }

    /// Asks Redis again for the waits that are due (all of them when woken
    /// in-process); past its deadline a miss takes a ticket regardless.
    fn poll(&mut self, fence: &FenceSession<'_>, outbox: &mut Outbox, woken: bool) {
        let now = Instant::now();
        for wait in self.waits.iter_mut().filter(|w| !w.in_flight) {
            if !woken && wait.next_poll.min(wait.deadline) > now {
                continue;
            }
            let ScriptReply::Miss { key, policy, nil, .. } = &wait.reply else {
                continue;
            };
            let forced = now >= wait.deadline;
            let reply = ScriptReply::Miss {
                key: key.clone(),
                policy: *policy,
                nil: nil.clone(),
                forced,
            };
            wait.in_flight = true;
            let call = fence.miss_call(key, *policy, forced);
            inject(&self.injections, call, reply, wait.slot, false, outbox, nil);
        }
    }
}

fn is_nil(frame: &[u8]) -> bool {
    frame == b"$-1\r\n" || frame == b"_\r\n"
}

/// Moves the local replies at the head of the queue into the outbox.
/// Returns true once one of them closes the connection and nothing is held
/// before it any more.
/// Records the latency of the request batches answered by now.
fn observe_latency(pairing: &mut Pairing, metrics: &Metrics) {
    let Some(mut mark) = pairing.take_answered() else {
        return;
    };
    let now = Instant::now();
    loop {
        let latency = now.saturating_duration_since(mark.at);
        for class in Class::ALL {
            metrics.latency[class as usize].observe(latency, u64::from(mark.counts[class as usize]));
        }
        match pairing.take_answered() {
            Some(next) => mark = next,
            None => return,
        }
    }
}

fn take_locals(pairing: &mut Pairing, outbox: &mut Outbox) -> bool {
    while let Some(local) = pairing.take_local() {
        match local {
            LocalReply::Raw { reply, close } => {
                outbox.send(reply);
                if close {
                    outbox.closing = true;
                    break;
                }
            }
            LocalReply::Built(reply) => outbox.send(reply.encode(pairing.is_resp3())),
        }
    }
    outbox.closing && !outbox.is_holding()
}

/// The upstream connection ended: every request still owed a reply gets an
/// error (unless part of a reply was already sent, which an error would
/// corrupt), and the client is closed.
async fn upstream_lost<W: AsyncWrite + Unpin>(
    client: &mut W,
    shared: &Shared,
    ctx: &Context,
    fence: Option<&FenceSession<'_>>,
    mid_frame: bool,
    reason: &str,
) -> SessionEnd {
    let (owed, deletes) = shared.pairing().abandon();
    if let Some(fence) = fence {
        for (db, keys) in deletes {
            // The client gets an error; the delete is retried until Redis takes it (C3).
            fence.fences.undelivered.push(db, &keys);
        }
    }
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

/// Writes all of `bytes` and flushes: a TLS stream may keep the end of
/// what it was given until flushed (for plain TCP, flushing does nothing).
async fn send<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
