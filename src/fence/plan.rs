//! The request rules: how an intercepted request is sent — as it is,
//! rewritten to a fence script call, or answered by the proxy — and what
//! its reply will need ([`Intercept`]).
//!
//! | client sends (fenced key) | sent as |
//! |---|---|
//! | `GET k`, `GETEX`, `MGET` | forwarded; a nil reply is held while the miss script runs (which records the miss in the fence) |
//! | `SET k v` with only expiry options or `NX`, `SETEX`, `PSETEX` | the `set` script: a fill if a miss is outstanding in its ticket scope (judged by the oldest), else a write per `on_write` |
//! | `SET … XX`/`GET`, `MSET`, `APPEND`, `INCR`… | write per `on_write` |
//! | `DEL`, `UNLINK`, `GETDEL` | invalidation script |

use bytes::Bytes;

use super::client::Client;
use super::history::{Source, What};
use super::probe::{PlainKind, Probe};
use super::script::{ScriptCall, fence_key};
use super::translate::ScriptReply;
use super::{OnStaleFill, OnWrite, Policy, Refusal, Scope, TicketScope, lag_micros, micros, millis};
use crate::resp::command::{CacheOp, KeyspaceOp};
use crate::resp::request::Frame;
use crate::resp::value::Reply;

/// What the session expects back for an intercepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intercept {
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
    /// `KEYS`, `SCAN` or `RANDOMKEY`, forwarded as is; fence keys are taken
    /// out of the reply ([`super::visible`]).
    Keyspace(KeyspaceOp),
    /// The `EXEC` reply of a transaction that queued fenced writes: what
    /// becomes of each queued command's element, in order.
    Exec(Vec<InExec>),
    /// The `MGET` of a pipelined run's fences ([`super::probe`]): its reply
    /// decides which writes go plain; the client's replies come from those.
    Probe(Probe),
    /// A write of a probed run sent without the script: its reply is the
    /// client's, as `kind` and `reply` say.
    Plain { kind: PlainKind, reply: ScriptReply },
}

/// Whether a miss may wait while another miss holds the key's herd lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Wait for the holder's fill (the session holds the reply).
    Wait,
    /// Wait, unless the holder is an earlier miss of this connection: the
    /// client has nothing else in flight here, so that fill can only come
    /// after this reply (one request at a time on a shared connection).
    Alone,
    /// Take a ticket now (`hold = 0`, `MGET`, the lease API, a hold that
    /// timed out).
    Force,
}

/// What becomes of one queued command's element of the `EXEC` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InExec {
    /// The client's own command: its element as Redis sent it.
    AsIs,
    /// The proxy's call that moves the fences after a fenced write (sent
    /// right behind it): its `QUEUED` and its element are the proxy's own,
    /// never the client's; the element is translated for its effects
    /// (wake-ups, the invalidation epilogue) and dropped.
    Hidden(ScriptReply),
}

impl InExec {
    /// The proxy's own call, whose replies the client never sees.
    pub fn hidden(&self) -> Option<&ScriptReply> {
        match self {
            InExec::AsIs => None,
            InExec::Hidden(reply) => Some(reply),
        }
    }
}

/// How to send one intercepted request.
#[derive(Debug)]
pub enum Plan {
    /// Send the request's bytes unchanged.
    Forward(Intercept),
    /// Send this script call instead; `reply` says how its reply becomes
    /// the client's.
    Rewrite { call: ScriptCall, reply: ScriptReply },
    /// Send nothing; the proxy answers.
    Local(Reply),
}

