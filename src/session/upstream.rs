//! The upstream side of a session: a connection of its own (1:1), or a
//! shared connection ([`crate::redis::shared`]) until the client does
//! something whose effect or reply belongs to its connection.
//!
//! [`placement`] decides, per command, whether it may go on a shared
//! connection. A command that may not moves the session to a connection of
//! its own first ([`SharedTx::pin`]): every reply owed on the shared
//! connection is read, a connection is opened with the proxy's handshake
//! (so it is in the state a shared one is in: the configured user and
//! database, and the protocol the client negotiated), and the session stays
//! on it until it ends. `HELLO 2` / `HELLO 3` alone move a session between
//! the RESP2 and the RESP3 shared connection of its slot
//! ([`SharedTx::switch`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use crate::app::App;
use crate::fence::script::ScriptCall;
use crate::net::Stream;
use crate::redis::UpstreamError;
use crate::redis::shared::{Backlog, Chunk, Job, Route};
use crate::resp::command::Command;
use crate::resp::request::Frame;

/// The channel of the `PUBLISH` that carries a session's write offset to
/// its own connection (see [`SharedTx::pin`]).
pub const CARRY_CHANNEL: &[u8] = b"__cachefence__:wait";

/// Where a command may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// On a shared connection: its effect and reply do not depend on which
    /// connection carries it.
    Shared,
    /// On a connection of the session's own (see the README's list).
    Own,
    /// `WAIT` / `WAITAOF`: on a connection of its own that has first
    /// caught up with the writes the session made on the shared one.
    OwnAfterWrites,
    /// `QUIT`: answered by the proxy (`+OK`, then close); sent upstream it
    /// would close the shared connection.
    Quit,
    /// `HELLO 2` / `HELLO 3` (nothing else): on the shared connection of
    /// that protocol (the session moves there first if it is on the other).
    Protocol { resp3: bool },
    /// `CLIENT SETNAME` / `CLIENT SETINFO`: on the shared connection (the
    /// reply is Redis' own, and clients send them as they connect), and
    /// sent again on the session's own connection if it moves, where
    /// `CLIENT GETNAME` / `INFO` / `LIST` can show them.
    Remembered,
}

/// Most `CLIENT SETNAME` / `SETINFO` requests a session keeps to send again
/// (the latest ones: sent again in order, a refused one is refused again
/// and leaves the name before it, as it did).
const REMEMBERED: usize = 16;

/// Keeps `request` (a [`Placement::Remembered`] one) to send again on the
/// session's own connection.
pub fn remember(kept: &mut Vec<Bytes>, request: &[u8]) {
    if kept.len() == REMEMBERED {
        kept.remove(0);
    }
    kept.push(Bytes::copy_from_slice(request));
}

