//! The session's side of the consistency layer: how an intercepted request
//! is sent (as is, rewritten to a fence script call, or answered here) and
//! how the reply to it becomes the reply the client expects.
//!
//! | client sends | fenced key, ticket held | fenced key, no ticket |
//! |---|---|---|
//! | `GET k` | forwarded; a nil reply is held while the miss script runs | same |
//! | `SET k v …`, `SETEX`, `PSETEX` | fill script (stored only if the fence did not move) | write per `on_write` |
//! | `MSET`, `APPEND`, `INCR`… | write per `on_write` | write per `on_write` |
//! | `DEL`, `UNLINK`, `GETDEL` | invalidation script | invalidation script |

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;

use crate::fence::history::{Event, Source, What};
use crate::fence::script::{self, fence_key};
use crate::fence::{Fences, OnStaleFill, OnWrite, Policy, Refusal, Scope, Ticket, micros, millis};
use crate::resp::command::Fenced;
use crate::resp::request::{Args, Frame};
use crate::resp::value::{Reply, Value};

/// A fence script call, kept so it can be sent again with its source after
/// a `NOSCRIPT` (e.g. after `SCRIPT FLUSH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall {
    pub keys: Vec<Bytes>,
    pub args: Vec<Bytes>,
}

impl ScriptCall {
    fn new(keys: Vec<Bytes>, args: Vec<Bytes>) -> ScriptCall {
        ScriptCall { keys, args }
    }

    pub fn encode(&self, with_source: bool) -> Bytes {
        let keys: Vec<&[u8]> = self.keys.iter().map(|k| &k[..]).collect();
        let args: Vec<&[u8]> = self.args.iter().map(|a| &a[..]).collect();
        match with_source {
            true => script::call_with_source(&keys, &args),
            false => script::call(&keys, &args),
        }
    }
}

/// How a fence script's reply becomes the client's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptReply {
    /// The proxy's miss script after a nil `GET`: the value that appeared,
    /// or the original nil (`nil`, in the client's protocol) and a ticket.
    /// Unless `forced`, a miss whose herd lease another client holds waits.
    Miss {
        key: Bytes,
        policy: usize,
        nil: Bytes,
        forced: bool,
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
    MGetMiss { key: Bytes, policy: usize, index: usize },
    /// A write or invalidation running the client's own command: its reply,
    /// with Lua's `false` turned back into the protocol's nil. `keys` are
    /// the fenced keys it moved (their held misses are woken; after an
    /// invalidation, their second delete is scheduled).
    Command { keys: Vec<Bytes>, invalidation: bool },
    /// `on_write = "invalidate"` of a SET-family command: `+OK`.
    Ok { keys: Vec<Bytes> },
    /// `CACHE.FENCE key`.
    FenceInfo { key: Bytes },
}

impl ScriptReply {
    /// The keys of an invalidation (`DEL`, `UNLINK`, `GETDEL`, `CACHE.INVALIDATE`).
    pub fn invalidated_keys(&self) -> Option<Vec<Bytes>> {
        match self {
            ScriptReply::Command {
                keys,
                invalidation: true,
            } => Some(keys.clone()),
            _ => None,
        }
    }
}

/// What the session expects back for an intercepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceExpect {
    /// A `GET` (or `GETEX`) of a fenced key, forwarded as is.
    Get { key: Bytes, policy: usize },
    /// An `MGET` with fenced keys (`None`: not fenced), forwarded as is.
    MGet { keys: Vec<Option<(Bytes, usize)>> },
    /// A fence script call; with `slot`, the proxy's own call whose result
    /// fills a held reply, else the rewritten client command itself.
    Script {
        call: ScriptCall,
        reply: ScriptReply,
        slot: Option<u64>,
    },
    /// A reply built by the proxy, encoded when it reaches the head of the
    /// queue (when the protocol in force is known).
    Local(Reply),
    /// The `EXEC` reply of a transaction that queued rewritten commands:
    /// the translation of each queued command, in order.
    Exec(Vec<Option<ScriptReply>>),
}

/// What a miss script's reply means for the held `GET`.
#[derive(Debug)]
pub enum MissOutcome {
    /// Release this reply (the value, or nil with a ticket issued).
    Reply(Bytes),
    /// Another client holds the herd lease: keep waiting for its fill.
    Wait,
}

