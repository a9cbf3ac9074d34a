//! Upstream → client: read what Redis sent, find frame boundaries, route
//! each frame (the reply to the head request, an unsolicited push, or the
//! reply to an intercepted request, translated by [`crate::fence::translate`])
//! and write the bytes to the client as they came — streaming a frame still
//! in progress when nothing about it needs a look. Misses are held here
//! while their miss script runs, and, for herd control (C7), while another
//! client fills the key ([`crate::fence::herd`]). Where a `SYNC` is answered
//! with anything but an error, the replication [`super::link`] starts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tracing::warn;

use super::outbox::Outbox;
use super::pairing::{Expect, Link, LocalReply, Pairing, Resume, Route};
use super::{Injection, REPLY_TIMEOUT_OFF_RECHECK, ReadSize, SessionEnd, Shared, Wait, link, sleep_until};
use crate::app::App;
use crate::fence::Client;
use crate::fence::herd::Holds;
use crate::fence::plan::{Claim, InExec, Intercept};
use crate::fence::probe::{Probe, Step};
use crate::fence::script::ScriptCall;
use crate::fence::translate::{self, MissOutcome, ScriptReply};
use crate::fence::visible::{self, Unsolicited, Visible};
use crate::resp::encode;
use crate::resp::reply::ReplyScanner;
use crate::resp::value::{Reply, Value};
use crate::telemetry::{Class, Metrics};