/// Where `command` may run, for a session whose database is `db`.
pub fn placement(command: Command, frame: &Frame, request: &[u8], db: u32) -> Placement {
    match command {
        Command::Plain => {}
        // A protocol alone is served by the shared connections of it;
        // `AUTH` or `SETNAME` in it make it the connection's own.
        Command::Hello(Some(version @ (2 | 3))) if frame.argc == 2 => {
            return Placement::Protocol { resp3: version == 3 };
        }
        Command::Hello(None) if frame.argc == 1 => return Placement::Shared,
        Command::Subscribe(..)
        | Command::Unsubscribe(..)
        | Command::Hello(_)
        | Command::Reset
        | Command::Monitor
        | Command::ClientReply(_)
        | Command::Multi
        | Command::Sync => return Placement::Own,
        Command::Blocking if is_name(frame, request, b"WAIT") || is_name(frame, request, b"WAITAOF") => {
            return Placement::OwnAfterWrites;
        }
        Command::Blocking => return Placement::Own,
        Command::Select(Some(to)) if to != db => return Placement::Own,
        Command::Closing if is_name(frame, request, b"QUIT") => return Placement::Quit,
        // SHUTDOWN NOSAVE stops a busy script: it must not queue behind one.
        Command::Closing => return Placement::Own,
        _ => return Placement::Shared,
    }
    let Some(name) = frame.arg(request, 0) else {
        return Placement::Shared;
    };
    let sub = |word: &[u8]| {
        frame
            .arg(request, 1)
            .is_some_and(|sub| sub.eq_ignore_ascii_case(word))
    };
    if name.eq_ignore_ascii_case(b"CLIENT") && (sub(b"SETNAME") || sub(b"SETINFO")) {
        return Placement::Remembered;
    }
    // Connection state a shared connection cannot carry for one client:
    // its user (AUTH), watched keys, cluster routing flags, its own
    // attributes (every other CLIENT subcommand: ID, GETNAME, TRACKING,
    // KILL, NO-EVICT, PAUSE's issuer …), and a replica's handshake.
    const OWN: [&[u8]; 7] = [
        b"CLIENT",
        b"AUTH",
        b"WATCH",
        b"READONLY",
        b"READWRITE",
        b"ASKING",
        b"REPLCONF",
    ];
    if OWN.iter().any(|own| name.eq_ignore_ascii_case(own)) {
        return Placement::Own;
    }
    // A busy script blocks the connection it runs on: the command that
    // stops it cannot wait behind it on a shared one. `SCRIPT DEBUG` makes
    // the connection's next `EVAL` a debugging session.
    let kills = (name.eq_ignore_ascii_case(b"SCRIPT") && (sub(b"KILL") || sub(b"DEBUG")))
        || (name.eq_ignore_ascii_case(b"FUNCTION") && sub(b"KILL"));
    match kills {
        true => Placement::Own,
        false => Placement::Shared,
    }
}

fn is_name(frame: &Frame, request: &[u8], name: &[u8]) -> bool {
    frame
        .arg(request, 0)
        .is_some_and(|n| n.eq_ignore_ascii_case(name))
}

/// The write half of a session's upstream connection.
pub trait UpstreamWrite: AsyncWrite + Unpin + Send {
    /// The shared connection the session is on, if it is on one.
    fn shared(&mut self) -> Option<&mut SharedTx> {
        None
    }
}

impl UpstreamWrite for tokio::net::tcp::WriteHalf<'_> {}
impl<T: AsyncRead + AsyncWrite + Send> UpstreamWrite for tokio::io::WriteHalf<T> {}

/// What the two halves of a session on a shared connection share.
#[derive(Debug, Default)]
struct Owed {
    /// Jobs sent whose last reply bytes the read half has not taken yet.
    jobs: AtomicUsize,
    none: Notify,
}

/// A session's write half on a shared connection.
#[derive(Debug)]
pub struct SharedTx {
    app: Arc<App>,
    slot: usize,
    queue: mpsc::Sender<Job>,
    route: Route,
    owed: Arc<Owed>,
    /// Reply frames of the requests sent so far (see [`super::Pairing`]'s count).
    frames_sent: u64,
    /// Anything was sent on the shared connection.
    sent_any: bool,
    /// On the RESP3 shared connection (after `HELLO 3`).
    resp3: bool,
    /// After [`SharedTx::pin`]: the session's own connection.
    own: Option<tokio::io::WriteHalf<Stream>>,
    /// The Sentinel failovers seen when the requests on their way were
    /// planned ([`SharedTx::planning`]); `None` once they are sent.
    planned_after: Option<u64>,
}

/// A session's read half on a shared connection.
#[derive(Debug)]
pub struct SharedRx {
    chunks: mpsc::UnboundedReceiver<Chunk>,
    /// What was routed here and not taken yet.
    pub backlog: Arc<Backlog>,
    pending: Bytes,
    owed: Arc<Owed>,
    own: Option<tokio::io::ReadHalf<Stream>>,
    ended: Option<io::ErrorKind>,
    eof: bool,
}

