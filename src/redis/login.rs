//! Whether a new connection to Redis starts logged in.
//!
//! Redis logs a new connection in as the `default` user when that user is
//! on and needs no password, and asks every other connection for `AUTH`
//! (`-NOAUTH`) — for as long as the default user needs a password, and only
//! connections made while it needed one (checked with Redis 7.0: a
//! connection made before a `CONFIG SET requirepass` keeps working).
//!
//! A client of the proxy must get what a new connection of its own would
//! get. A shared connection cannot show it: it stays as it was when it was
//! opened. So when the proxy has no credentials of its own (with
//! `upstream_password` it logs every connection in itself, in both modes),
//! it keeps what it knows of it: learnt from the first `-NOAUTH` a client
//! gets (a Redis started with a password), and, once a command that may
//! change it (`CONFIG SET requirepass`, `ACL SETUSER default`, `ACL LOAD`)
//! has been answered through the proxy, from one `PING` on a new
//! connection of its own before the next client starts. A client that
//! would be asked for `AUTH` gets a connection of its own from the start,
//! where Redis answers it.
//!
//! A change made on Redis directly, not through the proxy, is learnt when
//! the proxy restarts (README, "What differs in shared mode").

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{debug, info};

use super::{CallError, call_reply, connect};
use crate::config::Upstream;
use crate::resp::request::Frame;

/// The low bits of [`NewLogins::word`]: what is known (0: nothing).
const OPEN: u64 = 1;
const CLOSED: u64 = 2;
/// One change noted (the generation, above the state bits).
const GENERATION: u64 = 4;

/// What a new connection to Redis gets, as far as the proxy knows.
#[derive(Debug, Default)]
pub struct NewLogins {
    /// `generation * GENERATION + state`: a check's answer is kept only if
    /// no change was noted while it ran.
    word: AtomicU64,
    /// One check at a time; the others wait for its answer.
    checking: tokio::sync::Mutex<()>,
}

impl NewLogins {
    /// Whether a new connection is logged in without `AUTH`, and the
    /// generation that answer belongs to (for [`NewLogins::asked_for_auth`]).
    ///
    /// Until a command that may change it has been answered through the
    /// proxy, an unknown answer counts as yes without asking: a Redis
    /// started with a password says so to the first client on the shared
    /// connection (`-NOAUTH`), and that is learnt then. Afterwards Redis is
    /// asked; a Redis that cannot be asked counts as yes (the session finds
    /// out what is wrong from its own upstream), and is asked next time.
    pub async fn logged_in(&self, upstream: &Upstream, timeout: Duration) -> (bool, u64) {
        let word = self.word.load(Ordering::Acquire);
        if let Some(open) = known(word) {
            return (open, word / GENERATION);
        }
        if word / GENERATION == 0 {
            return (true, 0);
        }
        let _one = self.checking.lock().await;
        let word = self.word.load(Ordering::Acquire);
        if let Some(open) = known(word) {
            return (open, word / GENERATION);
        }
        let Some(open) = ask(upstream, timeout).await else {
            return (true, word / GENERATION);
        };
        self.learn(word, open);
        (open, word / GENERATION)
    }

    /// A client that started as logged in was asked for `AUTH` by Redis:
    /// its upstream connection, made when it started (generation
    /// `generation`), was not logged in.
    pub fn asked_for_auth(&self, generation: u64) {
        self.learn(generation * GENERATION, false);
    }

    /// Keeps `open` as the answer for `word`'s generation, unless a change
    /// was noted since (the answer may predate it).
    fn learn(&self, word: u64, open: bool) {
        let state = if open { OPEN } else { CLOSED };
        if self
            .word
            .compare_exchange(word, word + state, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            info!(
                new_connections = if open { "logged in" } else { "asked for AUTH" },
                "learnt how Redis greets a new connection"
            );
        }
    }

    /// A command that may change it was answered: the next new client asks.
    pub fn changed(&self) {
        let _ = self.word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            Some(w - w % GENERATION + GENERATION)
        });
        debug!("a command that may change Redis' logins was answered");
    }
}

/// `Some(open)` when the state bits of `word` know.
fn known(word: u64) -> Option<bool> {
    match word % GENERATION {
        OPEN => Some(true),
        CLOSED => Some(false),
        _ => None,
    }
}

