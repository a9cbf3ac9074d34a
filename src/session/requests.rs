//! Client → upstream: read what the client sent, frame and classify every
//! complete request, leave in the [`super::Pairing`] queue what each expects back,
//! and forward the whole batch in one write — byte for byte, except the
//! commands the fence layer rewrites or answers ([`crate::fence::plan`]).
//! This direction is the only writer to the upstream, so the proxy's own
//! script calls (a miss script after a nil `GET`) reach it as
//! [`Injection`]s and take their place in order.
//!
//! A `SYNC` / `PSYNC` goes in its place, as the client sent it (Redis
//! refuses one that arrives while earlier replies are still unwritten), and
//! ends the batch: nothing more is read from the client, nor any of the
//! proxy's own calls sent, until Redis answered it. A refusal leaves the
//! connection as it was; anything else makes it a replication
//! [`super::link`], on which the proxy's own calls cannot go (Redis would
//! run them as a replica's commands and never answer).

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::pairing::{Expect, Link, Resume};
use super::upstream::{
    Placement, UpstreamWrite, close_requests, placement, remember, send_call, send_requests, send_unencoded,
};
use super::{Injection, ReadSize, RequestsEnd, Shared, Wait, drain, link, sleep_until};
use crate::app::App;
use crate::fence::Client;
use crate::fence::plan::{InExec, Intercept, Plan, after_command};
use crate::fence::probe::{PROBE_MIN_OPS, Probe};
use crate::fence::script::{BATCH_MAX_OPS, BATCH_MAX_WORDS, ScriptCall, batch as batch_call};
use crate::fence::translate::ScriptReply;
use crate::redis::UpstreamError;
use crate::redis::login;
use crate::resp::command::{CacheOp, Command, ReplyMode};
use crate::resp::encode;
use crate::resp::request::{INLINE_MAX, ProtocolError, RequestFramer};
use crate::telemetry::{Class, ClassCounts};