/// The two halves of a session on shared connection `slot`, whose job
/// queue is `queue`.
pub fn shared_halves(app: Arc<App>, slot: usize, queue: mpsc::Sender<Job>) -> (SharedRx, SharedTx) {
    let (tx, chunks) = mpsc::unbounded_channel();
    let owed = Arc::new(Owed::default());
    let backlog = Arc::new(Backlog::new(app.config.client_output_limit));
    let route = Route::new(tx, backlog.clone());
    let rx = SharedRx {
        chunks,
        backlog,
        pending: Bytes::new(),
        owed: owed.clone(),
        own: None,
        ended: None,
        eof: false,
    };
    let tx = SharedTx {
        app,
        slot,
        queue,
        route,
        owed,
        frames_sent: 0,
        sent_any: false,
        resp3: false,
        own: None,
        planned_after: None,
    };
    (rx, tx)
}

impl SharedTx {
    /// The session is about to plan requests (fence calls among them). A
    /// fill planned before a failover carries no bound
    /// ([`crate::fence::failover`]): if the connection is found gone at
    /// the send because a failover revoked it meanwhile, the requests are
    /// answered with an error instead of going to the new master.
    pub fn planning(&mut self) {
        self.planned_after = Some(self.failovers_seen());
    }

    /// What was planned is sent (or waits for nothing the session plans).
    pub fn planned_sent(&mut self) {
        self.planned_after = None;
    }

    fn failovers_seen(&self) -> u64 {
        let sentinel = self.app.config.upstream.sentinel.as_ref();
        sentinel.map_or(0, |sentinel| sentinel.failovers.count())
    }

    /// Sends `bytes`, whole requests owed the reply frames pushed up to
    /// `frames_pushed` (the pairing's running count).
    /// `call`: `bytes` are exactly this one fence script call, as `EVALSHA`
    /// (the connection may merge it with other sessions' calls).
    pub async fn send(
        &mut self,
        bytes: &[u8],
        frames_pushed: u64,
        call: Option<ScriptCall>,
    ) -> io::Result<()> {
        let frames = (frames_pushed - self.frames_sent) as usize;
        self.frames_sent = frames_pushed;
        if bytes.is_empty() && frames == 0 {
            return Ok(()); // everything was answered by the proxy
        }
        self.owed.jobs.fetch_add(1, Ordering::AcqRel);
        self.sent_any = true;
        let job = Job {
            bytes: Bytes::copy_from_slice(bytes),
            frames,
            eof: false,
            route: self.route.clone(),
            call: call.filter(|_| frames == 1),
        };
        self.queue_job(job).await
    }

    /// [`SharedTx::send`] of a batch that is `call` alone, not encoded: the
    /// connection encodes it where it writes it, alone or (most often, with
    /// many clients that do not pipeline) in one batch call with other
    /// sessions' ([`crate::redis::shared`]), so it is not encoded twice.
    pub async fn send_unencoded(&mut self, call: ScriptCall, frames_pushed: u64) -> io::Result<()> {
        let frames = (frames_pushed - self.frames_sent) as usize;
        if frames != 1 {
            // Not the call's alone: not one to merge either.
            return self.send(&call.encode(false), frames_pushed, None).await;
        }
        self.frames_sent = frames_pushed;
        self.owed.jobs.fetch_add(1, Ordering::AcqRel);
        self.sent_any = true;
        let job = Job {
            bytes: Bytes::new(),
            frames,
            eof: false,
            route: self.route.clone(),
            call: Some(call),
        };
        self.queue_job(job).await
    }

    /// The client half-closed: once every reply before it is read, the
    /// read half ends (as Redis closes after a client's half-close).
    pub async fn close(&mut self) -> io::Result<()> {
        let job = Job {
            bytes: Bytes::new(),
            frames: 0,
            eof: true,
            route: self.route.clone(),
            call: None,
        };
        self.queue_job(job).await
    }

