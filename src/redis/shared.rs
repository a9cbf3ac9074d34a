//! Upstream connections that many client sessions share
//! (`shared_connections` > 0).
//!
//! Each session is given one [`Slot`] for its life (round robin). The slot
//! holds the job queue of its live connection; a connection task writes the
//! jobs of every session on it, pipelined, in the order they were queued,
//! and routes each reply back to the session that sent the request: Redis
//! answers in order, so the [`Router`] only has to count frames. A job
//! carries whole requests and how many reply frames they are owed, which
//! the session knows from its [`crate::session::Pairing`].
//!
//! Only requests whose effect and reply do not depend on the connection's
//! state go here; a session moves to a connection of its own before any
//! other (see `session::upstream`). The connection therefore stays as the
//! proxy's handshake left it: the configured user and database, and RESP2
//! (or RESP3: each slot has a connection of each protocol).
//!
//! When a connection fails every session owed a reply on it gets
//! [`Chunk::Lost`] (its client is answered with errors, as when a
//! dedicated connection fails), the slot forgets it, and the next job
//! opens a new one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, warn};

use super::{UpstreamError, connect};
use crate::config::Upstream;
use crate::fence::script::{self, BATCH_MAX_OPS, ScriptCall};
use crate::net::Stream;
use crate::resp::reply::{MalformedReply, ReplyScanner};
use crate::telemetry::Metrics;

/// Jobs queued per shared connection; a session whose job finds the queue
/// full waits (backpressure), as it waits for a full socket buffer.
const QUEUED_JOBS: usize = 4096;
/// Bytes gathered into one write at most (jobs larger than this go alone).
const WRITE_BATCH: usize = 256 * 1024;
/// Bytes per read from a shared connection, and the least free space.
const READ_CHUNK: usize = 64 * 1024;

/// A merged call's reply up to this size is handed out as slices of one
/// copy (a batch of writes answers a few bytes per call); a bigger one
/// (values read by direct reads) is copied per session.
const SLICED_REPLY_MAX: usize = 4 * 1024;
/// Batches gathered with a yield after one that carried several jobs.
const BUSY_BATCHES: u32 = 16;
/// Without that, one batch in this many is gathered with a yield anyway.
const PROBE_EVERY: u32 = 16;
/// Part of a frame that has arrived is handed to its session once it is
/// this large: a huge reply streams instead of being held whole.
const STREAM_PARTIAL: usize = 64 * 1024;

/// What a session receives from a shared connection, in order.
#[derive(Debug)]
pub enum Chunk {
    /// Reply bytes of the session's oldest job; `last` ends that job.
    Data { bytes: Bytes, last: bool },
    /// The session half-closed: nothing more comes (as Redis closing after
    /// a client's half-close).
    Eof,
    /// The connection failed with the job's replies owed.
    Lost(String),
    /// The session moved to a connection of its own: read it from now on.
    Switch(tokio::io::ReadHalf<Stream>),
}

/// Reply bytes routed to one session and not taken by it yet: what its
/// client has not read, held by the proxy (on a connection of its own,
/// Redis would hold them in its output buffer, and the proxy would stop
/// reading them). A session past its `limit` (`client_output_limit`) is
/// closed, as Redis closes a client past `client-output-buffer-limit`: the
/// replies owed to it are dropped, and the others on the connection go on
/// (holding the connection for one client that does not read would stall
/// them all).
#[derive(Debug)]
pub struct Backlog {
    bytes: AtomicUsize,
    /// 0: none.
    limit: usize,
    closed: AtomicBool,
    /// Woken once when the session is to be closed.
    pub close: Notify,
}

