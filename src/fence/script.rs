//! The fence script: every fence operation is one atomic call of this Lua
//! script, loaded once per upstream connection and called with `EVALSHA`.
//!
//! A fence is a string next to its key (same hash slot), read with one
//! `GET` and written with one `SET … PX` (fence.lua's `load` and `save`):
//! `<v> <t>`, then ` <he> <h>` while a herd lease is held, then
//! `\n<version> <at> <name>` per outstanding miss.
//! - `v`: the version, Redis `TIME` in µs or the previous version + 1,
//!   whichever is larger, so it never repeats (C5);
//! - `t`: when the key was last invalidated (Redis `TIME`, µs; 0 never);
//! - `he`, `h`: the herd lease's expiry (µs) and holder;
//! - a miss's name says whose it is (client address, proxy, connection),
//!   so a ticket scope is a prefix of it.
//!
//! Times are written with 16 digits (µs since 1970 have 16 from 2001 to
//! 2286; 0 as 16 zeros), so they compare as strings and stay below 2^53,
//! which Lua's doubles hold exactly. A fence lives only while it guards
//! something: a miss outstanding, a herd lease, or an invalidation time
//! the lag window needs.

use std::sync::Arc;

use bytes::Bytes;

use crate::resp::encode::command;

/// The script (kept as Lua in `fence.lua`, beside this file).
pub const SOURCE: &str = include_str!("fence.lua");

/// A fence script call, kept so it can be sent again with its source after
/// a `NOSCRIPT` (e.g. after `SCRIPT FLUSH`). Its words are shared: a lone
/// call on a shared connection is both the session's (for that resend) and
/// the connection's (to merge it with other sessions' calls), and a copy of
/// its two vectors and their words cost the proxy more than the rest of the
/// call's planning (#17, `bench/callgrind.sh` at P1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall(Arc<CallWords>);

/// What a [`ScriptCall`] sends: its keys and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallWords {
    pub keys: Vec<Bytes>,
    pub args: Vec<Bytes>,
    /// Bytes of its keys and arguments, summed once (an expectation counts
    /// it when pushed and when popped).
    weight: usize,
}

impl std::ops::Deref for ScriptCall {
    type Target = CallWords;

    fn deref(&self) -> &CallWords {
        &self.0
    }
}

impl ScriptCall {
    pub fn new(keys: Vec<Bytes>, args: Vec<Bytes>) -> ScriptCall {
        let weight = weigh(&keys, &args);
        ScriptCall(Arc::new(CallWords { keys, args, weight }))
    }

    /// Changes its keys and arguments (copied first if the call is shared).
    pub fn edit(&mut self, change: impl FnOnce(&mut Vec<Bytes>, &mut Vec<Bytes>)) {
        let words = Arc::make_mut(&mut self.0);
        change(&mut words.keys, &mut words.args);
        words.weight = weigh(&words.keys, &words.args);
    }

    /// Bytes of its keys and arguments (what an expectation keeps of it).
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// Its `EVALSHA` (as `encode(false)`), written at the end of `out`.
    pub fn encode_into(&self, out: &mut impl bytes::BufMut) {
        use crate::resp::encode::{put_command_header, put_number_word, put_word};
        put_command_header(out, 3 + self.keys.len() + self.args.len());
        put_word(out, b"EVALSHA");
        put_word(out, sha().as_bytes());
        put_number_word(out, self.keys.len());
        for word in self.keys.iter().chain(&self.args) {
            put_word(out, word);
        }
    }

    pub fn encode(&self, with_source: bool) -> Bytes {
        let keys: Vec<&[u8]> = self.keys.iter().map(|k| &k[..]).collect();
        let args: Vec<&[u8]> = self.args.iter().map(|a| &a[..]).collect();
        match with_source {
            true => call_with_source(&keys, &args),
            false => call(&keys, &args),
        }
    }
}

fn weigh(keys: &[Bytes], args: &[Bytes]) -> usize {
    keys.iter().chain(args).map(|b| b.len()).sum()
}

