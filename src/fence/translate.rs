//! The reply rules: how the reply to an intercepted request — a fence
//! script's, or Redis' own to a forwarded `GET` — becomes the reply the
//! client expects, byte for byte what Redis would have sent where the
//! fence let the command through.

use bytes::Bytes;

use super::Refusal;
use super::client::Client;
use super::history::{Source, What};
use super::plan::stale_reply;
use super::probe::PlainKind;
use crate::resp::value::{Reply, Value};

/// How a fence script's reply becomes the client's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptReply {
    /// The proxy's miss script after a nil `GET`: the value that appeared,
    /// or the original nil (`nil`, in the client's protocol) and a ticket.
    /// Unless `forced`, a miss whose herd lease another client holds waits.
    /// `miss` names it (its herd lease and its ticket in the fence). With
    /// `direct`, the script was sent in place of the client's `GET`
    /// ([`super::direct`]): its reply is that `GET`'s (a value, an error,
    /// or nil with a ticket).
    Miss {
        key: Bytes,
        policy: usize,
        /// The nil Redis sent (`$-1` or RESP3's `_`), released with a ticket.
        nil: &'static [u8],
        forced: bool,
        miss: u64,
        direct: bool,
    },
    /// A fill: `+OK` stored, nil when `NX` kept an existing value, and a
    /// refusal answered per `on_stale_fill` — or, for `CACHE.FILL`
    /// (`lease_api`), `+OK` / `+STALE`.
    Fill {
        policy: usize,
        key: Bytes,
        lease_api: bool,
    },
    /// `CACHE.GET`: `[value, nil]` on a hit, `[nil, token]` on a miss.
    LeaseGet { key: Bytes },
    /// The miss script for element `index` of a held `MGET` reply (never
    /// waits for another client's fill).
    MGetMiss {
        key: Bytes,
        policy: usize,
        index: usize,
        miss: u64,
    },
    /// A plain store of a fenced key, judged in Redis: a fill (stored,
    /// refused, or not stored for `NX`), or a write per `on_write` (the
    /// command's own reply, `+OK` for a delete, or the `reject` error).
    Set { policy: usize, key: Bytes },
    /// A write or invalidation running the client's own command: its reply,
    /// with Lua's `false` turned back into the protocol's nil. `keys` are
    /// the keys it names; their held misses are woken, and an invalidation
    /// (by `Source`) ends in [`super::epilogue`].
    Command {
        keys: Vec<Bytes>,
        invalidation: Option<Source>,
    },
    /// `on_write = "invalidate"` of a SET-family command: `+OK`.
    Ok { keys: Vec<Bytes> },
    /// `CACHE.FENCE key`.
    FenceInfo { key: Bytes },
    /// The `RANDOMKEY` script ([`super::visible::random_key_call`]), sent
    /// after Redis' own `RANDOMKEY` drew a fence: a key, or nil.
    RandomKey,
    /// Several pipelined writes and stores in one script call
    /// ([`super::script::batch`]): one element per operation, each becoming
    /// that command's reply as if it had run alone, in order.
    Batch(Vec<ScriptReply>),
}

impl ScriptReply {
    fn invalidated_by(&self) -> Option<Source> {
        match self {
            ScriptReply::Command { invalidation, .. } => *invalidation,
            _ => None,
        }
    }

    /// The keys of an invalidation (`DEL`, `UNLINK`, `GETDEL`, `CACHE.INVALIDATE`).
    pub fn invalidated_keys(&self) -> Option<Vec<Bytes>> {
        match self {
            ScriptReply::Command {
                keys,
                invalidation: Some(_),
            } => Some(keys.clone()),
            ScriptReply::Batch(items) => {
                let keys: Vec<Bytes> = items
                    .iter()
                    .filter_map(ScriptReply::invalidated_keys)
                    .flatten()
                    .collect();
                (!keys.is_empty()).then_some(keys)
            }
            _ => None,
        }
    }

    /// How many client replies this becomes.
    pub fn replies(&self) -> usize {
        match self {
            ScriptReply::Batch(items) => items.len(),
            _ => 1,
        }
    }
}