    async fn queue_job(&mut self, job: Job) -> io::Result<()> {
        let job = match self.queue.send(job).await {
            Ok(()) => return Ok(()),
            Err(mpsc::error::SendError(job)) => job,
        };
        // The connection ended (failed, or Redis closed it idle). A session
        // still owed replies on it gets them as `Chunk::Lost` and ends; one
        // owed nothing (this job aside) goes on on another connection, so
        // its replies never come from two connections at once.
        let owed_before = self.owed.jobs.load(Ordering::Acquire) - usize::from(!job.eof);
        let pool = self
            .app
            .shared
            .as_ref()
            .expect("a shared session implies shared connections");
        let planned_before_a_failover = self
            .planned_after
            .is_some_and(|seen| seen != self.failovers_seen());
        let sent = match owed_before {
            0 if planned_before_a_failover => Err(io::Error::other(
                "the upstream master changed (Sentinel failover) while the request was on its way",
            )),
            0 => match pool.queue(self.slot, self.resp3, &self.app.metrics).await {
                Ok(queue) => {
                    self.queue = queue;
                    self.queue
                        .send(job)
                        .await
                        .map_err(|_| io::Error::other("closed the connection"))
                }
                Err(error) => {
                    self.app.metrics.upstream_connect_errors.inc();
                    // The client's error names the address already.
                    Err(io::Error::other(error.detail()))
                }
            },
            _ => Err(io::Error::other("closed the connection")),
        };
        if let Err(error) = &sent {
            // The read half must end too: nothing else will answer.
            self.route.send(Chunk::Lost(error.to_string()));
        }
        sent
    }

    /// Moves the session to the shared connection of the other protocol,
    /// once every reply owed on this one has been read (its replies then
    /// come from one connection at a time, in order).
    pub async fn switch(&mut self, resp3: bool) -> Result<(), UpstreamError> {
        self.drained().await;
        let pool = self
            .app
            .shared
            .as_ref()
            .expect("a shared session implies shared connections");
        self.queue = pool.queue(self.slot, resp3, &self.app.metrics).await?;
        self.resp3 = resp3;
        Ok(())
    }

    /// Waits until every reply owed on the shared connection has been read.
    async fn drained(&self) {
        while self.owed.jobs.load(Ordering::Acquire) > 0 {
            self.owed.none.notified().await;
        }
    }

    /// Moves the session to a connection of its own, once every reply owed
    /// on the shared one has been read.
    ///
    /// `carry_writes`: for `WAIT` / `WAITAOF`, which count the replicas
    /// that have the writes *of the connection* they are sent on. Redis
    /// records a connection's write offset after a command that propagates
    /// (6.2–7.2: after any command), so a `PUBLISH` on the new connection,
    /// which Redis always propagates outside a cluster, carries the offset
    /// of the session's writes on the shared connection over to it.
    ///
    /// `remembered`: the session's `CLIENT SETNAME` / `SETINFO`, sent again
    /// on the new connection (a refusal there was a refusal before too).
    pub async fn pin(&mut self, carry_writes: bool, remembered: &[Bytes]) -> Result<(), UpstreamError> {
        self.drained().await;
        let config = &self.app.config;
        let mut stream = crate::redis::connect(&config.upstream, config.connect_timeout).await?;
        // The protocol the session speaks (`HELLO 3` was answered shared).
        if self.resp3 {
            crate::redis::shared::hello3(&mut stream, &config.upstream).await?;
        }
        let unreachable = |error: std::io::Error| UpstreamError::Unreachable {
            addr: config.upstream.addr(),
            reason: error.to_string(),
        };
        for request in remembered {
            if let Err(crate::redis::CallError::Io(error)) = crate::redis::call(&mut stream, request).await {
                return Err(unreachable(error));
            }
        }
        if carry_writes && self.sent_any {
            let publish = crate::resp::encode::command(&[b"PUBLISH", CARRY_CHANNEL, b""]);
            match crate::redis::call(&mut stream, &publish).await {
                Ok(()) => {}
                Err(crate::redis::CallError::Refused(reply)) => {
                    warn!(
                        reply,
                        "PUBLISH refused: a WAIT may not cover writes made on the shared connection"
                    );
                }
                Err(crate::redis::CallError::Io(error)) => return Err(unreachable(error)),
            }
        }
        let (rd, wr) = tokio::io::split(stream);
        self.route.send(Chunk::Switch(rd));
        self.own = Some(wr);
        self.app.metrics.sessions_pinned.inc();
        Ok(())
    }