impl Backlog {
    pub fn new(limit: usize) -> Backlog {
        Backlog {
            bytes: AtomicUsize::new(0),
            limit,
            closed: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    /// Whether the session is to be closed (for its backlog).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The session took `n` bytes.
    pub fn took(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
    }

    /// `n` more bytes for the session: false if that takes it past the
    /// limit (it is closed then).
    fn add(&self, n: usize, metrics: &Metrics) -> bool {
        let unread = self.bytes.fetch_add(n, Ordering::AcqRel) + n;
        if self.limit == 0 || unread <= self.limit {
            return true;
        }
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.close.notify_one();
            metrics.clients_output_closed.inc();
            warn!(
                unread,
                limit = self.limit,
                "closing a client past client_output_limit: it does not read its replies"
            );
        }
        false
    }
}

/// Where a job's replies go: the session's channel, unbounded in count
/// (a session is owed the replies of at most `max_pending` requests, the
/// bound that holds for a connection of its own too) and bounded in bytes
/// by its [`Backlog`].
#[derive(Debug, Clone)]
pub struct Route {
    tx: mpsc::UnboundedSender<Chunk>,
    backlog: Arc<Backlog>,
}

impl Route {
    pub fn new(tx: mpsc::UnboundedSender<Chunk>, backlog: Arc<Backlog>) -> Route {
        Route { tx, backlog }
    }

    /// Hands `chunk` over; a session that ended (or is being closed for
    /// its backlog) drops what it was owed.
    pub fn send(&self, chunk: Chunk) {
        if !self.backlog.closed.load(Ordering::Acquire) {
            let _ = self.tx.send(chunk);
        }
    }

    /// Hands reply bytes over, counted in the session's [`Backlog`].
    fn deliver(&self, bytes: Bytes, last: bool, metrics: &Metrics) {
        if self.backlog.add(bytes.len(), metrics) {
            self.send(Chunk::Data { bytes, last });
        }
    }
}

/// Requests of one session, written in one piece.
#[derive(Debug)]
pub struct Job {
    pub bytes: Bytes,
    /// Reply frames they are owed.
    pub frames: usize,
    /// The session half-closed after these (`frames` is 0).
    pub eof: bool,
    pub route: Route,
    /// `bytes` are exactly this one fence script call, as `EVALSHA`, owed
    /// one frame: the connection may run it in one batch call with the
    /// calls of other sessions queued next to it ([`merge`]). With `bytes`
    /// empty, the call was not encoded: the connection does it if it writes
    /// it alone.
    pub call: Option<ScriptCall>,
}

impl Job {
    /// About the bytes it writes (an unencoded call: its keys and
    /// arguments, and room for the `EVALSHA` around them).
    fn size(&self) -> usize {
        match (&self.call, self.bytes.is_empty()) {
            (Some(call), true) => call.weight() + 64,
            _ => self.bytes.len(),
        }
    }
}

/// What one write of a shared connection carries: the jobs' bytes in
/// order. One job's bytes alone are written as they are; several are
/// gathered in one buffer, kept from write to write (merged calls and
/// unencoded ones are encoded straight into it: no allocation per batch).
#[derive(Debug, Default)]
struct Outgoing {
    out: BytesMut,
    alone: Option<Bytes>,
}

/// A buffer grown past this for one write is not kept for the next.
const OUTGOING_KEPT: usize = 1 << 20;

impl Outgoing {
    /// What a job not merged writes: its bytes, or its call encoded.
    fn push(&mut self, bytes: Bytes, call: Option<ScriptCall>) {
        match call {
            Some(call) if bytes.is_empty() => call.encode_into(self.buffer()),
            // The first piece: kept aside until another comes.
            _ if self.alone.is_none() && self.out.is_empty() => self.alone = Some(bytes),
            _ => self.buffer().extend_from_slice(&bytes),
        }
    }

    /// The buffer, to append one more piece to.
    fn buffer(&mut self) -> &mut BytesMut {
        if let Some(alone) = self.alone.take() {
            self.out.extend_from_slice(&alone);
        }
        &mut self.out
    }

    fn bytes(&self) -> &[u8] {
        self.alone.as_deref().unwrap_or(&self.out)
    }