impl Client<'_> {
    /// Plans a fenced command, or `None` if none of its keys is fenced.
    /// Inside `MULTI` (`queued`), a `SET` is never a fill: the transaction's
    /// replies come later, all at once.
    /// `db` is the connection's database, for deletes still being retried
    /// (their keys read as nil and refuse fills).
    pub fn plan(
        &self,
        scope: &Scope,
        command: CacheOp,
        frame: &Frame,
        request: &[u8],
        queued: bool,
        db: u32,
    ) -> Option<Plan> {
        if command == CacheOp::Get {
            // The hot path: no argument copies, one glob match.
            let key = frame.arg(request, 1).filter(|_| frame.argc == 2)?;
            let (policy, _) = scope.policy(key)?;
            if self.undelivered(db, key) {
                return Some(Plan::Local(Reply::Nil));
            }
            let key = Bytes::copy_from_slice(key);
            return Some(Plan::Forward(Intercept::Get { key, policy }));
        }
        let words = frame.all_args(request);
        if !plausible_arity(command, &words) {
            // Redis' own arity error (and, in MULTI, EXECABORT) stays exact.
            return None;
        }
        let key = words.get(1)?;
        match command {
            // GET returned above; GETEX is handled like it.
            CacheOp::Get | CacheOp::GetEx => {
                let (policy, _) = scope.policy(key)?;
                if self.undelivered(db, key) {
                    return Some(Plan::Local(Reply::Nil));
                }
                Some(Plan::Forward(Intercept::Get {
                    key: key.clone(),
                    policy,
                }))
            }
            CacheOp::MGet => {
                let keys: Vec<Option<(Bytes, usize)>> = words[1..]
                    .iter()
                    .map(|k| scope.policy(k).map(|(policy, _)| (k.clone(), policy)))
                    .collect();
                keys.iter()
                    .any(Option::is_some)
                    .then(|| Plan::Forward(Intercept::MGet { keys }))
            }
            CacheOp::Set | CacheOp::SetEx | CacheOp::PSetEx => {
                let (policy, rules) = scope.policy(key)?;
                let set = match queued {
                    true => None,
                    false => self.set(command, &words, policy, rules, db),
                };
                match set {
                    Some(plan) => Some(plan),
                    None => self.write(scope, command, &words, vec![key.clone()]),
                }
            }
            CacheOp::MSet => {
                let keys: Vec<Bytes> = words[1..].iter().step_by(2).cloned().collect();
                self.write(scope, command, &words, keys)
            }
            CacheOp::Write => self.write(scope, command, &words, vec![key.clone()]),
            CacheOp::Delete => {
                let keys = words[1..].to_vec();
                let own = || self.scope_prefix(TicketScope::Connection);
                let call = command_call(scope, "inval", &words, &keys, &own)?;
                self.forget_own_misses(&call, &keys);
                self.fences.stats.invalidations.inc();
                self.fences.stats.keys_invalidated_client.add(keys.len() as u64);
                Some(rewrite(
                    call,
                    ScriptReply::Command {
                        keys,
                        invalidation: Some(Source::Client),
                    },
                ))
            }
        }
    }

    /// A plain store (`SET` with only expiry options and `NX`, `SETEX`,
    /// `PSETEX`) of a fenced key: whether it is a fill or a write is known
    /// only in Redis, where the key's outstanding misses are (any client,
    /// any proxy). `None` for other shapes (`XX`, `GET`): always writes.
    fn set(&self, command: CacheOp, words: &[Bytes], policy: usize, rules: &Policy, db: u32) -> Option<Plan> {
        let key = &words[1];
        // Where the value is in the command (the script reads it there).
        let (value_at, expiry, nx) = match command {
            CacheOp::SetEx => (3, vec![Bytes::from_static(b"EX"), words.get(2)?.clone()], false),
            CacheOp::PSetEx => (3, vec![Bytes::from_static(b"PX"), words.get(2)?.clone()], false),
            _ => {
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
                (2, expiry, nx)
            }
        };
        words.get(value_at)?;
        let on_write: &'static [u8] = match rules.on_write {
            OnWrite::Reject => b"reject",
            OnWrite::Invalidate if store_only(command, words) => b"inval",
            _ => b"write",
        };
        let flag = |on: bool| Bytes::from_static(if on { b"1" } else { b"0" });
        let missed_here = self.fences.take_recent_miss(key, rules.lease_ttl);
        let lag = self.fences.lag.judge(rules);
        // Sized up front: growing it would copy every argument once more.
        let mut args = Vec::with_capacity(12 + expiry.len() + words.len());
        args.extend([
            Bytes::from_static(b"set"),
            millis(rules.fence_ttl()),
            self.scope_prefix(rules.ticket_scope),
            self.fences.set_lease(rules.lease_ttl),
            lag_micros(lag.window, rules),
            Bytes::from_static(lag.policy.script_mode()),
            flag(nx),
            flag(missed_here),
            Bytes::from_static(on_write),
            // Counted in `reads_missed` only if Redis refuses it as a fill
            // (a write to the key is no read or fill kept from it).
            flag(self.fences.undelivered.is_pending(db, key)),
            small_number(value_at),
            small_number(expiry.len()),
        ]);
        args.extend(expiry);
        args.extend(words.iter().cloned());
        let call = ScriptCall::new(vec![key.clone(), fence_key(key).into()], args);
        Some(rewrite(
            call,
            ScriptReply::Set {
                policy,
                key: key.clone(),
            },
        ))
    }

    /// The fill script call: store `value` only if the fence still has
    /// `version`, the miss (`miss_us`, Redis clock) is younger than
    /// `lease_ttl`, and the lag rule allows it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fill_call(
        &self,
        key: &Bytes,
        rules: &Policy,
        version: Bytes,
        miss_us: Bytes,
        nx: bool,
        value: &Bytes,
        expiry: Vec<Bytes>,
    ) -> ScriptCall {
        let lag = self.fences.lag.judge(rules);
        let mut args = vec![
            Bytes::from_static(b"fill"),
            millis(rules.fence_ttl()),
            version,
            miss_us,
            lag_micros(lag.window, rules),
            Bytes::from_static(lag.policy.script_mode()),
            Bytes::from_static(if nx { b"1" } else { b"0" }),
            self.holder(0).into(),
            self.fences.fill_lease(rules.lease_ttl),
            value.clone(),
        ];
        args.extend(expiry);
        ScriptCall::new(vec![key.clone(), fence_key(key).into()], args)
    }

    /// A write of `keys` per the strictest `on_write` among their policies;
    /// `None` if none of them is fenced.
    fn write(&self, scope: &Scope, command: CacheOp, words: &[Bytes], keys: Vec<Bytes>) -> Option<Plan> {
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
                Plan::Local(rejected(&keys[0]))
            }
            // Only when every key is a cache: turning the write into a
            // delete must never take a key that is not one with it (an
            // `MSET` that mixes them stores them all and moves the fences,
            // as `write` does).
            OnWrite::Invalidate if store_only(command, words) && policies.len() == keys.len() => {
                let mut del = vec![Bytes::from_static(b"DEL")];
                del.extend(keys.iter().cloned());
                let own = || self.scope_prefix(TicketScope::Connection);
                let call = command_call(scope, "inval", &del, &keys, &own).expect("fenced keys");
                self.forget_own_misses(&call, &keys);
                self.fences.stats.invalidations.inc();
                self.fences.stats.keys_invalidated_client.add(keys.len() as u64);
                rewrite(call, ScriptReply::Ok { keys: keys.clone() })
            }
            _ => {
                let own = || self.scope_prefix(TicketScope::Connection);
                let call = command_call(scope, "write", words, &keys, &own).expect("fenced keys");
                self.forget_own_misses(&call, &keys);
                self.fences.stats.writes.inc();
                self.record_written(&keys);
                rewrite(
                    call,
                    ScriptReply::Command {
                        keys: keys.clone(),
                        invalidation: None,
                    },
                )
            }
        })
    }

    /// Under `ticket_scope = "connection"` a write takes back the
    /// connection's own misses of its keys (see [`command_call`]): no fill
    /// of theirs is coming, so the memory of them here goes too (else the
    /// SET that follows would be refused as a fill whose fence was lost).
    fn forget_own_misses(&self, call: &ScriptCall, keys: &[Bytes]) {
        if call.args.get(COMMAND_AT - 1).is_some_and(|own| !own.is_empty()) {
            for key in keys {
                self.fences.take_recent_miss(key, std::time::Duration::ZERO);
            }
        }
    }

    /// The proxy's miss script for a nil `GET`; `claim` says whether it
    /// may wait while another miss holds the key's herd lease. `miss` names
    /// the miss (its herd lease and its ticket in the fence); 0 for the
    /// lease API, whose token is the ticket.
    pub fn miss_call(&self, key: &Bytes, policy: usize, claim: Claim, miss: u64) -> ScriptCall {
        let scope = self.fences.scope();
        let rules = scope.policy_at(policy);
        let field = match miss {
            0 => String::new(),
            miss => self.miss_field(miss),
        };
        ScriptCall::new(
            vec![key.clone(), fence_key(key).into()],
            vec![
                Bytes::from_static(b"miss"),
                millis(rules.fence_ttl()),
                self.holder(miss).into(),
                // The herd lease lasts `hold`: a miss that is never filled
                // (a row that does not exist) delays others at most that long.
                millis(rules.hold),
                Bytes::from_static(match claim {
                    Claim::Wait => b"wait",
                    Claim::Alone => b"alone",
                    Claim::Force => b"force",
                }),
                field.into(),
                micros(rules.lease_ttl),
                format!("{}:", self.holder(0)).into(),
            ],
        )
    }

    /// A `GET` of `key` sent as the miss script itself ([`super::direct`]):
    /// the script reads the key as `GET` does and, if it is missing, records
    /// the miss. `alone`: the client sends one request at a time (see
    /// [`Claim::Alone`]).
    pub fn direct_read(&self, key: Bytes, policy: usize, alone: bool, resp3: bool) -> Plan {
        let forced = self.fences.scope().policy_at(policy).hold.is_zero();
        let claim = match (forced, alone) {
            (true, _) => Claim::Force,
            (false, true) => Claim::Alone,
            (false, false) => Claim::Wait,
        };
        let miss = self.next_miss();
        let mut call = self.miss_call(&key, policy, claim, miss);
        call.edit(|_, args| args.push(Bytes::from_static(b"get")));
        self.fences.stats.direct_reads.inc();
        let reply = ScriptReply::Miss {
            key,
            policy,
            // As the protocol is now (the reply's own is chosen when it comes).
            nil: super::translate::nil(resp3),
            forced,
            miss,
            direct: true,
        };
        Plan::Rewrite { call, reply }
    }
}

