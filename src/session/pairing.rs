//! Pairing replies with requests.
//!
//! Each forwarded request leaves an [`Expect`] in a bounded queue; each frame
//! from upstream either answers the request at the head of the queue or is
//! unsolicited (RESP3 pushes, pub/sub messages, MONITOR lines). The queue is
//! what later lets the proxy act on one command's reply, answer every
//! pending request when the upstream dies, and finish in-flight replies on
//! shutdown.
//!
//! The connection modes that change the reply stream are tracked here from
//! the replies themselves (not from the requests), so they follow what Redis
//! actually did: the protocol version (HELLO), pub/sub subscription counts,
//! MONITOR.

use std::collections::VecDeque;

use bytes::Bytes;
use tracing::warn;

pub use super::expect::Expect;
use crate::fence::plan::{InExec, Intercept};
use crate::fence::script::ScriptCall;
use crate::fence::translate::ScriptReply;
use crate::resp::command::SubFamily;
use crate::resp::request::string2ll;

/// Most bytes of requests that intercepted commands keep while their
/// replies are owed, per connection: past it the session stops reading the
/// client (as `max_pending` does by count), so a client that never reads its
/// replies cannot make the proxy hold its keys without bound.
pub const MAX_HELD_BYTES: usize = 16 << 20;

/// Subscriptions as Redis reported them in its confirmations.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Subscriptions {
    pub channels: u64,
    pub patterns: u64,
    pub shard: u64,
}

impl Subscriptions {
    pub fn any(&self) -> bool {
        self.channels + self.patterns + self.shard > 0
    }

    fn count(&self, family: SubFamily) -> u64 {
        match family {
            SubFamily::Channel => self.channels,
            SubFamily::Pattern => self.patterns,
            SubFamily::Shard => self.shard,
        }
    }

    /// Applies a confirmation carrying Redis' new total: channels and
    /// patterns share one total, shard channels have their own.
    fn confirm(&mut self, family: SubFamily, total: u64) {
        match family {
            SubFamily::Channel => self.channels = total.saturating_sub(self.patterns),
            SubFamily::Pattern => self.patterns = total.saturating_sub(self.channels),
            SubFamily::Shard => self.shard = total,
        }
    }
}

/// Where a frame from upstream goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// It answered the request at the head of the queue.
    Reply,
    /// Out-of-band (push, message, MONITOR line) or unexpected.
    Unsolicited,
    /// It answered an intercepted request: the session decides what the
    /// client gets.
    Fence(Intercept),
    /// It answered a request of the proxy's own: the client gets nothing.
    Hidden,
}

/// Where the connection stands with `SYNC` / `PSYNC`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// An ordinary client connection.
    #[default]
    Normal,
    /// A `SYNC` was sent; its answer decides.
    Pending,
    /// Redis refused it with an error: the connection stays ordinary.
    Refused,
    /// A replication link: raw bytes both ways from now on.
    Raw,
}

/// A reply the proxy owes at the head of the queue, in place of a frame
/// from upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalReply {
    Raw { reply: Bytes, close: bool },
    Built(crate::resp::value::Reply),
}