/// The `set` operation's reply for a store turned into a delete.
const SET_INVALIDATED: &[u8] = b":4\r\n";
/// A fill's reply when it was stored (`fill` and `set` operations).
const FILL_STORED: &[u8] = b":1\r\n";
/// The `set` operation's reply for a write `on_write = "reject"` refused.
const SET_REJECTED: &[u8] = b":5\r\n";

/// The nil of a protocol, as a `GET` answers it: RESP3's `_` or RESP2's `$-1`.
pub fn nil(resp3: bool) -> &'static [u8] {
    if resp3 { b"_\r\n" } else { b"$-1\r\n" }
}

/// `+OK`, the same in RESP2 and RESP3.
fn ok() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

/// What a miss script's reply means for the held `GET`.
#[derive(Debug)]
pub enum MissOutcome {
    /// Release this reply (the value, or nil with a ticket issued).
    Reply(Bytes),
    /// Another client holds the herd lease: keep waiting for its fill.
    Wait,
}

impl Client<'_> {
    /// Turns a fence script's reply into the client's reply. An error from
    /// Redis (the script could not run, or the client's own command failed
    /// inside it) is the client's reply as Redis sent it.
    pub fn translate(&self, reply: &ScriptReply, frame: &[u8], resp3: bool, db: u32) -> Bytes {
        if let ScriptReply::Batch(items) = reply {
            return self.batch_reply(items, frame, resp3, db);
        }
        if let ScriptReply::Command { .. } | ScriptReply::Ok { .. } = reply {
            // Writes and invalidations, the common case: no decoding needed.
            return match self.command_effects(reply, frame, db) {
                false => Bytes::copy_from_slice(frame),
                true if matches!(reply, ScriptReply::Ok { .. }) => ok(),
                // Lua's false (a nil inside the script) reaches a RESP3 client
                // as a boolean; the client's command answered nil.
                true if frame == b"#f\r\n" => Reply::Nil.encode(resp3),
                true => Bytes::copy_from_slice(frame),
            };
        }
        if let ScriptReply::Set { policy, key } = reply {
            return self.set_reply(*policy, key, frame, resp3, db);
        }
        if let ScriptReply::RandomKey = reply {
            // Lua's false: nil in RESP2, a boolean in RESP3.
            return match frame {
                b"$-1\r\n" | b"_\r\n" | b"#f\r\n" => Reply::Nil.encode(resp3),
                other => Bytes::copy_from_slice(other),
            };
        }
        let value = Value::decode(frame, resp3);
        match (reply, value) {
            (_, Some(Value::Error(_))) | (_, None) => Bytes::copy_from_slice(frame),
            // Misses are handled by the session (they may wait); total anyway.
            (ScriptReply::Miss { nil, .. }, _) => match self.miss(reply, frame, resp3) {
                MissOutcome::Reply(bytes) => bytes,
                MissOutcome::Wait => Bytes::from_static(nil),
            },
            (ScriptReply::LeaseGet { key }, Some(Value::Array(items))) => {
                let field = |i: usize| {
                    items
                        .get(i)
                        .and_then(Value::as_bytes)
                        .cloned()
                        .unwrap_or_default()
                };
                match items.first().and_then(Value::as_int) {
                    Some(1) => Reply::Array(vec![Reply::Bulk(field(1)), Reply::Nil]).encode(resp3),
                    _ => {
                        self.fences.stats.tickets_issued.inc();
                        let version = std::str::from_utf8(&field(1))
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        self.record(key, What::Miss { version });
                        let token = lease_token(&field(1), &field(3));
                        Reply::Array(vec![Reply::Nil, Reply::Bulk(token)]).encode(resp3)
                    }
                }
            }
            (
                ScriptReply::Fill {
                    policy,
                    key,
                    lease_api,
                },
                Some(verdict @ (Value::Array(_) | Value::Int(1))),
            ) => {
                // Stored, the usual verdict, is a number, not an array.
                let items = match &verdict {
                    Value::Array(items) => &items[..],
                    stored => std::slice::from_ref(stored),
                };
                self.fill_reply(*policy, key, items, *lease_api).encode(resp3)
            }
            (ScriptReply::FenceInfo { key }, Some(Value::Array(items))) => {
                self.fence_info(key, &items).encode(resp3)
            }
            (_, Some(_)) => Bytes::copy_from_slice(frame),
        }
    }

    /// What a write's or an invalidation's reply (`Command`, `Ok`) sets
    /// off; whether it succeeded. An error: a delete Redis refused while
    /// loading or running a script is retried like an undeliverable one,
    /// so the value it meant to remove goes (C3). Else an invalidation ends
    /// in the epilogue, a write wakes the held misses of its keys.
    fn command_effects(&self, reply: &ScriptReply, frame: &[u8], db: u32) -> bool {
        let (ScriptReply::Command { keys, .. } | ScriptReply::Ok { keys }) = reply else {
            return true;
        };
        if matches!(frame.first(), Some(b'-' | b'!')) {
            if let Some(keys) = reply.invalidated_keys()
                && (frame.starts_with(b"-LOADING") || frame.starts_with(b"-BUSY"))
            {
                self.fences.undelivered.push(db, &keys);
            }
            return false;
        }
        let invalidation = match reply {
            // `on_write = "invalidate"`: the client's write became a delete.
            ScriptReply::Ok { .. } => Some(Source::Client),
            _ => reply.invalidated_by(),
        };
        match invalidation {
            Some(source) => self
                .fences
                .epilogue
                .after_invalidation(db, keys, source, self.connection),
            None => self.fences.epilogue.after_write(db, keys),
        }
        true
    }

    /// The reply to a write of a probed run that went without the script
    /// ([`super::probe`]), counted and acted on as the script's reply to it
    /// would have been: `None` when the client's reply is `frame` as Redis
    /// sent it (the command's own reply, an error), else `+OK` for the
    /// `DEL` a store became.
    pub fn translate_plain(
        &self,
        kind: PlainKind,
        reply: &ScriptReply,
        frame: &[u8],
        resp3: bool,
        db: u32,
    ) -> Option<Bytes> {
        match kind {
            // A plain command's reply is never Lua's false: the bytes stay,
            // but for the `DEL` a store became.
            PlainKind::Command => match self.command_effects(reply, frame, db) {
                true if matches!(reply, ScriptReply::Ok { .. }) => Some(ok()),
                _ => None,
            },
            _ if matches!(frame.first(), Some(b'-' | b'!')) => None,
            PlainKind::SetWrite => {
                if let ScriptReply::Set { key, .. } = reply {
                    self.wrote(key, db);
                }
                None
            }
            PlainKind::SetInval => Some(self.translate(reply, SET_INVALIDATED, resp3, db)),
        }
    }

    /// A batch's replies, one per operation in order. An array holds one
    /// element per operation, each translated as that operation's own reply
    /// (an error among them stays in its place); anything else is an error
    /// for the whole call (`-NOSCRIPT` aside, which the session resends:
    /// `-BUSY`, `-OOM`, `-READONLY`, `-NOPERM`…), which every operation
    /// alone would have met too, so each gets it.
    fn batch_reply(&self, items: &[ScriptReply], frame: &[u8], resp3: bool, db: u32) -> Bytes {
        let mut out = bytes::BytesMut::with_capacity(frame.len() + 8 * items.len());
        let header = memchr::memchr(b'\n', frame).map(|i| i + 1);
        let elements = match (frame.first(), header) {
            (Some(b'*'), Some(header)) => &frame[header..],
            _ => {
                items
                    .iter()
                    .for_each(|item| out.extend_from_slice(&self.translate(item, frame, resp3, db)));
                return out.freeze();
            }
        };
        let mut scanner = crate::resp::reply::ReplyScanner::default();
        let mut start = 0;
        for item in items {
            let element: &[u8] = match scanner.advance(elements) {
                Ok(Some(element)) => {
                    let bytes = &elements[start..element.end];
                    start = element.end;
                    bytes
                }
                // Fewer elements than operations: not the script's reply.
                _ => b"-ERR cachefence: the fence script's batch reply is short\r\n",
            };
            out.extend_from_slice(&self.translate(item, element, resp3, db));
        }
        out.freeze()
    }

    /// A fill script's verdict, counted and recorded, as the client's
    /// reply: `{1}` stored (`+OK`), `{2}` not stored for `NX` (nil),
    /// `{0, reason}` refused (per `on_stale_fill`, or `+STALE` for the lease
    /// API). Held misses of the key are woken either way.
    fn fill_reply(&self, policy: usize, key: &Bytes, items: &[Value], lease_api: bool) -> Reply {
        self.fences.wake(key);
        match items.first().and_then(Value::as_int) {
            Some(1) => {
                self.fences.stats.fills_accepted.inc();
                match items.get(1).and_then(Value::as_int) {
                    Some(window) => self.record(
                        key,
                        What::FillShortened {
                            window_us: window.max(0) as u64,
                        },
                    ),
                    None => self.record(key, What::FillAccepted),
                }
                Reply::Status("OK")
            }
            Some(2) => {
                self.fences.stats.fills_not_stored_nx.inc();
                self.record(key, What::FillNotStored);
                Reply::Nil
            }
            _ => {
                let reason = items.get(1).and_then(Value::as_bytes).map_or(&b""[..], |b| b);
                let why = Refusal::from_script(reason);
                self.fences.stats.refused(why).inc();
                if why == Refusal::PendingDelete {
                    self.fences.undelivered.stats.reads_missed.inc();
                }
                match (why, items.get(2).and_then(Value::as_int)) {
                    (Refusal::LagWindow, Some(window)) => self.record(
                        key,
                        What::FillRefusedLag {
                            window_us: window.max(0) as u64,
                        },
                    ),
                    _ => self.record(key, What::FillRefused(why)),
                }
                match lease_api {
                    true => Reply::Status("STALE"),
                    false => stale_reply(why, self.fences.scope().policy_at(policy)),
                }
            }
        }
    }

    /// The reply to a plain store judged in Redis (`op == 'set'`): a fill's
    /// verdict (1 stored, else an array); for a write, the command's own
    /// reply (a status, or nil); 4 for a write turned into a delete
    /// (`on_write = "invalidate"`), 5 for a write rejected; or an error.
    fn set_reply(&self, policy: usize, key: &Bytes, frame: &[u8], resp3: bool, db: u32) -> Bytes {
        match frame {
            // A store turned into a delete, the default's common case.
            SET_INVALIDATED => return self.set_invalidated(key, db),
            // A fill stored, the usual verdict: a number, not an array.
            FILL_STORED => {
                return self
                    .fill_reply(policy, key, &[Value::Int(1)], false)
                    .encode(resp3);
            }
            SET_REJECTED => {
                self.fences.stats.writes_rejected.inc();
                self.record(key, What::WriteRejected);
                return super::plan::rejected(key).encode(resp3);
            }
            // An error: the client's command failed in the script, or the
            // script could not run. The client's reply as Redis sent it.
            [b'-' | b'!', ..] => return Bytes::copy_from_slice(frame),
            [b'*', ..] => {}
            // A write: the command's own reply, SET's usual one first (no
            // copy to make). Lua's false (SET … NX that found a value)
            // reaches a RESP3 client as a boolean; the command answered nil.
            own => {
                self.wrote(key, db);
                return match own {
                    b"+OK\r\n" => ok(),
                    b"#f\r\n" => Reply::Nil.encode(resp3),
                    own => Bytes::copy_from_slice(own),
                };
            }
        }
        let Some(Value::Array(items)) = Value::decode(frame, resp3) else {
            return Bytes::copy_from_slice(frame);
        };
        self.fill_reply(policy, key, &items, false).encode(resp3)
    }

    /// A store of `key` ran as a delete: counted, acted on, answered `+OK`.
    fn set_invalidated(&self, key: &Bytes, db: u32) -> Bytes {
        self.fences.stats.invalidations.inc();
        self.fences.stats.keys_invalidated_client.inc();
        let keys = std::slice::from_ref(key);
        self.fences
            .epilogue
            .after_invalidation(db, keys, Source::Client, self.connection);
        ok()
    }

    /// A plain store of `key` ran as a write: counted, recorded, and its
    /// held misses woken.
    fn wrote(&self, key: &Bytes, db: u32) {
        self.fences.stats.writes.inc();
        let event = || super::history::Event::now(self.connection, What::Write);
        self.fences.history.record_if_known(key, event);
        self.fences.epilogue.after_write(db, std::slice::from_ref(key));
    }

    /// A miss script's reply: `{1, value}` (the value appeared) or
    /// `{0, version, invalidated, now, leader}` (a ticket, unless another
    /// client leads and this miss may still wait).
    pub fn miss(&self, reply: &ScriptReply, frame: &[u8], resp3: bool) -> MissOutcome {
        let (key, nil, forced) = match reply {
            ScriptReply::Miss { key, nil, forced, .. } => (key, Bytes::from_static(nil), *forced),
            ScriptReply::MGetMiss { key, .. } => (key, Bytes::new(), true),
            _ => unreachable!("only misses"),
        };
        let Some(Value::Array(items)) = Value::decode(frame, resp3) else {
            // The script failed: release the nil as Redis gave it, no ticket.
            return MissOutcome::Reply(nil);
        };
        let leader = items.get(4).and_then(Value::as_int) == Some(1);
        match (items.first().and_then(Value::as_int), items.get(1)) {
            (Some(1), Some(Value::Bulk(value))) => {
                MissOutcome::Reply(Reply::Bulk(value.clone()).encode(false))
            }
            // A direct read's GET failed (WRONGTYPE): its error, as GET gives it.
            (Some(3), Some(Value::Bulk(message))) => {
                let mut error = Vec::with_capacity(message.len() + 3);
                error.push(b'-');
                error.extend_from_slice(message);
                error.extend_from_slice(b"\r\n");
                MissOutcome::Reply(error.into())
            }
            (Some(0), Some(Value::Bulk(_))) if !leader && !forced => MissOutcome::Wait,
            (Some(0), Some(Value::Bulk(version))) => {
                // Its ticket is a field of the fence now (the script wrote it).
                let version = std::str::from_utf8(version)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                self.fences.missed(self.connection, key, version);
                MissOutcome::Reply(nil)
            }
            _ => MissOutcome::Reply(nil),
        }
    }

    fn fence_info(&self, key: &Bytes, items: &[Value]) -> Reply {
        let field = |i: usize| items.get(i).and_then(Value::as_bytes).cloned();
        let now: i64 = field(4)
            .and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok())
            .unwrap_or(0);
        let age_ms = |i: usize| -> Reply {
            match field(i).and_then(|b| std::str::from_utf8(&b).ok()?.parse::<i64>().ok()) {
                Some(t) if t > 0 => Reply::Int((now - t) / 1000),
                _ => Reply::Nil,
            }
        };
        let policy = self
            .fences
            .scope()
            .policy(key)
            .map(|(_, p)| Reply::Bulk(p.pattern.clone().into()));
        Reply::Map(vec![
            (Reply::Bulk("key".into()), Reply::Bulk(key.clone())),
            (Reply::Bulk("fenced_by".into()), policy.unwrap_or(Reply::Nil)),
            (
                Reply::Bulk("version".into()),
                field(0).map_or(Reply::Nil, Reply::Bulk),
            ),
            (Reply::Bulk("invalidated_ms_ago".into()), age_ms(1)),
            (
                Reply::Bulk("lease_holder".into()),
                field(2).map_or(Reply::Nil, Reply::Bulk),
            ),
            (
                Reply::Bulk("ttl_ms".into()),
                Reply::Int(items.get(5).and_then(Value::as_int).unwrap_or(-2)),
            ),
            (
                Reply::Bulk("tickets_outstanding".into()),
                Reply::Int(items.get(6).and_then(Value::as_int).unwrap_or(0)),
            ),
        ])
    }
}