/// The script as it is sent: [`SOURCE`] without its comment lines, blank
/// lines and indentation (13.5 KB of 29.5 KB; fence.lua has no long
/// strings, where that would change a value). The first fenced write of a
/// process sends it: Redis keeps less of it, and the `EVAL` fits under
/// Redis' 16 KB bulk limit for a client that has not logged in.
pub fn source() -> &'static str {
    static SENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SENT.get_or_init(|| {
        SOURCE
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// The script's SHA-1, as `EVALSHA` wants it.
pub fn sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| sha1_smol::Sha1::from(source()).digest().to_string())
}

/// `EVALSHA <sha> <numkeys> keys… args…`.
pub fn call(keys: &[&[u8]], args: &[&[u8]]) -> Bytes {
    let numkeys = keys.len().to_string();
    let mut words: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    words.extend([b"EVALSHA".as_slice(), sha().as_bytes(), numkeys.as_bytes()]);
    words.extend(keys);
    words.extend(args);
    command(&words)
}

/// The same call with the script's source (`EVAL`), after a `NOSCRIPT`.
pub fn call_with_source(keys: &[&[u8]], args: &[&[u8]]) -> Bytes {
    let numkeys = keys.len().to_string();
    let mut words: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    words.extend([b"EVAL".as_slice(), source().as_bytes(), numkeys.as_bytes()]);
    words.extend(keys);
    words.extend(args);
    command(&words)
}

/// Most operations in one batch call (its replies wait until all of it has
/// run), and most keys and arguments one operation may have to go in a
/// batch (an operation's shape packs its counts below 10^4, and the script
/// takes its keys with Lua's `unpack`, which stops near 8000 values).
pub const BATCH_MAX_OPS: usize = 64;
pub const BATCH_MAX_WORDS: usize = 1024;

/// Several calls as one (fence.lua's `batch`): ARGV `batch`, the count,
/// each call's shape, then each call's own arguments; KEYS every call's
/// keys, in order. A call's leading arguments equal to the call before it
/// (the same operation under the same policy: usually all but the key and
/// the value) are not sent again — Redis makes a Lua string of every
/// argument, and that and copying them cost a script more than the
/// operation's own work. A shape is one number, `keys * 10^8 + arguments *
/// 10^4 + shared` (one `tonumber` in the script instead of three). The
/// reply is an array with one element per call, each what that call alone
/// would have answered.
pub fn batch(calls: &[ScriptCall]) -> ScriptCall {
    let (shapes, own) = batch_arguments(calls);
    let mut args = Vec::with_capacity(2 + shapes.len() + own.len());
    args.push(Bytes::from_static(b"batch"));
    args.push(calls.len().to_string().into());
    args.extend(shapes.iter().map(|shape| Bytes::from(shape.to_string())));
    args.extend(own.into_iter().cloned());
    let mut keys = Vec::with_capacity(calls.iter().map(|c| c.keys.len()).sum());
    keys.extend(calls.iter().flat_map(|c| c.keys.iter().cloned()));
    ScriptCall::new(keys, args)
}

/// [`batch`]'s `EVALSHA`, written at the end of `out` straight from
/// `calls` (a batch that is never sent again as a whole: the merged calls
/// of several sessions, into the shared connection's write buffer). No
/// allocation of its own: the shared prefixes are counted on the stack,
/// the numbers written in place.
pub fn batch_encode_into(calls: &[ScriptCall], out: &mut impl bytes::BufMut) {
    use crate::resp::encode::{put_command_header, put_number_word, put_word};
    assert!(
        calls.len() <= BATCH_MAX_OPS,
        "a batch has at most {BATCH_MAX_OPS} calls"
    );
    let mut shared = [0usize; BATCH_MAX_OPS];
    let (mut keys, mut own) = (0, 0);
    let mut previous: &[Bytes] = &[];
    for (i, call) in calls.iter().enumerate() {
        shared[i] = shared_prefix(previous, &call.args);
        keys += call.keys.len();
        own += call.args.len() - shared[i];
        previous = &call.args;
    }
    put_command_header(out, 3 + keys + 2 + calls.len() + own);
    put_word(out, b"EVALSHA");
    put_word(out, sha().as_bytes());
    put_number_word(out, keys);
    for key in calls.iter().flat_map(|c| &c.keys) {
        put_word(out, key);
    }
    put_word(out, b"batch");
    put_number_word(out, calls.len());
    for (call, shared) in calls.iter().zip(shared) {
        put_number_word(out, shape(call, shared));
    }
    for (call, shared) in calls.iter().zip(shared) {
        for arg in &call.args[shared..] {
            put_word(out, arg);
        }
    }
}

