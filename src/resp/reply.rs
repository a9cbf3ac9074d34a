//! Reply framing: where each top-level RESP2/RESP3 frame sent by Redis ends.
//!
//! The scanner never copies or decodes values; it walks type bytes and
//! lengths and skips payloads, keeping its place between reads, so a reply
//! can be streamed to the client while it is still arriving (a 64 MiB bulk
//! string is never buffered whole) and a large aggregate arriving in pieces
//! is scanned once. Its only allocation is the nesting stack, kept for the
//! life of the connection.
//!
//! Attributes (`|`) are folded into the frame they annotate: an attribute of
//! `n` pairs followed by its frame counts as one aggregate of `2n + 1`
//! elements, so attribute + value is one reply, as it is for a client.

/// Deepest nesting accepted from upstream. Redis' own Lua replies go about
/// 8000 deep (a script returning a table that contains itself, until
/// "reached lua stack limit"), and they must pass; the scanner is iterative
/// and pays one small stack entry per level.
pub const MAX_DEPTH: usize = 1 << 16;

/// Upstream sent bytes that are not RESP: the connection cannot be framed
/// any further and must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from upstream: {0}")]
pub struct MalformedReply(pub &'static str);

/// A top-level frame completed by [`ReplyScanner::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFrame {
    /// Offset of the frame's first byte (0 if part of it was already
    /// consumed while streaming).
    pub start: usize,
    /// Offset one past the frame's last byte, relative to the buffer given.
    pub end: usize,
    /// The frame's type byte (`+ - : $ * > %` …); for an attributed frame,
    /// `|`.
    pub kind: u8,
}

impl ReplyFrame {
    /// RESP3 out-of-band data: never the reply to a request.
    pub fn is_push(&self) -> bool {
        self.kind == b'>'
    }

    pub fn is_error(&self) -> bool {
        matches!(self.kind, b'-' | b'!')
    }
}

/// Elements still expected by an open aggregate.
#[derive(Debug, Clone, Copy)]
enum Open {
    Counted(u64),
    /// `*?`, `%?`, … terminated by `.\r\n`.
    Streamed,
    /// `$?` terminated by `;0\r\n`.
    StreamedString,
    /// The body of one chunk of a streamed string (not an element).
    Chunk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// At the start of a line (type byte next).
    Line,
    /// Inside a bulk payload: this many bytes plus `\r\n` remain.
    Payload(u64),
}

#[derive(Debug)]
pub struct ReplyScanner {
    /// Scan position relative to the front of the caller's buffer.
    pos: usize,
    /// Where the current top-level frame started (relative to the buffer).
    frame_start: usize,
    /// Type byte of the current top-level frame.
    frame_kind: Option<u8>,
    skip: Skip,
    stack: Vec<Open>,
    /// Nesting past this is refused ([`MAX_DEPTH`] unless told).
    max_depth: usize,
}

impl Default for ReplyScanner {
    fn default() -> Self {
        ReplyScanner {
            pos: 0,
            frame_start: 0,
            frame_kind: None,
            skip: Skip::Line,
            stack: Vec::with_capacity(8),
            max_depth: MAX_DEPTH,
        }
    }
}

impl ReplyScanner {
    /// A scanner that refuses nesting deeper than `max_depth`.
    pub fn with_max_depth(max_depth: usize) -> ReplyScanner {
        ReplyScanner {
            max_depth,
            ..ReplyScanner::default()
        }
    }

    /// Offset up to which the buffer has been scanned.
    pub fn scanned(&self) -> usize {
        self.pos
    }

    /// True when a frame has started but not finished.
    pub fn in_frame(&self) -> bool {
        self.frame_kind.is_some()
    }

    /// Type byte of the frame in progress, if any.
    pub fn frame_kind(&self) -> Option<u8> {
        self.frame_kind
    }

    /// Where the frame in progress started.
    pub fn frame_start(&self) -> usize {
        self.frame_start
    }

