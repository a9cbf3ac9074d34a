//! The audit's own connection to Redis: read-only (`SCAN`, `GET`), opened
//! like the proxy's upstream connections (TLS, AUTH, SELECT of the URL's
//! database) and bounded by a timeout on every round trip.

use std::time::Duration;

use anyhow::Context as _;
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Upstream;
use crate::net::Stream;
use crate::redis;
use crate::resp::encode::command;
use crate::resp::reply::ReplyScanner;
use crate::resp::value::Value;

/// Keys `SCAN` is asked to look at per call (its `COUNT`).
const SCAN_COUNT: &str = "1000";
/// `GET`s sent in one pipeline.
const GETS_PER_PIPELINE: usize = 100;

/// What a `GET` of a sampled key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cached {
    Value(Bytes),
    /// Deleted or expired since `SCAN` returned it (or invalidated).
    Missing,
    /// A hash, list, set… (`WRONGTYPE`): not a cached string.
    NotAString,
}

pub struct ReadOnlyRedis {
    stream: Stream,
    buf: BytesMut,
    scanner: ReplyScanner,
    timeout: Duration,
    addr: String,
}

impl ReadOnlyRedis {
    /// Connects and authenticates within `timeout`, which then bounds each
    /// round trip.
    pub async fn connect(upstream: &Upstream, timeout: Duration) -> anyhow::Result<ReadOnlyRedis> {
        let stream = redis::connect(upstream, timeout).await?;
        Ok(ReadOnlyRedis {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
            scanner: ReplyScanner::default(),
            timeout,
            addr: upstream.addr(),
        })
    }

    /// One `SCAN cursor MATCH glob COUNT 1000`: the next cursor (`0`: the
    /// scan is complete) and the keys returned (possibly none, possibly
    /// some returned before).
    pub async fn scan(&mut self, cursor: &[u8], glob: &str) -> anyhow::Result<(Bytes, Vec<Bytes>)> {
        let request = command(&[
            b"SCAN",
            cursor,
            b"MATCH",
            glob.as_bytes(),
            b"COUNT",
            SCAN_COUNT.as_bytes(),
        ]);
        let reply = self.pipeline(&[request]).await?.pop().expect("one reply");
        let malformed = || anyhow::anyhow!("Redis {}: unexpected SCAN reply {reply:?}", self.addr);
        let Value::Array(parts) = &reply else {
            return Err(malformed());
        };
        match parts.as_slice() {
            [Value::Bulk(next), Value::Array(keys)] => {
                let keys = keys
                    .iter()
                    .map(|k| k.as_bytes().cloned())
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(malformed)?;
                Ok((next.clone(), keys))
            }
            _ => Err(malformed()),
        }
    }

    /// `GET` of each key, pipelined.
    pub async fn get_all(&mut self, keys: &[Bytes]) -> anyhow::Result<Vec<Cached>> {
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(GETS_PER_PIPELINE) {
            let requests: Vec<Bytes> = chunk.iter().map(|k| command(&[b"GET", k])).collect();
            for (key, reply) in chunk.iter().zip(self.pipeline(&requests).await?) {
                found.push(match reply {
                    Value::Bulk(value) => Cached::Value(value),
                    Value::Nil => Cached::Missing,
                    Value::Error(e) if e.starts_with(b"WRONGTYPE") => Cached::NotAString,
                    other => anyhow::bail!(
                        "Redis {}: GET {} answered {other:?}",
                        self.addr,
                        key.escape_ascii()
                    ),
                });
            }
        }
        Ok(found)
    }

    /// Sends `requests` in one write and reads their replies; an error
    /// reply is an error, except `WRONGTYPE`, returned as a value.
    async fn pipeline(&mut self, requests: &[Bytes]) -> anyhow::Result<Vec<Value>> {
        let timeout = self.timeout;
        let exchange = async {
            for request in requests {
                self.stream.write_all(request).await?;
            }
            self.stream.flush().await?;
            let mut replies = Vec::with_capacity(requests.len());
            while replies.len() < requests.len() {
                match self.scanner.advance(&self.buf)? {
                    Some(frame) => {
                        let reply = Value::decode(&self.buf[frame.start..frame.end], false)
                            .context("undecodable reply")?;
                        self.buf.advance(frame.end);
                        self.scanner.consume(frame.end);
                        if let Value::Error(e) = &reply
                            && !e.starts_with(b"WRONGTYPE")
                        {
                            anyhow::bail!("{}", String::from_utf8_lossy(e));
                        }
                        replies.push(reply);
                    }
                    None => {
                        if self.stream.read_buf(&mut self.buf).await? == 0 {
                            anyhow::bail!("connection closed");
                        }
                    }
                }
            }
            Ok(replies)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result.with_context(|| format!("Redis {}", self.addr)),
            Err(_) => anyhow::bail!("Redis {}: no reply within {timeout:?}", self.addr),
        }
    }
}