/// A call's shape in a batch: `keys * 10^8 + arguments * 10^4 + shared`.
fn shape(call: &ScriptCall, shared: usize) -> usize {
    debug_assert!(call.keys.len() + call.args.len() <= BATCH_MAX_WORDS);
    call.keys.len() * 100_000_000 + call.args.len() * 10_000 + shared
}

/// How many leading arguments `args` shares with `previous`. The policy's
/// words most often are the same `Bytes` in both: compared by address
/// first.
fn shared_prefix(previous: &[Bytes], args: &[Bytes]) -> usize {
    previous
        .iter()
        .zip(args)
        .take_while(|(a, b)| a.len() == b.len() && (a.as_ptr() == b.as_ptr() || a[..] == b[..]))
        .count()
}

/// Each call's shape, and the arguments of each call not shared with the
/// call before it.
fn batch_arguments(calls: &[ScriptCall]) -> (Vec<usize>, Vec<&Bytes>) {
    let mut shapes = Vec::with_capacity(calls.len());
    let mut own = Vec::new();
    let mut previous: &[Bytes] = &[];
    for call in calls {
        let shared = shared_prefix(previous, &call.args);
        shapes.push(shape(call, shared));
        own.extend(&call.args[shared..]);
        previous = &call.args;
    }
    (shapes, own)
}

/// Keys and arguments of an invalidation: `DEL keys` and every key's fence
/// moved (its invalidation time recorded), atomically.
pub fn invalidation(keys: &[Bytes], fence_ttl: std::time::Duration) -> (Vec<Bytes>, Vec<Bytes>) {
    let mut all = keys.to_vec();
    all.extend(keys.iter().map(|k| Bytes::from(fence_key(k))));
    let mut args = vec![
        Bytes::from_static(b"inval"),
        super::millis(fence_ttl),
        keys.len().to_string().into(),
        // Created if missing: these invalidations (retried deletes, the
        // change log, CACHE.INVALIDATE) keep their invalidation time.
        Bytes::from_static(b"1"),
        // No connection's misses are taken back.
        Bytes::new(),
        Bytes::from_static(b"DEL"),
    ];
    args.extend(keys.iter().cloned());
    (all, args)
}

/// A key of the proxy's own: `cachefence:{…` or `cachefence::…`, the
/// prefixes [`fence_key`] writes (they are reserved; fence.lua's
/// `is_fence` says the same).
pub fn is_fence_key(key: &[u8]) -> bool {
    key.starts_with(b"cachefence:{") || key.starts_with(b"cachefence::")
}