#[derive(Debug, Default)]
pub struct Pairing {
    pending: VecDeque<Expect>,
    resp3: bool,
    monitor: bool,
    subs: Subscriptions,
    /// Redis answered `-NOAUTH` and nothing has succeeded since.
    unauthenticated: bool,
    /// Numbers of the expectations whose replies may change how Redis
    /// greets a new connection ([`crate::redis::login`]).
    login_changes: VecDeque<u64>,
    /// One of them was answered since [`Pairing::take_login_changed`].
    login_changed: bool,
    /// The generation of what the session was told at its start, while it
    /// started as logged in ([`Pairing::start_login`]).
    login_generation: Option<u64>,
    /// Redis answered `-NOAUTH` to a request.
    asked_for_auth: bool,
    /// A reply on this upstream connection showed it logged in (a command
    /// succeeded). Not yet: a failed `AUTH` counts as Redis asking for one.
    logged_in_seen: bool,
    /// Subscription requests still waiting for their confirmations.
    confirms_pending: usize,
    /// Redis answered a `QUIT`: it sends nothing more.
    quit: bool,
    /// The proxy answered a `QUIT` itself (a shared connection): the
    /// connection closes after its `+OK`, without lingering.
    pub quit_locally: bool,
    /// The database the connection has selected, as far as replies show.
    pub db: u32,
    /// The commands queued in the open transaction, as their `EXEC`
    /// elements will need them.
    queued: Vec<InExec>,
    /// Shutting down: no new requests; close once nothing is pending.
    pub draining: bool,
    /// The replies direction holds a reply the client has not had yet (a
    /// miss in progress), as of its last pass.
    pub reply_held: bool,
    /// Blocking commands pending.
    blocking: usize,
    /// Sum of the pending expectations' [`Expect::weight`].
    held_bytes: usize,
    /// Expectations pushed and popped so far: a [`Mark`] is answered once
    /// `popped` reaches its `upto` (the queue is first in, first out).
    pushed: u64,
    popped: u64,
    /// Reply frames from upstream that the expectations pushed so far are
    /// owed (a shared connection routes replies by this count).
    frames_pushed: u64,
    /// Request batches whose replies are not all routed yet, for latency.
    marks: VecDeque<Mark>,
    /// The client once sent a request while a reply was still owed: it
    /// pipelines (or multiplexes), so a miss held on this connection can
    /// still see a fill sent on it behind.
    pipelined: bool,
    /// `SYNC` / `PSYNC` in progress or done.
    pub link: Link,
    /// How a probed run goes on ([`crate::fence::probe`]), from its `MGET`
    /// reply: what the requests direction sends next, in order, before it
    /// reads the client again.
    pub resume: Option<Vec<Resume>>,
}

/// One step of a probed run, as the requests direction sends it.
#[derive(Debug)]
pub enum Resume {
    /// These bytes, expecting this.
    Send(Bytes, Expect),
    /// A fence script call, encoded by the requests direction (the one
    /// upstream writer knows whether the script's source went yet).
    Call(ScriptCall, ScriptReply),
}

/// A mark's `upto` while its batch waits for a probed run's steps to be
/// pushed (never answered until then).
const RESUMING: u64 = u64::MAX;

/// Most batches timed at once per connection; past it a batch goes untimed.
const MAX_MARKS: usize = 1024;

/// A batch of requests read at `at`, answered when the expectation pushed
/// last for it (number `upto`) is popped.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    upto: u64,
    pub at: std::time::Instant,
    pub counts: crate::telemetry::ClassCounts,
}

impl Pairing {
    /// A request of the client's: as [`Pairing::push`], and notes whether
    /// the client sent it before it had every earlier reply (it pipelines).
    pub fn push_request(&mut self, expect: Expect) {
        self.pipelined |= !self.pending.is_empty() || self.reply_held;
        self.push(expect);
    }

    pub fn push(&mut self, expect: Expect) {
        match expect {
            Expect::Confirm { .. } | Expect::ConfirmAll(_) => self.confirms_pending += 1,
            Expect::Blocking => self.blocking += 1,
            _ => {}
        }
        self.held_bytes += expect.weight();
        self.pushed += 1;
        // Every expectation on a shared connection is owed one frame (those
        // owed several or none move the session to its own connection).
        self.frames_pushed += u64::from(!expect.is_local());
        self.pending.push_back(expect);
    }

    /// Reply frames from upstream owed to everything pushed so far.
    pub fn frames_pushed(&self) -> u64 {
        self.frames_pushed
    }

    /// The client sent several requests without waiting for a reply,
    /// queued here as one expectation (a batch of fenced writes).
    pub fn note_pipelined(&mut self) {
        self.pipelined = true;
    }

    /// Whether the client has ever pipelined on this connection (see
    /// `pipelined`); a client that never did sends one request at a time.
    pub fn has_pipelined(&self) -> bool {
        self.pipelined
    }

    /// Times the batch whose expectations were pushed last.
    pub fn mark(&mut self, at: std::time::Instant, counts: crate::telemetry::ClassCounts) {
        if self.marks.len() < MAX_MARKS {
            let upto = self.pushed;
            self.marks.push_back(Mark { upto, at, counts });
        }
    }