/// A new connection without credentials, one `PING`: `-NOAUTH` means
/// closed; any other answer (`+PONG`, or `-NOPERM` for a default user
/// without `PING`) means open. `None`: Redis could not be asked.
async fn ask(upstream: &Upstream, timeout: Duration) -> Option<bool> {
    let bare = Upstream {
        user: None,
        password: None,
        db: 0,
        ..upstream.clone()
    };
    let answer = tokio::time::timeout(timeout, async {
        let mut stream = connect(&bare, timeout).await.ok()?;
        match call_reply(&mut stream, b"*1\r\n$4\r\nPING\r\n").await {
            Ok(_) => Some(true),
            Err(CallError::Refused(reply)) => Some(!reply.starts_with("NOAUTH")),
            Err(CallError::Io(_)) => None,
        }
    })
    .await;
    answer.ok().flatten()
}

/// Whether `request` may change what a new connection gets:
/// `CONFIG SET requirepass …`, `ACL SETUSER default …`, `ACL LOAD`.
pub fn may_change(frame: &Frame, request: &[u8]) -> bool {
    let arg = |i: usize| frame.arg(request, i).unwrap_or_default();
    let is = |i: usize, word: &[u8]| arg(i).eq_ignore_ascii_case(word);
    if is(0, b"CONFIG") && is(1, b"SET") {
        // `CONFIG SET name value [name value …]` (Redis 7): past the
        // arguments the framer tracks, so copied (a rare command).
        let args = frame.all_args(request);
        return args
            .iter()
            .skip(2)
            .step_by(2)
            .any(|name| name.eq_ignore_ascii_case(b"requirepass"));
    }
    // User names are case-sensitive.
    is(0, b"ACL") && (is(1, b"LOAD") || is(1, b"SETUSER") && arg(2) == b"default")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::request::RequestFramer;

    fn changes(words: &[&str]) -> bool {
        let args: Vec<&[u8]> = words.iter().map(|w| w.as_bytes()).collect();
        let request = crate::resp::encode::command(&args);
        let frame = RequestFramer::new(1 << 20)
            .next(&request)
            .expect("a valid request")
            .expect("one complete frame");
        may_change(&frame, &request)
    }

    #[test]
    fn the_commands_that_may_change_a_new_connections_login() {
        assert!(changes(&["config", "set", "requirepass", "x"]));
        assert!(changes(&[
            "CONFIG",
            "SET",
            "maxmemory",
            "1mb",
            "REQUIREPASS",
            "x"
        ]));
        assert!(changes(&["ACL", "SETUSER", "default", "off"]));
        assert!(changes(&["acl", "load"]));
        assert!(
            !changes(&["CONFIG", "SET", "maxmemory", "requirepass"]),
            "a value, not a name"
        );
        assert!(!changes(&["CONFIG", "GET", "requirepass"]));
        assert!(!changes(&["ACL", "SETUSER", "alice", "on"]));
        assert!(!changes(&["ACL", "SETUSER", "DEFAULT", "on"]), "another user");
        assert!(!changes(&["GET", "requirepass"]));
        assert!(!changes(&["CONFIG"]));
    }

    #[test]
    fn an_answer_that_raced_a_change_is_not_kept() {
        let logins = NewLogins::default();
        // Nothing changed yet: no question, and a client's -NOAUTH is kept.
        logins.asked_for_auth(0);
        assert_eq!(known(logins.word.load(Ordering::Acquire)), Some(false));
        logins.changed();
        let before = logins.word.load(Ordering::Acquire);
        logins.changed();
        // The check that read `before` cannot store its answer.
        assert!(
            logins
                .word
                .compare_exchange(before, before + OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        );
        assert_eq!(known(logins.word.load(Ordering::Acquire)), None);
        // A -NOAUTH from a connection made before the last change: not kept.
        logins.asked_for_auth(1);
        assert_eq!(known(logins.word.load(Ordering::Acquire)), None);
        logins.asked_for_auth(2);
        assert_eq!(known(logins.word.load(Ordering::Acquire)), Some(false));
        logins.changed();
        assert_eq!(known(logins.word.load(Ordering::Acquire)), None);
    }
}
