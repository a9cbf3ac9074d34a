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