/// Upstream → client.
pub(super) async fn forward_replies<R, W>(
    upstream: &mut R,
    client: &mut W,
    shared: &Shared,
    app: &App,
    fence: Option<&Client<'_>>,
    mut misses: Misses,
) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut read_size = ReadSize::new();
    let mut buf = BytesMut::with_capacity(ReadSize::MIN);
    let mut scanner = ReplyScanner::default();
    let mut outbox = Outbox::default();
    // `reply_timeout` without a timer or a clock read per request: a check
    // every `reply_timeout` fires when a reply was owed at this check and the
    // last one and nothing came from Redis in between (so after 1 to 2 times
    // `reply_timeout` of silence). Without a `reply_timeout` the check only
    // looks every few seconds whether a reload set one.
    let period = || app.live.reply_timeout().unwrap_or(REPLY_TIMEOUT_OFF_RECHECK);
    let mut check = Box::pin(tokio::time::sleep(period()));
    let (mut reads, mut reads_at_check, mut due_at_check) = (0u64, 0u64, false);
    // Kept across turns, made again only once it fired: a fresh
    // `notified()` polled at every turn registers a waiter and drops it
    // again, a lock each way, for every reply read.
    let wait_woken = || {
        let woken_now = || shared.replies_woken.swap(false, Ordering::AcqRel);
        Wait::new(Box::pin(shared.wake_replies.notified()), woken_now)
    };
    let mut woken = wait_woken();
    loop {
        // Local replies owed before any further upstream frame.
        let (close, drained, linked) = {
            let mut pairing = shared.pairing();
            let close = take_locals(&mut pairing, &mut outbox);
            observe_latency(&mut pairing, &app.metrics);
            pairing.reply_held = outbox.is_holding();
            // A probed run's steps not pushed yet are owed too.
            let drained = pairing.draining
                && pairing.pending() == 0
                && pairing.resume.is_none()
                && !scanner.in_frame()
                && !outbox.is_holding();
            // A `SYNC` sent with replies off is a link as soon as it is next.
            let linked = !scanner.in_frame() && pairing.link_starts(None);
            if pairing.link != Link::Normal {
                shared.link.notify_one();
            }
            (close, drained, linked)
        };
        if linked {
            outbox.release_waiting();
            outbox.forward(&buf, scanner.scanned()..buf.len());
        }
        if outbox.write(client, &buf).await.is_err() {
            return SessionEnd::ClientWriteFailed;
        }
        if linked {
            return link::replies(upstream, client).await;
        }
        if close {
            let _ = client.shutdown().await;
            return SessionEnd::Closed;
        }
        if drained {
            let _ = client.shutdown().await;
            return SessionEnd::Drained;
        }
        read_size.prepare(&mut buf);
        // Calls of the proxy's own waiting for room (see `Injections`).
        let waiting = (!misses.injections.waiting.is_empty()).then(|| misses.injections.tx.clone());
        let read = tokio::select! {
            // Bytes already there count before the reply check does.
            biased;
            read = upstream.read_buf(&mut buf), if waiting.is_none() => read,
            _ = async { waiting.as_ref().expect("guarded").reserve().await }, if waiting.is_some() => {
                misses.injections.flush(&mut outbox);
                continue;
            }
            _ = &mut woken => {
                woken = wait_woken();
                continue;
            }
            _ = misses.wake.notified(), if !misses.holds.is_empty() => {
                misses.poll(fence.expect("herd waits imply fences"), &mut outbox, true);
                continue;
            }
            _ = sleep_until(misses.holds.next_poll()) => {
                misses.poll(fence.expect("herd waits imply fences"), &mut outbox, false);
                continue;
            }
            _ = &mut check => {
                let due = app.live.reply_timeout().is_some()
                    && (shared.pairing().awaits_upstream() || scanner.in_frame());
                if due && due_at_check && reads == reads_at_check {
                    app.metrics.upstream_timeouts.inc();
                    let reason = format!("did not reply within {:?}", period());
                    return upstream_lost(client, shared, app, fence, scanner.in_frame(), &reason).await;
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
                    app,
                    fence,
                    scanner.in_frame(),
                    "closed the connection",
                )
                .await;
            }
            Err(error) => {
                return upstream_lost(client, shared, app, fence, scanner.in_frame(), &error.to_string())
                    .await;
            }
            Ok(n) => read_size.observe(n),
        }
        let (upto, close, linked) = {
            let mut pairing = shared.pairing();
            let before = pairing.pending();
            let mut close = false;
            let mut upto = 0;
            let mut linked = false;
            loop {
                if !scanner.in_frame() && pairing.link_starts(buf.get(scanner.scanned()).copied()) {
                    // Misses still held go out as Redis answered them (their
                    // miss scripts cannot follow a SYNC Redis accepted), and
                    // everything from here is the link's: forwarded unframed.
                    outbox.release_waiting();
                    outbox.forward(&buf, scanner.scanned()..buf.len());
                    shared.link.notify_one();
                    linked = true;
                    break;
                }
                match scanner.advance(&buf) {
                    Ok(Some(frame)) => {
                        let range = frame.start..frame.end;
                        match pairing.route(frame.kind, &buf[range.clone()]) {
                            Route::Reply => outbox.forward(&buf, range),
                            // Notifications and invalidations of fences are the proxy's own.
                            Route::Unsolicited if fence.is_some() => {
                                match visible::unsolicited(&buf[range.clone()]) {
                                    Unsolicited::AsIs => outbox.forward(&buf, range),
                                    Unsolicited::Hidden => {}
                                    Unsolicited::Filtered(bytes) => outbox.send(bytes),
                                }
                            }
                            Route::Unsolicited => outbox.forward(&buf, range),
                            Route::Hidden => {}
                            // A hit costs nothing: forwarded like any reply (its
                            // section's miss score is only read while it is 0).
                            Route::Fence(Intercept::Get { policy, .. }) if !is_nil(&buf[range.clone()]) => {
                                if let Some(fence) = fence {
                                    fence.fences.miss_scores.hit(policy);
                                }
                                outbox.forward(&buf, range)
                            }
                            // A probed run's plain write: its reply as Redis sent it, or `+OK`.
                            Route::Fence(Intercept::Plain { kind, reply }) => {
                                let (resp3, db) = (pairing.is_resp3(), pairing.db);
                                let fence = fence.expect("fence expectations imply fences");
                                match fence.translate_plain(kind, &reply, &buf[range.clone()], resp3, db) {
                                    None => outbox.forward(&buf, range),
                                    Some(bytes) => outbox.send(bytes),
                                }
                            }
                            Route::Fence(expect) => {
                                let (resp3, db) = (pairing.is_resp3(), pairing.db);
                                let fence = fence.expect("fence expectations imply fences");
                                // A client that sends one request at a time.
                                let alone = !pairing.has_pipelined();
                                on_fence_reply(
                                    expect,
                                    &buf[range],
                                    (resp3, db, alone),
                                    fence,
                                    &mut outbox,
                                    &mut misses,
                                );
                                if let Some(steps) = misses.resume.take() {
                                    pairing.resume_after_probe(steps);
                                    shared.resumed.notify_one();
                                }
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
                observe_latency(&mut pairing, &app.metrics);
                // Before the client has the reply (and can connect again).
                tell_logins(&mut pairing, app);
            }
            pairing.reply_held = outbox.is_holding();
            if !close && !linked {
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
            (upto, close, linked)
        };
        if outbox.write(client, &buf).await.is_err() {
            return SessionEnd::ClientWriteFailed;
        }
        if linked {
            return link::replies(upstream, client).await;
        }
        shared.touch(&app.live);
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
    expect: Intercept,
    frame: &[u8],
    (resp3, db, alone): (bool, u32, bool),
    fence: &Client<'_>,
    outbox: &mut Outbox,
    held: &mut Misses,
) {
    let noscript = frame.starts_with(b"-NOSCRIPT");
    match expect {
        Intercept::Get { key, policy } if is_nil(frame) => {
            // A miss: hold the nil until the miss script has run.
            fence.fences.stats.misses.inc();
            fence.fences.miss_scores.missed(policy);
            let slot = outbox.hold(Bytes::copy_from_slice(frame));
            let forced = fence.fences.scope().policy_at(policy).hold.is_zero();
            let miss = fence.next_miss();
            let claim = match (forced, alone) {
                (true, _) => Claim::Force,
                (false, true) => Claim::Alone,
                (false, false) => Claim::Wait,
            };
            let call = fence.miss_call(&key, policy, claim, miss);
            let reply = ScriptReply::Miss {
                key,
                policy,
                nil: translate::nil(frame == b"_\r\n"),
                forced,
                miss,
                direct: false,
            };
            inject(&mut held.injections, call, reply, slot, false, outbox, frame);
        }
        // Hits are forwarded by the caller as ranges; this copy keeps the match total.
        Intercept::Get { .. } => outbox.send(Bytes::copy_from_slice(frame)),
        Intercept::MGet { keys } => {
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
            let slot = outbox.hold(Bytes::copy_from_slice(frame));
            held.mgets.insert(
                slot,
                MGetMisses {
                    elements,
                    waiting: misses.len(),
                },
            );
            for index in misses {
                let (key, policy) = keys[index].clone().expect("a fenced key");
                let miss = fence.next_miss();
                let call = fence.miss_call(&key, policy, Claim::Force, miss);
                let reply = ScriptReply::MGetMiss {
                    key,
                    policy,
                    index,
                    miss,
                };
                inject(&mut held.injections, call, reply, slot, false, outbox, frame);
            }
        }
        Intercept::Script { call, reply, slot } if noscript => {
            // The script cache was flushed: send it again with its source.
            fence.fences.stats.script_reloads.inc();
            let slot = slot.unwrap_or_else(|| outbox.hold(Bytes::copy_from_slice(frame)));
            inject(&mut held.injections, call, reply, slot, true, outbox, frame);
        }
        Intercept::Script {
            reply: reply @ ScriptReply::Miss { .. },
            slot: Some(slot),
            ..
        } => match fence.miss(&reply, frame, resp3) {
            MissOutcome::Reply(bytes) => {
                if held.holds.release(slot) {
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
            MissOutcome::Wait => held.hold(fence, slot, reply),
        },
        Intercept::Script {
            reply: reply @ ScriptReply::MGetMiss { index, .. },
            slot: Some(slot),
            ..
        } => {
            let value = match fence.miss(&reply, frame, resp3) {
                MissOutcome::Reply(bytes) if !bytes.is_empty() => Value::decode(&bytes, false),
                _ => None,
            };
            if let Some(state) = held.mgets.get_mut(&slot) {
                if let Some(Value::Bulk(v)) = value {
                    state.elements[index] = Reply::Bulk(v);
                }
                state.waiting -= 1;
                if state.waiting == 0 {
                    let elements = held.mgets.remove(&slot).map(|s| s.elements).unwrap_or_default();
                    outbox.resolve(slot, Reply::Array(elements).encode(resp3));
                }
            }
        }
        Intercept::Script {
            reply:
                ScriptReply::Miss {
                    key,
                    policy,
                    forced,
                    miss,
                    direct: true,
                    ..
                },
            slot: None,
            ..
        } => {
            // A direct read: the GET's reply, or its nil held while another
            // client fills the key.
            let nil = translate::nil(resp3);
            let reply = ScriptReply::Miss {
                key,
                policy,
                nil,
                forced,
                miss,
                direct: true,
            };
            let scores = &fence.fences.miss_scores;
            match frame.get(..8) {
                Some(b"*2\r\n:1\r\n") => scores.hit(policy),
                Some(b"*5\r\n:0\r\n") => {
                    fence.fences.stats.misses.inc();
                    scores.missed(policy);
                }
                _ => {}
            }
            match fence.miss(&reply, frame, resp3) {
                MissOutcome::Reply(bytes) => outbox.send(bytes),
                MissOutcome::Wait => {
                    let slot = outbox.hold(Bytes::from_static(nil));
                    held.hold(fence, slot, reply);
                }
            }
        }
        Intercept::Script {
            reply, slot: None, ..
        } => outbox.send(fence.translate(&reply, frame, resp3, db)),
        Intercept::Script {
            reply,
            slot: Some(slot),
            ..
        } => outbox.resolve(slot, fence.translate(&reply, frame, resp3, db)),
        Intercept::Keyspace(op) => match visible::keyspace_reply(op, frame, resp3) {
            Visible::Unchanged => outbox.send(Bytes::copy_from_slice(frame)),
            Visible::Filtered(bytes) => outbox.send(bytes),
            Visible::Redraw => {
                let slot = outbox.hold(Bytes::copy_from_slice(frame));
                let call = visible::random_key_call();
                inject(
                    &mut held.injections,
                    call,
                    ScriptReply::RandomKey,
                    slot,
                    false,
                    outbox,
                    frame,
                );
            }
        },
        Intercept::Probe(probe) => held.resume = Some(resume_probe(probe, frame, resp3, fence)),
        // Routed by the caller as ranges; this keeps the match total.
        Intercept::Plain { kind, reply } => match fence.translate_plain(kind, &reply, frame, resp3, db) {
            None => outbox.send(Bytes::copy_from_slice(frame)),
            Some(bytes) => outbox.send(bytes),
        },
        Intercept::Local(reply) => outbox.send(reply.encode(resp3)),
        Intercept::Exec(queued) => outbox.send(exec_reply(frame, &queued, fence, (resp3, db))),
    }
}

/// An `EXEC` array as Redis sent it, less the elements of the proxy's own
/// calls behind fenced writes (translated for their effects, then dropped),
/// with its length adjusted to match.
fn exec_reply(frame: &[u8], queued: &[InExec], fence: &Client<'_>, (resp3, db): (bool, u32)) -> Bytes {
    let Some(header) = memchr::memchr(b'\n', frame).map(|i| i + 1) else {
        return Bytes::copy_from_slice(frame);
    };
    let elements = &frame[header..];
    let mut kept = BytesMut::with_capacity(elements.len());
    let mut scanner = ReplyScanner::default();
    let (mut start, mut count) = (0, 0usize);
    for in_exec in queued {
        let Ok(Some(element)) = scanner.advance(elements) else {
            return Bytes::copy_from_slice(frame);
        };
        let bytes = &elements[start..element.end];
        match in_exec {
            InExec::AsIs => {
                kept.extend_from_slice(bytes);
                count += 1;
            }
            InExec::Hidden(reply) => drop(fence.translate(reply, bytes, resp3, db)),
        }
        start = element.end;
    }
    let mut out = BytesMut::with_capacity(kept.len() + 16);
    out.extend_from_slice(format!("{}{count}\r\n", frame[0] as char).as_bytes());
    out.extend_from_slice(&kept);
    out.extend_from_slice(&elements[start..]);
    out.freeze()
}

/// A probed run's writes as its `MGET` reply decides ([`Probe::steps`]):
/// what the requests direction sends next, with what each expects back.
/// Nothing of the client's was sent behind the probe, so their replies
/// are the next the client gets: they take their places as they come.
fn resume_probe(probe: Probe, frame: &[u8], resp3: bool, fence: &Client<'_>) -> Vec<Resume> {
    let stats = &fence.fences.stats;
    stats.probes.inc();
    let steps = probe.steps(frame, resp3);
    let mut resume = Vec::with_capacity(steps.len());
    for step in steps {
        match step {
            Step::Plain { command, kind, reply } => {
                stats.probed_plain.inc();
                resume.push(Resume::Send(
                    command,
                    Expect::fence(Intercept::Plain { kind, reply }),
                ));
            }
            Step::Script { call, reply } => {
                stats.probed_script.add(reply.replies() as u64);
                resume.push(Resume::Call(call, reply));
            }
        }
    }
    resume
}

/// The proxy's own calls on their way to the requests direction, which
/// sends them upstream.
pub(super) struct Injections {
    tx: mpsc::Sender<Box<Injection>>,
    /// Calls the channel had no room for, in order, each with what its held
    /// reply is released as if they can never be sent. While any wait,
    /// nothing more is read from upstream: the requests direction takes
    /// them as fast as it can write them, so the wait is bounded, and a
    /// miss keeps its fence (released without its call, its nil would come
    /// without a ticket, and the client's fill would count as a write).
    waiting: VecDeque<(Box<Injection>, u64, Bytes)>,
}

impl Injections {
    pub(super) fn new(tx: mpsc::Sender<Box<Injection>>) -> Injections {
        Injections {
            tx,
            waiting: VecDeque::new(),
        }
    }

    /// Moves waiting calls into the channel while it has room; once the
    /// requests direction is gone, their replies are released as they are.
    fn flush(&mut self, outbox: &mut Outbox) {
        while let Some((injection, slot, release)) = self.waiting.pop_front() {
            match self.tx.try_send(injection) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(injection)) => {
                    self.waiting.push_front((injection, slot, release));
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => outbox.resolve(slot, release),
            }
        }
    }
}

/// Asks the requests direction to send one of the proxy's own calls,
/// whose reply is held in `slot`; if that can never happen (the requests
/// direction ended), the held reply is released as it is.
fn inject(
    injections: &mut Injections,
    call: ScriptCall,
    reply: ScriptReply,
    slot: u64,
    reload: bool,
    outbox: &mut Outbox,
    fallback: &[u8],
) {
    let release = match &reply {
        ScriptReply::Miss { nil, .. } => Bytes::from_static(nil),
        // A batch owes one reply per command.
        _ => Bytes::from(fallback.repeat(reply.replies())),
    };
    let expect = Expect::fence(Intercept::Script {
        call: call.clone(),
        reply,
        slot: Some(slot),
    });
    let injection = Box::new(Injection { call, reload, expect });
    injections.waiting.push_back((injection, slot, release));
    injections.flush(outbox);
}

/// Passes on what the replies just routed taught about how Redis greets a
/// new connection ([`crate::redis::login`]).
fn tell_logins(pairing: &mut Pairing, app: &App) {
    let Some(logins) = &app.logins else { return };
    if pairing.take_login_changed() {
        logins.changed();
    }
    if let Some(generation) = pairing.take_asked_for_auth() {
        logins.asked_for_auth(generation);
    }
}

fn is_nil(frame: &[u8]) -> bool {
    frame == b"$-1\r\n" || frame == b"_\r\n"
}

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

/// Moves the local replies at the head of the queue into the outbox.
/// Returns true once one of them closes the connection and nothing is held
/// before it any more.
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
    app: &App,
    fence: Option<&Client<'_>>,
    mid_frame: bool,
    reason: &str,
) -> SessionEnd {
    let (owed, deletes) = {
        let mut pairing = shared.pairing();
        let abandoned = pairing.abandon();
        tell_logins(&mut pairing, app);
        abandoned
    };
    if let Some(fence) = fence {
        for (db, keys) in deletes {
            // The client gets an error; the delete is retried until Redis takes it (C3).
            fence.fences.undelivered.push(db, &keys);
        }
    }
    if owed > 0 {
        app.metrics.upstream_lost.inc();
        warn!(owed, reason, "upstream connection lost with replies pending");
        if !mid_frame {
            let addr = app.config.upstream.addr();
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

/// Misses in progress on this connection: those held while another client
/// fills the key (herd control, C7), and `MGET` replies waiting for their
/// misses.
pub(super) struct Misses {
    holds: Holds,
    mgets: HashMap<u64, MGetMisses>,
    /// Woken by [`crate::fence::Fences::wake`] when a fill, refusal or
    /// invalidation of a watched key passes through this process.
    wake: Arc<Notify>,
    injections: Injections,
    /// A probed run's steps, from the reply just routed, for the requests
    /// direction ([`super::pairing::Pairing::resume`]).
    resume: Option<Vec<Resume>>,
}

/// An `MGET` reply being rebuilt: its elements, and how many miss scripts
/// are still to answer.
struct MGetMisses {
    elements: Vec<Reply>,
    waiting: usize,
}

impl Misses {
    pub(super) fn new(injections: mpsc::Sender<Box<Injection>>) -> Misses {
        Misses {
            holds: Holds::default(),
            mgets: HashMap::new(),
            wake: Arc::new(Notify::new()),
            injections: Injections::new(injections),
            resume: None,
        }
    }

    /// Holds a miss whose herd lease another client has.
    fn hold(&mut self, fence: &Client<'_>, slot: u64, reply: ScriptReply) {
        let ScriptReply::Miss { key, policy, .. } = &reply else {
            return;
        };
        let hold = fence.fences.scope().policy_at(*policy).hold;
        fence.fences.watch(key, &self.wake);
        if self.holds.hold(slot, reply, hold, Instant::now()) {
            fence.fences.stats.holds.inc();
        }
    }

    /// Asks Redis again for the held misses that are due (all of them when
    /// woken in-process).
    fn poll(&mut self, fence: &Client<'_>, outbox: &mut Outbox, woken: bool) {
        for (slot, reply) in self.holds.due(Instant::now(), woken) {
            let ScriptReply::Miss {
                key,
                policy,
                nil,
                forced,
                miss,
                ..
            } = &reply
            else {
                continue;
            };
            let claim = if *forced { Claim::Force } else { Claim::Wait };
            let call = fence.miss_call(key, *policy, claim, *miss);
            let nil = *nil;
            inject(&mut self.injections, call, reply, slot, false, outbox, nil);
        }
    }
}