    fn clear(&mut self) {
        self.alone = None;
        match self.out.capacity() > OUTGOING_KEPT {
            true => self.out = BytesMut::new(),
            false => self.out.clear(),
        }
    }
}

/// The process's shared upstream connections.
#[derive(Debug)]
pub struct SharedUpstreams {
    /// Per slot, a RESP2 connection and a RESP3 one (opened with `HELLO 3`
    /// for the sessions that switched to RESP3).
    slots: Vec<[Slot; 2]>,
    next: AtomicUsize,
    upstream: Upstream,
    connect_timeout: Duration,
    /// How long a connection may stay silent while it owes a reply before
    /// it is replaced: three times `reply_timeout` at start, so that each
    /// session's own `reply_timeout` (checked once per period, so firing
    /// within two) answers its client first, as on a connection of its own.
    silence: Option<Duration>,
    merging: Arc<Merging>,
}

#[derive(Debug, Default)]
struct Slot {
    /// The live connection's job queue, and (behind Sentinel) whether its
    /// master is still the master.
    queue: Mutex<Option<(mpsc::Sender<Job>, Option<crate::net::Currency>)>>,
    /// Held while a connection is being opened: the sessions that arrive
    /// meanwhile (a thousand clients at start) wait for it instead of each
    /// opening one.
    connecting: tokio::sync::Mutex<()>,
    /// The last failed attempt: sessions that waited for it fail with it
    /// rather than each waiting `connect_timeout` in turn.
    failed: Mutex<Option<(Instant, UpstreamError)>>,
}

impl SharedUpstreams {
    pub fn new(
        connections: usize,
        upstream: Upstream,
        connect_timeout: Duration,
        silence: Option<Duration>,
    ) -> SharedUpstreams {
        SharedUpstreams {
            slots: (0..connections.max(1)).map(|_| Default::default()).collect(),
            next: AtomicUsize::new(0),
            merging: Arc::new(Merging::new(upstream.clone(), connect_timeout)),
            upstream,
            connect_timeout,
            silence: silence.map(|reply_timeout| reply_timeout * 3),
        }
    }

    /// The slot a new session uses for its life.
    pub fn assign(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    /// The job queue of `slot`'s live connection of the protocol (`resp3`),
    /// connecting first if it has none (the session then starts offline if
    /// Redis is unreachable, as with a dedicated connection).
    pub async fn queue(
        &self,
        slot: usize,
        resp3: bool,
        metrics: &Arc<Metrics>,
    ) -> Result<mpsc::Sender<Job>, UpstreamError> {
        let slot_state = &self.slots[slot][usize::from(resp3)];
        if let Some(queue) = slot_state.live() {
            return Ok(queue);
        }
        let asked = Instant::now();
        let _connecting = slot_state.connecting.lock().await;
        // Opened, or failed, while this session waited.
        if let Some(queue) = slot_state.live() {
            return Ok(queue);
        }
        let failed = slot_state
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some((at, error)) = failed.filter(|(at, _)| *at >= asked) {
            debug!(?at, "shared upstream connection failed while waiting");
            return Err(error);
        }
        // A failure is counted by the caller (a session going offline, or
        // one whose shared connection could not be replaced).
        let stream = match self.connect(resp3).await {
            Ok(stream) => stream,
            Err(error) => {
                *slot_state.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), error.clone()));
                return Err(error);
            }
        };
        let currency = stream.currency();
        let mut held = slot_state.queue.lock().unwrap_or_else(|p| p.into_inner());
        let (tx, rx) = mpsc::channel(QUEUED_JOBS);
        metrics.shared_opened.inc();
        debug!(slot, resp3, "shared upstream connection opened");
        tokio::spawn(serve(
            stream,
            rx,
            self.silence,
            metrics.clone(),
            self.merging.clone(),
        ));
        *held = Some((tx.clone(), currency));
        Ok(tx)
    }

    /// The proxy's handshake, and `HELLO 3` for a RESP3 connection.
    async fn connect(&self, resp3: bool) -> Result<Stream, UpstreamError> {
        let mut stream = connect(&self.upstream, self.connect_timeout).await?;
        if resp3 {
            hello3(&mut stream, &self.upstream).await?;
        }
        Ok(stream)
    }
}