/// Client → upstream.
pub(super) async fn forward_requests<R, W>(
    (client, unread): (&mut R, BytesMut),
    upstream: &mut W,
    shared: &Shared,
    app: &App,
    fence: Option<&Client<'_>>,
    mut injections: mpsc::Receiver<Box<Injection>>,
    shutdown: &mut watch::Receiver<bool>,
) -> RequestsEnd
where
    R: AsyncRead + Unpin,
    W: UpstreamWrite,
{
    let mut buf = unread;
    let mut read_size = ReadSize::new();
    let frames = || shared.pairing().frames_pushed();
    // Requests read before the upstream answered are framed first.
    let mut unframed = !buf.is_empty();
    let mut state = RequestState {
        framer: RequestFramer::new(app.live.max_frame_size()),
        reply_mode: ReplyMode::On,
        in_multi: false,
        multi_pubsub: false,
        multi_login: false,
        discarding: false,
        shared: upstream.shared().is_some(),
        remembered: Vec::new(),
        resp3_pool: false,
        run: Run::default(),
    };
    // After a shutdown or the client's end, keep writing the proxy's own
    // calls: replies already owed may depend on them.
    let mut reading = !*shutdown.borrow();
    if !reading {
        drain(shared);
    }
    // The shutdown, waited for with a clone (the session's own receiver
    // marks what it saw).
    let mut changes = shutdown.clone();
    let stopping = shutdown.clone();
    let mut stopped = Wait::new(
        Box::pin(async move {
            let _ = changes.changed().await;
        }),
        move || stopping.has_changed().unwrap_or(true),
    );
    // A `SYNC` sent and not answered yet: the client is not read meanwhile.
    let mut syncing = false;
    // A probed run's `MGET` sent and not answered yet: nothing more of the
    // client's is sent (or read) until its writes are ([`Pairing::resume`]).
    let mut probing = false;
    loop {
        // The shutdown: looked for here at every turn (a busy client's
        // read is always ready first), and woken for by `stopped`.
        if reading && !matches!(shutdown.has_changed(), Ok(false)) {
            // Seen, as `changed()` on it would have marked it.
            shutdown.borrow_and_update();
            reading = false;
            drain(shared);
        }
        let room = shared.pairing().has_room(app.live.max_pending());
        state.framer.set_max_bulk_len(app.live.max_frame_size());
        let timeout = app.live.timeout();
        read_size.prepare(&mut buf);
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
            // In this order, so that a client whose bytes are there costs one
            // poll: the proxy's own calls first (they must not wait for a
            // busy client), the client, then what only a quiet turn needs.
            // The shutdown is also looked for at the top of every turn.
            tokio::select! {
            biased;
            injection = injections.recv(), if fence.is_some() && !syncing => {
                let Some(injection) = injection else { return RequestsEnd::RepliesDone };
                let fence = fence.expect("injections imply fences");
                let bytes = fence.encode(&injection.call, injection.reload);
                shared.pairing().push(injection.expect);
                if let Err(error) = send_requests(upstream, &bytes, frames).await {
                    debug!(%error, "upstream write failed");
                    return RequestsEnd::UpstreamGone;
                }
                continue;
            }
            read = client.read_buf(&mut buf), if reading && room && !syncing && !probing => read,
            _ = shared.room.notified(), if reading && !room && !syncing && !probing => continue,
            _ = shared.resumed.notified(), if probing => {
                let Some(steps) = shared.pairing().resume.take() else { continue };
                let fence = fence.expect("probes imply fences");
                let size = steps
                    .iter()
                    .map(|step| match step {
                        Resume::Send(step, _) => step.len(),
                        // About a call's encoding (sized again if longer).
                        Resume::Call(call, _) => call.weight() + 128,
                    })
                    .sum();
                let mut bytes = BytesMut::with_capacity(size);
                {
                    let mut pairing = shared.pairing();
                    for step in steps {
                        let expect = match step {
                            Resume::Send(step, expect) => {
                                bytes.extend_from_slice(&step);
                                expect
                            }
                            Resume::Call(call, reply) => {
                                bytes.extend_from_slice(&fence.encode(&call, false));
                                Expect::fence(Intercept::Script { call, reply, slot: None })
                            }
                        };
                        pairing.push(expect);
                    }
                    pairing.resumed();
                }
                if let Err(error) = send_requests(upstream, &bytes, frames).await {
                    debug!(%error, "upstream write failed");
                    return RequestsEnd::UpstreamGone;
                }
                if let Some(tx) = upstream.shared() {
                    tx.planned_sent();
                }
                // What was read behind the run is framed now.
                (probing, unframed) = (false, !buf.is_empty());
                continue;
            }
            _ = shared.link.notified(), if syncing => {
                let raw = {
                    let mut pairing = shared.pairing();
                    if pairing.link == Link::Refused {
                        pairing.link = Link::Normal;
                        (syncing, unframed) = (false, !buf.is_empty());
                    }
                    pairing.link == Link::Raw
                };
                if raw {
                    return link::requests(client, upstream, buf, reading, shutdown).await;
                }
                continue;
            }
            // The top of the loop acts on it (the session's own receiver
            // has not seen the change).
            _ = &mut stopped, if reading => continue,
            _ = sleep_until(idle_deadline) => {
                let timeout = timeout.expect("a deadline implies a timeout");
                if shared.pairing().is_idle() && Instant::now() >= shared.last_activity() + timeout {
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
                close_requests(upstream).await;
                reading = false;
                continue;
            }
            Ok(n) => {
                read_size.observe(n);
                shared.touch(&app.live);
            }
            Err(error) => {
                debug!(%error, "client read failed");
                return RequestsEnd::ClientGone;
            }
        }
        if state.discarding {
            buf.clear();
            continue;
        }
        if let Some(tx) = upstream.shared() {
            tx.planning();
        }
        let mut batch = frame_requests(&buf, &mut state, shared, app, fence);
        // Requests as the client sent them carry no fence call: they may
        // follow a failover to the new master.
        if let (None, None, false, Some(tx)) = (&batch.rewritten, &batch.call, batch.probe, upstream.shared())
        {
            tx.planned_sent();
        }
        let written = match (&batch.rewritten, batch.call.take()) {
            (Some(bytes), call) => send_call(upstream, bytes, frames, call).await,
            // The batch is its call, not encoded: the shared connection does it.
            (None, Some(call)) => send_unencoded(upstream, call, frames).await,
            (None, None) if batch.complete > 0 => {
                send_requests(upstream, &buf[..batch.complete], frames).await
            }
            (None, None) => Ok(()),
        };
        if let Err(error) = written {
            debug!(%error, "upstream write failed");
            return RequestsEnd::UpstreamGone;
        }
        // A probed run's steps are planned already, and sent at its resume.
        if let (false, Some(tx)) = (batch.probe, upstream.shared()) {
            tx.planned_sent();
        }
        buf.advance(batch.complete);
        probing = batch.probe;
        if batch.quit {
            reading = false;
            buf.clear();
        }
        if batch.wake {
            shared.wake_replies();
        }
        if let Some(resp3) = batch.protocol {
            let switched = match upstream.shared() {
                Some(upstream) => upstream.switch(resp3).await,
                None => Ok(()),
            };
            match switched {
                Ok(()) => state.resp3_pool = resp3,
                // A Redis without RESP3 (or an ACL without HELLO): the
                // client's HELLO goes on a connection of its own, and
                // Redis answers it there.
                Err(UpstreamError::Rejected { .. }) => batch.pin = Some(false),
                Err(error) => {
                    cannot_move(shared, app, &error, "the RESP3 shared connection");
                    reading = false;
                    buf.clear();
                    continue;
                }
            }
            if batch.pin.is_none() {
                unframed = !buf.is_empty();
                continue;
            }
        }
        if let Some(carry_writes) = batch.pin {
            let pinned = match upstream.shared() {
                Some(upstream) => upstream.pin(carry_writes, &state.remembered).await,
                None => Ok(()),
            };
            if let Err(error) = pinned {
                cannot_move(shared, app, &error, "a connection of its own");
                reading = false;
                buf.clear();
                continue;
            }
            state.shared = false;
            shared.pairing().new_connection();
            unframed = !buf.is_empty();
            continue;
        }
        if batch.sync {
            let raw = shared.pairing().link == Link::Raw;
            if raw {
                return link::requests(client, upstream, buf, reading, shutdown).await;
            }
            syncing = true;
            continue;
        }
        if let Some(error) = batch.failure {
            app.metrics.protocol_errors.inc();
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

/// The session could not move to another upstream connection: the client
/// gets the error and is closed, as when its first connection cannot be
/// opened.
fn cannot_move(shared: &Shared, app: &App, error: &UpstreamError, to: &'static str) {
    app.metrics.upstream_connect_errors.inc();
    warn!(%error, to, "cannot move client to another upstream connection");
    shared.reply_locally(encode::error(&format!("ERR cachefence: {error}")), true);
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
    /// The transaction queued a command that may change how Redis greets
    /// a new connection ([`login::may_change`]).
    multi_login: bool,
    /// A protocol error under `CLIENT REPLY OFF`: input is read and dropped.
    discarding: bool,
    /// On a shared upstream connection: commands that need a connection of
    /// their own move the session first ([`placement`]).
    shared: bool,
    /// `CLIENT SETNAME` / `SETINFO` sent on the shared connection, to send
    /// again on the session's own.
    remembered: Vec<bytes::Bytes>,
    /// On the RESP3 shared connection.
    resp3_pool: bool,
    /// Kept between batches, empty, for its vectors' room: a client that
    /// does not pipeline would allocate them for every request.
    run: Run,
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
    /// A `SYNC` ended the batch (sent last in it).
    sync: bool,
    /// A probed run's `MGET` ended the batch (sent last in it): what
    /// follows it waits for its reply.
    probe: bool,
    /// The next command needs a connection of the session's own: the batch
    /// ends before it (framed again once the session moved); `true`: the
    /// session's writes must be carried over ([`super::upstream::SharedTx::pin`]).
    pin: Option<bool>,
    /// A `QUIT` on a shared connection, answered by the proxy: nothing after
    /// it is read.
    quit: bool,
    /// The next command is a `HELLO` of the other protocol: the batch ends
    /// before it, and the session moves to the shared connection of it.
    protocol: Option<bool>,
    /// What is sent is this one fence script call alone, as `EVALSHA` (a
    /// shared connection may run it in a batch call with other sessions').
    /// Without `rewritten`, it is not encoded: the shared connection
    /// encodes it, alone or in a batch call, where it writes it.
    call: Option<ScriptCall>,
}

/// Frames every complete request at the front of `buf` and queues what each
/// expects back.
fn frame_requests(
    buf: &[u8],
    state: &mut RequestState,
    shared: &Shared,
    app: &App,
    fence: Option<&Client<'_>>,
) -> Batch {
    let mut pairing = shared.pairing();
    let mut batch = Batch {
        complete: 0,
        rewritten: None,
        wake: false,
        failure: None,
        sync: false,
        probe: false,
        pin: None,
        quit: false,
        protocol: None,
        call: None,
    };
    // Bytes of `buf` already copied into `rewritten`.
    let mut copied = 0;
    // Fenced writes and stores framed in a row, not sent yet: they go as one
    // script call when something else comes, or at the end of the batch.
    let mut run = std::mem::take(&mut state.run);
    let mut classes: ClassCounts = [0; 3];
    // The `[[cache]]` sections, loaded once per batch (at its first fenced command).
    let mut scope = None;
    loop {
        let frame = match state.framer.next(&buf[batch.complete..]) {
            Ok(Some(frame)) => frame,
            Ok(None) if buf.len() - batch.complete > app.live.max_frame_size() + INLINE_MAX => {
                batch.failure = Some(ProtocolError(format!(
                    "request larger than max_frame_size ({} bytes)",
                    app.live.max_frame_size()
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
        if state.shared {
            match placement(command, &frame, request, pairing.db) {
                Placement::Shared => {}
                Placement::Remembered => remember(&mut state.remembered, request),
                Placement::Protocol { resp3 } if resp3 == state.resp3_pool => {}
                Placement::Protocol { resp3 } => {
                    run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, false);
                    batch.complete = start;
                    batch.protocol = Some(resp3);
                    break;
                }
                place @ (Placement::Own | Placement::OwnAfterWrites) => {
                    run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, false);
                    batch.complete = start;
                    batch.pin = Some(place == Placement::OwnAfterWrites);
                    break;
                }
                Placement::Quit => {
                    run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, false);
                    pairing.push_request(Expect::Local {
                        reply: Bytes::from_static(b"+OK\r\n"),
                        close: true,
                    });
                    splice(buf, &mut batch.rewritten, &mut copied, start..batch.complete, &[]);
                    pairing.quit_locally = true;
                    (batch.wake, batch.quit) = (true, true);
                    classes[Class::Passthrough as usize] += 1;
                    break;
                }
            }
        }
        // A command that cannot join the run ends it; a probed run ends the
        // batch too, before this command (framed again after the probe).
        if !run.calls.is_empty()
            && !Run::may_take(command, state.in_multi)
            && run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, true)
        {
            (batch.complete, batch.probe) = (start, true);
            break;
        }
        // Inside MULTI Redis refuses it (and queues nothing): an ordinary command.
        if command == Command::Sync && !state.in_multi {
            run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, false);
            batch.sync = true;
            // With replies off a refusal would not be seen: whatever comes is the link.
            let inspect = Expect::for_command(command, &mut state.reply_mode).is_some();
            pairing.push_request(Expect::Sync { inspect });
            pairing.link = if inspect { Link::Pending } else { Link::Raw };
            classes[Class::Passthrough as usize] += 1;
            break;
        }
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
        // Known once its reply (its `EXEC`'s, in a transaction) is routed.
        let login_change = app.logins.is_some()
            && match command {
                Command::Plain if login::may_change(&frame, request) => {
                    state.multi_login |= state.in_multi;
                    !state.in_multi
                }
                Command::EndMulti | Command::Reset => std::mem::take(&mut state.multi_login),
                _ => false,
            };
        // Where Redis would refuse the command anyway (unauthenticated,
        // RESP2 subscribed) or its reply is not its own (MULTI, CLIENT REPLY),
        // it goes as it is.
        let interceptable = state.reply_mode == ReplyMode::On && pairing.may_intercept();
        let queued = state.in_multi && fence.is_some() && interceptable && command != Command::Multi;
        let mut plan = match (fence, command) {
            // Reads inside MULTI answer later, in EXEC: no miss handling there.
            (Some(_), Command::CacheOp(CacheOp::Get | CacheOp::GetEx | CacheOp::MGet)) if state.in_multi => {
                None
            }
            (Some(fence), Command::CacheOp(fenced)) if interceptable => {
                let scope = scope.get_or_insert_with(|| fence.fences.scope());
                fence.plan(scope, fenced, &frame, request, state.in_multi, pairing.db)
            }
            // Inside MULTI the reply comes in EXEC: not filtered there.
            (Some(_), Command::Keyspace(op)) if interceptable && !state.in_multi => {
                Some(Plan::Forward(Intercept::Keyspace(op)))
            }
            (Some(fence), Command::Admin) if interceptable && !state.in_multi => {
                Some(crate::admin::plan(fence, app, &frame, request, pairing.db))
            }
            _ => None,
        };
        // A GET of a section whose reads mostly miss goes as the miss script
        // itself (`fence::direct`), from a client on a shared connection
        // (on one of its own, the GETs it sends are its state: tracking).
        // Looked at by reference: moving the plan costs every command a copy.
        let direct = match (&plan, fence) {
            (Some(Plan::Forward(Intercept::Get { policy, .. })), Some(fence)) => {
                state.shared
                    && command == Command::CacheOp(CacheOp::Get)
                    && fence.fences.miss_scores.direct(*policy)
            }
            _ => false,
        };
        if direct
            && let (Some(Plan::Forward(Intercept::Get { key, policy })), Some(fence)) = (plan.take(), fence)
        {
            plan = Some(fence.direct_read(key, policy, !pairing.has_pipelined(), pairing.is_resp3()));
        }
        let class = match (&plan, command) {
            (None, _) => Class::Passthrough,
            (Some(_), Command::Admin) => Class::Admin,
            (Some(_), _) => Class::Intercepted,
        };
        classes[class as usize] += 1;
        // Matched by reference: moving the plan costs every command (a GET
        // hit too) a copy of it.
        let joins_run = matches!(
            &plan,
            Some(Plan::Rewrite { call, reply }) if !queued && Run::takes(call, reply)
        );
        if joins_run {
            if let Some(Plan::Rewrite { call, reply }) = plan {
                // A direct read is a run of its own: its reply is never an
                // element of a batch of the client's, and alone (a client
                // that sends one request at a time) the shared connection
                // may merge it with other sessions' calls.
                if run.holds_read() || is_direct_read(&reply) {
                    run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, false);
                }
                run.push(call, reply, start..batch.complete);
            }
            if run.calls.len() == BATCH_MAX_OPS
                && run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, true)
            {
                batch.probe = true;
                break;
            }
            continue;
        }
        if !run.calls.is_empty() {
            // A command that looked like a run's and is not (a key not
            // fenced, a rejected write): already planned, so the run goes
            // to the script (a probe would send it after this command).
            run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, false);
        }
        let (replacement, expect) = match plan {
            // In MULTI: the client's write goes as sent, the proxy's call
            // that moves its fences right behind it (with the script's
            // source: a NOSCRIPT would only show in EXEC, too late to
            // resend); the call's QUEUED and EXEC element are hidden.
            Some(Plan::Rewrite { call, reply }) if queued => {
                pairing.push_request(Expect::Queued(InExec::AsIs));
                let after = after_command(call, &reply).encode(true);
                let mut both = BytesMut::with_capacity(request.len() + after.len());
                both.extend_from_slice(request);
                both.extend_from_slice(&after);
                (Some(both.freeze()), Some(Expect::Queued(InExec::Hidden(reply))))
            }
            Some(Plan::Local(_)) | Some(Plan::Forward(_)) | None if queued => (
                None,
                Expect::for_command(command, &mut state.reply_mode).map(|_| Expect::Queued(InExec::AsIs)),
            ),
            None => match Expect::for_command(command, &mut state.reply_mode) {
                Some(_) if exec_with_pubsub || exec_fenced => (None, Some(Expect::Exec)),
                expect => (None, expect),
            },
            Some(Plan::Forward(expect)) => (None, Some(Expect::fence(expect))),
            Some(Plan::Rewrite { call, reply }) => {
                let fence = fence.expect("plans imply fences");
                let bytes = fence.encode(&call, false);
                (
                    Some(bytes),
                    Some(Expect::fence(Intercept::Script {
                        call,
                        reply,
                        slot: None,
                    })),
                )
            }
            Some(Plan::Local(reply)) => {
                batch.wake = true;
                (Some(Bytes::new()), Some(Expect::fence(Intercept::Local(reply))))
            }
        };
        match expect {
            Some(expect) => {
                pairing.push_request(expect);
                if login_change {
                    pairing.note_login_change();
                }
            }
            // No reply will tell when Redis applied it.
            None if login_change => {
                if let Some(logins) = &app.logins {
                    logins.changed();
                }
            }
            None => {}
        }
        if let Some(bytes) = replacement {
            splice(
                buf,
                &mut batch.rewritten,
                &mut copied,
                start..batch.complete,
                &bytes,
            );
        }
    }
    // Behind a protocol error's reply nothing more may be sent.
    let probe = batch.failure.is_none() && !batch.sync;
    // The batch is one fenced write and nothing else (a client that does
    // not pipeline): a shared connection may merge it.
    let alone = run.calls.len() == 1 && run.span == (0..batch.complete) && batch.failure.is_none();
    run.unencoded = alone && state.shared;
    if run.flush(buf, &mut batch.rewritten, &mut copied, &mut pairing, fence, probe) {
        batch.probe = true;
    }
    batch.call = run.lone.take().filter(|_| alone);
    run.clear();
    state.run = run;
    if let Some(out) = &mut batch.rewritten {
        out.extend_from_slice(&buf[copied..batch.complete]);
    }
    if classes != [0; 3] {
        for class in Class::ALL {
            app.metrics.commands[class as usize].add(u64::from(classes[class as usize]));
        }
        // Latency is only timed where someone can read it (a clock read
        // per batch on each side).
        if app.metrics_addr.is_some() {
            pairing.mark(Instant::now(), classes);
        }
    }
    batch
}

/// A `GET` sent as the miss script ([`crate::fence::direct`]).
fn is_direct_read(reply: &ScriptReply) -> bool {
    matches!(reply, ScriptReply::Miss { direct: true, .. })
}

/// Puts `bytes` in place of `buf[span]` in what is sent (`rewritten`, made
/// on the first replacement of the batch; `copied` is how far `buf` was
/// copied into it).
fn splice(
    buf: &[u8],
    rewritten: &mut Option<BytesMut>,
    copied: &mut usize,
    span: std::ops::Range<usize>,
    bytes: &[u8],
) {
    let out = rewritten.get_or_insert_with(|| BytesMut::with_capacity(buf.len() + bytes.len()));
    out.extend_from_slice(&buf[*copied..span.start]);
    out.extend_from_slice(bytes);
    *copied = span.end;
}

/// Fenced writes and stores that a client pipelined, framed in a row: sent
/// as one script call ([`crate::fence::script::batch`]) whose reply becomes
/// their replies, in order, each as if it had run alone. A script call
/// costs Redis a fixed 4 µs or so (the call, `TIME`, the script's set-up)
/// before any work: a pipeline of 16 `SET`s pays it once, not 16 times.
#[derive(Default)]
struct Run {
    calls: Vec<ScriptCall>,
    replies: Vec<ScriptReply>,
    /// The bytes of `buf` the commands span (nothing else is between them:
    /// any other command ends the run).
    span: std::ops::Range<usize>,
    /// Each command's own bytes (a probe may send it as it is).
    spans: Vec<std::ops::Range<usize>>,
    /// The last flush sent one call alone, as `EVALSHA`: a copy of it.
    lone: Option<ScriptCall>,
    /// Set for the last flush of a batch that is one call on a shared
    /// connection: a lone call is not encoded (nor spliced) there, the
    /// connection does it, most often in a batch call with other sessions'
    /// ([`crate::redis::shared`]).
    unencoded: bool,
}

impl Run {
    /// Whether a rewritten command may join a run: writes, invalidations
    /// and judged stores of a size the script slices easily.
    fn takes(call: &ScriptCall, reply: &ScriptReply) -> bool {
        (matches!(
            reply,
            ScriptReply::Set { .. } | ScriptReply::Command { .. } | ScriptReply::Ok { .. }
        ) || is_direct_read(reply))
            && call.keys.len() + call.args.len() <= BATCH_MAX_WORDS
    }

    /// Whether the run is a direct read (which is always alone in its run).
    fn holds_read(&self) -> bool {
        self.replies.first().is_some_and(is_direct_read)
    }

    /// Empty again, its vectors' room kept.
    fn clear(&mut self) {
        self.calls.clear();
        self.replies.clear();
        self.spans.clear();
        (self.span, self.lone, self.unencoded) = (0..0, None, false);
    }

    fn push(&mut self, call: ScriptCall, reply: ScriptReply, span: std::ops::Range<usize>) {
        match self.calls.is_empty() {
            true => {
                self.span = span.clone();
                self.spans.clear();
            }
            false => self.span.end = span.end,
        }
        self.spans.push(span);
        self.calls.push(call);
        self.replies.push(reply);
    }

    /// Whether a command may join a run (if its plan says so): the
    /// commands [`Run::takes`] can take, outside `MULTI`.
    fn may_take(command: Command, in_multi: bool) -> bool {
        use CacheOp::{Delete, MSet, PSetEx, Set, SetEx, Write};
        !in_multi
            && matches!(
                command,
                Command::CacheOp(Set | SetEx | PSetEx | MSet | Write | Delete)
            )
    }

    /// Sends the run in its place, with the one expectation its reply
    /// answers: one call, or the batch of them, or (with `probe`, where
    /// [`Probe::of`] finds it worth one) the `MGET` of its fences.
    /// Whether it was a probe.
    fn flush(
        &mut self,
        buf: &[u8],
        rewritten: &mut Option<BytesMut>,
        copied: &mut usize,
        pairing: &mut super::pairing::Pairing,
        fence: Option<&Client<'_>>,
        probe: bool,
    ) -> bool {
        self.lone = None;
        let (Some(fence), false) = (fence, self.calls.is_empty()) else {
            return false;
        };
        if self.calls.len() > 1 {
            // The client sent these without waiting for replies: it pipelines.
            pairing.note_pipelined();
        }
        if probe && self.calls.len() >= PROBE_MIN_OPS {
            // Each write's request, sliced from one copy of the run's bytes.
            let sent = Bytes::copy_from_slice(&buf[self.span.clone()]);
            let at = self.span.start;
            let sent = self
                .spans
                .iter()
                .map(|span| sent.slice(span.start - at..span.end - at));
            if let Some(probe) = Probe::of(&mut self.calls, &mut self.replies, sent) {
                let bytes = probe.request();
                pairing.push_request(Expect::fence(Intercept::Probe(probe)));
                splice(buf, rewritten, copied, self.span.clone(), &bytes);
                return true;
            }
        }
        let (call, reply) = match self.calls.len() {
            1 => (self.calls.remove(0), self.replies.remove(0)),
            _ => {
                debug_assert!(
                    !self.replies.iter().any(is_direct_read),
                    "a direct read runs alone"
                );
                let call = batch_call(&self.calls);
                self.calls.clear();
                (call, ScriptReply::Batch(std::mem::take(&mut self.replies)))
            }
        };
        let lone = fence.has_loaded() && !matches!(reply, ScriptReply::Batch(_));
        if lone {
            self.lone = Some(call.clone());
        }
        if lone && self.unencoded {
            pairing.push_request(Expect::fence(Intercept::Script {
                call,
                reply,
                slot: None,
            }));
            // The client's bytes are replaced by nothing here.
            *copied = self.span.end;
            return false;
        }
        let bytes = fence.encode(&call, false);
        pairing.push_request(Expect::fence(Intercept::Script {
            call,
            reply,
            slot: None,
        }));
        splice(buf, rewritten, copied, self.span.clone(), &bytes);
        false
    }
}