/// How to send one intercepted request.
#[derive(Debug)]
pub enum Plan {
    /// Send the request's bytes unchanged.
    Forward(FenceExpect),
    /// Send this script call instead.
    Rewrite(ScriptCall, FenceExpect),
    /// Send nothing; the proxy answers.
    Local(Reply),
}

/// The fence state of one connection.
#[derive(Debug)]
pub struct FenceSession<'a> {
    pub fences: &'a Fences,
    pub connection: u64,
    /// Keys this connection holds tickets for (dropped with it).
    pub tickets: Mutex<HashSet<Bytes>>,
    /// The script's source was sent on this connection (later calls use
    /// `EVALSHA`). Only the requests direction, the one upstream writer,
    /// encodes calls, so the first call on the wire is the one with source.
    loaded: std::sync::atomic::AtomicBool,
    /// `CACHE.AUTH` succeeded on this connection.
    admin: std::sync::atomic::AtomicBool,
}

impl<'a> FenceSession<'a> {
    pub fn new(fences: &'a Fences) -> FenceSession<'a> {
        FenceSession {
            fences,
            connection: fences.connection(),
            tickets: Mutex::new(HashSet::new()),
            loaded: std::sync::atomic::AtomicBool::new(false),
            admin: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Encodes a call for the wire: with the script's source the first
    /// time on this connection, or when Redis lost the script (`reload`).
    pub fn encode(&self, call: &ScriptCall, reload: bool) -> Bytes {
        let first = !self.loaded.swap(true, std::sync::atomic::Ordering::Relaxed);
        call.encode(first || reload)
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<Bytes>> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Plans a fenced command, or `None` if none of its keys is fenced.
    /// Inside `MULTI` (`queued`), a `SET` is never a fill: the transaction's
    /// replies come later, all at once.
    /// `db` is the connection's database, for deletes still being retried
    /// (their keys read as nil and refuse fills).
    pub fn plan(
        &self,
        scope: &Scope,
        command: Fenced,
        frame: &Frame,
        request: &[u8],
        queued: bool,
        db: u32,
    ) -> Option<Plan> {
        if command == Fenced::Get {
            // The hot path: no argument copies, one glob match.
            let key = frame.arg(request, 1).filter(|_| frame.argc == 2)?;
            let (policy, _) = scope.policy(key)?;
            if self.undelivered(db, key) {
                return Some(Plan::Local(Reply::Nil));
            }
            let key = Bytes::copy_from_slice(key);
            return Some(Plan::Forward(FenceExpect::Get { key, policy }));
        }
        let words = all_args(frame, request);
        if !plausible_arity(command, &words) {
            // Redis' own arity error (and, in MULTI, EXECABORT) stays exact.
            return None;
        }
        let key = words.get(1)?;
        match command {
            // GET returned above; GETEX is handled like it.
            Fenced::Get | Fenced::GetEx => {
                let (policy, _) = scope.policy(key)?;
                if self.undelivered(db, key) {
                    return Some(Plan::Local(Reply::Nil));
                }
                Some(Plan::Forward(FenceExpect::Get {
                    key: key.clone(),
                    policy,
                }))
            }
            Fenced::MGet => {
                let keys: Vec<Option<(Bytes, usize)>> = words[1..]
                    .iter()
                    .map(|k| scope.policy(k).map(|(policy, _)| (k.clone(), policy)))
                    .collect();
                keys.iter()
                    .any(Option::is_some)
                    .then(|| Plan::Forward(FenceExpect::MGet { keys }))
            }
            Fenced::Set | Fenced::SetEx | Fenced::PSetEx => {
                let (policy, rules) = scope.policy(key)?;
                let fill = if queued {
                    None
                } else {
                    self.fill(command, &words, policy, rules, db)
                };
                match fill {
                    Some(plan) => Some(plan),
                    None => self.write(scope, command, &words, vec![key.clone()]),
                }
            }
            Fenced::MSet => {
                let keys: Vec<Bytes> = words[1..].iter().step_by(2).cloned().collect();
                self.write(scope, command, &words, keys)
            }
            Fenced::Write => self.write(scope, command, &words, vec![key.clone()]),
            Fenced::Delete => {
                let keys = words[1..].to_vec();
                let call = command_call(scope, "inval", &words, &keys)?;
                self.fences.stats.invalidations.inc();
                self.record_fenced(scope, &keys, What::Invalidated(Source::Client));
                self.fences.stats.keys_invalidated_client.add(keys.len() as u64);
                Some(rewrite(
                    call,
                    ScriptReply::Command {
                        keys: keys.clone(),
                        invalidation: true,
                    },
                ))
            }
        }
    }

    /// A fill, if this connection holds a ticket for the key and the command
    /// is a plain store (`SET` with only expiry options and `NX`).
    fn fill(&self, command: Fenced, words: &[Bytes], policy: usize, rules: &Policy, db: u32) -> Option<Plan> {
        let key = &words[1];
        let (value, expiry, nx) = match command {
            Fenced::SetEx => (
                words.get(3)?,
                vec![Bytes::from_static(b"EX"), words.get(2)?.clone()],
                false,
            ),
            Fenced::PSetEx => (
                words.get(3)?,
                vec![Bytes::from_static(b"PX"), words.get(2)?.clone()],
                false,
            ),
            _ => {
                let value = words.get(2)?;
                let (mut expiry, mut nx) = (Vec::new(), false);
                let mut i = 3;
                while i < words.len() {
                    let word = words[i].to_ascii_uppercase();
                    match &word[..] {
                        b"NX" => nx = true,
                        b"KEEPTTL" => expiry.push(words[i].clone()),
                        b"EX" | b"PX" | b"EXAT" | b"PXAT" => {
                            expiry.extend([words[i].clone(), words.get(i + 1)?.clone()]);
                            i += 1;
                        }
                        _ => return None, // XX, GET: not a fill
                    }
                    i += 1;
                }
                (value, expiry, nx)
            }
        };
        let ticket = self.fences.take(self.connection, key)?;
        self.held().remove(key);
        if ticket.issued.elapsed() > rules.lease_ttl {
            return Some(self.refuse(key, Refusal::Expired, rules));
        }
        if self.undelivered(db, key) {
            return Some(self.refuse(key, Refusal::PendingDelete, rules));
        }
        let call = self.fill_call(key, rules, ticket.version, ticket.miss_us, nx, value, expiry);
        Some(rewrite(
            call,
            ScriptReply::Fill {
                policy,
                key: key.clone(),
                lease_api: false,
            },
        ))
    }

    /// The fill script call: store `value` only if the fence still has
    /// `version`, the miss (`miss_us`, Redis clock) is younger than
    /// `lease_ttl`, and the lag rule allows it.
    #[allow(clippy::too_many_arguments)]
    fn fill_call(
        &self,
        key: &Bytes,
        rules: &Policy,
        version: Bytes,
        miss_us: Bytes,
        nx: bool,
        value: &Bytes,
        expiry: Vec<Bytes>,
    ) -> ScriptCall {
        let lag_refuse = matches!(rules.lag_policy, crate::fence::LagPolicy::Refuse);
        let mut args = vec![
            Bytes::from_static(b"fill"),
            millis(rules.fence_ttl()).into(),
            version,
            miss_us,
            micros(rules.lag_window).into(),
            Bytes::from_static(if lag_refuse { b"1" } else { b"0" }),
            Bytes::from_static(if nx { b"1" } else { b"0" }),
            self.fences.lease_holder(self.connection).into(),
            micros(rules.lease_ttl).into(),
            value.clone(),
        ];
        args.extend(expiry);
        ScriptCall::new(vec![key.clone(), fence_key(key).into()], args)
    }

    /// Is a delete of `key` waiting to be retried? Such a key reads as a
    /// miss and refuses fills through this proxy (counted).
    pub fn undelivered(&self, db: u32, key: &[u8]) -> bool {
        let pending = self.fences.undelivered.is_pending(db, key);
        if pending {
            self.fences.undelivered.stats.reads_missed.inc();
        }
        pending
    }

    fn refuse(&self, key: &[u8], why: Refusal, rules: &Policy) -> Plan {
        self.fences.stats.refused(why).inc();
        self.record(key, What::FillRefused(why));
        Plan::Local(stale_reply(why, rules))
    }

    /// A write of `keys` per the strictest `on_write` among their policies;
    /// `None` if none of them is fenced.
    fn write(&self, scope: &Scope, command: Fenced, words: &[Bytes], keys: Vec<Bytes>) -> Option<Plan> {
        let policies: Vec<&Policy> = keys
            .iter()
            .filter_map(|k| scope.policy(k).map(|(_, p)| p))
            .collect();
        if policies.is_empty() {
            return None;
        }
        let on_write = policies.iter().map(|p| p.on_write).max_by_key(|w| match w {
            OnWrite::Write => 0,
            OnWrite::Invalidate => 1,
            OnWrite::Reject => 2,
        });
        Some(match on_write.expect("at least one policy") {
            OnWrite::Reject => {
                self.fences.stats.writes_rejected.inc();
                self.record_fenced(scope, &keys, What::WriteRejected);
                let key = String::from_utf8_lossy(&keys[0]);
                Plan::Local(Reply::Error(format!(
                    "ERR cachefence: writes to '{key}' are rejected (on_write = \"reject\"); \
                     read it (miss) and fill it, or use CACHE.INVALIDATE"
                )))
            }
            OnWrite::Invalidate if store_only(command, words) => {
                let mut del = vec![Bytes::from_static(b"DEL")];
                del.extend(keys.iter().cloned());
                let call = command_call(scope, "inval", &del, &keys).expect("fenced keys");
                self.fences.stats.invalidations.inc();
                self.record_fenced(scope, &keys, What::Invalidated(Source::Client));
                self.fences.stats.keys_invalidated_client.add(keys.len() as u64);
                rewrite(call, ScriptReply::Ok { keys: keys.clone() })
            }
            _ => {
                let call = command_call(scope, "write", words, &keys).expect("fenced keys");
                self.fences.stats.writes.inc();
                self.record_fenced(scope, &keys, What::Write);
                rewrite(
                    call,
                    ScriptReply::Command {
                        keys: keys.clone(),
                        invalidation: false,
                    },
                )
            }
        })
    }

    /// The proxy's miss script for a nil `GET`; `force` takes a ticket
    /// even while another client holds the herd lease.
    pub fn miss_call(&self, key: &Bytes, policy: usize, force: bool) -> ScriptCall {
        let scope = self.fences.scope();
        let rules = scope.policy_at(policy);
        ScriptCall::new(
            vec![key.clone(), fence_key(key).into()],
            vec![
                Bytes::from_static(b"miss"),
                millis(rules.fence_ttl()).into(),
                self.fences.lease_holder(self.connection).into(),
                // The herd lease lasts `hold`: a miss that is never filled
                // (a row that does not exist) delays others at most that long.
                millis(rules.hold).into(),
                Bytes::from_static(if force { b"force" } else { b"wait" }),
            ],
        )
    }

    /// Turns a fence script's reply into the client's reply (`None`: the
    /// script could not run; the caller decides).
    pub fn translate(&self, reply: &ScriptReply, frame: &[u8], resp3: bool, db: u32) -> Bytes {
        if let ScriptReply::Command { keys, .. } | ScriptReply::Ok { keys } = reply {
            // Writes and invalidations, the common case: no decoding needed.
            if matches!(frame.first(), Some(b'-' | b'!')) {
                // Redis took the connection but not the delete (still loading
                // its data after a restart, a script running): retried like an
                // undeliverable one, so the value it meant to remove goes (C3).
                if let Some(keys) = reply.invalidated_keys()
                    && (frame.starts_with(b"-LOADING") || frame.starts_with(b"-BUSY"))
                {
                    self.fences.undelivered.push(db, &keys);
                }
                return Bytes::copy_from_slice(frame);
            }
            keys.iter().for_each(|k| self.fences.wake(k));
            if matches!(
                reply,
                ScriptReply::Ok { .. }
                    | ScriptReply::Command {
                        invalidation: true,
                        ..
                    }
            ) {
                self.fences.invalidated(db, keys);
            }
            return match reply {
                ScriptReply::Ok { .. } => Reply::Status("OK").encode(resp3),
                // Lua's false (a nil inside the script) reaches a RESP3 client
                // as a boolean; the client's command answered nil.
                _ if frame == b"#f\r\n" => Reply::Nil.encode(resp3),
                _ => Bytes::copy_from_slice(frame),
            };
        }
        let value = Value::decode(frame, resp3);
        match (reply, value) {
            (_, Some(Value::Error(_))) | (_, None) => Bytes::copy_from_slice(frame),
            // Misses are handled by the session (they may wait); total anyway.
            (ScriptReply::Miss { nil, .. }, _) => match self.miss(reply, frame, resp3) {
                MissOutcome::Reply(bytes) => bytes,
                MissOutcome::Wait => nil.clone(),
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
                Some(Value::Array(items)),
            ) => {
                self.fences.wake(key);
                match items.first().and_then(Value::as_int) {
                    Some(1) => {
                        self.fences.stats.fills_accepted.inc();
                        self.record(key, What::FillAccepted);
                        Reply::Status("OK").encode(resp3)
                    }
                    Some(2) => {
                        self.fences.stats.fills_not_stored_nx.inc();
                        self.record(key, What::FillNotStored);
                        Reply::Nil.encode(resp3)
                    }
                    _ => {
                        let reason = items.get(1).and_then(Value::as_bytes).map_or(&b""[..], |b| b);
                        let why = Refusal::from_script(reason);
                        self.fences.stats.refused(why).inc();
                        self.record(key, What::FillRefused(why));
                        match lease_api {
                            true => Reply::Status("STALE").encode(resp3),
                            false => stale_reply(why, self.fences.scope().policy_at(*policy)).encode(resp3),
                        }
                    }
                }
            }
            (ScriptReply::FenceInfo { key }, Some(Value::Array(items))) => {
                self.fence_info(key, &items).encode(resp3)
            }
            (_, Some(_)) => Bytes::copy_from_slice(frame),
        }
    }

    /// A miss script's reply: `{1, value}` (the value appeared) or
    /// `{0, version, invalidated, now, leader}` (a ticket, unless another
    /// client leads and this miss may still wait).
    pub fn miss(&self, reply: &ScriptReply, frame: &[u8], resp3: bool) -> MissOutcome {
        let (key, nil, forced) = match reply {
            ScriptReply::Miss { key, nil, forced, .. } => (key, nil, *forced),
            ScriptReply::MGetMiss { key, .. } => (key, &Bytes::new(), true),
            _ => unreachable!("only misses"),
        };
        let Some(Value::Array(items)) = Value::decode(frame, resp3) else {
            // The script failed: release the nil as Redis gave it, no ticket.
            return MissOutcome::Reply(nil.clone());
        };
        let leader = items.get(4).and_then(Value::as_int) == Some(1);
        match (items.first().and_then(Value::as_int), items.get(1)) {
            (Some(1), Some(Value::Bulk(value))) => {
                MissOutcome::Reply(Reply::Bulk(value.clone()).encode(false))
            }
            (Some(0), Some(Value::Bulk(_))) if !leader && !forced => MissOutcome::Wait,
            (Some(0), Some(Value::Bulk(version))) => {
                let ticket = Ticket {
                    version: version.clone(),
                    miss_us: items
                        .get(3)
                        .and_then(Value::as_bytes)
                        .cloned()
                        .unwrap_or_default(),
                    issued: Instant::now(),
                };
                let mut held = self.held();
                if self
                    .fences
                    .issue(self.connection, key.clone(), ticket, held.len())
                {
                    held.insert(key.clone());
                }
                MissOutcome::Reply(nil.clone())
            }
            _ => MissOutcome::Reply(nil.clone()),
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
                Reply::Int(self.fences.tickets_for(key) as i64),
            ),
        ])
    }

    /// `CACHE.*` commands: a plan to send (`CACHE.INVALIDATE`, `CACHE.FENCE`)
    /// or a reply.
    pub fn admin(&self, frame: &Frame, request: &[u8], db: u32, ctx: &super::Context) -> Plan {
        let words = all_args(frame, request);
        let name = String::from_utf8_lossy(&words[0]).to_ascii_uppercase();
        let arity = || {
            Reply::Error(format!(
                "ERR wrong number of arguments for '{}' command",
                name.to_lowercase()
            ))
        };
        let password = self.fences.admin_password.load();
        let admitted = password.is_none() || self.admin.load(std::sync::atomic::Ordering::Relaxed);
        match name.as_str() {
            "CACHE.AUTH" if words.len() == 2 => Plan::Local(match &*password {
                None => Reply::Error(
                    "ERR cachefence: CACHE.AUTH called without an admin password configured".into(),
                ),
                Some(password) if same_secret(password.expose().as_bytes(), &words[1]) => {
                    self.admin.store(true, std::sync::atomic::Ordering::Relaxed);
                    Reply::Status("OK")
                }
                Some(_) => {
                    tracing::warn!("CACHE.AUTH with a wrong admin password");
                    self.admin.store(false, std::sync::atomic::Ordering::Relaxed);
                    Reply::Error("WRONGPASS cachefence: invalid admin password".into())
                }
            }),
            "CACHE.INVALIDATE" | "CACHE.RELOAD" if !admitted => Plan::Local(Reply::Error(format!(
                "NOAUTH cachefence: {name} needs CACHE.AUTH <admin password> first"
            ))),
            "CACHE.HELP" => Plan::Local(Reply::Array(
                HELP.iter()
                    .map(|l| Reply::Bulk(Bytes::from_static(l.as_bytes())))
                    .collect(),
            )),
            "CACHE.INFO" => Plan::Local(Reply::Bulk(self.info().into())),
            "CACHE.RELOAD" if words.len() == 1 => {
                Plan::Local(match crate::live::reload(ctx, "CACHE.RELOAD") {
                    Ok(done) => {
                        let names = |keys: Vec<&'static str>| {
                            Reply::Array(
                                keys.into_iter()
                                    .map(|k| Reply::Bulk(Bytes::from_static(k.as_bytes())))
                                    .collect(),
                            )
                        };
                        Reply::Map(vec![
                            (Reply::Bulk("file".into()), Reply::Bulk(done.file.into())),
                            (Reply::Bulk("applied".into()), names(done.applied)),
                            (
                                Reply::Bulk("restart_required".into()),
                                names(done.restart_required),
                            ),
                        ])
                    }
                    Err(error) => Reply::Error(format!(
                        "ERR cachefence: reload rejected, the running configuration is kept: {}",
                        one_line(&format!("{error:#}"))
                    )),
                })
            }
            "CACHE.STATS" => Plan::Local(crate::telemetry::cache_stats(self.fences)),
            "CACHE.INVALIDATE" if words.len() >= 2 => {
                let keys = words[1..].to_vec();
                // Explicit invalidations fence the keys even outside every pattern.
                let ttl = self
                    .fences
                    .scope()
                    .policies()
                    .map(Policy::fence_ttl)
                    .max()
                    .unwrap_or_default();
                let (all, args) = script::invalidation(&keys, ttl);
                let call = ScriptCall::new(all, args);
                self.fences.stats.invalidations.inc();
                self.fences
                    .history
                    .record_all(&keys, self.connection, What::Invalidated(Source::Admin));
                self.fences.stats.keys_invalidated_admin.add(keys.len() as u64);
                rewrite(
                    call,
                    ScriptReply::Command {
                        keys: keys.clone(),
                        invalidation: true,
                    },
                )
            }
            "CACHE.EXPLAIN" if words.len() == 2 => Plan::Local(Reply::Array(
                self.fences
                    .history
                    .explain(&words[1])
                    .iter()
                    .map(|event| Reply::Bulk(event.describe().into()))
                    .collect(),
            )),
            "CACHE.FENCE" if words.len() == 2 => {
                let key = words[1].clone();
                let call = ScriptCall::new(vec![fence_key(&key).into()], vec![Bytes::from_static(b"peek")]);
                rewrite(call, ScriptReply::FenceInfo { key })
            }
            "CACHE.GET" if words.len() == 2 && self.undelivered(db, &words[1]) => {
                // No value and no lease: a delete of the key is still pending.
                Plan::Local(Reply::Array(vec![Reply::Nil, Reply::Nil]))
            }
            "CACHE.GET" if words.len() == 2 => {
                let key = words[1].clone();
                let (policy, _) = self.fences.scope().lease_policy(&key);
                let call = self.miss_call(&key, policy, true);
                rewrite(call, ScriptReply::LeaseGet { key })
            }
            "CACHE.FILL" if words.len() == 4 || words.len() == 6 => {
                let key = words[1].clone();
                let scope = self.fences.scope();
                let (policy, rules) = scope.lease_policy(&key);
                let Some((version, miss_us)) = parse_lease_token(&words[2]) else {
                    return Plan::Local(Reply::Error("ERR cachefence: invalid lease token".into()));
                };
                let expiry = words[4..].to_vec();
                let valid_expiry = expiry.is_empty()
                    || (matches!(&expiry[0].to_ascii_uppercase()[..], b"EX" | b"PX")
                        && std::str::from_utf8(&expiry[1])
                            .is_ok_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0)));
                if !valid_expiry {
                    return Plan::Local(Reply::Error(
                        "ERR syntax error (CACHE.FILL key token value [EX s|PX ms])".into(),
                    ));
                }
                if self.undelivered(db, &key) {
                    self.fences.stats.refused(Refusal::PendingDelete).inc();
                    self.record(&key, What::FillRefused(Refusal::PendingDelete));
                    return Plan::Local(Reply::Status("STALE"));
                }
                let call = self.fill_call(&key, rules, version, miss_us, false, &words[3], expiry);
                rewrite(
                    call,
                    ScriptReply::Fill {
                        policy,
                        key,
                        lease_api: true,
                    },
                )
            }
            "CACHE.INVALIDATE" | "CACHE.FENCE" | "CACHE.GET" | "CACHE.FILL" | "CACHE.AUTH"
            | "CACHE.RELOAD" | "CACHE.EXPLAIN" => Plan::Local(arity()),
            _ => Plan::Local(Reply::Error(format!(
                "ERR unknown cachefence command '{name}'; try CACHE.HELP, CACHE.STATS, CACHE.FENCE, \
                 CACHE.INVALIDATE, CACHE.GET, CACHE.FILL, CACHE.AUTH, CACHE.INFO, CACHE.RELOAD, CACHE.EXPLAIN"
            ))),
        }
    }

    /// `CACHE.INFO`: the proxy itself, as Redis' `INFO` formats a section.
    /// Addresses only, never a URL or a password.
    fn info(&self) -> String {
        let about = &self.fences.about;
        let scope = self.fences.scope();
        let patterns: Vec<&str> = scope.policies().map(|p| p.pattern.as_str()).collect();
        let mut lines = vec![
            "# cachefence".to_string(),
            format!("version:{}", env!("CARGO_PKG_VERSION")),
            format!(
                "uptime_in_seconds:{}",
                about.started.map_or(0, |s| s.elapsed().as_secs())
            ),
            format!("process_id:{}", std::process::id()),
            format!("config_file:{}", about.config_file.as_deref().unwrap_or("")),
            format!("listen:{}", about.listen),
            format!("upstream:{}", about.upstream),
            format!("upstream_db:{}", about.upstream_db),
            "fences:on".to_string(),
            format!("fenced_patterns:{}", patterns.join(",")),
            format!("changelog_outbox:{}", about.outbox.as_deref().unwrap_or("")),
            format!(
                "admin_password:{}",
                if self.fences.admin_password.load().is_some() {
                    "set"
                } else {
                    "none"
                }
            ),
        ];
        lines.push(String::new());
        lines.join("\r\n")
    }

    /// Records an event of `key` for `CACHE.EXPLAIN`.
    fn record(&self, key: &[u8], what: What) {
        self.fences.history.record(key, Event::now(self.connection, what));
    }

    /// Records an event of the fenced ones among `keys`.
    fn record_fenced(&self, scope: &Scope, keys: &[Bytes], what: What) {
        let event = Event::now(self.connection, what);
        for key in keys.iter().filter(|k| scope.policy(k).is_some()) {
            self.fences.history.record(key, event);
        }
    }

    /// Tickets this connection still holds, to forget when it ends.
    pub fn forget_all(&self) {
        let keys: Vec<Bytes> = self.held().drain().collect();
        self.fences.forget(self.connection, keys);
    }
}