/// Whether calls may be merged ([`merge`]): that depends on the proxy's
/// upstream user ([`may_touch_every_key`]), asked once per process, on a
/// connection of its own, the first time there are calls to merge (so a
/// proxy without fenced writes never asks, and the shared connections run
/// nothing of the proxy's own: `MONITOR` and `INFO` see what they see
/// directly). Until the answer, calls are not merged; a user that may not
/// run `ACL` gets none.
#[derive(Debug)]
pub struct Merging {
    /// 0: not asked; 1: asking; 2: yes; 3: no.
    state: std::sync::atomic::AtomicU8,
    upstream: Upstream,
    connect_timeout: Duration,
}

impl Merging {
    fn new(upstream: Upstream, connect_timeout: Duration) -> Merging {
        Merging {
            state: std::sync::atomic::AtomicU8::new(0),
            upstream,
            connect_timeout,
        }
    }

    /// Whether calls may be merged now; the first time, asks in the background.
    fn allowed(self: &Arc<Self>) -> bool {
        match self.state.load(Ordering::Acquire) {
            2 => true,
            0 if self
                .state
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok() =>
            {
                let this = self.clone();
                tokio::spawn(async move {
                    let ask = async {
                        let mut stream = connect(&this.upstream, this.connect_timeout).await.ok()?;
                        Some(may_touch_every_key(&mut stream).await)
                    };
                    // Unreachable: asked again the next time there are calls to merge.
                    let state = match tokio::time::timeout(this.connect_timeout * 2, ask).await {
                        Ok(Some(true)) => 2,
                        Ok(Some(false)) => 3,
                        _ => 0,
                    };
                    debug!(
                        state,
                        "whether fence script calls of different clients may be merged"
                    );
                    this.state.store(state, Ordering::Release);
                });
                false
            }
            _ => false,
        }
    }
}

/// Whether the proxy's upstream user may touch every key (`~*`, or the
/// `allkeys` flag of Redis 6). Redis checks the keys an `EVALSHA` declares
/// against the user's ACL before it runs anything: a batch call of several
/// clients' calls ([`merge`]) would be refused as a whole (`-NOPERM`) for
/// one client's key, and every client in it would get an error its call
/// alone does not get. So calls are merged only for a user that may touch
/// every key; when that is unknown (the user may not run `ACL`), not.
async fn may_touch_every_key(stream: &mut Stream) -> bool {
    use crate::resp::value::Value;
    async fn ask(stream: &mut Stream, args: &[&[u8]]) -> Option<Value> {
        let reply = super::call_reply(stream, &crate::resp::encode::command(args))
            .await
            .ok()?;
        Value::decode(&reply, false)
    }
    let Some(name) = ask(stream, &[b"ACL", b"WHOAMI"])
        .await
        .and_then(|v| v.as_bytes().cloned())
    else {
        return false;
    };
    let Some(Value::Array(fields)) = ask(stream, &[b"ACL", b"GETUSER", &name]).await else {
        return false;
    };
    fields.chunks(2).any(|pair| match pair {
        [Value::Bulk(field), Value::Array(flags)] if &field[..] == b"flags" => flags
            .iter()
            .any(|flag| flag.as_bytes().is_some_and(|f| &f[..] == b"allkeys")),
        [Value::Bulk(field), Value::Bulk(keys)] if &field[..] == b"keys" => keys
            .split(|&b| b == b' ')
            .any(|pattern| pattern == b"~*" || pattern == b"%RW~*"),
        _ => false,
    })
}