    /// A probe was just answered ([`Pairing::resume`]): its steps are what
    /// the requests direction sends next. The batch the probe ended is
    /// timed until their replies, not the probe's ([`Pairing::resumed`]).
    pub fn resume_after_probe(&mut self, steps: Vec<Resume>) {
        let probe = self.popped;
        for mark in self.marks.iter_mut().filter(|m| m.upto == probe) {
            mark.upto = RESUMING;
        }
        self.resume = Some(steps);
    }

    /// The requests direction pushed a probed run's steps: its batch is
    /// answered with the last of them.
    pub fn resumed(&mut self) {
        let pushed = self.pushed;
        for mark in self.marks.iter_mut().filter(|m| m.upto == RESUMING) {
            mark.upto = pushed;
        }
    }

    /// The oldest timed batch, if every reply to it has been routed.
    pub fn take_answered(&mut self) -> Option<Mark> {
        match self.marks.front() {
            Some(mark) if mark.upto <= self.popped => self.marks.pop_front(),
            _ => None,
        }
    }

    /// The request pushed last may change how Redis greets a new
    /// connection (`CONFIG SET requirepass`; an `EXEC` of one).
    pub fn note_login_change(&mut self) {
        self.login_changes.push_back(self.pushed);
    }

    /// Whether a request noted by [`Pairing::note_login_change`] was
    /// answered (or lost with the upstream) since the last call.
    pub fn take_login_changed(&mut self) -> bool {
        std::mem::take(&mut self.login_changed)
    }

    fn pop(&mut self) -> Option<Expect> {
        let expect = self.pending.pop_front()?;
        self.popped += 1;
        while self.login_changes.front().is_some_and(|&n| n <= self.popped) {
            self.login_changes.pop_front();
            self.login_changed = true;
        }
        match expect {
            Expect::Confirm { .. } | Expect::ConfirmAll(_) => self.confirms_pending -= 1,
            Expect::Blocking => self.blocking -= 1,
            _ => {}
        }
        self.held_bytes -= expect.weight();
        Some(expect)
    }

    /// A reply from upstream is due now and no pending command may
    /// legitimately keep Redis silent (`reply_timeout` applies).
    pub fn awaits_upstream(&self) -> bool {
        // A `SYNC` may wait for a BGSAVE (Redis sends newlines meanwhile,
        // or nothing for a diskless sync's delay).
        self.blocking == 0
            && self
                .pending
                .front()
                .is_some_and(|e| !e.is_local() && !matches!(e, Expect::Sync { .. }))
    }

    /// Does the replication link start here? `next` is the first byte after
    /// the last complete frame, if any arrived. Redis answers an accepted
    /// `SYNC` / `PSYNC` with `+FULLRESYNC` / `+CONTINUE`, a newline
    /// (keepalive while the RDB is being made) or the RDB's `$`; a refusal
    /// is an error frame, routed as a reply. Once it starts, the head of
    /// the queue is the `SYNC` and nothing follows it.
    pub fn link_starts(&mut self, next: Option<u8>) -> bool {
        let Some(Expect::Sync { inspect }) = self.pending.front() else {
            return false;
        };
        if *inspect && !matches!(next, Some(b'+' | b'$' | b'\n')) {
            return false;
        }
        self.pop();
        self.link = Link::Raw;
        true
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Room for another request: under `max_pending` requests and
    /// [`MAX_HELD_BYTES`].
    pub fn has_room(&self, max_pending: usize) -> bool {
        self.pending.len() < max_pending && self.held_bytes < MAX_HELD_BYTES
    }

    pub fn is_resp3(&self) -> bool {
        self.resp3
    }

    /// How the connection starts, as [`crate::redis::login::NewLogins`]
    /// knew it (generation `generation`): logged out, Redis will ask for
    /// `AUTH`; logged in, unless its first `-NOAUTH` says otherwise.
    pub fn start_login(&mut self, logged_in: bool, generation: u64) {
        self.unauthenticated = !logged_in;
        self.login_generation = Some(generation).filter(|_| logged_in);
    }

    /// The session moved to a connection of its own: nothing on it has
    /// shown it logged in yet.
    pub fn new_connection(&mut self) {
        self.logged_in_seen = false;
    }

    /// The generation of a connection that started as logged in and was
    /// just asked for `AUTH` (once).
    pub fn take_asked_for_auth(&mut self) -> Option<u64> {
        self.asked_for_auth
            .then(|| self.login_generation.take())
            .flatten()
    }

    /// Whether a command may be rewritten: not while Redis refuses most
    /// commands anyway (before `AUTH`, RESP2 subscribed), where the error
    /// must name the client's command.
    pub fn may_intercept(&self) -> bool {
        !self.unauthenticated && (self.resp3 || !self.subs.any() && self.confirms_pending == 0)
    }

    /// Nothing is owed and nothing may arrive unasked: the connection is
    /// idle in the sense of Redis' `timeout`.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.resume.is_none() && !self.monitor && !self.subs.any()
    }

