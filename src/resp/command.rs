//! Command classification: what the proxy must know about a request to pair
//! its replies. Everything not named here is [`Command::Plain`]: exactly one
//! reply, forwarded untouched. This is the place where the consistency layer
//! hooks the commands it intercepts.

use super::request::{Frame, string2ll};

/// A pub/sub family: the reply kinds and the counter each one moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubFamily {
    /// SUBSCRIBE / UNSUBSCRIBE.
    Channel,
    /// PSUBSCRIBE / PUNSUBSCRIBE.
    Pattern,
    /// SSUBSCRIBE / SUNSUBSCRIBE.
    Shard,
}

/// `CLIENT REPLY` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// One reply, no effect on the connection's mode.
    Plain,
    /// `(P|S)SUBSCRIBE a b …`: one confirmation per argument.
    Subscribe(SubFamily, u64),
    /// `(P|S)UNSUBSCRIBE a b …` (one confirmation each) or with no argument
    /// (one per current subscription of the family, at least one).
    Unsubscribe(SubFamily, Option<u64>),
    /// `HELLO [protover …]`: on success the connection speaks `protover`.
    Hello(Option<u8>),
    /// `RESET`: back to RESP2, no subscriptions, no MONITOR, replies on.
    Reset,
    /// `MONITOR`: after `+OK`, a stream of unsolicited lines.
    Monitor,
    /// `QUIT` / `SHUTDOWN`: Redis may close without (another) reply.
    Closing,
    /// `CLIENT REPLY ON|OFF|SKIP`.
    ClientReply(ReplyMode),
    /// `SELECT db`: on success, the connection's database.
    Select(Option<u32>),
    /// `MULTI`, `EXEC`, `DISCARD`: the transaction state decides whether
    /// fenced commands can be intercepted.
    Multi,
    EndMulti,
    /// A command the fence layer may intercept when its key is fenced.
    CacheOp(CacheOp),
    /// `CACHE.*`: answered by the proxy.
    Admin,
    /// `KEYS`, `SCAN`, `RANDOMKEY`: with fences on, their replies hide the
    /// proxy's own keys ([`crate::fence::visible`]).
    Keyspace(KeyspaceOp),
    /// A command that may legitimately wait for its reply as long as it
    /// asks (`BLPOP`, `XREAD BLOCK`, `WAIT` …): no `reply_timeout` while
    /// one is pending.
    Blocking,
    /// `SYNC` / `PSYNC`: once Redis accepts it, the connection is a
    /// replication link (an RDB payload, then the command stream), relayed
    /// as raw bytes from then on ([`crate::session::link`]).
    Sync,
}

/// The commands the consistency layer looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOp {
    /// `GET key`: a nil reply is a miss.
    Get,
    /// `GETEX key [options]`: a nil reply is a miss.
    GetEx,
    /// `MGET key…`: each nil of a fenced key is a miss.
    MGet,
    /// `SET key value [options]`: a fill with a ticket, else a write.
    Set,
    /// `SETEX key seconds value`.
    SetEx,
    /// `PSETEX key milliseconds value`.
    PSetEx,
    /// `MSET key value [key value …]`: a write of every key.
    MSet,
    /// Other single-key writes (`APPEND`, `SETRANGE`, `INCR`…, `SETNX`, `GETSET`).
    Write,
    /// `DEL`, `UNLINK`, `GETDEL`: invalidations of every key.
    Delete,
}

/// The commands whose replies list keys of the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyspaceOp {
    Keys,
    Scan,
    RandomKey,
}

/// Longest command name worth comparing; longer names are plain commands.
const MAX_NAME: usize = 16;