/// Switches a fresh connection to RESP3 (its reply is dropped).
pub async fn hello3(stream: &mut Stream, upstream: &Upstream) -> Result<(), UpstreamError> {
    match super::call(stream, &crate::resp::encode::command(&[b"HELLO", b"3"])).await {
        Ok(()) => Ok(()),
        Err(super::CallError::Io(error)) => Err(UpstreamError::Unreachable {
            addr: upstream.addr(),
            reason: error.to_string(),
        }),
        Err(super::CallError::Refused(reply)) => Err(UpstreamError::Rejected {
            addr: upstream.addr(),
            step: "HELLO 3",
            reply,
        }),
    }
}

impl Slot {
    /// The queue of a connection still open. A connection to a master a
    /// Sentinel failover replaced is not one, even while it is still
    /// answering what it owes: a session that comes now (a client that
    /// connects again after the failover's error) goes to the new master,
    /// not to a connection that can only fail its request.
    fn live(&self) -> Option<mpsc::Sender<Job>> {
        let held = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .filter(|(q, currency)| !q.is_closed() && currency.as_ref().is_none_or(|c| c.is_current()))
            .map(|(q, _)| q.clone())
    }
}

/// Splits a shared connection's reply stream among the jobs, in order.
#[derive(Debug, Default)]
pub struct Router {
    /// Jobs written and not answered yet.
    routes: VecDeque<Entry>,
    scanner: ReplyScanner,
    /// Where each element of a merged call's reply is ([`Router::split`]).
    parts: Vec<std::ops::Range<usize>>,
}

#[derive(Debug)]
struct Entry {
    route: Route,
    /// A batch call of several sessions' calls ([`merge`]): its one frame
    /// is an array whose first element is `route`'s reply and the rest,
    /// in order, these routes'.
    merged: Vec<Route>,
    /// Reply frames still owed.
    left: usize,
    /// A half-close: answered with [`Chunk::Eof`].
    eof: bool,
    /// When it was written.
    since: Instant,
}

/// What [`Router::step`] found at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// `buf[..upto]` belongs to the oldest job; `last`: its replies are complete.
    Deliver { upto: usize, last: bool },
    /// `buf[..upto]` answers the oldest job, a merged batch call: its
    /// array starts at `start` (pushes before it) and is split by
    /// [`Router::split`].
    Split { start: usize, upto: usize },
    /// Nothing to hand over until more bytes arrive.
    More,
}

impl Router {
    /// A job written: `frames` reply frames will answer it.
    pub fn push(&mut self, route: Route, frames: usize, eof: bool) {
        self.routes.push_back(Entry {
            route,
            merged: Vec::new(),
            left: if eof { 0 } else { frames },
            eof,
            since: Instant::now(),
        });
    }

