//! Request framing with Redis' own grammar.
//!
//! Redis does not read client requests as general RESP: a request is either a
//! *multibulk* (`*<n>\r\n` then `n` × `$<len>\r\n<bytes>\r\n`) or, when the
//! first byte is anything but `*`, an *inline* command (one line split like a
//! shell would). This module reproduces `processMultibulkBuffer` and
//! `processInlineBuffer` of Redis 7 closely enough that a malformed request
//! gets the very error text Redis would send, and that a request Redis would
//! ignore (`*0`, an empty line) is ignored here too.
//!
//! The framer is resumable: it keeps its position between reads, so a 64 MiB
//! value or a 100 000-command pipeline arriving in small pieces is scanned
//! once, and it allocates nothing for multibulk requests.

use std::ops::Range;

use bytes::Bytes;

/// Longest line Redis accepts for an inline request or a length header
/// (`PROTO_INLINE_MAX_SIZE`).
pub const INLINE_MAX: usize = 64 * 1024;

/// How many leading arguments the framer remembers for classification
/// (command name, subcommand or key, one more).
pub const TRACKED_ARGS: usize = 3;

/// A malformed request. The text is exactly what Redis replies after `-ERR `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Protocol error: {0}")]
pub struct ProtocolError(pub String);

impl ProtocolError {
    fn new(text: impl Into<String>) -> Self {
        ProtocolError(text.into())
    }
}

/// One complete request found at the start of the unconsumed buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Bytes the request occupies, line ending included.
    pub len: usize,
    /// Number of arguments; 0 means Redis ignores the request and sends no reply.
    pub argc: usize,
    /// How the request was written.
    pub args: Args,
}

/// Where the leading arguments of a request are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Args {
    /// Multibulk: ranges (relative to the request start) of the first
    /// [`TRACKED_ARGS`] arguments, which are always contiguous in the buffer.
    Multibulk([Range<usize>; TRACKED_ARGS]),
    /// Inline: the arguments after unquoting (inline requests are rare and
    /// come from people typing, so they may allocate).
    Inline(Vec<Vec<u8>>),
}

impl Frame {
    /// Every argument of the complete request held in `request`, copied
    /// (once, the arguments sharing the copy: for the commands the proxy
    /// rewrites or answers; forwarding never needs this).
    pub fn all_args(&self, request: &[u8]) -> Vec<Bytes> {
        match &self.args {
            Args::Inline(args) => args.iter().map(|a| Bytes::copy_from_slice(a)).collect(),
            Args::Multibulk(tracked) => {
                // One copy of the request; each argument a slice of it.
                let copy = Bytes::copy_from_slice(request);
                let mut out = Vec::with_capacity(self.argc);
                // The framer found the first ones already (all of a `SET k v`).
                let known = self.argc.min(TRACKED_ARGS);
                out.extend(tracked[..known].iter().map(|at| copy.slice(at.clone())));
                let mut pos = match known {
                    0 => request.len(),
                    _ => tracked[known - 1].end + 2,
                };
                while out.len() < self.argc && pos < request.len() {
                    let Some(line) = memchr::memchr(b'\r', &request[pos..]) else {
                        break;
                    };
                    let length =
                        string2ll(&request[pos + 1..pos + line]).and_then(|n| usize::try_from(n).ok());
                    let Some(len) = length else { break };
                    let start = pos + line + 2;
                    if start.saturating_add(len) > request.len() {
                        break;
                    }
                    out.push(copy.slice(start..start + len));
                    pos = start + len + 2;
                }
                out
            }
        }
    }

    /// Argument `i` (0 = the command name) if it is one of the tracked ones.
    pub fn arg<'a>(&'a self, request: &'a [u8], i: usize) -> Option<&'a [u8]> {
        if i >= self.argc {
            return None;
        }
        match &self.args {
            Args::Multibulk(ranges) => ranges.get(i).map(|r| &request[r.clone()]),
            Args::Inline(args) => args.get(i).map(Vec::as_slice),
        }
    }
}

/// Resumable parser state for the request at the front of the buffer.
#[derive(Debug, Default)]
pub struct RequestFramer {
    /// Offset (from the start of the current request) parsed so far.
    pos: usize,
    /// Arguments still to read; `None` until the `*<n>` header is parsed.
    remaining: Option<usize>,
    /// Declared number of arguments.
    argc: usize,
    /// Length of the bulk whose `$<len>` header was read and body was not.
    bulk_len: Option<usize>,
    /// Ranges of the first arguments seen so far.
    tracked: [Range<usize>; TRACKED_ARGS],
    /// Largest bulk accepted (`proto-max-bulk-len`).
    max_bulk_len: usize,
}

