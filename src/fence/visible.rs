//! Fences are keys in the client's database (`cachefence:{key}`, see
//! [`super::script::fence_key`]); the replies that list the keyspace must
//! not show them (#15). Only the replies of `KEYS`, `SCAN` and `RANDOMKEY`,
//! and keyspace notifications, are looked at — never a `GET`'s.
//!
//! | reply | what the client gets |
//! |---|---|
//! | `KEYS` | the array without fence keys |
//! | `SCAN` | the batch without fence keys (SCAN may return fewer keys than `COUNT`), same cursor |
//! | `RANDOMKEY` naming a fence | the [`random_key_call`] script: random draws, then a bounded `SCAN`, for a key that is not a fence; nil if none |
//! | a keyspace notification of a fence (`__keyspace@N__:cachefence:…`, or `__keyevent@N__:…` with a fence as payload) | nothing |

use bytes::Bytes;

use super::script::{ScriptCall, is_fence_key};
use crate::resp::command::KeyspaceOp;
use crate::resp::value::{Reply, Value};

/// Every fence key starts with this; a reply without it needs no look.
const MARK: &[u8] = b"cachefence:";

/// The channel Redis sends `CLIENT TRACKING` invalidations on when they
/// are redirected (RESP2), and the name of the RESP3 push.
const INVALIDATE_CHANNEL: &[u8] = b"__redis__:invalidate";
const INVALIDATE: &[u8] = b"invalidate";

/// What the client gets of a frame nobody asked for (a push or a pub/sub
/// message).
#[derive(Debug, PartialEq, Eq)]
pub enum Unsolicited {
    /// As Redis sent it.
    AsIs,
    /// Nothing: it is about fences only.
    Hidden,
    /// A tracking invalidation without its fence keys.
    Filtered(Bytes),
}

/// A keyspace notification of a fence is hidden; a `CLIENT TRACKING`
/// invalidation (a RESP3 `invalidate` push, or a message on
/// `__redis__:invalidate` for a client that redirects them) loses its
/// fence keys — the miss script reads the fence on the client's
/// connection, so Redis tracks it for the client — and is hidden if
/// nothing else is left.
pub fn unsolicited(frame: &[u8]) -> Unsolicited {
    if memchr::memmem::find(frame, MARK).is_none() {
        return Unsolicited::AsIs;
    }
    if is_fence_notification(frame) {
        return Unsolicited::Hidden;
    }
    let push = frame.first() == Some(&b'>');
    let Some(Value::Array(mut items)) = Value::decode(frame, push) else {
        return Unsolicited::AsIs;
    };
    let name = |v: Option<&Value>, of: &[u8]| v.and_then(Value::as_bytes).is_some_and(|b| b[..] == *of);
    let invalidation = match items.len() {
        2 => push && name(items.first(), INVALIDATE),
        _ => items.len() >= 3 && name(items.get(items.len() - 2), INVALIDATE_CHANNEL),
    };
    let Some(Value::Array(keys)) = items.pop().filter(|_| invalidation) else {
        return Unsolicited::AsIs;
    };
    let kept: Vec<Bytes> = keys
        .into_iter()
        .filter_map(|k| match k {
            Value::Bulk(key) if is_fence_key(&key) => None,
            Value::Bulk(key) => Some(key),
            _ => None,
        })
        .collect();
    if kept.is_empty() {
        return Unsolicited::Hidden;
    }
    // The same frame, its last element the keys left.
    let mut out = bytes::BytesMut::with_capacity(frame.len());
    out.extend_from_slice(format!("{}{}\r\n", if push { '>' } else { '*' }, items.len() + 1).as_bytes());
    for item in &items {
        let word: &[u8] = item.as_bytes().map_or(b"", |b| &b[..]);
        out.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
        out.extend_from_slice(word);
        out.extend_from_slice(b"\r\n");
    }
    let keys: Vec<&[u8]> = kept.iter().map(|k| &k[..]).collect();
    out.extend_from_slice(&crate::resp::encode::command(&keys));
    Unsolicited::Filtered(out.freeze())
}