impl Command {
    /// Classifies a complete request. `request` holds the request's bytes.
    pub fn classify(frame: &Frame, request: &[u8]) -> Command {
        let Some(name) = frame.arg(request, 0) else {
            return Command::Plain;
        };
        if name.len() > MAX_NAME {
            return Command::Plain;
        }
        let mut upper = [0u8; MAX_NAME];
        let upper = &mut upper[..name.len()];
        upper.copy_from_slice(name);
        upper.make_ascii_uppercase();
        let args = frame.argc as u64 - 1;
        let unsubscribe = |family| Command::Unsubscribe(family, (args > 0).then_some(args));
        match &*upper {
            b"SUBSCRIBE" => Command::Subscribe(SubFamily::Channel, args),
            b"PSUBSCRIBE" => Command::Subscribe(SubFamily::Pattern, args),
            b"SSUBSCRIBE" => Command::Subscribe(SubFamily::Shard, args),
            b"UNSUBSCRIBE" => unsubscribe(SubFamily::Channel),
            b"PUNSUBSCRIBE" => unsubscribe(SubFamily::Pattern),
            b"SUNSUBSCRIBE" => unsubscribe(SubFamily::Shard),
            b"HELLO" => Command::Hello(
                frame
                    .arg(request, 1)
                    .and_then(string2ll)
                    .and_then(|v| u8::try_from(v).ok()),
            ),
            b"RESET" => Command::Reset,
            b"MONITOR" => Command::Monitor,
            b"QUIT" | b"SHUTDOWN" => Command::Closing,
            b"MULTI" => Command::Multi,
            b"SELECT" => Command::Select(
                frame
                    .arg(request, 1)
                    .and_then(string2ll)
                    .and_then(|v| u32::try_from(v).ok()),
            ),
            b"EXEC" | b"DISCARD" => Command::EndMulti,
            b"GET" => Command::CacheOp(CacheOp::Get),
            b"GETEX" => Command::CacheOp(CacheOp::GetEx),
            b"MGET" => Command::CacheOp(CacheOp::MGet),
            b"SET" => Command::CacheOp(CacheOp::Set),
            b"SETEX" => Command::CacheOp(CacheOp::SetEx),
            b"PSETEX" => Command::CacheOp(CacheOp::PSetEx),
            b"MSET" => Command::CacheOp(CacheOp::MSet),
            b"APPEND" | b"SETRANGE" | b"INCR" | b"INCRBY" | b"DECR" | b"DECRBY" | b"INCRBYFLOAT"
            | b"SETNX" | b"GETSET" => Command::CacheOp(CacheOp::Write),
            b"DEL" | b"UNLINK" | b"GETDEL" => Command::CacheOp(CacheOp::Delete),
            b"KEYS" => Command::Keyspace(KeyspaceOp::Keys),
            b"SCAN" => Command::Keyspace(KeyspaceOp::Scan),
            b"RANDOMKEY" => Command::Keyspace(KeyspaceOp::RandomKey),
            b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
            | b"BZMPOP" | b"XREAD" | b"XREADGROUP" | b"WAIT" | b"WAITAOF" => Command::Blocking,
            b"SYNC" | b"PSYNC" => Command::Sync,
            _ if upper.starts_with(b"CACHE.") => Command::Admin,
            b"CLIENT" if frame.argc == 3 => {
                let is = |i: usize, word: &str| {
                    frame
                        .arg(request, i)
                        .is_some_and(|a| a.eq_ignore_ascii_case(word.as_bytes()))
                };
                match () {
                    _ if !is(1, "REPLY") => Command::Plain,
                    _ if is(2, "ON") => Command::ClientReply(ReplyMode::On),
                    _ if is(2, "OFF") => Command::ClientReply(ReplyMode::Off),
                    _ if is(2, "SKIP") => Command::ClientReply(ReplyMode::Skip),
                    _ => Command::Plain,
                }
            }
            _ => Command::Plain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::request::RequestFramer;

    fn classify(input: &[u8]) -> Command {
        let frame = RequestFramer::new(1 << 20).next(input).unwrap().unwrap();
        Command::classify(&frame, input)
    }

    #[test]
    fn names_are_matched_case_insensitively() {
        assert_eq!(
            classify(b"subscribe a b\r\n"),
            Command::Subscribe(SubFamily::Channel, 2)
        );
        assert_eq!(
            classify(b"PUnsubscribe\r\n"),
            Command::Unsubscribe(SubFamily::Pattern, None)
        );
        assert_eq!(
            classify(b"sunsubscribe x\r\n"),
            Command::Unsubscribe(SubFamily::Shard, Some(1))
        );
        assert_eq!(classify(b"hello 3 auth u p\r\n"), Command::Hello(Some(3)));
        assert_eq!(classify(b"HELLO\r\n"), Command::Hello(None));
        assert_eq!(
            classify(b"client reply off\r\n"),
            Command::ClientReply(ReplyMode::Off)
        );
        assert_eq!(classify(b"CLIENT REPLY maybe\r\n"), Command::Plain);
        assert_eq!(classify(b"*1\r\n$4\r\nquit\r\n"), Command::Closing);
        assert_eq!(classify(b"GET k\r\n"), Command::CacheOp(CacheOp::Get));
        assert_eq!(classify(b"unlink a b\r\n"), Command::CacheOp(CacheOp::Delete));
        assert_eq!(classify(b"cache.stats\r\n"), Command::Admin);
        assert_eq!(classify(b"LRANGE l 0 -1\r\n"), Command::Plain);
        assert_eq!(classify(b"blpop l 0\r\n"), Command::Blocking);
        assert_eq!(classify(b"SYNC\r\n"), Command::Sync);
        assert_eq!(classify(b"psync ? -1\r\n"), Command::Sync);
        assert_eq!(classify(b"REPLCONF capa eof\r\n"), Command::Plain);
        assert_eq!(classify(b"averyveryverylongcommandname\r\n"), Command::Plain);
    }
}