impl RequestFramer {
    pub fn new(max_bulk_len: usize) -> Self {
        RequestFramer {
            max_bulk_len,
            ..Default::default()
        }
    }

    /// Changes the largest bulk accepted (a reload of `max_frame_size`).
    pub fn set_max_bulk_len(&mut self, max_bulk_len: usize) {
        self.max_bulk_len = max_bulk_len;
    }

    /// Bytes of the current, still incomplete request that have been
    /// validated so far (0 when at a request boundary).
    pub fn partial_len(&self) -> usize {
        self.pos
    }

    /// The command name of the incomplete request at the front, once read.
    pub fn partial_name<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        let named = self.remaining.is_some_and(|left| left < self.argc);
        named.then(|| &buf[self.tracked[0].clone()])
    }

    /// Parses the request at the front of `buf` (which starts at the current
    /// request). `Ok(None)` means more bytes are needed; the framer remembers
    /// how far it got. After `Ok(Some(frame))` the caller must drop
    /// `frame.len` bytes from the front before calling again.
    pub fn next(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf[0] != b'*' {
            debug_assert_eq!(self.pos, 0);
            return parse_inline(buf);
        }
        let frame = self.parse_multibulk(buf);
        if !matches!(frame, Ok(None)) {
            self.reset();
        }
        frame
    }

    fn reset(&mut self) {
        let max_bulk_len = self.max_bulk_len;
        *self = RequestFramer::new(max_bulk_len);
    }

    fn parse_multibulk(&mut self, buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
        if self.remaining.is_none() {
            let Some(line) = header_line(buf, 0, "too big mbulk count string")? else {
                return Ok(None);
            };
            let count = string2ll(&buf[1..line.end]);
            let count = match count {
                Some(n) if n <= i64::from(i32::MAX) => n,
                _ => return Err(ProtocolError::new("invalid multibulk length")),
            };
            self.pos = line.next;
            if count <= 0 {
                return Ok(Some(Frame {
                    len: self.pos,
                    argc: 0,
                    args: Args::Multibulk(Default::default()),
                }));
            }
            self.argc = count as usize;
            self.remaining = Some(self.argc);
        }
        while let Some(left) = self.remaining.filter(|&n| n > 0) {
            let len = match self.bulk_len {
                Some(len) => len,
                None => {
                    let Some(line) = header_line(buf, self.pos, "too big bulk count string")? else {
                        return Ok(None);
                    };
                    if buf[self.pos] != b'$' {
                        let got = char::from(buf[self.pos]);
                        return Err(ProtocolError(format!("expected '$', got '{got}'")));
                    }
                    let len = match string2ll(&buf[self.pos + 1..line.end]) {
                        Some(n) if n >= 0 && (n as u64) <= self.max_bulk_len as u64 => n as usize,
                        _ => return Err(ProtocolError::new("invalid bulk length")),
                    };
                    self.pos = line.next;
                    self.bulk_len = Some(len);
                    len
                }
            };
            // Redis skips the two bytes after the body without checking them.
            if buf.len() - self.pos < len + 2 {
                return Ok(None);
            }
            let index = self.argc - left;
            if index < TRACKED_ARGS {
                self.tracked[index] = self.pos..self.pos + len;
            }
            self.pos += len + 2;
            self.bulk_len = None;
            self.remaining = Some(left - 1);
        }
        Ok(Some(Frame {
            len: self.pos,
            argc: self.argc,
            args: Args::Multibulk(self.tracked.clone()),
        }))
    }
}

/// A header line inside `buf` starting at `start`: `end` is the `\r`,
/// `next` the first byte after the (assumed) `\n`.
struct Line {
    end: usize,
    next: usize,
}

/// Finds the end of a `*`/`$` header line as Redis does: `strchr` for `\r`
/// (which stops at a NUL byte), then one more byte assumed to be `\n`.
fn header_line(buf: &[u8], start: usize, too_big: &str) -> Result<Option<Line>, ProtocolError> {
    let rest = &buf[start..];
    match memchr::memchr2(b'\r', 0, rest) {
        Some(i) if rest[i] == b'\r' => {
            if i + 2 > rest.len() {
                return Ok(None);
            }
            Ok(Some(Line {
                end: start + i,
                next: start + i + 2,
            }))
        }
        _ if rest.len() > INLINE_MAX => Err(ProtocolError::new(too_big)),
        _ => Ok(None),
    }
}