    /// The caller dropped `n` bytes from the front of its buffer; `n` must not
    /// exceed [`scanned`](Self::scanned).
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.pos);
        self.pos -= n;
        self.frame_start = self.frame_start.saturating_sub(n);
    }

    /// Scans forward and returns the next completed top-level frame, or
    /// `None` when `buf` holds no further complete frame.
    pub fn advance(&mut self, buf: &[u8]) -> Result<Option<ReplyFrame>, MalformedReply> {
        loop {
            if let Skip::Payload(left) = self.skip {
                let available = (buf.len() - self.pos) as u64;
                if available < left + 2 {
                    // Skip what is there, keeping the two final bytes'
                    // accounting simple: remember what is still owed.
                    let take = available.min(left);
                    self.pos += take as usize;
                    self.skip = Skip::Payload(left - take);
                    return Ok(None);
                }
                self.pos += left as usize + 2;
                self.skip = Skip::Line;
                if let Some(done) = self.element_done() {
                    return Ok(Some(done));
                }
                continue;
            }
            let Some(line_len) = memchr::memchr(b'\n', &buf[self.pos..]) else {
                return Ok(None);
            };
            let line_end = self.pos + line_len;
            if line_len < 2 || buf[line_end - 1] != b'\r' {
                return Err(MalformedReply("line not terminated by CRLF"));
            }
            let kind = buf[self.pos];
            let body = &buf[self.pos + 1..line_end - 1];
            if self.frame_kind.is_none() {
                self.frame_start = self.pos;
                self.frame_kind = Some(kind);
            }
            self.pos = line_end + 1;
            if let Some(done) = self.line(kind, body)? {
                return Ok(Some(done));
            }
        }
    }

    /// Handles one header or scalar line; returns a frame if it completed one.
    fn line(&mut self, kind: u8, body: &[u8]) -> Result<Option<ReplyFrame>, MalformedReply> {
        match kind {
            b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Ok(self.element_done()),
            b'$' | b'!' | b'=' => {
                if kind == b'$' && body == b"?" {
                    return self.open(Open::StreamedString);
                }
                match parse_len(body)? {
                    None => Ok(self.element_done()),
                    Some(len) => {
                        self.skip = Skip::Payload(len);
                        Ok(None)
                    }
                }
            }
            b';' => {
                // A chunk of a streamed string; `;0` ends it.
                if !matches!(self.stack.last(), Some(Open::StreamedString)) {
                    return Err(MalformedReply("string chunk outside a streamed string"));
                }
                match parse_len(body)? {
                    Some(0) => {
                        self.stack.pop();
                        Ok(self.element_done())
                    }
                    Some(len) => {
                        self.skip = Skip::Payload(len);
                        self.stack.push(Open::Chunk);
                        Ok(None)
                    }
                    None => Err(MalformedReply("null string chunk")),
                }
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                if body == b"?" {
                    return self.open(Open::Streamed);
                }
                let pairs = matches!(kind, b'%' | b'|');
                match parse_len(body)? {
                    None => Ok(self.element_done()),
                    Some(n) => {
                        let mut count = if pairs { n.checked_mul(2) } else { Some(n) }
                            .ok_or(MalformedReply("aggregate length overflows"))?;
                        if kind == b'|' {
                            // The annotated frame itself.
                            count = count
                                .checked_add(1)
                                .ok_or(MalformedReply("aggregate length overflows"))?;
                        }
                        if count == 0 {
                            Ok(self.element_done())
                        } else {
                            self.open(Open::Counted(count))
                        }
                    }
                }
            }
            b'.' => match self.stack.last() {
                Some(Open::Streamed) if body.is_empty() => {
                    self.stack.pop();
                    Ok(self.element_done())
                }
                _ => Err(MalformedReply("stream end outside a streamed aggregate")),
            },
            _ => Err(MalformedReply("unknown type byte")),
        }
    }

    fn open(&mut self, open: Open) -> Result<Option<ReplyFrame>, MalformedReply> {
        if self.stack.len() >= self.max_depth {
            return Err(MalformedReply("nesting too deep"));
        }
        self.stack.push(open);
        Ok(None)
    }

    /// One element finished; closes every aggregate it completes and reports
    /// the top-level frame if that finished too.
    fn element_done(&mut self) -> Option<ReplyFrame> {
        loop {
            match self.stack.last_mut() {
                None => {
                    let kind = self.frame_kind.take().expect("a frame is open");
                    return Some(ReplyFrame {
                        start: self.frame_start,
                        end: self.pos,
                        kind,
                    });
                }
                Some(Open::Chunk) => {
                    self.stack.pop();
                    return None;
                }
                Some(Open::Counted(left)) => {
                    *left -= 1;
                    if *left > 0 {
                        return None;
                    }
                    self.stack.pop();
                }
                Some(Open::Streamed | Open::StreamedString) => return None,
            }
        }
    }
}

