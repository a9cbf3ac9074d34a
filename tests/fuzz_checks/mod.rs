//! The invariants of the request framer (`resp::request`, `resp::command`)
//! and of the reply scanner (`resp::reply`), as plain functions that panic on
//! a violation. They are shared by the libFuzzer targets of `fuzz/` (which
//! include this file by path) and by the bounded smoke test
//! `tests/fuzz_smoke.rs`, so the same checks run with and without libFuzzer.
//!
//! Both targets read their input the same way (see [`Input::parse`]): one
//! control byte, a few little-endian `u16` cut points, then the payload
//! (the bytes a client or Redis sends). The payload is framed once in one
//! piece and once arriving in pieces cut at those points; both runs must see
//! the very same frames and end the same way.

// Each user (a fuzz target, the smoke test) uses only part of this module.
#![allow(dead_code)]

use std::ops::Range;

use cachefence::resp::command::Command;
use cachefence::resp::reply::{MAX_DEPTH, ReplyScanner};
use cachefence::resp::request::{Args, INLINE_MAX, ProtocolError, RequestFramer, TRACKED_ARGS, split_args};

/// A fuzz input: how to cut the payload, and the payload.
#[derive(Debug)]
pub struct Input<'a> {
    /// The control byte; each target reads its own bits from it.
    pub control: u8,
    /// Increasing offsets (each `<= payload.len()`) at which the payload is
    /// cut into the pieces that arrive one after the other.
    pub cuts: Vec<usize>,
    pub payload: &'a [u8],
}