/// The error a write under `on_write = "reject"` gets.
pub(crate) fn rejected(key: &[u8]) -> Reply {
    let key = String::from_utf8_lossy(key);
    Reply::Error(format!(
        "ERR cachefence: writes to '{key}' are rejected (on_write = \"reject\"); \
         read it (miss) and fill it, or use CACHE.INVALIDATE"
    ))
}

/// A `write`/`inval` call running `words` (the command) on `keys`, moving
/// the fences of the fenced ones; `None` if none is fenced. `own` gives
/// the connection's own miss-name prefix: where every fenced key's policy
/// has `ticket_scope = "connection"`, the write also takes back the
/// connection's own misses of those keys (see fence.lua `write`).
pub(crate) fn command_call(
    scope: &Scope,
    op: &'static str,
    words: &[Bytes],
    keys: &[Bytes],
    own: &dyn Fn() -> Bytes,
) -> Option<ScriptCall> {
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
    // A missing fence is created only where the lag window (C2) needs the
    // invalidation time: a key without a fence has no miss outstanding.
    let create = fenced.iter().any(|(_, p)| !p.lag_window.is_zero());
    let own = match fenced
        .iter()
        .all(|(_, p)| p.ticket_scope == TicketScope::Connection)
    {
        true => own(),
        false => Bytes::new(),
    };
    let mut args = vec![
        Bytes::from(op),
        millis(ttl),
        fenced.len().to_string().into(),
        Bytes::from_static(if create { b"1" } else { b"0" }),
        own,
    ];
    debug_assert_eq!(args.len(), COMMAND_AT, "after_command cuts the command here");
    args.extend(words.iter().cloned());
    Some(ScriptCall::new(all_keys, args))
}

