//! The fence layer's state for one client connection: the tickets it
//! holds, whether the script's source was sent on its upstream, whether it
//! passed `CACHE.AUTH`. Its rules live beside it: [`super::plan`] (how a
//! request is sent) and [`super::translate`] (how the reply comes back).

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::Bytes;

use super::history::{Event, What};
use super::plan::{Plan, stale_reply};
use super::script::ScriptCall;
use super::{Fences, Policy, Refusal, Scope};

/// The fence state of one connection.
#[derive(Debug)]
pub struct Client<'a> {
    pub fences: &'a Fences,
    pub connection: u64,
    /// Keys this connection holds tickets for (dropped with it).
    pub tickets: Mutex<HashSet<Bytes>>,
    /// The script's source was sent on this connection (later calls use
    /// `EVALSHA`). Only the requests direction, the one upstream writer,
    /// encodes calls, so the first call on the wire is the one with source.
    loaded: std::sync::atomic::AtomicBool,
    /// `CACHE.AUTH` succeeded on this connection.
    pub admin: std::sync::atomic::AtomicBool,
}

impl<'a> Client<'a> {
    pub fn new(fences: &'a Fences) -> Client<'a> {
        Client {
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

    pub(super) fn held(&self) -> std::sync::MutexGuard<'_, HashSet<Bytes>> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
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

    pub(super) fn refuse(&self, key: &[u8], why: Refusal, rules: &Policy) -> Plan {
        self.fences.stats.refused(why).inc();
        self.record(key, What::FillRefused(why));
        Plan::Local(stale_reply(why, rules))
    }

    /// Records an event of `key` for `CACHE.EXPLAIN`.
    pub(crate) fn record(&self, key: &[u8], what: What) {
        self.fences.history.record(key, Event::now(self.connection, what));
    }

    /// Records an event of the fenced ones among `keys`.
    pub(super) fn record_fenced(&self, scope: &Scope, keys: &[Bytes], what: What) {
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