    fn own(&mut self) -> io::Result<Pin<&mut tokio::io::WriteHalf<Stream>>> {
        match &mut self.own {
            Some(own) => Ok(Pin::new(own)),
            None => Err(io::Error::other(
                "a shared connection is written with SharedTx::send",
            )),
        }
    }
}

impl UpstreamWrite for SharedTx {
    fn shared(&mut self) -> Option<&mut SharedTx> {
        match self.own {
            None => Some(self),
            Some(_) => None,
        }
    }
}

/// Once pinned: the session's own connection.
impl AsyncWrite for SharedTx {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut().own() {
            Ok(own) => own.poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().own() {
            Ok(own) => own.poll_flush(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().own() {
            Ok(own) => own.poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl AsyncRead for SharedRx {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(own) = &mut this.own {
                return Pin::new(own).poll_read(cx, buf);
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            if let Some(kind) = this.ended {
                return Poll::Ready(Err(io::Error::from(kind)));
            }
            match ready!(this.chunks.poll_recv(cx)) {
                Some(Chunk::Data { bytes, last }) => {
                    this.backlog.took(bytes.len());
                    if last && this.owed.jobs.fetch_sub(1, Ordering::AcqRel) == 1 {
                        this.owed.none.notify_one();
                    }
                    this.pending = bytes;
                }
                Some(Chunk::Eof) => this.eof = true,
                Some(Chunk::Switch(own)) => this.own = Some(own),
                Some(Chunk::Lost(reason)) => {
                    this.ended = Some(io::ErrorKind::ConnectionAborted);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionAborted, reason)));
                }
                // The write half holds a sender while the session lives.
                None => return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into())),
            }
        }
    }
}

/// Sends `bytes` upstream: on a shared connection as a job owed the frames
/// pushed since the last send, else written as they are.
pub(super) async fn send_requests<W: UpstreamWrite>(
    upstream: &mut W,
    bytes: &[u8],
    frames_pushed: impl FnOnce() -> u64,
) -> io::Result<()> {
    send_call(upstream, bytes, frames_pushed, None).await
}

/// [`send_requests`] of a batch that is `call` alone (see [`SharedTx::send`]).
pub(super) async fn send_call<W: UpstreamWrite>(
    upstream: &mut W,
    bytes: &[u8],
    frames_pushed: impl FnOnce() -> u64,
    call: Option<ScriptCall>,
) -> io::Result<()> {
    match upstream.shared() {
        Some(shared) => shared.send(bytes, frames_pushed(), call).await,
        None => super::send(upstream, bytes).await,
    }
}

/// [`send_call`] of a batch that is `call` alone, not encoded yet (the
/// session is on a shared connection, which encodes it).
pub(super) async fn send_unencoded<W: UpstreamWrite>(
    upstream: &mut W,
    call: ScriptCall,
    frames_pushed: impl FnOnce() -> u64,
) -> io::Result<()> {
    match upstream.shared() {
        Some(shared) => shared.send_unencoded(call, frames_pushed()).await,
        None => super::send(upstream, &call.encode(false)).await,
    }
}

/// The client half-closed: so does the upstream side.
pub(super) async fn close_requests<W: UpstreamWrite>(upstream: &mut W) {
    let _ = match upstream.shared() {
        Some(shared) => shared.close().await,
        None => tokio::io::AsyncWriteExt::shutdown(upstream).await,
    };
}

#[cfg(test)]
mod tests;
