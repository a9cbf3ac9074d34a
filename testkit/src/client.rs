//! A raw RESP client that sends bytes and reads whole frames, and the
//! helpers to build requests and show replies.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wait::WAIT;

/// Encodes a command as a multibulk request.
pub fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Same, from a whitespace-separated string (no quoting).
pub fn cmds(line: &str) -> Vec<u8> {
    let args: Vec<&[u8]> = line.split_whitespace().map(str::as_bytes).collect();
    cmd(&args)
}

/// A raw client that sends bytes and reads whole RESP frames.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> RawClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn from_stream(stream: TcpStream) -> RawClient {
        let _ = stream.set_nodelay(true);
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to server");
    }

    /// Sends a command and returns its reply, or `None` if the connection
    /// failed or no reply came within `timeout` (for clients that expect
    /// faults).
    pub async fn call_within(&mut self, line: &str, timeout: Duration) -> Option<String> {
        self.stream.write_all(&cmds(line)).await.ok()?;
        let frame = self.read_frame_within(timeout).await?;
        Some(String::from_utf8_lossy(&frame).into_owned())
    }

    /// Reads one complete frame (its raw bytes), or `None` on EOF or if none
    /// completes within `timeout`.
    pub async fn read_frame_within(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return Some(self.buf.drain(..len).collect());
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads one frame or panics.
    pub async fn read_frame(&mut self) -> Vec<u8> {
        match self.read_frame_within(WAIT).await {
            Some(frame) => frame,
            None => panic!(
                "no complete reply within {WAIT:?}; buffered: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Sends a command and returns its reply as text (lossy).
    pub async fn call(&mut self, line: &str) -> String {
        self.send(&cmds(line)).await;
        String::from_utf8_lossy(&self.read_frame().await).into_owned()
    }

    /// Reads until EOF (bounded by `WAIT`), returning everything unread.
    pub async fn read_to_close(&mut self) -> (Vec<u8>, bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
                Err(_) => return (out, false),
            }
        }
    }

    /// Reads the RDB payload that starts a replication stream, after
    /// `SYNC` (or `PSYNC` and its `+FULLRESYNC`): the keepalive newlines
    /// Redis sends while it makes the RDB, then `$<len>\r\n` and exactly
    /// `len` bytes (no CRLF follows), or the diskless `$EOF:<40-byte
    /// mark>\r\n`, the payload and the mark again. `None` on EOF, a header
    /// that is neither, or nothing complete within `timeout`. What follows
    /// the payload (the command stream) stays buffered for
    /// [`read_frame`](Self::read_frame).
    pub async fn read_rdb_within(&mut self, timeout: Duration) -> Option<RdbTransfer> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let newlines = self.buf.iter().take_while(|&&b| b == b'\n').count();
            self.buf.drain(..newlines);
            if let Some(transfer) = RdbTransfer::take(&mut self.buf)? {
                return Some(transfer);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Whatever arrives within `wait` (expected: nothing).
    pub async fn read_quiet(&mut self, wait: Duration) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
            out.extend_from_slice(&chunk[..n]);
        }
        out
    }
}

/// An RDB payload as a replication stream carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdbTransfer {
    /// Sent diskless, between `$EOF:<mark>` and the mark.
    pub eof_marked: bool,
    pub payload: Vec<u8>,
}

impl RdbTransfer {
    /// Takes a complete transfer off the front of `buf`: `Ok(None)` while
    /// incomplete, `None` for a header that is not an RDB's.
    fn take(buf: &mut Vec<u8>) -> Option<Option<RdbTransfer>> {
        let Some(line) = buf.windows(2).position(|w| w == b"\r\n") else {
            return (buf.first().is_none_or(|&b| b == b'$')).then_some(None);
        };
        let header = buf[..line].strip_prefix(b"$")?.to_vec();
        let start = line + 2;
        if let Some(mark) = header.strip_prefix(b"EOF:") {
            if mark.len() != 40 {
                return None;
            }
            let Some(at) = buf[start..].windows(40).position(|w| w == mark) else {
                return Some(None);
            };
            let payload = buf[start..start + at].to_vec();
            buf.drain(..start + at + 40);
            return Some(Some(RdbTransfer {
                eof_marked: true,
                payload,
            }));
        }
        let len: usize = std::str::from_utf8(&header).ok()?.parse().ok()?;
        if buf.len() < start + len {
            return Some(None);
        }
        let payload = buf[start..start + len].to_vec();
        buf.drain(..start + len);
        Some(Some(RdbTransfer {
            eof_marked: false,
            payload,
        }))
    }

    /// `REDIS0010`: the format version, the same for every server of one
    /// build.
    pub fn version(&self) -> &[u8] {
        &self.payload[..self.payload.len().min(9)]
    }

    /// The payload ends with the EOF opcode and the CRC64 of everything
    /// before the checksum, as Redis writes it: not a byte was changed,
    /// added or lost in transit.
    pub fn checksum_ok(&self) -> bool {
        let Some(body_len) = self.payload.len().checked_sub(8) else {
            return false;
        };
        let (body, sum) = self.payload.split_at(body_len);
        body.last() == Some(&0xFF) && u64::from_le_bytes(sum.try_into().expect("8 bytes")) == crc64(body)
    }
}

/// Redis' CRC64 (Jones polynomial, reflected, initial value 0), bit by bit.
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0x95ac_9329_ac4b_c9b5;
    let mut crc = 0u64;
    for &byte in data {
        crc ^= u64::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
        }
    }
    crc
}

/// Length of the first complete RESP2/RESP3 frame in `buf`. Deliberately
/// independent of the proxy's own scanner.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    walk(buf, 0)
}

fn walk(buf: &[u8], pos: usize) -> Option<usize> {
    let line_end = pos + buf.get(pos..)?.windows(2).position(|w| w == b"\r\n")?;
    let body = std::str::from_utf8(&buf[pos + 1..line_end]).ok()?;
    let next = line_end + 2;
    match buf[pos] {
        b'$' | b'!' | b'=' => match body.parse::<i64>().ok()? {
            -1 => Some(next),
            n => {
                let end = next + n as usize + 2;
                (buf.len() >= end).then_some(end)
            }
        },
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n: i64 = body.parse().ok()?;
            let items = if matches!(buf[pos], b'%' | b'|') {
                n * 2
            } else {
                n.max(0)
            };
            let mut at = next;
            for _ in 0..items {
                at = walk(buf, at)?;
            }
            if buf[pos] == b'|' { walk(buf, at) } else { Some(at) }
        }
        _ => Some(next),
    }
}

/// Bytes as a readable, unambiguous string (`\r\n` and non-printables escaped).
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
