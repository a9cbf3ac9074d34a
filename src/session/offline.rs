//! Serving a client while Redis cannot be reached: every request is
//! answered with the error, a delete of fenced keys is also queued and
//! retried until Redis takes it (C3, invalidations are not lost), a key
//! whose delete waits reads as a miss, and the upstream is tried again
//! before each new batch.

use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use super::{send, sleep_until};
use crate::app::App;
use crate::net::Stream;
use crate::redis::{self, UpstreamError};
use crate::resp::command::{CacheOp, Command};
use crate::resp::encode;
use crate::resp::request::{INLINE_MAX, RequestFramer};

/// The upstream cannot be reached: each request the client sends is
/// answered with the error — a delete of fenced keys is also queued and
/// retried until Redis takes it (C3) — and the upstream is tried again
/// before each new batch. `Some` once it answers: the connection and what
/// the client sent that is still unanswered.
pub(super) async fn serve_offline(
    client: &mut Stream,
    app: &App,
    mut error: UpstreamError,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(Stream, BytesMut)> {
    let config = &app.config;
    let mut framer = RequestFramer::new(app.live.max_frame_size());
    let mut buf = BytesMut::new();
    loop {
        app.metrics.upstream_connect_errors.inc();
        debug!(%error, "upstream unreachable: answering with errors");
        let (mut replies, mut done, mut close) = (BytesMut::new(), 0, false);
        while !close {
            let frame = match framer.next(&buf[done..]) {
                Ok(Some(frame)) => frame,
                Ok(None) if buf.len() - done <= app.live.max_frame_size() + INLINE_MAX => break,
                Ok(None) => {
                    let text = format!(
                        "ERR Protocol error: request larger than max_frame_size ({} bytes)",
                        app.live.max_frame_size()
                    );
                    replies.extend_from_slice(&encode::error(&text));
                    break;
                }
                Err(protocol) => {
                    replies.extend_from_slice(&encode::error(&format!("ERR {protocol}")));
                    close = true;
                    break;
                }
            };
            let request = &buf[done..done + frame.len];
            done += frame.len;
            if frame.argc == 0 {
                continue;
            }
            let reply = match Command::classify(&frame, request) {
                Command::Closing => {
                    close = true;
                    encode::error(&format!("ERR cachefence: {error}"))
                }
                // A key whose delete waits reads as a miss (RESP2: HELLO failed too).
                Command::CacheOp(CacheOp::Get | CacheOp::GetEx)
                    if frame.arg(request, 1).is_some_and(|key| {
                        app.fences.as_ref().is_some_and(|f| {
                            f.is_fenced(key) && f.undelivered.is_pending(config.upstream.db, key)
                        })
                    }) =>
                {
                    Bytes::from_static(b"$-1\r\n")
                }
                Command::CacheOp(CacheOp::Delete) if app.fences.is_some() => {
                    let fences = app.fences.as_ref().expect("checked");
                    let keys: Vec<Bytes> = frame
                        .all_args(request)
                        .split_off(1)
                        .into_iter()
                        .filter(|k| fences.is_fenced(k))
                        .collect();
                    match !keys.is_empty() && fences.undelivered.push(config.upstream.db, &keys) {
                        true => {
                            encode::error(&format!("ERR cachefence: {error}; the delete will be retried"))
                        }
                        false => encode::error(&format!("ERR cachefence: {error}")),
                    }
                }
                _ => encode::error(&format!("ERR cachefence: {error}")),
            };
            replies.extend_from_slice(&reply);
        }
        buf.advance(done);
        if send(client, &replies).await.is_err() || close {
            let _ = client.shutdown().await;
            return None;
        }
        let idle = sleep_until(app.live.timeout().map(|t| Instant::now() + t));
        let read = tokio::select! {
            read = client.read_buf(&mut buf) => read,
            _ = shutdown.changed() => return None,
            _ = idle => return None,
        };
        if !matches!(read, Ok(n) if n > 0) {
            return None;
        }
        match redis::connect(&config.upstream, config.connect_timeout).await {
            Ok(stream) => {
                app.metrics.upstream_reconnects.inc();
                debug!("upstream reachable again");
                return Some((stream, buf));
            }
            Err(again) => error = again,
        }
    }
}