/// A RESP length: `-1` is null (`None`), other negatives are malformed.
fn parse_len(body: &[u8]) -> Result<Option<u64>, MalformedReply> {
    if body == b"-1" {
        return Ok(None);
    }
    if body.is_empty() || body.len() > 19 || !body.iter().all(u8::is_ascii_digit) {
        return Err(MalformedReply("bad length"));
    }
    Ok(Some(body.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frame ends found when `input` arrives in pieces of `step` bytes.
    fn ends(input: &[u8], step: usize) -> Vec<(usize, u8)> {
        let mut scanner = ReplyScanner::default();
        let mut out = Vec::new();
        let mut upto = 0;
        while upto < input.len() {
            upto = (upto + step).min(input.len());
            while let Some(f) = scanner.advance(&input[..upto]).unwrap() {
                out.push((f.end, f.kind));
            }
        }
        out
    }

    #[test]
    fn resp2_and_resp3_frames_are_delimited() {
        let input: &[u8] = b"+OK\r\n$-1\r\n$3\r\nfoo\r\n*2\r\n:1\r\n*-1\r\n%1\r\n+a\r\n_\r\n\
>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$0\r\n\r\n|1\r\n+ttl\r\n:3\r\n,1.5\r\n*0\r\n";
        let expected = vec![
            (5, b'+'),
            (10, b'$'),
            (19, b'$'),
            (32, b'*'),
            (43, b'%'),
            (73, b'>'),
            (93, b'|'),
            (97, b'*'),
        ];
        for step in [1, 2, 3, 7, input.len()] {
            assert_eq!(ends(input, step), expected, "step {step}");
        }
    }

    #[test]
    fn streamed_strings_and_aggregates_end_at_their_terminators() {
        let input = b"$?\r\n;4\r\nHell\r\n;1\r\no\r\n;0\r\n*?\r\n:1\r\n*?\r\n.\r\n.\r\n+x\r\n";
        assert_eq!(ends(input, 1), vec![(25, b'$'), (43, b'*'), (47, b'+')]);
    }

    #[test]
    fn payloads_may_contain_crlf_and_are_skipped_unread() {
        let input = b"$6\r\na\r\nb\r\n\r\n:7\r\n";
        assert_eq!(ends(input, 1), vec![(12, b'$'), (16, b':')]);
    }

    #[test]
    fn consume_keeps_positions_relative_to_the_buffer() {
        let mut scanner = ReplyScanner::default();
        let mut buf = b"$5\r\nhel".to_vec();
        assert_eq!(scanner.advance(&buf).unwrap(), None);
        // Forward what was scanned, as the session does while streaming.
        let scanned = scanner.scanned();
        buf.drain(..scanned);
        scanner.consume(scanned);
        buf.extend_from_slice(b"lo\r\n+OK\r\n");
        assert_eq!(scanner.advance(&buf).unwrap().map(|f| f.end), Some(4));
        assert_eq!(scanner.advance(&buf).unwrap().map(|f| f.end), Some(9));
    }

    #[test]
    fn garbage_is_reported() {
        let mut scanner = ReplyScanner::default();
        assert!(scanner.advance(b"hello\r\n").is_err());
        let mut scanner = ReplyScanner::default();
        assert!(scanner.advance(b"$x\r\n").is_err());
    }
}