    /// A batch call made of several sessions' calls, one frame owed:
    /// `routes` in the order of the calls.
    pub fn push_merged(&mut self, mut routes: Vec<Route>) {
        debug_assert!(routes.len() > 1);
        let route = routes.remove(0);
        self.routes.push_back(Entry {
            route,
            merged: routes,
            left: 1,
            eof: false,
            since: Instant::now(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The oldest job has waited at least `limit` for its reply.
    pub fn owed_for(&self, limit: Duration) -> bool {
        self.routes
            .front()
            .is_some_and(|entry| entry.since.elapsed() >= limit)
    }

    /// A job at the head owed no frame (or a half-close): answered now,
    /// with what it gets.
    pub fn pop_empty(&mut self) -> Option<(Route, Chunk)> {
        if self.routes.front()?.left > 0 {
            return None;
        }
        let entry = self.routes.pop_front()?;
        let chunk = match entry.eof {
            true => Chunk::Eof,
            false => Chunk::Data {
                bytes: Bytes::new(),
                last: true,
            },
        };
        Some((entry.route, chunk))
    }

    /// Looks at the front of `buf` (after [`Router::pop_empty`] found
    /// nothing); after a [`Step::Deliver`] the caller takes `buf[..upto]`
    /// off and calls [`Router::consumed`].
    pub fn step(&mut self, buf: &[u8]) -> Result<Step, MalformedReply> {
        loop {
            let Some(head) = self.routes.front_mut() else {
                return match buf.is_empty() {
                    true => Ok(Step::More),
                    // Nothing on a shared connection sends unasked.
                    false => Err(MalformedReply(
                        "a reply that no request on the shared connection asked for",
                    )),
                };
            };
            debug_assert!(head.left > 0, "jobs owed nothing are popped first");
            match self.scanner.advance(buf)? {
                // A RESP3 push is no reply: it goes to the session whose
                // request is answered next (`DEBUG PROTOCOL push` sends one
                // before its reply; tracking and pub/sub, which send them
                // unasked, have connections of their own).
                Some(frame) if frame.is_push() => {}
                Some(frame) if !head.merged.is_empty() => {
                    return Ok(Step::Split {
                        start: frame.start,
                        upto: frame.end,
                    });
                }
                Some(frame) => {
                    head.left -= 1;
                    if head.left == 0 {
                        return Ok(Step::Deliver {
                            upto: frame.end,
                            last: true,
                        });
                    }
                }
                None => {
                    let upto = self.scanner.scanned();
                    // A merged call's array is split whole.
                    return Ok(match upto >= STREAM_PARTIAL && head.merged.is_empty() {
                        true => Step::Deliver { upto, last: false },
                        false => Step::More,
                    });
                }
            }
        }
    }

    /// The caller took the `upto` bytes of a [`Step::Deliver`] off the
    /// front: returns where they go (a `last` one ends the oldest job).
    pub fn consumed(&mut self, upto: usize, last: bool) -> Option<Route> {
        self.scanner.consume(upto);
        match last {
            true => self.routes.pop_front().map(|entry| entry.route),
            false => self.routes.front().map(|entry| entry.route.clone()),
        }
    }

    /// After a [`Step::Split`]: the oldest job's reply `frame` (the
    /// `buf[..upto]` it named; its array at `start`) cut into each merged
    /// session's reply, handed to `deliver` in order, with the pushes
    /// before it going to the first. Where `frame` is small each reply is
    /// a slice of it. A reply that is not an array of one element per call
    /// (an error for the whole call: `-NOSCRIPT`, `-BUSY`, `-OOM` …) goes to
    /// each of them, as each call alone would have got it.
    pub fn split(&mut self, frame: &Bytes, start: usize, mut deliver: impl FnMut(Route, Bytes)) {
        self.scanner.consume(frame.len());
        let Some(entry) = self.routes.pop_front() else {
            return;
        };
        let n = 1 + entry.merged.len();
        let parts = elements(&frame[start..], n, &mut self.parts).then_some(&self.parts);
        let routes = std::iter::once(entry.route).chain(entry.merged);
        for (i, route) in routes.enumerate() {
            let part = parts.map_or(start..frame.len(), |parts| {
                start + parts[i].start..start + parts[i].end
            });
            let bytes = match i {
                0 if start > 0 => [&frame[..start], &frame[part]].concat().into(),
                _ if frame.len() <= SLICED_REPLY_MAX => frame.slice(part),
                // A slice would keep the whole batch reply alive while its
                // client is slow, though its backlog counts only its own part.
                _ => Bytes::copy_from_slice(&frame[part]),
            };
            deliver(route, bytes);
        }
    }

    /// Every job still owed a reply: the connection failed.
    fn drain(&mut self) -> impl Iterator<Item = Route> + '_ {
        self.routes
            .drain(..)
            .flat_map(|entry| std::iter::once(entry.route).chain(entry.merged))
    }
}

/// Whether `array` (one whole frame) is an array of `n` elements; if so
/// `parts` holds where each is.
fn elements(array: &[u8], n: usize, parts: &mut Vec<std::ops::Range<usize>>) -> bool {
    parts.clear();
    if array.first() != Some(&b'*') {
        return false;
    }
    let Some(header_end) = memchr::memmem::find(array, b"\r\n") else {
        return false;
    };
    if crate::resp::request::string2ll(&array[1..header_end]) != Some(n as i64) {
        return false;
    }
    let body = header_end + 2;
    let mut scanner = ReplyScanner::default();
    let mut at = body;
    while let Ok(Some(frame)) = scanner.advance(&array[body..]) {
        parts.push(at..body + frame.end);
        at = body + frame.end;
    }
    parts.len() == n && at == array.len()
}

/// Turns runs of jobs that are each one fence script call into one batch
/// call each ([`script::batch`]): Redis then pays a script call's fixed
/// cost (about 4 µs, most of what a fenced write costs it) once per run
/// instead of once per client. Each session's call keeps its place among
/// the others (a run is jobs next to each other in the queue, so no job
/// passes another of its session), and its reply is the element of the
/// batch's that is what it alone would have answered. What to write goes
/// into `outgoing`, with the jobs routed in order.
fn merge(router: &Mutex<Router>, jobs: &mut Vec<Job>, outgoing: &mut Outgoing, metrics: &Metrics, may: bool) {
    let mut router = lock(router);
    let mut jobs = jobs.drain(..).peekable();
    let mut calls = Vec::new();
    while let Some(job) = jobs.next() {
        let mergeable = |job: &Job| may && job.call.is_some() && job.frames == 1 && !job.eof;
        if !mergeable(&job) || !jobs.peek().is_some_and(mergeable) {
            answer_locked(&mut router, job.route, job.frames, job.eof);
            outgoing.push(job.bytes, job.call);
            continue;
        }
        let mut routes = Vec::with_capacity(8);
        calls.push(job.call.expect("mergeable"));
        routes.push(job.route);
        while calls.len() < BATCH_MAX_OPS {
            match jobs.next_if(mergeable) {
                Some(job) => {
                    calls.push(job.call.expect("mergeable"));
                    routes.push(job.route);
                }
                None => break,
            }
        }
        metrics.shared_merged.add(calls.len() as u64);
        router.push_merged(routes);
        script::batch_encode_into(&calls, outgoing.buffer());
        calls.clear();
    }
}

/// Queues a job's route; one owed nothing and first in line is answered now.
fn answer(router: &Mutex<Router>, route: Route, frames: usize, eof: bool) {
    answer_locked(&mut lock(router), route, frames, eof);
}

fn answer_locked(router: &mut Router, route: Route, frames: usize, eof: bool) {
    router.push(route, frames, eof);
    while let Some((to, chunk)) = router.pop_empty() {
        to.send(chunk);
    }
}

fn lock(router: &Mutex<Router>) -> std::sync::MutexGuard<'_, Router> {
    router.lock().unwrap_or_else(|p| p.into_inner())
}

/// Queues a job's route and adds its bytes to what is written.
fn route(router: &Mutex<Router>, job: Job, outgoing: &mut Outgoing) {
    answer(router, job.route, job.frames, job.eof);
    outgoing.push(job.bytes, job.call);
}

/// Takes the first `upto` bytes of the read buffer. A small piece is
/// copied: a slice would keep the whole read buffer alive while its client
/// is slow.
fn take_front(buf: &mut BytesMut, upto: usize) -> Bytes {
    match upto < READ_CHUNK {
        true => {
            let bytes = Bytes::copy_from_slice(&buf[..upto]);
            buf.advance(upto);
            bytes
        }
        false => buf.split_to(upto).freeze(),
    }
}

/// Runs one shared connection until it fails. `silence`: how long Redis
/// may stay silent while it owes a reply (`reply_timeout`).
async fn serve(
    stream: Stream,
    mut jobs: mpsc::Receiver<Job>,
    silence: Option<Duration>,
    metrics: Arc<Metrics>,
    merging: Arc<Merging>,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let router = Mutex::new(Router::default());
    let writer = async {
        let mut outgoing = Outgoing::default();
        let mut gathered: Vec<Job> = Vec::new();
        // Batches left to gather with a yield since one carried several jobs.
        let (mut busy, mut writes) = (0u32, 0u32);
        loop {
            let Some(first) = jobs.recv().await else {
                return "no session uses it".to_string();
            };
            // Routed before any await: if the connection fails meanwhile,
            // the job is answered (`Chunk::Lost`) with the others.
            let mut size = first.size();
            route(&router, first, &mut outgoing);
            // While several sessions are busy, the ones woken by the same
            // readiness event queue their jobs first: one write carries them
            // all, and Redis reads them in one call (the task that wakes
            // another runs it next). One busy client alone would only pay
            // the extra turn of the scheduler: it is skipped then, but for
            // one batch in `PROBE_EVERY`, which finds others coming.
            writes = writes.wrapping_add(1);
            if busy > 0 || writes % PROBE_EVERY == 0 {
                tokio::task::yield_now().await;
            }
            // Gathered without an await, and routed (merged where they
            // may be) before the write's.
            while size < WRITE_BATCH {
                match jobs.try_recv() {
                    Ok(job) => {
                        size += job.size();
                        gathered.push(job);
                    }
                    Err(_) => break,
                }
            }
            busy = match gathered.len() {
                0 => busy.saturating_sub(1),
                _ => BUSY_BATCHES,
            };
            let calls = gathered.iter().filter(|job| job.call.is_some()).count();
            let may_merge = calls > 1 && merging.allowed();
            merge(&router, &mut gathered, &mut outgoing, &metrics, may_merge);
            let written = wr.write_all(outgoing.bytes()).await;
            outgoing.clear();
            if let Err(error) = written.and(wr.flush().await) {
                return error.to_string();
            }
        }
    };
    let reader = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            let read = match silence {
                None => rd.read_buf(&mut buf).await,
                Some(limit) => match tokio::time::timeout(limit, rd.read_buf(&mut buf)).await {
                    Ok(read) => read,
                    // A hung Redis (or a black-holed path) must not keep
                    // every client waiting: the connection is replaced.
                    Err(_) if lock(&router).owed_for(limit) => {
                        return format!("did not reply within {limit:?}");
                    }
                    Err(_) => continue,
                },
            };
            match read {
                // Worded as a dedicated connection's loss is.
                Ok(0) => return "closed the connection".to_string(),
                Err(error) => return error.to_string(),
                Ok(_) => {}
            }
            let mut router = lock(&router);
            loop {
                while let Some((to, chunk)) = router.pop_empty() {
                    to.send(chunk);
                }
                match router.step(&buf) {
                    Ok(Step::More) => break,
                    Ok(Step::Deliver { upto, last }) => {
                        let bytes = take_front(&mut buf, upto);
                        if let Some(to) = router.consumed(upto, last) {
                            to.deliver(bytes, last, &metrics);
                        }
                    }
                    Ok(Step::Split { start, upto }) => {
                        let frame = take_front(&mut buf, upto);
                        router.split(&frame, start, |to, bytes| to.deliver(bytes, true, &metrics));
                    }
                    Err(error) => return format!("sent bytes that are not RESP: {error}"),
                }
            }
        }
    };
    let reason = tokio::select! {
        reason = writer => reason,
        reason = reader => reason,
    };
    // Every job routed here is answered before the queue closes (a session
    // finding it closed opens another connection only once it is owed
    // nothing here, see `session::upstream`); then what was queued.
    let mut owed = 0;
    for to in lock(&router).drain() {
        owed += 1;
        to.send(Chunk::Lost(reason.clone()));
    }
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        owed += 1;
        job.route.send(Chunk::Lost(reason.clone()));
    }
    match owed {
        0 => debug!(reason, "shared upstream connection ended"),
        _ => warn!(reason, owed, "shared upstream connection lost with replies owed"),
    }
}

#[cfg(test)]
mod tests;