/// The opaque lease token of `CACHE.GET`: the fence version and the miss
/// time (Redis clock), so that any proxy can check a `CACHE.FILL`.
pub(crate) fn lease_token(version: &[u8], miss_us: &[u8]) -> Bytes {
    let mut token = b"cf1.".to_vec();
    token.extend_from_slice(version);
    token.push(b'.');
    token.extend_from_slice(miss_us);
    token.into()
}

pub(crate) fn parse_lease_token(token: &[u8]) -> Option<(Bytes, Bytes)> {
    let rest = token.strip_prefix(b"cf1.")?;
    let dot = rest.iter().position(|&b| b == b'.')?;
    let (version, miss_us) = (&rest[..dot], &rest[dot + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    (digits(version) && digits(miss_us))
        .then(|| (Bytes::copy_from_slice(version), Bytes::copy_from_slice(miss_us)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fence::plan::tests::{client, fences};

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn fill(key: &'static str) -> ScriptReply {
        ScriptReply::Fill {
            policy: 0,
            key: b(key),
            lease_api: false,
        }
    }

    #[test]
    fn an_accepted_fill_answers_ok_and_a_refused_one_per_on_stale_fill() {
        let fences = fences();
        let client = client(&fences);
        assert_eq!(
            &client.translate(&fill("user:1"), b":1\r\n", false, 0)[..],
            b"+OK\r\n"
        );
        assert_eq!(fences.stats.fills_accepted.get(), 1);
        let refused = b"*2\r\n:0\r\n$11\r\nfence_moved\r\n";
        assert_eq!(
            &client.translate(&fill("user:1"), refused, false, 0)[..],
            b"+OK\r\n"
        );
        assert_eq!(fences.stats.refused(Refusal::FenceMoved).get(), 1);
        assert_eq!(
            &client.translate(&fill("user:1"), b"*1\r\n:2\r\n", true, 0)[..],
            b"_\r\n"
        );
        // An error from Redis is the client's reply, byte for byte.
        let error = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
        assert_eq!(&client.translate(&fill("user:1"), error, false, 0)[..], error);
    }

    #[test]
    fn lua_false_becomes_the_protocol_nil() {
        let fences = fences();
        let client = client(&fences);
        let write = ScriptReply::Command {
            keys: vec![b("user:1")],
            invalidation: None,
        };
        assert_eq!(&client.translate(&write, b"#f\r\n", true, 0)[..], b"_\r\n");
        assert_eq!(&client.translate(&write, b"$-1\r\n", false, 0)[..], b"$-1\r\n");
        assert_eq!(&client.translate(&write, b":7\r\n", false, 0)[..], b":7\r\n");
    }

    #[test]
    fn an_acknowledged_delete_ends_in_the_epilogue_and_a_loading_one_is_retried() {
        let fences = fences();
        let client = client(&fences);
        let delete = ScriptReply::Command {
            keys: vec![b("user:1"), b("other")],
            invalidation: Some(Source::Client),
        };
        assert_eq!(&client.translate(&delete, b":1\r\n", false, 0)[..], b":1\r\n");
        // The fenced key has the event; the key outside every pattern has no history.
        assert_eq!(fences.history.explain(b"user:1").len(), 1);
        assert!(fences.history.explain(b"other").is_empty());
        assert!(fences.undelivered.is_empty());
        let loading = b"-LOADING Redis is loading the dataset in memory\r\n";
        assert_eq!(&client.translate(&delete, loading, false, 3)[..], loading);
        assert!(fences.undelivered.is_pending(3, b"user:1"));
        assert_eq!(
            fences.history.explain(b"user:1").len(),
            1,
            "not acknowledged: no event"
        );
    }

    fn miss(forced: bool) -> ScriptReply {
        ScriptReply::Miss {
            key: b("user:1"),
            policy: 0,
            nil: b"$-1\r\n",
            forced,
            miss: 1,
            direct: false,
        }
    }

    #[test]
    fn a_miss_issues_a_ticket_unless_another_client_leads() {
        let fences = fences();
        let client = client(&fences);
        // Not an array of the expected shape: the nil goes, no ticket.
        assert!(matches!(
            client.miss(&miss(false), b"-ERR x\r\n", false),
            MissOutcome::Reply(_)
        ));
        let reply = b"*5\r\n:0\r\n$3\r\n100\r\n$1\r\n0\r\n$3\r\n200\r\n:0\r\n";
        assert!(matches!(
            client.miss(&miss(false), reply, false),
            MissOutcome::Wait
        ));
        assert_eq!(fences.tickets_outstanding(), 0);
        match client.miss(&miss(true), reply, false) {
            MissOutcome::Reply(nil) => assert_eq!(&nil[..], b"$-1\r\n"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fences.tickets_outstanding(), 1);
    }

    #[test]
    fn a_direct_read_answers_as_its_get() {
        let fences = fences();
        let client = client(&fences);
        let reply = |frame: &[u8]| match client.miss(&miss(false), frame, false) {
            MissOutcome::Reply(bytes) => bytes,
            MissOutcome::Wait => panic!("no wait"),
        };
        assert_eq!(&reply(b"*2\r\n:1\r\n$5\r\nvalue\r\n")[..], b"$5\r\nvalue\r\n");
        let wrongtype = b"*2\r\n:3\r\n$9\r\nWRONGTYPE\r\n";
        assert_eq!(&reply(wrongtype)[..], b"-WRONGTYPE\r\n");
        // An error of the script itself (after the read found nothing): nil.
        assert_eq!(&reply(b"-OOM command not allowed\r\n")[..], b"$-1\r\n");
        assert_eq!(fences.tickets_outstanding(), 0);
    }

    fn set(key: &'static str) -> ScriptReply {
        ScriptReply::Set {
            policy: 0,
            key: b(key),
        }
    }

    #[test]
    fn a_judged_store_answers_as_the_fill_or_the_write_it_was() {
        let fences = fences();
        let client = client(&fences);
        assert_eq!(
            &client.translate(&set("user:1"), b":1\r\n", false, 0)[..],
            b"+OK\r\n"
        );
        assert_eq!(fences.stats.fills_accepted.get(), 1);
        let older = b"*2\r\n:0\r\n$22\r\nolder_miss_outstanding\r\n";
        assert_eq!(&client.translate(&set("user:1"), older, false, 0)[..], b"+OK\r\n");
        assert_eq!(fences.stats.refused(Refusal::OlderMissOutstanding).get(), 1);
        // A SET judged a fill of a key whose delete is still being retried.
        let pending = b"*2\r\n:0\r\n$14\r\npending_delete\r\n";
        assert_eq!(
            &client.translate(&set("user:1"), pending, false, 0)[..],
            b"+OK\r\n"
        );
        assert_eq!(fences.stats.refused(Refusal::PendingDelete).get(), 1);
        assert_eq!(fences.undelivered.stats.reads_missed.get(), 1);
        // A write: the command's own reply, byte for byte; nil from Lua's false.
        assert_eq!(
            &client.translate(&set("user:1"), b"+OK\r\n", true, 0)[..],
            b"+OK\r\n"
        );
        assert_eq!(
            &client.translate(&set("user:1"), b"#f\r\n", true, 0)[..],
            b"_\r\n"
        );
        assert_eq!(
            &client.translate(&set("user:1"), b"$-1\r\n", false, 0)[..],
            b"$-1\r\n"
        );
        assert_eq!(fences.stats.writes.get(), 3);
        // on_write = "invalidate": +OK, and the invalidation ends in the epilogue.
        assert_eq!(
            &client.translate(&set("user:1"), b":4\r\n", false, 0)[..],
            b"+OK\r\n"
        );
        assert_eq!(fences.stats.keys_invalidated_client.get(), 1);
        assert!(
            fences
                .history
                .explain(b"user:1")
                .iter()
                .any(|e| e.describe().contains("invalidated by a client"))
        );
        let rejected = client.translate(&set("rejected:1"), b":5\r\n", false, 0);
        assert!(rejected.starts_with(b"-ERR cachefence: writes to 'rejected:1' are rejected"));
        assert_eq!(fences.stats.writes_rejected.get(), 1);
        let error = b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n";
        assert_eq!(&client.translate(&set("user:1"), error, false, 0)[..], error);
    }

    #[test]
    fn a_miss_that_finds_a_value_returns_it() {
        let fences = fences();
        let client = client(&fences);
        match client.miss(&miss(false), b"*2\r\n:1\r\n$5\r\nvalue\r\n", false) {
            MissOutcome::Reply(bytes) => assert_eq!(&bytes[..], b"$5\r\nvalue\r\n"),
            other => panic!("{other:?}"),
        }
        assert_eq!(fences.tickets_outstanding(), 0);
    }
}