impl<'a> Input<'a> {
    /// Byte 0: control (bits 0-1: number of cuts minus one). Then that many
    /// little-endian `u16` cut points (taken modulo `payload.len() + 1`),
    /// then the payload. Short inputs are padded with zeros.
    pub fn parse(data: &'a [u8]) -> Input<'a> {
        let control = data.first().copied().unwrap_or(0);
        let count = usize::from(control & 3) + 1;
        let header = (1 + 2 * count).min(data.len());
        let payload = &data[header..];
        let raw = data.get(1..header).unwrap_or(&[]);
        let mut cuts: Vec<usize> = (0..count)
            .map(|i| {
                let lo = raw.get(2 * i).copied().unwrap_or(0);
                let hi = raw.get(2 * i + 1).copied().unwrap_or(0);
                usize::from(u16::from_le_bytes([lo, hi])) % (payload.len() + 1)
            })
            .collect();
        cuts.sort_unstable();
        Input {
            control,
            cuts,
            payload,
        }
    }

    /// The inverse of [`parse`](Self::parse), for building seeds.
    pub fn encode(control: u8, cuts: &[u16], payload: &[u8]) -> Vec<u8> {
        assert!(!cuts.is_empty() && cuts.len() <= 4);
        let control = (control & !3) | (cuts.len() as u8 - 1);
        let mut out = vec![control];
        for cut in cuts {
            out.extend_from_slice(&cut.to_le_bytes());
        }
        out.extend_from_slice(payload);
        out
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// `proto-max-bulk-len` values the request target chooses from (control
/// bits 2-4): the proxy's default-like large limit and small ones, so that
/// "invalid bulk length" is reached by short inputs.
pub const MAX_BULK_LENS: [usize; 8] = [512 << 20, 0, 1, 2, 5, 16, 100, 1 << 20];

/// Control bits 5-7 of the request target: the mode.
pub const MODE_SHIFT: u8 = 5;
/// Modes 4 and 5: also feed the payload one byte at a time (only for short
/// payloads, as an inline line is rescanned on every call).
pub const BYTE_BY_BYTE: [u8; 2] = [4, 5];
/// Longest payload fed one byte at a time.
pub const BYTE_BY_BYTE_MAX: usize = 256;
/// Control byte 0xff (mode 7, bulk-length choice 7, four cuts): blow the
/// payload up past [`INLINE_MAX`] (a run of one byte inserted at the first
/// cut), to reach the "too big" errors. One random control byte in 256, as
/// these inputs are 64 KiB each.
pub const INFLATE: u8 = 0xff;

/// One request as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// Offset of the request in the whole payload.
    pub start: usize,
    pub len: usize,
    pub argc: usize,
    pub inline: bool,
    /// The tracked (multibulk) or all (inline) arguments.
    pub args: Vec<Vec<u8>>,
    pub command: Command,
}

/// How framing stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestEnd {
    /// Waiting for more bytes; the incomplete request starts at `at`.
    Incomplete {
        at: usize,
        partial_len: usize,
        partial_name: Option<Vec<u8>>,
    },
    /// A protocol error for the request starting at `at`.
    Error { at: usize, error: ProtocolError },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRun {
    pub frames: Vec<SeenRequest>,
    pub end: RequestEnd,
}

/// Frames `input` arriving in pieces that end at each of `arrivals` (then at
/// `input.len()`), dropping each request from the front once framed, as the
/// session does, and checks each call's result on the way.
pub fn frame_requests(input: &[u8], arrivals: &[usize], max_bulk_len: usize) -> RequestRun {
    let mut framer = RequestFramer::new(max_bulk_len);
    let mut at = 0;
    let mut frames = Vec::new();
    for &available in arrivals.iter().chain([&input.len()]) {
        assert!(at <= available && available <= input.len());
        let buf = &input[..available];
        loop {
            let rest = &buf[at..];
            match framer.next(rest) {
                Ok(Some(frame)) => {
                    // Progress, and within the buffer: a zero-length frame
                    // would make the caller loop for ever.
                    assert!(frame.len > 0, "empty frame at {at}: {frame:?}");
                    assert!(
                        frame.len <= rest.len(),
                        "frame at {at} ends past the buffer: {frame:?} (rest {})",
                        rest.len()
                    );
                    let request = &rest[..frame.len];
                    let (inline, args) = match &frame.args {
                        Args::Multibulk(ranges) => {
                            assert_eq!(rest[0], b'*');
                            let tracked = frame.argc.min(TRACKED_ARGS);
                            let mut end = 0;
                            for range in &ranges[..tracked] {
                                assert!(range.start <= range.end && range.end <= frame.len - 2);
                                // Arguments are in order and never overlap.
                                assert!(range.start > end, "{ranges:?}");
                                end = range.end;
                            }
                            let args = (0..tracked)
                                .map(|i| frame.arg(request, i).expect("tracked argument").to_vec())
                                .collect();
                            (false, args)
                        }
                        Args::Inline(args) => {
                            assert_ne!(rest[0], b'*');
                            assert_eq!(frame.argc, args.len());
                            assert_eq!(request[frame.len - 1], b'\n');
                            (true, args.clone())
                        }
                    };
                    assert_eq!(frame.arg(request, frame.argc), None);
                    let command = Command::classify(&frame, request);
                    frames.push(SeenRequest {
                        start: at,
                        len: frame.len,
                        argc: frame.argc,
                        inline,
                        args,
                        command,
                    });
                    at += frame.len;
                }
                Ok(None) => {
                    assert!(framer.partial_len() <= rest.len());
                    let _ = framer.partial_name(rest);
                    break;
                }
                Err(error) => {
                    return RequestRun {
                        frames,
                        end: RequestEnd::Error { at, error },
                    };
                }
            }
        }
    }
    let rest = &input[at..];
    RequestRun {
        frames,
        end: RequestEnd::Incomplete {
            at,
            partial_len: framer.partial_len(),
            partial_name: framer.partial_name(rest).map(<[u8]>::to_vec),
        },
    }
}

/// The request target's whole check. Returns the one-piece run.
pub fn check_request_input(data: &[u8]) -> RequestRun {
    let input = Input::parse(data);
    let max_bulk_len = MAX_BULK_LENS[usize::from(input.control >> 2) & 7];
    let mut payload = input.payload.to_vec();
    let mut cuts = input.cuts.clone();
    let mode = input.control >> MODE_SHIFT;
    if input.control == INFLATE {
        // A run of one byte (the last payload byte unless that ends a line,
        // else 'a') longer than a line may be, inserted at the first cut;
        // later cuts move with it. Not a line end, so that the run is one
        // line, not 64 Ki requests.
        let fill = match payload.last() {
            Some(&b) if b != b'\n' && b != b'\r' => b,
            _ => b'a',
        };
        let run = INLINE_MAX + 1 + payload.len() % 7;
        let at = cuts[0];
        payload.splice(at..at, std::iter::repeat_n(fill, run));
        for cut in &mut cuts[1..] {
            *cut += run;
        }
    }
    check_requests(&payload, &cuts, max_bulk_len, BYTE_BY_BYTE.contains(&mode))
}

/// Frames `payload` whole and cut at `cuts` and checks that both agree,
/// and that the whole run agrees with [`reference_request`].
pub fn check_requests(payload: &[u8], cuts: &[usize], max_bulk_len: usize, byte_by_byte: bool) -> RequestRun {
    let whole = frame_requests(payload, &[payload.len()], max_bulk_len);
    check_against_reference(payload, &whole, max_bulk_len);
    let split = frame_requests(payload, cuts, max_bulk_len);
    assert_same_requests(&whole, &split, payload.len(), &format!("cut at {cuts:?}"));
    if byte_by_byte && payload.len() <= BYTE_BY_BYTE_MAX {
        let every: Vec<usize> = (0..=payload.len()).collect();
        let bytewise = frame_requests(payload, &every, max_bulk_len);
        assert_same_requests(&whole, &bytewise, payload.len(), "byte by byte");
    }
    whole
}

fn assert_same_requests(whole: &RequestRun, split: &RequestRun, len: usize, how: &str) {
    if whole == split {
        return;
    }
    // The one legitimate difference, the same as in Redis: a line longer
    // than INLINE_MAX with its terminator still to come is refused when the
    // bytes so far already exceed the limit, which depends on how they
    // arrive. Only inputs longer than INLINE_MAX can show it.
    let too_big = matches!(&split.end, RequestEnd::Error { error, .. } if error.0.starts_with("too big"));
    let prefix = whole.frames.starts_with(&split.frames);
    assert!(
        len > INLINE_MAX && too_big && prefix,
        "framing differs when the input arrives {how}:\n whole: {whole:?}\n split: {split:?}"
    );
}

/// What a reference framing gives: `Ok(Some(frame))`, `Ok(None)` when more
/// bytes are needed, or the text of the protocol error.
pub type Reference<T> = Result<Option<T>, String>;

/// What a fresh framer must return for a buffer starting with `*`,
/// written independently of `resp::request` from Redis'
/// `processMultibulkBuffer`: `Ok(Some((len, argc, first ranges)))`.
pub fn reference_multibulk(buf: &[u8], max_bulk_len: usize) -> Reference<(usize, usize, Vec<Range<usize>>)> {
    /// A header line at `at`: `(digits, next)`, where Redis would search it
    /// with `strchr(p, '\r')` and then assume the `\n`.
    fn line(buf: &[u8], at: usize, too_big: &str) -> Result<Option<(Range<usize>, usize)>, String> {
        let rest = &buf[at..];
        match rest.iter().position(|&b| b == b'\r' || b == 0) {
            Some(cr) if rest[cr] == b'\r' => {
                Ok((cr + 2 <= rest.len()).then(|| (at + 1..at + cr, at + cr + 2)))
            }
            _ if rest.len() > INLINE_MAX => Err(too_big.to_string()),
            _ => Ok(None),
        }
    }
    /// A decimal integer as Redis' `string2ll` takes it: the canonical
    /// spelling of an i64 and nothing else.
    fn number(digits: &[u8]) -> Option<i64> {
        let text = std::str::from_utf8(digits).ok()?;
        let n: i64 = text.parse().ok()?;
        (n.to_string() == text).then_some(n)
    }
    let Some((digits, mut pos)) = line(buf, 0, "too big mbulk count string")? else {
        return Ok(None);
    };
    let count = match number(&buf[digits]) {
        Some(n) if n <= i64::from(i32::MAX) => n,
        _ => return Err("invalid multibulk length".into()),
    };
    if count <= 0 {
        return Ok(Some((pos, 0, Vec::new())));
    }
    let mut ranges = Vec::new();
    for _ in 0..count {
        let Some((digits, next)) = line(buf, pos, "too big bulk count string")? else {
            return Ok(None);
        };
        if buf[pos] != b'$' {
            return Err(format!("expected '$', got '{}'", char::from(buf[pos])));
        }
        let len = match number(&buf[digits]) {
            Some(n) if n >= 0 && n as u64 <= max_bulk_len as u64 => n as usize,
            _ => return Err("invalid bulk length".into()),
        };
        if buf.len() - next < len + 2 {
            return Ok(None);
        }
        if ranges.len() < TRACKED_ARGS {
            ranges.push(next..next + len);
        }
        pos = next + len + 2;
    }
    Ok(Some((pos, count as usize, ranges)))
}

/// What a fresh framer must return for a buffer not starting with `*`:
/// `Ok(Some((len, args)))`, from Redis' `processInlineBuffer`.
pub fn reference_inline(buf: &[u8]) -> Reference<(usize, Vec<Vec<u8>>)> {
    // `strchr(p, '\n')` stops at a NUL byte.
    let newline = match buf.iter().position(|&b| b == b'\n' || b == 0) {
        Some(i) if buf[i] == b'\n' => i,
        _ if buf.len() > INLINE_MAX => return Err("too big inline request".into()),
        _ => return Ok(None),
    };
    let line = match &buf[..newline] {
        [line @ .., b'\r'] => line,
        line => line,
    };
    let args = split_args(line).ok_or("unbalanced quotes in request")?;
    Ok(Some((newline + 1, args)))
}

/// Each frame of the one-piece run, and how it ended, is what the
/// reference grammar gives for the rest of the buffer at that point.
fn check_against_reference(input: &[u8], whole: &RequestRun, max_bulk_len: usize) {
    type Outcome = Reference<(usize, usize, Vec<Vec<u8>>)>;
    let reference = |at: usize| -> Outcome {
        let rest = &input[at..];
        if rest.is_empty() {
            return Ok(None);
        }
        if rest[0] == b'*' {
            reference_multibulk(rest, max_bulk_len).map(|f| {
                f.map(|(len, argc, ranges)| {
                    (len, argc, ranges.into_iter().map(|r| rest[r].to_vec()).collect())
                })
            })
        } else {
            reference_inline(rest).map(|f| f.map(|(len, args)| (len, args.len(), args)))
        }
    };
    for frame in &whole.frames {
        let got: Outcome = Ok(Some((frame.len, frame.argc, frame.args.clone())));
        assert_eq!(got, reference(frame.start), "request at {}", frame.start);
    }
    let (at, got): (usize, Outcome) = match &whole.end {
        RequestEnd::Incomplete { at, .. } => (*at, Ok(None)),
        RequestEnd::Error { at, error } => (*at, Err(error.0.clone())),
    };
    assert_eq!(got, reference(at), "end of framing at {at}");
}

// ---------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------

/// How the caller of the reply scanner drops bytes from its buffer (control
/// bits 2-3 of the reply target).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consume {
    /// Never: the buffer only grows.
    Never,
    /// Up to the end of the last complete frame after each piece.
    Frames,
    /// Everything scanned after each piece, as the session does when it
    /// streams a large reply to the client.
    Scanned,
}

impl Consume {
    pub fn from_control(control: u8) -> Consume {
        match (control >> 2) & 3 {
            0 => Consume::Never,
            1 => Consume::Frames,
            _ => Consume::Scanned,
        }
    }
}

/// A completed top-level reply: absolute end offset and type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenReply {
    pub end: usize,
    pub kind: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyEnd {
    /// Waiting for more bytes.
    Incomplete {
        /// Absolute offset scanned up to.
        scanned: usize,
        frame_kind: Option<u8>,
    },
    Error(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRun {
    pub frames: Vec<SeenReply>,
    pub end: ReplyEnd,
}

/// Scans `input` arriving in pieces ending at `arrivals` (then at
/// `input.len()`), dropping bytes from the front as `consume` says, and
/// checks every result on the way.
pub fn scan_replies(input: &[u8], arrivals: &[usize], consume: Consume) -> ReplyRun {
    let mut scanner = ReplyScanner::default();
    // The caller's buffer is input[base..available].
    let mut base = 0;
    let mut frames: Vec<SeenReply> = Vec::new();
    for &available in arrivals.iter().chain([&input.len()]) {
        let buf = &input[base..available.max(base)];
        let mut last_end = 0;
        loop {
            match scanner.advance(buf) {
                Ok(Some(frame)) => {
                    let previous = frames.last().map_or(0, |f| f.end);
                    let end = base + frame.end;
                    // Progress, within the buffer, contiguous frames.
                    assert!(end > previous, "no progress: {frame:?} after {previous}");
                    assert!(
                        frame.end <= buf.len(),
                        "{frame:?} past the buffer ({})",
                        buf.len()
                    );
                    assert!(frame.start < frame.end);
                    assert!(scanner.scanned() == frame.end);
                    if consume != Consume::Scanned {
                        assert_eq!(base + frame.start, previous, "frames must be contiguous");
                        assert_eq!(frame.kind, buf[frame.start]);
                    }
                    assert_eq!(frame.is_push(), frame.kind == b'>');
                    assert!(!scanner.in_frame());
                    frames.push(SeenReply {
                        end,
                        kind: frame.kind,
                    });
                    last_end = frame.end;
                }
                Ok(None) => {
                    assert!(scanner.scanned() <= buf.len());
                    assert!(scanner.frame_start() <= scanner.scanned());
                    break;
                }
                Err(error) => {
                    return ReplyRun {
                        frames,
                        end: ReplyEnd::Error(error.0),
                    };
                }
            }
        }
        let upto = match consume {
            Consume::Never => 0,
            Consume::Frames => last_end,
            Consume::Scanned => scanner.scanned(),
        };
        scanner.consume(upto);
        base += upto;
    }
    ReplyRun {
        frames,
        end: ReplyEnd::Incomplete {
            scanned: base + scanner.scanned(),
            frame_kind: scanner.frame_kind(),
        },
    }
}

/// The reply target's whole check. Returns the one-piece run.
pub fn check_reply_input(data: &[u8]) -> ReplyRun {
    let input = Input::parse(data);
    check_replies(input.payload, &input.cuts, Consume::from_control(input.control))
}

/// Scans `payload` whole and in pieces and checks that both agree, and that
/// every frame `redis-protocol` decodes as valid RESP ends where the
/// scanner says.
pub fn check_replies(payload: &[u8], cuts: &[usize], consume: Consume) -> ReplyRun {
    let whole = scan_replies(payload, &[payload.len()], Consume::Never);
    let split = scan_replies(payload, cuts, consume);
    assert_eq!(
        whole, split,
        "scanning differs when cut at {cuts:?} ({consume:?})"
    );
    // The oracle: walk the frames the scanner found.
    let mut at = 0;
    for frame in &whole.frames {
        if let Some(len) = oracle_reply_len(&payload[at..]) {
            assert_eq!(
                frame.end,
                at + len,
                "scanner and redis-protocol disagree on the end of the reply at {at}"
            );
        }
        at = frame.end;
    }
    if let Some(len) = oracle_reply_len(&payload[at..]) {
        panic!(
            "redis-protocol decodes a valid {len}-byte reply at {at}, the scanner stopped there with {:?}",
            whole.end
        );
    }
    whole
}

/// Length of the valid reply at the front of `buf`, per `redis-protocol`'s
/// RESP2 and RESP3 decoders, or `None` when it is not one (or not known).
///
/// Valid means what a Redis server may send: the decoders accept a few
/// things the RESP specification does not (`$+3`, CR or LF inside a simple
/// string, a chunk outside a streamed string, `HELLO`…), so a frame counts
/// only if its canonical encoding is exactly the bytes decoded and no
/// simple string holds CR or LF. Streamed strings and aggregates are
/// followed chunk by chunk / element by element.
pub fn oracle_reply_len(buf: &[u8]) -> Option<usize> {
    // The decoders recurse once per nesting level: keep them (and this
    // function) away from deep inputs, which the scanner refuses anyway
    // past MAX_DEPTH.
    if nesting_bound(buf) > 64.min(MAX_DEPTH) {
        return None;
    }
    oracle_len(buf)
}

fn oracle_len(buf: &[u8]) -> Option<usize> {
    use redis_protocol::resp3::types::DecodedFrame;
    match buf.first()? {
        b'+' | b'-' | b':' | b'$' | b'*' => {
            if let Ok(Some((frame, len))) = redis_protocol::resp2::decode::decode(buf)
                && resp2_valid(&frame)
                && encode2(&frame).as_deref() == Some(&buf[..len])
            {
                return Some(len);
            }
        }
        _ => {}
    }
    match redis_protocol::resp3::decode::streaming::decode(buf) {
        Ok(Some((DecodedFrame::Complete(frame), len))) => {
            (resp3_valid(&frame) && encode3(&frame).as_deref() == Some(&buf[..len])).then_some(len)
        }
        Ok(Some((DecodedFrame::Streaming(_), _))) => streamed_len(buf),
        _ => None,
    }
}

/// A streamed string (`$?` then `;n` chunks, `;0`) or aggregate (`*?`,
/// `~?`, `%?` then elements, `.`).
fn streamed_len(buf: &[u8]) -> Option<usize> {
    use redis_protocol::resp3::types::{DecodedFrame, OwnedFrame};
    let kind = *buf.first()?;
    if !matches!(kind, b'$' | b'*' | b'~' | b'%') || !buf.starts_with(&[kind, b'?', b'\r', b'\n']) {
        return None;
    }
    let mut pos = 4;
    let mut elements = 0usize;
    loop {
        let rest = &buf[pos..];
        if kind == b'$' {
            if rest.starts_with(b";0\r\n") {
                return Some(pos + 4);
            }
            if rest.first() != Some(&b';') {
                return None;
            }
            let Ok(Some((DecodedFrame::Complete(chunk @ OwnedFrame::ChunkedString(_)), len))) =
                redis_protocol::resp3::decode::streaming::decode(rest)
            else {
                return None;
            };
            let canonical = encode3(&chunk)?;
            if canonical != rest[..len] {
                return None;
            }
            pos += len;
        } else {
            if rest.starts_with(b".\r\n") {
                return (kind != b'%' || elements.is_multiple_of(2)).then_some(pos + 3);
            }
            pos += oracle_len(rest)?;
            elements += 1;
        }
    }
}

/// An upper bound of the nesting depth of the replies in `buf`: the number
/// of lines that may open an aggregate.
fn nesting_bound(buf: &[u8]) -> usize {
    let opens = |b: u8| matches!(b, b'*' | b'~' | b'%' | b'>' | b'|' | b'$');
    usize::from(buf.first().is_some_and(|&b| opens(b)))
        + buf.windows(2).filter(|w| w[0] == b'\n' && opens(w[1])).count()
}

fn line_ok(data: &[u8]) -> bool {
    !data.iter().any(|&b| b == b'\r' || b == b'\n')
}

fn resp2_valid(frame: &redis_protocol::resp2::types::OwnedFrame) -> bool {
    use redis_protocol::resp2::types::OwnedFrame;
    match frame {
        OwnedFrame::SimpleString(data) => line_ok(data),
        OwnedFrame::Error(data) => line_ok(data.as_bytes()),
        OwnedFrame::Array(data) => data.iter().all(resp2_valid),
        OwnedFrame::Integer(_) | OwnedFrame::BulkString(_) | OwnedFrame::Null => true,
    }
}

fn resp3_valid(frame: &redis_protocol::resp3::types::OwnedFrame) -> bool {
    use redis_protocol::resp3::types::{OwnedFrame, Resp3Frame};
    let attributes = frame
        .attributes()
        .is_none_or(|a| a.iter().all(|(k, v)| resp3_valid(k) && resp3_valid(v)));
    attributes
        && match frame {
            OwnedFrame::SimpleString { data, .. } | OwnedFrame::BigNumber { data, .. } => line_ok(data),
            OwnedFrame::SimpleError { data, .. } => line_ok(data.as_bytes()),
            OwnedFrame::Array { data, .. } | OwnedFrame::Push { data, .. } => data.iter().all(resp3_valid),
            OwnedFrame::Set { data, .. } => data.iter().all(resp3_valid),
            OwnedFrame::Map { data, .. } => data.iter().all(|(k, v)| resp3_valid(k) && resp3_valid(v)),
            OwnedFrame::Hello { .. } | OwnedFrame::ChunkedString(_) => false,
            OwnedFrame::BlobString { .. }
            | OwnedFrame::BlobError { .. }
            | OwnedFrame::Boolean { .. }
            | OwnedFrame::Null
            | OwnedFrame::Number { .. }
            | OwnedFrame::Double { .. }
            | OwnedFrame::VerbatimString { .. } => true,
        }
}

fn encode2(frame: &redis_protocol::resp2::types::OwnedFrame) -> Option<Vec<u8>> {
    use redis_protocol::resp2::types::Resp2Frame;
    let mut buf = vec![0u8; frame.encode_len(false)];
    let n = redis_protocol::resp2::encode::encode(&mut buf, frame, false).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn encode3(frame: &redis_protocol::resp3::types::OwnedFrame) -> Option<Vec<u8>> {
    use redis_protocol::resp3::types::Resp3Frame;
    let mut buf = vec![0u8; frame.encode_len(false)];
    let n = redis_protocol::resp3::encode::complete::encode(&mut buf, frame, false).ok()?;
    buf.truncate(n);
    Some(buf)
}