fn parse_inline(buf: &[u8]) -> Result<Option<Frame>, ProtocolError> {
    let newline = match memchr::memchr2(b'\n', 0, buf) {
        Some(i) if buf[i] == b'\n' => i,
        _ if buf.len() > INLINE_MAX => return Err(ProtocolError::new("too big inline request")),
        _ => return Ok(None),
    };
    let line_end = if newline > 0 && buf[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    };
    let args =
        split_args(&buf[..line_end]).ok_or_else(|| ProtocolError::new("unbalanced quotes in request"))?;
    Ok(Some(Frame {
        len: newline + 1,
        argc: args.len(),
        args: Args::Inline(args),
    }))
}

/// Redis' `string2ll`: an optional `-`, no leading zeros, no sign on zero,
/// nothing else, no overflow.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    match s {
        [] => None,
        [b'0'] => Some(0),
        [b'-', digits @ ..] => parse_digits(digits, true),
        digits => parse_digits(digits, false),
    }
}

fn parse_digits(digits: &[u8], negative: bool) -> Option<i64> {
    let (first, rest) = digits.split_first()?;
    if !(b'1'..=b'9').contains(first) {
        return None;
    }
    let mut value = u64::from(first - b'0');
    for &b in rest {
        if !b.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    if negative {
        if value > i64::MAX as u64 + 1 {
            return None;
        }
        Some((value as i64).wrapping_neg())
    } else {
        i64::try_from(value).ok()
    }
}

/// Redis' `sdssplitargs`: splits an inline request into arguments, honouring
/// `"..."` (with `\n \r \t \b \a \\ \" \xHH` escapes) and `'...'` (with `\'`).
/// `None` means unbalanced quotes, or a closing quote not followed by space.
pub fn split_args(line: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut args = Vec::new();
    let mut p = 0;
    loop {
        while p < line.len() && is_space(line[p]) {
            p += 1;
        }
        if p >= line.len() {
            return Some(args);
        }
        let mut current = Vec::new();
        let mut in_double = false;
        let mut in_single = false;
        loop {
            let c = line.get(p).copied();
            if in_double {
                match c {
                    None => return None,
                    Some(b'\\')
                        if line.get(p + 1) == Some(&b'x')
                            && line.get(p + 2).is_some_and(u8::is_ascii_hexdigit)
                            && line.get(p + 3).is_some_and(u8::is_ascii_hexdigit) =>
                    {
                        current.push(hex(line[p + 2]) * 16 + hex(line[p + 3]));
                        p += 3;
                    }
                    Some(b'\\') if p + 1 < line.len() => {
                        p += 1;
                        current.push(match line[p] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 8,
                            b'a' => 7,
                            other => other,
                        });
                    }
                    Some(b'"') => {
                        if line.get(p + 1).is_some_and(|&n| !is_space(n)) {
                            return None;
                        }
                        p += 1;
                        break;
                    }
                    Some(other) => current.push(other),
                }
            } else if in_single {
                match c {
                    None => return None,
                    Some(b'\\') if line.get(p + 1) == Some(&b'\'') => {
                        p += 1;
                        current.push(b'\'');
                    }
                    Some(b'\'') => {
                        if line.get(p + 1).is_some_and(|&n| !is_space(n)) {
                            return None;
                        }
                        p += 1;
                        break;
                    }
                    Some(other) => current.push(other),
                }
            } else {
                match c {
                    None => break,
                    Some(b) if is_space(b) => break,
                    Some(b'"') => in_double = true,
                    Some(b'\'') => in_single = true,
                    Some(other) => current.push(other),
                }
            }
            p += 1;
        }
        args.push(current);
    }
}

