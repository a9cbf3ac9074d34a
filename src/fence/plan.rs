//! The request rules: how an intercepted request is sent — as it is,
//! rewritten to a fence script call, or answered by the proxy — and what
//! its reply will need ([`Intercept`]).
//!
//! | client sends | fenced key, ticket held | fenced key, no ticket |
//! |---|---|---|
//! | `GET k` | forwarded; a nil reply is held while the miss script runs | same |
//! | `SET k v …`, `SETEX`, `PSETEX` | fill script (stored only if the fence did not move) | write per `on_write` |
//! | `MSET`, `APPEND`, `INCR`… | write per `on_write` | write per `on_write` |
//! | `DEL`, `UNLINK`, `GETDEL` | invalidation script | invalidation script |

use bytes::Bytes;

use super::client::Client;
use super::history::{Source, What};
use super::script::{ScriptCall, fence_key};
use super::translate::ScriptReply;
use super::{OnStaleFill, OnWrite, Policy, Refusal, Scope, micros, millis};
use crate::resp::command::CacheOp;
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
    /// The `EXEC` reply of a transaction that queued rewritten commands:
    /// the translation of each queued command, in order.
    Exec(Vec<Option<ScriptReply>>),
}

/// How to send one intercepted request.
#[derive(Debug)]
pub enum Plan {
    /// Send the request's bytes unchanged.
    Forward(Intercept),
    /// Send this script call instead.
    Rewrite(ScriptCall, Intercept),
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
            CacheOp::MSet => {
                let keys: Vec<Bytes> = words[1..].iter().step_by(2).cloned().collect();
                self.write(scope, command, &words, keys)
            }
            CacheOp::Write => self.write(scope, command, &words, vec![key.clone()]),
            CacheOp::Delete => {
                let keys = words[1..].to_vec();
                let call = command_call(scope, "inval", &words, &keys)?;
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

    /// A fill, if this connection holds a ticket for the key and the command
    /// is a plain store (`SET` with only expiry options and `NX`).
    fn fill(
        &self,
        command: CacheOp,
        words: &[Bytes],
        policy: usize,
        rules: &Policy,
        db: u32,
    ) -> Option<Plan> {
        let key = &words[1];
        let (value, expiry, nx) = match command {
            CacheOp::SetEx => (
                words.get(3)?,
                vec![Bytes::from_static(b"EX"), words.get(2)?.clone()],
                false,
            ),
            CacheOp::PSetEx => (
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
                        invalidation: None,
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
}

/// A `write`/`inval` call running `words` (the command) on `keys`, moving
/// the fences of the fenced ones; `None` if none is fenced.
pub(crate) fn command_call(
    scope: &Scope,
    op: &'static str,
    words: &[Bytes],
    keys: &[Bytes],
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
    let mut args = vec![
        Bytes::from(op),
        millis(ttl).into(),
        fenced.len().to_string().into(),
    ];
    args.extend(words.iter().cloned());
    Some(ScriptCall::new(all_keys, args))
}

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
    Plan::Rewrite(
        call.clone(),
        Intercept::Script {
            call,
            reply,
            slot: None,
        },
    )
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
pub(super) mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fence::{CacheSection, Fences, Ticket};
    use crate::resp::command::Command;
    use crate::resp::request::RequestFramer;

    /// `user:*` fenced with defaults, `rejected:*` with `on_write = "reject"`,
    /// `gone:*` with `on_write = "invalidate"`; everything else passes through.
    pub(in crate::fence) fn fences() -> Fences {
        let section = |pattern: &str, on_write| CacheSection {
            pattern: Some(pattern.into()),
            on_write,
            ..Default::default()
        };
        let sections = [
            section("user:*", None),
            section("rejected:*", Some(OnWrite::Reject)),
            section("gone:*", Some(OnWrite::Invalidate)),
        ];
        Fences::new(Scope::new(&sections).expect("valid sections"), None)
    }

    fn plan(client: &Client<'_>, line: &str) -> Option<Plan> {
        let request = format!("{line}\r\n");
        let frame = RequestFramer::new(1 << 20)
            .next(request.as_bytes())
            .expect("a valid request")
            .expect("a whole request");
        let Command::CacheOp(op) = Command::classify(&frame, request.as_bytes()) else {
            panic!("{line} is not a cache command");
        };
        client.plan(&client.fences.scope(), op, &frame, request.as_bytes(), false, 0)
    }

    /// The script operation and keys of a rewritten command, and its reply rule.
    fn rewritten(plan: Option<Plan>) -> (String, Vec<Bytes>, ScriptReply) {
        match plan {
            Some(Plan::Rewrite(
                call,
                Intercept::Script {
                    reply, slot: None, ..
                },
            )) => (
                String::from_utf8_lossy(&call.args[0]).into_owned(),
                call.keys,
                reply,
            ),
            other => panic!("expected a rewrite, got {other:?}"),
        }
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    pub(in crate::fence) fn give_ticket(client: &Client<'_>, key: &'static str, issued: Instant) {
        let ticket = Ticket {
            version: b("100"),
            miss_us: b("200"),
            issued,
        };
        assert!(client.fences.issue(client.connection, b(key), ticket, 0));
        client.held().insert(b(key));
    }

    #[test]
    fn a_get_of_a_fenced_key_is_forwarded_and_others_pass_through() {
        let fences = fences();
        let client = Client::new(&fences);
        match plan(&client, "GET user:1") {
            Some(Plan::Forward(Intercept::Get { key, policy: 0 })) => assert_eq!(key, b("user:1")),
            other => panic!("{other:?}"),
        }
        assert!(plan(&client, "GET other").is_none());
        assert!(plan(&client, "SET other v").is_none());
        assert!(plan(&client, "DEL other").is_none());
    }

    #[test]
    fn a_set_without_a_ticket_is_a_write_that_moves_the_fence() {
        let fences = fences();
        let client = Client::new(&fences);
        let (op, keys, reply) = rewritten(plan(&client, "SET user:1 v"));
        assert_eq!(op, "write");
        assert_eq!(keys, vec![b("user:1"), Bytes::from(fence_key(b"user:1"))]);
        assert_eq!(
            reply,
            ScriptReply::Command {
                keys: vec![b("user:1")],
                invalidation: None
            }
        );
        assert_eq!(fences.stats.writes.get(), 1);
    }

    #[test]
    fn a_set_with_a_ticket_is_a_fill_and_consumes_it() {
        let fences = fences();
        let client = Client::new(&fences);
        give_ticket(&client, "user:1", Instant::now());
        let (op, _, reply) = rewritten(plan(&client, "SET user:1 v EX 10"));
        assert_eq!(op, "fill");
        assert_eq!(
            reply,
            ScriptReply::Fill {
                policy: 0,
                key: b("user:1"),
                lease_api: false
            }
        );
        assert_eq!(fences.tickets_outstanding(), 0);
        // The next SET has no ticket left: a write.
        assert_eq!(rewritten(plan(&client, "SET user:1 v")).0, "write");
    }

    #[test]
    fn a_set_with_xx_or_get_is_never_a_fill() {
        let fences = fences();
        let client = Client::new(&fences);
        give_ticket(&client, "user:1", Instant::now());
        assert_eq!(rewritten(plan(&client, "SET user:1 v XX")).0, "write");
        assert_eq!(rewritten(plan(&client, "SET user:1 v GET")).0, "write");
        assert_eq!(
            fences.tickets_outstanding(),
            1,
            "the ticket waits for a real fill"
        );
    }

    #[test]
    fn a_fill_older_than_lease_ttl_is_refused_here() {
        let fences = fences();
        let client = Client::new(&fences);
        let old = Instant::now() - Duration::from_secs(11);
        give_ticket(&client, "user:1", old);
        match plan(&client, "SET user:1 v") {
            Some(Plan::Local(Reply::Status("OK"))) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(fences.stats.refused(Refusal::Expired).get(), 1);
    }

    #[test]
    fn a_delete_invalidates_every_key_and_fences_the_fenced_ones() {
        let fences = fences();
        let client = Client::new(&fences);
        let (op, keys, reply) = rewritten(plan(&client, "DEL user:1 other"));
        assert_eq!(op, "inval");
        assert_eq!(
            keys,
            vec![b("user:1"), b("other"), Bytes::from(fence_key(b"user:1"))]
        );
        assert_eq!(
            reply,
            ScriptReply::Command {
                keys: vec![b("user:1"), b("other")],
                invalidation: Some(Source::Client)
            }
        );
        assert_eq!(fences.stats.keys_invalidated_client.get(), 2);
    }

    #[test]
    fn on_write_decides_what_a_write_becomes() {
        let fences = fences();
        let client = Client::new(&fences);
        match plan(&client, "SET rejected:1 v") {
            Some(Plan::Local(Reply::Error(text))) => assert!(
                text.starts_with("ERR cachefence: writes to 'rejected:1' are rejected"),
                "{text}"
            ),
            other => panic!("{other:?}"),
        }
        let (op, _, reply) = rewritten(plan(&client, "SET gone:1 v"));
        assert_eq!(op, "inval");
        assert_eq!(
            reply,
            ScriptReply::Ok {
                keys: vec![b("gone:1")]
            }
        );
        // Its reply depends on the value: it cannot become a delete.
        assert_eq!(rewritten(plan(&client, "SET gone:1 v NX")).0, "write");
        // The strictest rule among the keys wins.
        assert!(matches!(
            plan(&client, "MSET user:1 a rejected:1 b"),
            Some(Plan::Local(_))
        ));
    }

    #[test]
    fn wrong_arity_goes_as_it_is_for_redis_own_error() {
        let fences = fences();
        let client = Client::new(&fences);
        for line in [
            "SETEX user:1 10",
            "MSET user:1",
            "INCR user:1 2",
            "GETDEL user:1 user:2",
        ] {
            assert!(plan(&client, line).is_none(), "{line}");
        }
    }
}