/// Inside `MULTI`, the client's fenced write goes as it was sent, so that
/// Redis checks it as that command (at queue time: arity, OOM; at `EXEC`:
/// OOM, READONLY, NOREPLICAS), and this call goes right behind it, in the
/// same transaction: the write's `write`/`inval` call without the command
/// (it has run), moving the same fences. Under `on_write = "invalidate"`
/// (`reply` is [`ScriptReply::Ok`]) it keeps its `DEL`: the value the
/// client's command stored goes.
pub(crate) fn after_command(mut call: ScriptCall, reply: &ScriptReply) -> ScriptCall {
    if !matches!(reply, ScriptReply::Ok { .. }) {
        call.edit(|_, args| args.truncate(COMMAND_AT));
    }
    call
}

/// Where the command starts in a `write`/`inval` call's arguments.
pub(super) const COMMAND_AT: usize = 5;

pub(super) fn stale_reply(why: Refusal, rules: &Policy) -> Reply {
    match rules.on_stale_fill {
        OnStaleFill::Ok => Reply::Status("OK"),
        OnStaleFill::Error => Reply::Error(format!("STALE cachefence: fill refused ({})", why.as_str())),
    }
}

/// SET-family commands whose reply is `+OK` whatever the value: those that
/// `on_write = "invalidate"` can turn into a delete.
fn store_only(command: CacheOp, words: &[Bytes]) -> bool {
    match command {
        CacheOp::SetEx | CacheOp::PSetEx | CacheOp::MSet => true,
        CacheOp::Set => !words[3..].iter().any(|w| {
            let w = w.to_ascii_uppercase();
            w == b"GET" || w == b"NX" || w == b"XX"
        }),
        _ => false,
    }
}