/// Random draws the `RANDOMKEY` script makes before it scans.
pub const RANDOM_DRAWS: usize = 32;

/// `SCAN … COUNT 100` calls the `RANDOMKEY` script makes at most after its
/// draws found only fences (about 10 000 keys looked at).
pub const RANDOM_SCANS: usize = 100;

/// What the client gets for the reply to a keyspace command.
#[derive(Debug, PartialEq, Eq)]
pub enum Visible {
    /// Redis' reply as it is (no fence in it).
    Unchanged,
    /// The reply without its fence keys.
    Filtered(Bytes),
    /// `RANDOMKEY` drew a fence: ask again with [`random_key_call`].
    Redraw,
}

/// The reply to `op` as the client may see it.
pub fn keyspace_reply(op: KeyspaceOp, frame: &[u8], resp3: bool) -> Visible {
    if memchr::memmem::find(frame, MARK).is_none() {
        return Visible::Unchanged;
    }
    match (op, Value::decode(frame, resp3)) {
        (KeyspaceOp::RandomKey, Some(Value::Bulk(key))) if is_fence_key(&key) => Visible::Redraw,
        (KeyspaceOp::Keys, Some(Value::Array(keys))) => {
            Visible::Filtered(Reply::Array(visible(keys)).encode(resp3))
        }
        (KeyspaceOp::Scan, Some(Value::Array(mut items))) if items.len() == 2 => {
            let Some(Value::Array(keys)) = items.pop() else {
                return Visible::Unchanged;
            };
            let Some(Value::Bulk(cursor)) = items.pop() else {
                return Visible::Unchanged;
            };
            Visible::Filtered(
                Reply::Array(vec![Reply::Bulk(cursor), Reply::Array(visible(keys))]).encode(resp3),
            )
        }
        _ => Visible::Unchanged,
    }
}

/// The keys of a listing that are not fences, as bulks.
fn visible(keys: Vec<Value>) -> Vec<Reply> {
    keys.into_iter()
        .filter_map(|k| match k {
            Value::Bulk(key) if is_fence_key(&key) => None,
            Value::Bulk(key) => Some(Reply::Bulk(key)),
            _ => None,
        })
        .collect()
}

/// The `RANDOMKEY` script: a random key that is not a fence, or nil.
pub fn random_key_call() -> ScriptCall {
    ScriptCall::new(
        Vec::new(),
        vec![
            Bytes::from_static(b"randomkey"),
            RANDOM_DRAWS.to_string().into(),
            RANDOM_SCANS.to_string().into(),
        ],
    )
}

