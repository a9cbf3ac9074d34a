//! What the proxy expects back for one forwarded request, decided from the
//! request alone when it is framed; [`super::pairing`] keeps these in order.

use bytes::Bytes;

use crate::fence::plan::{InExec, Intercept};
use crate::fence::probe::PlainKind;
use crate::fence::translate::ScriptReply;
use crate::resp::command::{Command, ReplyMode, SubFamily};

/// What the proxy expects back for one forwarded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// One reply, forwarded as is.
    Reply,
    /// One reply to a blocking command, forwarded as is; it may take as
    /// long as the command asks.
    Blocking,
    /// One reply; on success the protocol becomes `version` (if given).
    Hello(Option<u8>),
    /// One reply; on success every mode is reset.
    Reset,
    /// One reply; on success the connection streams MONITOR lines.
    Monitor,
    /// One reply, or none if Redis closes the connection (QUIT, SHUTDOWN).
    Closing,
    /// `left` subscription confirmations of `family`, or one error.
    Confirm { family: SubFamily, left: u64 },
    /// Unsubscribe from everything in `family`: one confirmation per current
    /// subscription (at least one), counted when it reaches the head.
    ConfirmAll(SubFamily),
    /// A reply the proxy made itself, sent in its place in the order;
    /// `close` ends the connection after it.
    Local { reply: Bytes, close: bool },
    /// A `GET` of a fenced key: [`Intercept::Get`], unboxed because it
    /// is the hot path of a cache (one allocation less per hit) and it fits
    /// in the size that [`Expect::Queued`] takes anyway.
    Get { key: Bytes, policy: usize },
    /// The store of a probed run sent without the script
    /// ([`Intercept::Plain`] of a [`ScriptReply::Set`]): unboxed like
    /// [`Expect::Get`], as most fenced `SET`s of a pipeline go this way.
    PlainSet {
        kind: PlainKind,
        key: Bytes,
        policy: usize,
    },
    /// Any other intercepted command (see [`crate::fence::plan`]); boxed so that
    /// the queue entry of every plain command stays small.
    Fence(Box<Intercept>),
    /// `EXEC` of a transaction that queued (un)subscriptions.
    Exec,
    /// One reply; on success the connection uses database `db`.
    Select(u32),
    /// A command inside `MULTI` (fences on): when Redis answers `+QUEUED`,
    /// its `EXEC` element is handled as this says.
    Queued(InExec),
    /// `SYNC` / `PSYNC`: an error (Redis refused it) or the start of a
    /// replication link, after which nothing is framed any more. With
    /// `inspect` false (replies were off) whatever comes is the link.
    Sync { inspect: bool },
}

impl Expect {
    /// The expectation of an intercepted command: a `GET` unboxed
    /// ([`Expect::Get`]), anything else boxed ([`Expect::Fence`]).
    pub fn fence(expect: Intercept) -> Expect {
        match expect {
            Intercept::Get { key, policy } => Expect::Get { key, policy },
            Intercept::Plain {
                kind,
                reply: ScriptReply::Set { policy, key },
            } => Expect::PlainSet { kind, key, policy },
            other => Expect::Fence(Box::new(other)),
        }
    }

    /// Bytes of the client's request this expectation keeps (keys, and a
    /// fill's value kept to resend after `NOSCRIPT`), for the per-connection
    /// bound [`MAX_HELD_BYTES`].
    pub(super) fn weight(&self) -> usize {
        let fence = match self {
            Expect::Get { key, .. } => return key.len(),
            Expect::Fence(fence) => fence,
            _ => return 0,
        };
        match &**fence {
            // Never boxed (see `Expect::fence`).
            Intercept::Get { key, .. } => key.len(),
            Intercept::MGet { keys } => keys.iter().flatten().map(|(k, _)| k.len()).sum(),
            Intercept::Script { call, .. } => call.weight(),
            Intercept::Probe(probe) => probe.weight(),
            Intercept::Local(_) | Intercept::Exec(_) | Intercept::Keyspace(_) | Intercept::Plain { .. } => 0,
        }
    }

    /// How many replies the client is owed for this expectation when no
    /// frame from upstream will come (the upstream is gone): none for a
    /// reply the proxy makes itself, one per command of a batch.
    pub(super) fn replies(&self) -> usize {
        match self {
            _ if self.is_local() => 0,
            Expect::Fence(fence) => match &**fence {
                Intercept::Script { reply, .. } => reply.replies(),
                Intercept::Probe(probe) => probe.replies(),
                _ => 1,
            },
            _ => 1,
        }
    }

    /// A reply the proxy makes itself (no frame from upstream answers it).
    pub(super) fn is_local(&self) -> bool {
        match self {
            Expect::Local { .. } => true,
            Expect::Fence(fence) => matches!(**fence, Intercept::Local(_)),
            _ => false,
        }
    }

    /// The expectation for a request, given the connection's `CLIENT REPLY`
    /// mode, which it updates. `None`: Redis sends nothing back.
    pub fn for_command(command: Command, mode: &mut ReplyMode) -> Option<Expect> {
        let expect = match command {
            Command::Plain
            | Command::Multi
            | Command::EndMulti
            | Command::CacheOp(_)
            | Command::Admin
            | Command::Keyspace(_)
            | Command::Select(None) => Expect::Reply,
            Command::Blocking => Expect::Blocking,
            Command::Sync => Expect::Sync { inspect: true },
            Command::Select(Some(db)) => Expect::Select(db),
            Command::Subscribe(family, n) => Expect::Confirm {
                family,
                left: n.max(1),
            },
            Command::Unsubscribe(family, Some(n)) => Expect::Confirm { family, left: n },
            Command::Unsubscribe(family, None) => Expect::ConfirmAll(family),
            Command::Hello(version) => Expect::Hello(version),
            Command::Reset => {
                *mode = ReplyMode::On;
                return Some(Expect::Reset);
            }
            Command::Monitor => Expect::Monitor,
            Command::Closing => Expect::Closing,
            Command::ClientReply(new) => {
                *mode = new;
                return (new == ReplyMode::On).then_some(Expect::Reply);
            }
        };
        match *mode {
            ReplyMode::On => Some(expect),
            ReplyMode::Off => None,
            ReplyMode::Skip => {
                *mode = ReplyMode::On;
                None
            }
        }
    }
}