/// Sends `call` in place of the client's command; `reply` says how its reply
/// becomes the client's.
pub(crate) fn rewrite(call: ScriptCall, reply: ScriptReply) -> Plan {
    Plan::Rewrite { call, reply }
}

/// Whether a fenced command has an argument count Redis accepts; others go
/// as they are so Redis' own error stays exact.
fn plausible_arity(command: CacheOp, words: &[Bytes]) -> bool {
    let n = words.len();
    match command {
        CacheOp::Get => n == 2,
        CacheOp::GetEx | CacheOp::MGet => n >= 2,
        CacheOp::Set => n >= 3,
        CacheOp::SetEx | CacheOp::PSetEx => n == 4,
        CacheOp::MSet => n >= 3 && n % 2 == 1,
        CacheOp::Delete => match &words[0].to_ascii_uppercase()[..] {
            b"GETDEL" => n == 2,
            _ => n >= 2,
        },
        CacheOp::Write => match &words[0].to_ascii_uppercase()[..] {
            b"INCR" | b"DECR" => n == 2,
            b"SETRANGE" => n == 4,
            _ => n == 3,
        },
    }
}

#[cfg(test)]
pub(super) mod tests;

/// `n` as the argument Redis reads: no allocation for a digit.
fn small_number(n: usize) -> Bytes {
    const DIGITS: [&[u8]; 10] = [b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"8", b"9"];
    match DIGITS.get(n) {
        Some(digit) => Bytes::from_static(digit),
        None => n.to_string().into(),
    }
}