    /// The head of the queue is a reply the proxy made itself.
    pub fn take_local(&mut self) -> Option<LocalReply> {
        if !self.pending.front().is_some_and(Expect::is_local) {
            return None;
        }
        self.popped += 1;
        match self.pending.pop_front()? {
            Expect::Local { reply, close } => Some(LocalReply::Raw { reply, close }),
            Expect::Fence(fence) => match *fence {
                Intercept::Local(reply) => Some(LocalReply::Built(reply)),
                _ => None,
            },
            _ => None,
        }
    }

    /// Requests whose replies will never come once the upstream is gone,
    /// excluding those that legitimately end the connection: requests after
    /// a `QUIT` are never answered by Redis either. Also returns the keys of
    /// the invalidations among them, by database: Redis may never have
    /// applied them.
    pub fn abandon(&mut self) -> (usize, Vec<(u32, Vec<Bytes>)>) {
        let mut deletes = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        // Redis may have applied them.
        self.login_changed |= !std::mem::take(&mut self.login_changes).is_empty();
        (self.confirms_pending, self.blocking, self.held_bytes) = (0, 0, 0);
        (self.popped, self.marks) = (self.pushed, VecDeque::new());
        if self.quit {
            return (0, deletes);
        }
        let (mut owed, mut db) = (0, self.db);
        for expect in pending.iter().take_while(|e| !matches!(e, Expect::Closing)) {
            owed += expect.replies();
            match expect {
                Expect::Select(selected) => db = *selected,
                Expect::Fence(fence) => match &**fence {
                    // The client's deletes (a miss script invalidates nothing).
                    Intercept::Script { reply, .. } | Intercept::Plain { reply, .. } => {
                        deletes.extend(reply.invalidated_keys().map(|keys| (db, keys)));
                    }
                    Intercept::Probe(probe) => {
                        deletes.extend(probe.invalidated_keys().map(|keys| (db, keys)))
                    }
                    Intercept::Exec(queued) => deletes.extend(
                        queued
                            .iter()
                            .filter_map(InExec::hidden)
                            .filter_map(ScriptReply::invalidated_keys)
                            .map(|keys| (db, keys)),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
        // A probed run's steps not sent yet: each owes its replies, and its
        // deletes are retried like those that were sent (C3).
        for step in self.resume.take().unwrap_or_default() {
            let reply = match &step {
                Resume::Call(_, reply) => reply,
                Resume::Send(_, Expect::Fence(fence)) => match &**fence {
                    Intercept::Plain { reply, .. } => reply,
                    _ => continue,
                },
                // A store: one reply, nothing it deletes.
                Resume::Send(_, Expect::PlainSet { .. }) => {
                    owed += 1;
                    continue;
                }
                Resume::Send(..) => continue,
            };
            owed += reply.replies();
            deletes.extend(reply.invalidated_keys().map(|keys| (db, keys)));
        }
        (owed, deletes)
    }

    /// May a frame of type `kind` be forwarded before it is complete? Only
    /// when nothing about it needs to be inspected.
    pub fn may_stream(&self, kind: u8) -> bool {
        let head = match self.pending.front() {
            Some(Expect::Reply | Expect::Blocking) => true,
            // A bulk still arriving is not nil: the GET was a hit.
            Some(Expect::Get { .. }) => kind == b'$',
            _ => false,
        };
        head && kind != b'>' && !self.monitor && !self.subs.any()
    }

    /// Routes one complete top-level frame (`frame` holds all of its bytes
    /// unless it was streamed, in which case it is a plain reply).
    pub fn route(&mut self, kind: u8, frame: &[u8]) -> Route {
        if let Some(Expect::ConfirmAll(family)) = self.pending.front() {
            let family = *family;
            let left = self.subs.count(family).max(1);
            self.pending[0] = Expect::Confirm { family, left };
        }
        let confirming = match self.pending.front() {
            Some(Expect::Confirm { family, .. }) => Some(*family),
            _ => None,
        };
        let inspect =
            kind == b'>' || (kind == b'*' && !self.resp3 && (self.subs.any() || confirming.is_some()));
        if inspect {
            match pubsub_kind(frame) {
                Some(PubSub::Message) => return Route::Unsolicited,
                Some(PubSub::Confirmation(family)) => {
                    if let Some(total) = trailing_integer(frame) {
                        self.subs.confirm(family, total);
                    }
                    if confirming != Some(family) {
                        return Route::Unsolicited;
                    }
                    if let Some(Expect::Confirm { left, .. }) = self.pending.front_mut() {
                        *left -= 1;
                        if *left == 0 {
                            self.pop();
                        }
                    }
                    return Route::Reply;
                }
                None if kind == b'>' => return Route::Unsolicited,
                None => {}
            }
        }
        if self.monitor && kind == b'+' && is_monitor_line(frame) {
            return Route::Unsolicited;
        }
        let Some(expect) = self.pop() else {
            return Route::Unsolicited;
        };
        let ok = !matches!(kind, b'-' | b'!');
        if ok {
            self.unauthenticated = false;
            // Redis answers these to a client that has not logged in too.
            self.logged_in_seen |= !matches!(expect, Expect::Reset | Expect::Closing);
        } else if frame.starts_with(b"-NOAUTH") {
            self.unauthenticated = true;
            self.asked_for_auth = true;
        } else if frame.starts_with(b"-WRONGPASS") && !self.logged_in_seen {
            // A failed AUTH before anything showed the connection logged in:
            // most likely Redis asks for one (a connection that is logged in
            // stays so, and its next reply says it).
            self.unauthenticated = true;
        }
        match expect {
            Expect::Queued(InExec::Hidden(reply)) => {
                // The proxy's own call behind a fenced write: its QUEUED is
                // not the client's. Refused (an ACL without EVAL, say), it
                // aborts the transaction as any refused command does.
                if frame == b"+QUEUED\r\n" {
                    self.queued.push(InExec::Hidden(reply));
                } else {
                    warn!(reply = %String::from_utf8_lossy(frame).trim_end(), "the fence call behind a write in MULTI was refused");
                }
                return Route::Hidden;
            }
            Expect::Queued(in_exec) if frame == b"+QUEUED\r\n" => self.queued.push(in_exec),
            Expect::Exec => {
                let queued = std::mem::take(&mut self.queued);
                if !ok || !matches!(kind, b'*') {
                    return Route::Reply;
                }
                // Subscriptions made inside the transaction.
                if let Some(crate::resp::value::Value::Array(replies)) =
                    crate::resp::value::Value::decode(frame, self.resp3)
                {
                    for reply in replies {
                        self.confirm_from_value(&reply);
                    }
                }
                if queued.iter().any(|q| q.hidden().is_some()) {
                    return Route::Fence(Intercept::Exec(queued));
                }
            }
            Expect::Hello(Some(version)) if ok => self.resp3 = version == 3,
            Expect::Select(db) if ok => self.db = db,
            Expect::Reset if ok => {
                self.queued.clear();
                self.db = 0;
                self.resp3 = false;
                self.monitor = false;
                self.subs = Subscriptions::default();
            }
            Expect::Monitor if ok => self.monitor = true,
            Expect::Closing if ok => self.quit = true,
            // Anything but the start of a link: Redis refused the sync.
            Expect::Sync { .. } => self.link = Link::Refused,
            Expect::Get { key, policy } => return Route::Fence(Intercept::Get { key, policy }),
            Expect::PlainSet { kind, key, policy } => {
                let reply = ScriptReply::Set { policy, key };
                return Route::Fence(Intercept::Plain { kind, reply });
            }
            Expect::Fence(fence) => return Route::Fence(*fence),
            _ => {}
        }
        Route::Reply
    }
}

impl Pairing {
    /// Applies a confirmation found inside an `EXEC` reply.
    fn confirm_from_value(&mut self, reply: &crate::resp::value::Value) {
        use crate::resp::value::Value;
        let Value::Array(items) = reply else { return };
        let (Some(kind), Some(Value::Int(total))) = (items.first().and_then(Value::as_bytes), items.get(2))
        else {
            return;
        };
        let mut frame = format!("*1\r\n${}\r\n", kind.len()).into_bytes();
        frame.extend_from_slice(kind);
        frame.extend_from_slice(b"\r\n");
        if let Some(PubSub::Confirmation(family)) = pubsub_kind(&frame) {
            self.subs.confirm(family, u64::try_from(*total).unwrap_or(0));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PubSub {
    Message,
    Confirmation(SubFamily),
}

/// Classifies a pub/sub frame by its first element.
fn pubsub_kind(frame: &[u8]) -> Option<PubSub> {
    let kind = first_bulk(frame)?;
    let lower = |w: &str| kind.eq_ignore_ascii_case(w.as_bytes());
    Some(match () {
        _ if lower("message") || lower("pmessage") || lower("smessage") => PubSub::Message,
        _ if lower("subscribe") || lower("unsubscribe") => PubSub::Confirmation(SubFamily::Channel),
        _ if lower("psubscribe") || lower("punsubscribe") => PubSub::Confirmation(SubFamily::Pattern),
        _ if lower("ssubscribe") || lower("sunsubscribe") => PubSub::Confirmation(SubFamily::Shard),
        _ => return None,
    })
}

/// The first element of an aggregate frame, if it is a bulk string.
fn first_bulk(frame: &[u8]) -> Option<&[u8]> {
    let header_end = memchr::memchr(b'\n', frame)? + 1;
    let rest = frame.get(header_end..)?;
    let rest = rest.strip_prefix(b"$")?;
    let len_end = memchr::memchr(b'\r', rest)?;
    let len = usize::try_from(string2ll(&rest[..len_end])?).ok()?;
    rest.get(len_end + 2..len_end + 2 + len)
}

/// The value of a frame's last line if it is `:<n>` (the subscription count
/// that ends every confirmation).
fn trailing_integer(frame: &[u8]) -> Option<u64> {
    let body = frame.strip_suffix(b"\r\n")?;
    let start = memchr::memrchr(b'\n', body).map_or(0, |i| i + 1);
    let line = body[start..].strip_prefix(b":")?;
    u64::try_from(string2ll(line)?).ok()
}

/// `+1700000000.123456 [0 127.0.0.1:5000] "get" "k"`.
fn is_monitor_line(frame: &[u8]) -> bool {
    frame.len() > 2 && frame[1].is_ascii_digit() && memchr::memmem::find(frame, b" [").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::command::{Command, ReplyMode};

    fn confirmation(kind: &str, channel: &str, total: u64, push: bool) -> Vec<u8> {
        let t = if push { '>' } else { '*' };
        format!(
            "{t}3\r\n${}\r\n{kind}\r\n${}\r\n{channel}\r\n:{total}\r\n",
            kind.len(),
            channel.len()
        )
        .into_bytes()
    }

    #[test]
    fn a_lost_upstream_owes_the_replies_and_retries_the_deletes_of_steps_not_sent_yet() {
        use crate::fence::history::Source;
        use crate::fence::probe::PlainKind;
        let del = |key: &'static [u8]| ScriptReply::Command {
            keys: vec![Bytes::from_static(key)],
            invalidation: Some(Source::Client),
        };
        let mut p = Pairing::default();
        p.push(Expect::Reply);
        p.resume_after_probe(vec![
            Resume::Send(
                Bytes::from_static(b"DEL a"),
                Expect::fence(Intercept::Plain {
                    kind: PlainKind::Command,
                    reply: del(b"a"),
                }),
            ),
            Resume::Call(
                ScriptCall::new(Vec::new(), Vec::new()),
                ScriptReply::Batch(vec![del(b"b"), del(b"c")]),
            ),
            // A store sent plain (unboxed, `Expect::PlainSet`): one reply owed.
            Resume::Send(
                Bytes::from_static(b"SET k v"),
                Expect::fence(Intercept::Plain {
                    kind: PlainKind::SetWrite,
                    reply: ScriptReply::Set {
                        policy: 0,
                        key: Bytes::from_static(b"k"),
                    },
                }),
            ),
        ]);
        assert!(!p.is_idle(), "steps are owed");
        let (owed, deletes) = p.abandon();
        assert_eq!(owed, 1 + 1 + 2 + 1);
        let keys: Vec<Bytes> = deletes.into_iter().flat_map(|(_, keys)| keys).collect();
        assert_eq!(keys, [&b"a"[..], b"b", b"c"]);
        assert!(p.resume.is_none());
    }

    /// A plain store's expectation, kept unboxed, routes its reply as the
    /// boxed one would.
    #[test]
    fn a_plain_store_routes_as_its_intercept() {
        use crate::fence::probe::PlainKind;
        for kind in [PlainKind::SetWrite, PlainKind::SetInval] {
            let plain = Intercept::Plain {
                kind,
                reply: ScriptReply::Set {
                    policy: 7,
                    key: Bytes::from_static(b"user:1"),
                },
            };
            let mut p = Pairing::default();
            p.push(Expect::fence(plain.clone()));
            assert!(matches!(p.pending.front(), Some(Expect::PlainSet { .. })));
            assert_eq!(p.route(b':', b":1\r\n"), Route::Fence(plain));
            assert!(p.is_idle());
        }
    }

    #[test]
    fn a_batch_ended_by_a_probe_is_timed_until_the_replies_of_its_steps() {
        let mut p = Pairing::default();
        p.push(Expect::Reply);
        p.push(Expect::Reply); // the probe's place
        p.mark(std::time::Instant::now(), [2, 0, 0]);
        for _ in 0..2 {
            assert_eq!(p.route(b'+', b"+OK\r\n"), Route::Reply);
        }
        p.resume_after_probe(vec![
            Resume::Send(Bytes::from_static(b"a"), Expect::Reply),
            Resume::Send(Bytes::from_static(b"b"), Expect::Reply),
        ]);
        assert!(p.take_answered().is_none(), "the steps are not answered yet");
        // A call of the proxy's own went out in between.
        p.push(Expect::Reply);
        for step in p.resume.take().expect("the steps") {
            let Resume::Send(_, expect) = step else {
                unreachable!()
            };
            p.push(expect);
        }
        p.resumed();
        assert_eq!(p.route(b'+', b"+OK\r\n"), Route::Reply);
        assert!(p.take_answered().is_none());
        assert_eq!(p.route(b'+', b"+OK\r\n"), Route::Reply);
        assert!(p.take_answered().is_none());
        assert_eq!(p.route(b'+', b"+OK\r\n"), Route::Reply);
        assert_eq!(p.take_answered().map(|m| m.counts), Some([2, 0, 0]));
    }

    #[test]
    fn resp2_subscribe_pairs_each_confirmation_and_passes_messages() {
        let mut p = Pairing::default();
        p.push(Expect::Confirm {
            family: SubFamily::Channel,
            left: 2,
        });
        p.push(Expect::Reply);
        let a = confirmation("subscribe", "a", 1, false);
        assert_eq!(p.route(b'*', &a), Route::Reply);
        let msg = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n";
        assert_eq!(p.route(b'*', msg), Route::Unsolicited);
        let b = confirmation("subscribe", "b", 2, false);
        assert_eq!(p.route(b'*', &b), Route::Reply);
        assert_eq!(p.pending(), 1);
        assert_eq!(p.subs.channels, 2);
        // `PING` while subscribed in RESP2: an array that is a reply.
        assert_eq!(p.route(b'*', b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"), Route::Reply);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn unsubscribe_all_waits_for_one_confirmation_per_subscription() {
        let mut p = Pairing {
            subs: Subscriptions {
                channels: 2,
                patterns: 1,
                shard: 0,
            },
            ..Default::default()
        };
        p.push(Expect::ConfirmAll(SubFamily::Channel));
        assert_eq!(
            p.route(b'*', &confirmation("unsubscribe", "a", 2, false)),
            Route::Reply
        );
        assert_eq!(p.pending(), 1);
        assert_eq!(
            p.route(b'*', &confirmation("unsubscribe", "b", 1, false)),
            Route::Reply
        );
        assert_eq!(p.pending(), 0);
        assert_eq!(p.subs.channels, 0);
        assert_eq!(p.subs.patterns, 1);
    }

    #[test]
    fn resp3_pushes_never_answer_plain_requests() {
        let mut p = Pairing::default();
        p.push(Expect::Hello(Some(3)));
        assert_eq!(p.route(b'%', b"%0\r\n"), Route::Reply);
        assert!(p.is_resp3());
        p.push(Expect::Reply);
        let invalidate = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n";
        assert_eq!(p.route(b'>', invalidate), Route::Unsolicited);
        assert_eq!(p.pending(), 1);
        assert_eq!(p.route(b'$', b"$-1\r\n"), Route::Reply);
    }

    #[test]
    fn subscribe_errors_consume_the_request() {
        let mut p = Pairing::default();
        p.push(Expect::Confirm {
            family: SubFamily::Channel,
            left: 1,
        });
        assert_eq!(p.route(b'-', b"-ERR wrong number of arguments\r\n"), Route::Reply);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn monitor_lines_are_unsolicited_after_monitor_succeeds() {
        let mut p = Pairing::default();
        p.push(Expect::Monitor);
        assert_eq!(p.route(b'+', b"+OK\r\n"), Route::Reply);
        let line = b"+1700000000.000001 [0 127.0.0.1:5000] \"get\" \"k\"\r\n";
        assert_eq!(p.route(b'+', line), Route::Unsolicited);
        p.push(Expect::Reset);
        assert_eq!(p.route(b'+', b"+RESET\r\n"), Route::Reply);
        assert!(p.is_idle());
    }

    #[test]
    fn a_sync_answered_with_anything_but_an_error_starts_the_link() {
        for first in [b'+', b'$', b'\n'] {
            let mut p = Pairing::default();
            p.push(Expect::Sync { inspect: true });
            assert!(!p.link_starts(None), "nothing arrived yet");
            assert!(p.link_starts(Some(first)));
            assert_eq!((p.link, p.pending()), (Link::Raw, 0));
        }
        // With replies off a refusal would not come: it is a link at once.
        let mut p = Pairing::default();
        p.push(Expect::Sync { inspect: false });
        assert!(p.link_starts(None));
    }

    #[test]
    fn a_refused_sync_is_an_ordinary_reply() {
        let mut p = Pairing::default();
        p.push(Expect::Reply);
        p.push(Expect::Sync { inspect: true });
        assert!(!p.link_starts(Some(b'+')), "not at the head yet");
        assert_eq!(p.route(b'+', b"+OK\r\n"), Route::Reply);
        assert!(!p.link_starts(Some(b'-')));
        assert_eq!(
            p.route(b'-', b"-NOAUTH Authentication required.\r\n"),
            Route::Reply
        );
        assert_eq!((p.link, p.pending()), (Link::Refused, 0));
        assert!(!p.awaits_upstream());
    }

    #[test]
    fn client_reply_off_and_skip_expect_nothing() {
        let mut mode = ReplyMode::On;
        assert_eq!(
            Expect::for_command(Command::ClientReply(ReplyMode::Skip), &mut mode),
            None
        );
        assert_eq!(Expect::for_command(Command::Plain, &mut mode), None);
        assert_eq!(
            Expect::for_command(Command::Plain, &mut mode),
            Some(Expect::Reply)
        );
        assert_eq!(
            Expect::for_command(Command::ClientReply(ReplyMode::Off), &mut mode),
            None
        );
        assert_eq!(Expect::for_command(Command::Plain, &mut mode), None);
        assert_eq!(
            Expect::for_command(Command::ClientReply(ReplyMode::On), &mut mode),
            Some(Expect::Reply)
        );
    }
}

#[cfg(test)]
mod size_tests {
    use super::Expect;

    /// Every pending request costs one entry: the unboxed `Get` did not
    /// make it bigger (`Queued` sets its size), and nothing else may. (It
    /// was 80 until a miss kept its nil as a static slice.)
    #[test]
    fn queue_entries_stay_at_72_bytes() {
        assert_eq!(std::mem::size_of::<Expect>(), 72);
    }
}