/// A pub/sub message (RESP2 `message`/`pmessage`, or the RESP3 push) that
/// is a keyspace notification about a fence: `__keyspace@N__:<fence>`, or
/// `__keyevent@N__:<event>` whose payload is a fence.
fn is_fence_notification(frame: &[u8]) -> bool {
    if memchr::memmem::find(frame, MARK).is_none() || memchr::memmem::find(frame, b"__key").is_none() {
        return false;
    }
    let Some(Value::Array(items)) = Value::decode(frame, frame.first() == Some(&b'>')) else {
        return false;
    };
    let kind = items.first().and_then(Value::as_bytes);
    let is = |w: &[u8]| kind.is_some_and(|k| k.eq_ignore_ascii_case(w));
    if !(is(b"message") || is(b"pmessage")) || items.len() < 3 {
        return false;
    }
    let (Some(Value::Bulk(channel)), Some(Value::Bulk(payload))) = (items.get(items.len() - 2), items.last())
    else {
        return false;
    };
    let key_of = |prefix: &[u8]| -> Option<&[u8]> {
        let rest = channel.strip_prefix(prefix)?;
        let end = memchr::memmem::find(rest, b"__:")?;
        Some(&rest[end + 3..])
    };
    match (key_of(b"__keyspace@"), key_of(b"__keyevent@")) {
        (Some(key), _) => is_fence_key(key),
        (None, Some(_)) => is_fence_key(payload),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_lose_their_fences_and_keep_the_rest() {
        let keys = b"*3\r\n$1\r\nk\r\n$14\r\ncachefence:{k}\r\n$1\r\nj\r\n";
        assert_eq!(
            keyspace_reply(KeyspaceOp::Keys, keys, false),
            Visible::Filtered(Bytes::from_static(b"*2\r\n$1\r\nk\r\n$1\r\nj\r\n"))
        );
        let plain = b"*1\r\n$1\r\nk\r\n";
        assert_eq!(keyspace_reply(KeyspaceOp::Keys, plain, false), Visible::Unchanged);
        let scan = b"*2\r\n$2\r\n17\r\n*1\r\n$14\r\ncachefence:{k}\r\n";
        assert_eq!(
            keyspace_reply(KeyspaceOp::Scan, scan, true),
            Visible::Filtered(Bytes::from_static(b"*2\r\n$2\r\n17\r\n*0\r\n"))
        );
        let random = b"$14\r\ncachefence:{k}\r\n";
        assert_eq!(
            keyspace_reply(KeyspaceOp::RandomKey, random, false),
            Visible::Redraw
        );
        let error = b"-ERR cachefence: something\r\n";
        assert_eq!(keyspace_reply(KeyspaceOp::Keys, error, false), Visible::Unchanged);
    }

    #[test]
    fn tracking_invalidations_lose_their_fence_keys() {
        let push = b">2\r\n$10\r\ninvalidate\r\n*2\r\n$1\r\nk\r\n$14\r\ncachefence:{k}\r\n";
        assert_eq!(
            unsolicited(push),
            Unsolicited::Filtered(Bytes::from_static(
                b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
            ))
        );
        let fences_only = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$14\r\ncachefence:{k}\r\n";
        assert_eq!(unsolicited(fences_only), Unsolicited::Hidden);
        // Redirected to a RESP2 subscriber, and to a pattern subscriber.
        let message = b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*2\r\n$14\r\ncachefence:{k}\r\n$1\r\nk\r\n";
        assert_eq!(
            unsolicited(message),
            Unsolicited::Filtered(Bytes::from_static(
                b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n"
            ))
        );
        let pmessage = b"*4\r\n$8\r\npmessage\r\n$8\r\n__redis*\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$14\r\ncachefence:{k}\r\n";
        assert_eq!(unsolicited(pmessage), Unsolicited::Hidden);
        // Not invalidations: a message that names a fence, a flush's null.
        let chat = b"*3\r\n$7\r\nmessage\r\n$4\r\nchat\r\n$14\r\ncachefence:{k}\r\n";
        assert_eq!(unsolicited(chat), Unsolicited::AsIs);
        assert_eq!(
            unsolicited(b">2\r\n$10\r\ninvalidate\r\n_\r\n"),
            Unsolicited::AsIs
        );
        let space = b"*3\r\n$7\r\nmessage\r\n$29\r\n__keyspace@9__:cachefence:{x}\r\n$6\r\nexpire\r\n";
        assert_eq!(unsolicited(space), Unsolicited::Hidden);
    }

    #[test]
    fn notifications_of_fences_are_recognised() {
        let space = b"*3\r\n$7\r\nmessage\r\n$29\r\n__keyspace@9__:cachefence:{x}\r\n$6\r\nexpire\r\n";
        assert!(is_fence_notification(space));
        let event =
            b">4\r\n$8\r\npmessage\r\n$3\r\n__*\r\n$19\r\n__keyevent@0__:hset\r\n$14\r\ncachefence:{x}\r\n";
        assert!(is_fence_notification(event));
        let own = b"*3\r\n$7\r\nmessage\r\n$16\r\n__keyspace@9__:x\r\n$3\r\nset\r\n";
        assert!(!is_fence_notification(own));
        let other = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$14\r\ncachefence:{x}\r\n";
        assert!(!is_fence_notification(other));
    }
}