/// A `write`/`inval` call running `words` (the command) on `keys`, moving
/// the fences of the fenced ones; `None` if none is fenced.
fn command_call(scope: &Scope, op: &'static str, words: &[Bytes], keys: &[Bytes]) -> Option<ScriptCall> {
    let fenced: Vec<(&Bytes, &Policy)> = keys
        .iter()
        .filter_map(|k| scope.policy(k).map(|(_, p)| (k, p)))
        .collect();
    if fenced.is_empty() {
        return None;
    }
    let ttl = fenced
        .iter()
        .map(|(_, p)| p.fence_ttl())
        .max()
        .expect("not empty");
    let mut all_keys: Vec<Bytes> = keys.to_vec();
    all_keys.extend(fenced.iter().map(|(k, _)| Bytes::from(fence_key(k))));
    let mut args = vec![
        Bytes::from(op),
        millis(ttl).into(),
        fenced.len().to_string().into(),
    ];
    args.extend(words.iter().cloned());
    Some(ScriptCall::new(all_keys, args))
}

/// An error text fit for a RESP error line (TOML errors span lines).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Compares a secret in time independent of where the first difference is.
fn same_secret(expected: &[u8], given: &[u8]) -> bool {
    expected.len() == given.len() && expected.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

const HELP: &[&str] = &[
    "CACHE.HELP -- this list",
    "CACHE.STATS -- counters: misses, tickets, fills accepted/refused by reason, writes, invalidations",
    "CACHE.EXPLAIN <key> -- the key's recent history here: misses (ticket version), fills and why refused, invalidations by source, writes",
    "CACHE.FENCE <key> -- the key's fence: version, last invalidation, lease holder, ttl, outstanding tickets",
    "CACHE.INVALIDATE <key> [key ...] -- delete the keys and move their fences (in-flight fills are refused)",
    "CACHE.AUTH <password> -- unlock the admin commands (CACHE.INVALIDATE, CACHE.RELOAD) when admin_password is set",
    "CACHE.RELOAD -- re-read the config file: [[cache]] sections, limits, log level now; lists what needs a restart",
    "CACHE.INFO -- version, uptime, config file, listen address, upstream, fenced patterns (no secrets)",
    "CACHE.GET <key> -- [value, nil] on a hit; [nil, token] on a miss: a lease usable from any connection or proxy",
    "CACHE.FILL <key> <token> <value> [EX s|PX ms] -- store if nothing invalidated the key since the miss: OK or STALE",
];

/// The opaque lease token of `CACHE.GET`: the fence version and the miss
/// time (Redis clock), so that any proxy can check a `CACHE.FILL`.
fn lease_token(version: &[u8], miss_us: &[u8]) -> Bytes {
    let mut token = b"cf1.".to_vec();
    token.extend_from_slice(version);
    token.push(b'.');
    token.extend_from_slice(miss_us);
    token.into()
}

fn parse_lease_token(token: &[u8]) -> Option<(Bytes, Bytes)> {
    let rest = token.strip_prefix(b"cf1.")?;
    let dot = rest.iter().position(|&b| b == b'.')?;
    let (version, miss_us) = (&rest[..dot], &rest[dot + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    (digits(version) && digits(miss_us))
        .then(|| (Bytes::copy_from_slice(version), Bytes::copy_from_slice(miss_us)))
}

fn stale_reply(why: Refusal, rules: &Policy) -> Reply {
    match rules.on_stale_fill {
        OnStaleFill::Ok => Reply::Status("OK"),
        OnStaleFill::Error => Reply::Error(format!("STALE cachefence: fill refused ({})", why.as_str())),
    }
}

/// SET-family commands whose reply is `+OK` whatever the value: those that
/// `on_write = "invalidate"` can turn into a delete.
fn store_only(command: Fenced, words: &[Bytes]) -> bool {
    match command {
        Fenced::SetEx | Fenced::PSetEx | Fenced::MSet => true,
        Fenced::Set => !words[3..].iter().any(|w| {
            let w = w.to_ascii_uppercase();
            w == b"GET" || w == b"NX" || w == b"XX"
        }),
        _ => false,
    }
}

/// Sends `call` in place of the client's command; `reply` says how its reply
/// becomes the client's.
fn rewrite(call: ScriptCall, reply: ScriptReply) -> Plan {
    Plan::Rewrite(
        call.clone(),
        FenceExpect::Script {
            call,
            reply,
            slot: None,
        },
    )
}

/// Whether a fenced command has an argument count Redis accepts; others go
/// as they are so Redis' own error stays exact.
fn plausible_arity(command: Fenced, words: &[Bytes]) -> bool {
    let n = words.len();
    match command {
        Fenced::Get => n == 2,
        Fenced::GetEx | Fenced::MGet => n >= 2,
        Fenced::Set => n >= 3,
        Fenced::SetEx | Fenced::PSetEx => n == 4,
        Fenced::MSet => n >= 3 && n % 2 == 1,
        Fenced::Delete => match &words[0].to_ascii_uppercase()[..] {
            b"GETDEL" => n == 2,
            _ => n >= 2,
        },
        Fenced::Write => match &words[0].to_ascii_uppercase()[..] {
            b"INCR" | b"DECR" => n == 2,
            b"SETRANGE" => n == 4,
            _ => n == 3,
        },
    }
}

/// Every argument of a complete request.
pub fn all_args(frame: &Frame, request: &[u8]) -> Vec<Bytes> {
    match &frame.args {
        Args::Inline(args) => args.iter().map(|a| Bytes::copy_from_slice(a)).collect(),
        Args::Multibulk(_) => {
            let mut out = Vec::with_capacity(frame.argc);
            let mut pos = memchr::memchr(b'\n', request).map_or(request.len(), |i| i + 1);
            while out.len() < frame.argc && pos < request.len() {
                let Some(line) = memchr::memchr(b'\r', &request[pos..]) else {
                    break;
                };
                let len: usize = std::str::from_utf8(&request[pos + 1..pos + line])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let start = pos + line + 2;
                out.push(Bytes::copy_from_slice(&request[start..start + len]));
                pos = start + len + 2;
            }
            out
        }
    }
}
