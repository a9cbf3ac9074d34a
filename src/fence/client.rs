//! The fence layer's state for one client connection: the tickets it
//! holds, whether the script's source was sent on its upstream, whether it
//! passed `CACHE.AUTH`. Its rules live beside it: [`super::plan`] (how a
//! request is sent) and [`super::translate`] (how the reply comes back).

use bytes::Bytes;

use super::history::{Event, What};
use super::script::ScriptCall;
use super::{Fences, Scope, TicketScope};

/// The fence state of one connection.
#[derive(Debug)]
pub struct Client<'a> {
    pub fences: &'a Fences,
    pub connection: u64,
    /// The client's IP address: the `client` ticket scope.
    address: String,
    /// Misses of this connection so far: each has a name of its own (its
    /// herd lease and its ticket in the fence), so that on a connection
    /// shared by many threads one miss leads and the others wait.
    misses: std::sync::atomic::AtomicU64,
    /// The script's source was sent on this connection (later calls use
    /// `EVALSHA`). Only the requests direction, the one upstream writer,
    /// encodes calls, so the first call on the wire is the one with source.
    loaded: std::sync::atomic::AtomicBool,
    /// `CACHE.AUTH` succeeded on this connection.
    pub admin: std::sync::atomic::AtomicBool,
    /// [`Client::scope_prefix`] of each ticket scope, made once: every
    /// fenced write sends one.
    prefixes: [Bytes; 3],
}

impl<'a> Client<'a> {
    /// The fence state of a new connection from `address`.
    pub fn new(fences: &'a Fences, address: std::net::IpAddr) -> Client<'a> {
        let connection = fences.connection();
        let address = address.to_string();
        let prefixes = [
            Bytes::from_static(b"m|"),
            Bytes::from(format!("m|{address}|")),
            Bytes::from(format!("m|{address}|{}|", fences.lease_holder(connection))),
        ];
        Client {
            fences,
            connection,
            address,
            prefixes,
            misses: std::sync::atomic::AtomicU64::new(0),
            loaded: std::sync::atomic::AtomicBool::new(false),
            admin: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Encodes a call for the wire: with the script's source the first
    /// time this process sends one ([`crate::fence::Fences::script_sent`]),
    /// or when Redis lost the script (`reload`).
    pub fn encode(&self, call: &ScriptCall, reload: bool) -> Bytes {
        use std::sync::atomic::Ordering::Relaxed;
        let first = !self.loaded.swap(true, Relaxed) && !self.fences.script_sent.swap(true, Relaxed);
        call.encode(first || reload)
    }

    /// Whether this connection sent a call already (its next calls go as
    /// `EVALSHA`).
    pub fn has_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A name for this connection's next miss.
    pub fn next_miss(&self) -> u64 {
        self.misses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    }

    /// The herd lease holder name of miss `miss` (0: the connection itself,
    /// for the lease API, whose token is the ticket).
    pub fn holder(&self, miss: u64) -> String {
        match miss {
            0 => self.fences.lease_holder(self.connection),
            miss => format!("{}:{miss}", self.fences.lease_holder(self.connection)),
        }
    }

    /// The fence field of miss `miss`: `m|<address>|<connection>|<miss>`.
    /// Each ticket scope is a prefix of it ([`Client::scope_prefix`]).
    pub fn miss_field(&self, miss: u64) -> String {
        format!(
            "m|{}|{}|{miss}",
            self.address,
            self.fences.lease_holder(self.connection)
        )
    }

    /// The fence fields of the misses a SET here is judged against.
    pub fn scope_prefix(&self, scope: TicketScope) -> Bytes {
        let at = match scope {
            TicketScope::All => 0,
            TicketScope::Client => 1,
            TicketScope::Connection => 2,
        };
        self.prefixes[at].clone()
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

    /// Records an event of `key` for `CACHE.EXPLAIN`.
    pub(crate) fn record(&self, key: &[u8], what: What) {
        self.fences.history.record(key, Event::now(self.connection, what));
    }

    /// A write without a ticket of `keys`, recorded where they have a
    /// history ([`super::history::History::record_if_known`]).
    pub(super) fn record_written(&self, keys: &[Bytes]) {
        let event = || Event::now(self.connection, What::Write);
        for key in keys {
            self.fences.history.record_if_known(key, event);
        }
    }

    /// Records an event of the fenced ones among `keys`.
    pub(super) fn record_fenced(&self, scope: &Scope, keys: &[Bytes], what: What) {
        let event = Event::now(self.connection, what);
        for key in keys.iter().filter(|k| scope.policy(k).is_some()) {
            self.fences.history.record(key, event);
        }
    }
}