/// `isspace` in the C locale.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\r' | b'\t' | 0x0b | 0x0c)
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(input: &[u8]) -> (Vec<(usize, usize)>, Option<ProtocolError>) {
        let mut framer = RequestFramer::new(512 * 1024 * 1024);
        let mut at = 0;
        let mut frames = Vec::new();
        loop {
            match framer.next(&input[at..]) {
                Ok(Some(f)) => {
                    frames.push((f.len, f.argc));
                    at += f.len;
                }
                Ok(None) => return (frames, None),
                Err(e) => return (frames, Some(e)),
            }
        }
    }

    #[test]
    fn multibulk_pipeline_is_split_at_command_boundaries() {
        let input = b"*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*0\r\n";
        let (frames, err) = frame_all(input);
        assert_eq!(frames, vec![(14, 1), (27, 3), (4, 0)]);
        assert_eq!(err, None);
    }

    /// Every argument, the ones the framer tracked and the ones after,
    /// for every count around [`TRACKED_ARGS`], empty and long ones among
    /// them, multibulk and inline alike.
    #[test]
    fn all_args_are_every_argument_in_order() {
        let words: Vec<Vec<u8>> = vec![
            b"MSET".to_vec(),
            b"".to_vec(),
            b"k1".to_vec(),
            vec![b'x'; 1234],
            b"k2".to_vec(),
            b"v\r\n2".to_vec(),
        ];
        for argc in 1..=words.len() {
            let mut request = format!("*{argc}\r\n").into_bytes();
            for word in &words[..argc] {
                request.extend_from_slice(format!("${}\r\n", word.len()).as_bytes());
                request.extend_from_slice(word);
                request.extend_from_slice(b"\r\n");
            }
            let frame = RequestFramer::new(1 << 20).next(&request).unwrap().unwrap();
            let args: Vec<Vec<u8>> = frame.all_args(&request).iter().map(|a| a.to_vec()).collect();
            assert_eq!(args, words[..argc], "argc {argc}");
        }
        let inline = b"SET  key \"a b\"\r\n";
        let frame = RequestFramer::new(1 << 20).next(inline).unwrap().unwrap();
        let args: Vec<Vec<u8>> = frame.all_args(inline).iter().map(|a| a.to_vec()).collect();
        assert_eq!(args, [b"SET".to_vec(), b"key".to_vec(), b"a b".to_vec()]);
    }

    #[test]
    fn names_and_keys_are_found_without_copying() {
        let input = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
        let frame = RequestFramer::new(1 << 20).next(input).unwrap().unwrap();
        assert_eq!(frame.arg(input, 0), Some(&b"SET"[..]));
        assert_eq!(frame.arg(input, 1), Some(&b"key"[..]));
        assert_eq!(frame.arg(input, 2), Some(&b"value"[..]));
        assert_eq!(frame.arg(input, 3), None);
    }

    #[test]
    fn byte_by_byte_arrival_gives_the_same_frames() {
        let input = b"*2\r\n$3\r\nGET\r\n$3\r\nfoo\r\nPING\r\n*1\r\n$4\r\nPING\r\n";
        let mut framer = RequestFramer::new(1 << 20);
        let mut start = 0;
        let mut lens = Vec::new();
        for end in 1..=input.len() {
            while let Some(f) = framer.next(&input[start..end]).unwrap() {
                lens.push(f.len);
                start += f.len;
            }
        }
        assert_eq!(lens, vec![22, 6, 14]);
    }

    #[test]
    fn errors_use_the_text_redis_sends() {
        let cases: &[(&[u8], &str)] = &[
            (b"*x\r\n", "Protocol error: invalid multibulk length"),
            (b"*2147483648\r\n", "Protocol error: invalid multibulk length"),
            (b"*1\r\n+PING\r\n", "Protocol error: expected '$', got '+'"),
            (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$01\r\n", "Protocol error: invalid bulk length"),
            (
                b"SET \"a b\"c\r\n",
                "Protocol error: unbalanced quotes in request",
            ),
            (b"GET 'x\r\n", "Protocol error: unbalanced quotes in request"),
        ];
        for (input, text) in cases {
            let (_, err) = frame_all(input);
            assert_eq!(err.map(|e| e.to_string()).as_deref(), Some(*text), "{input:?}");
        }
    }

    #[test]
    fn oversized_lines_and_bulks_are_refused() {
        let mut long = vec![b'a'; INLINE_MAX + 1];
        assert_eq!(frame_all(&long).1.unwrap().0, "too big inline request");
        long[0] = b'*';
        assert_eq!(frame_all(&long).1.unwrap().0, "too big mbulk count string");
        let mut framer = RequestFramer::new(10);
        let err = framer.next(b"*1\r\n$11\r\n").unwrap_err();
        assert_eq!(err.0, "invalid bulk length");
    }

    #[test]
    fn inline_commands_split_like_sdssplitargs() {
        let input = b"set \"a\\x41\\n\" 'it\\'s' plain\n";
        let frame = RequestFramer::new(1 << 20).next(input).unwrap().unwrap();
        assert_eq!(frame.len, input.len());
        let Args::Inline(args) = frame.args else {
            panic!("inline")
        };
        assert_eq!(
            args,
            vec![
                b"set".to_vec(),
                b"aA\n".to_vec(),
                b"it's".to_vec(),
                b"plain".to_vec()
            ]
        );
        let blank = RequestFramer::new(1 << 20).next(b"  \r\n").unwrap().unwrap();
        assert_eq!((blank.len, blank.argc), (4, 0));
    }

    #[test]
    fn string2ll_matches_redis() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"-1"), Some(-1));
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
        ] {
            assert_eq!(string2ll(bad), None, "{bad:?}");
        }
    }
}