/// The fence key of `key`: in the key's hash slot (its `{tag}` if it has
/// one, else the whole key as the tag), under a prefix of its own.
pub fn fence_key(key: &[u8]) -> Vec<u8> {
    const OPEN: &[u8] = b"cachefence:{";
    // Each of the exact size: `Bytes` takes such a `Vec` over without
    // allocating again (one with room to spare costs it a second allocation).
    let mut out;
    match hash_tag(key) {
        Some(tag) => {
            out = Vec::with_capacity(OPEN.len() + tag.len() + 2 + key.len());
            out.extend_from_slice(OPEN);
            out.extend_from_slice(tag);
            out.extend_from_slice(b"}:");
            out.extend_from_slice(key);
        }
        // A key with a `}` but no tag cannot be wrapped into a tag; outside
        // Redis Cluster the slot does not matter.
        None if memchr::memchr(b'}', key).is_some() => {
            out = Vec::with_capacity(12 + key.len());
            out.extend_from_slice(b"cachefence::");
            out.extend_from_slice(key);
        }
        None => {
            out = Vec::with_capacity(OPEN.len() + key.len() + 1);
            out.extend_from_slice(OPEN);
            out.extend_from_slice(key);
            out.push(b'}');
        }
    }
    out
}

/// Redis Cluster's hash tag: the bytes between the first `{` and the next
/// `}`, if not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = memchr::memchr(b'{', key)?;
    let close = memchr::memchr(b'}', &key[open + 1..])?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fence_key_is_recognised() {
        for key in [&b"user:42"[..], b"user:{42}:name", b"odd{}key", b"{x}", b""] {
            assert!(is_fence_key(&fence_key(key)), "{}", key.escape_ascii());
            assert!(!is_fence_key(key));
        }
    }

    #[test]
    fn fences_share_the_keys_hash_slot() {
        assert_eq!(fence_key(b"user:42"), b"cachefence:{user:42}".to_vec());
        assert_eq!(
            fence_key(b"user:{42}:name"),
            b"cachefence:{42}:user:{42}:name".to_vec()
        );
        assert_eq!(fence_key(b"odd{}key"), b"cachefence::odd{}key".to_vec());
        let crc = |k: &[u8]| redis_protocol::redis_keyslot(k);
        for key in [&b"user:42"[..], b"user:{42}:name", b"a{b}c{d}"] {
            assert_eq!(crc(&fence_key(key)), crc(key), "{key:?}");
        }
    }

    #[test]
    fn a_batch_lists_each_calls_share_then_their_words() {
        let one = ScriptCall::new(vec![b("k"), b("f")], vec![b("set"), b("1")]);
        let two = ScriptCall::new(vec![b("d"), b("g")], vec![b("write"), b("2"), b("1")]);
        let three = ScriptCall::new(vec![b("e"), b("h")], vec![b("write"), b("2"), b("9")]);
        // The last the same words again (the same `Bytes`): all shared.
        let calls = [one, two, three.clone(), three];
        let all = batch(&calls);
        // Encoded straight from the calls, the same bytes.
        let mut encoded = bytes::BytesMut::from(&b"before"[..]);
        batch_encode_into(&calls, &mut encoded);
        assert_eq!(encoded[6..], all.encode(false)[..]);
        let mut alone = Vec::new();
        calls[0].encode_into(&mut alone);
        assert_eq!(alone, calls[0].encode(false));
        assert_eq!(
            all.keys,
            [b("k"), b("f"), b("d"), b("g"), b("e"), b("h"), b("e"), b("h")]
        );
        // Shapes: keys * 10^8 + arguments * 10^4 + arguments shared with the
        // call before; then only the arguments not shared.
        assert_eq!(
            all.args,
            [
                "batch",
                "4",
                "200020000",
                "200030000",
                "200030002",
                "200030003",
                "set",
                "1",
                "write",
                "2",
                "1",
                "9"
            ]
            .map(b)
        );
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn the_sent_script_fits_an_unauthenticated_clients_bulk() {
        // Redis refuses a bulk over 16 KB from a client that has not logged
        // in; the first fenced call of a process may be such a client's.
        assert!(source().len() < 16 * 1024, "{} bytes", source().len());
        assert!(!source().lines().any(|line| line.starts_with("--")));
    }

    #[test]
    fn calls_name_the_script_by_sha() {
        assert_eq!(sha().len(), 40);
        let c = call(&[b"k", b"f"], &[b"miss"]);
        assert!(c.starts_with(b"*6\r\n$7\r\nEVALSHA\r\n$40\r\n"));
    }
}
