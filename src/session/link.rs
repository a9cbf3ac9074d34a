//! A replication link: once Redis accepts a `SYNC` or `PSYNC`, the
//! connection carries an RDB payload (`$<len>\r\n<bytes>` with no CRLF
//! after it, or the diskless `$EOF:<mark>\r\n…<mark>`) and then the command
//! stream one way, `REPLCONF ACK`s the other. None of it is a reply to
//! anything, so from there both directions copy bytes as they come, without
//! framing them.
//!
//! The client's limits do not apply to a link, as Redis does not apply them
//! to its replicas: no idle `timeout` (Redis skips replicas), no
//! `reply_timeout` (the stream is silent while nothing is written, up to
//! `repl-ping-replica-period`), no `max_pending` / `max_frame_size` (there
//! are no requests left to count). A shutdown closes the link at once
//! (there is nothing to drain; the replica reconnects), and either side
//! closing closes the other, as Redis closes a replica that closes.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tracing::debug;

use super::{READ_CHUNK, RequestsEnd, SessionEnd, send};

/// Client → upstream on a link. `unread` are the client's bytes read behind
/// the `SYNC`, not sent yet; `reading` is false after the client's end.
pub(super) async fn requests<R, W>(
    client: &mut R,
    upstream: &mut W,
    unread: BytesMut,
    reading: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> RequestsEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    debug!("replication link: relaying raw bytes");
    if *shutdown.borrow() {
        return RequestsEnd::LinkClosed;
    }
    if !unread.is_empty() && send(upstream, &unread).await.is_err() {
        return RequestsEnd::UpstreamGone;
    }
    let mut buf = unread;
    loop {
        buf.clear();
        if buf.capacity() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            read = client.read_buf(&mut buf), if reading => match read {
                Ok(0) | Err(_) => return RequestsEnd::ClientGone,
                Ok(_) => {
                    if send(upstream, &buf).await.is_err() {
                        return RequestsEnd::UpstreamGone;
                    }
                }
            },
            _ = shutdown.changed() => return RequestsEnd::LinkClosed,
        }
    }
}

/// Upstream → client on a link, until Redis closes it or the client cannot
/// be written to.
pub(super) async fn replies<R, W>(upstream: &mut R, client: &mut W) -> SessionEnd
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    loop {
        buf.clear();
        match upstream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = client.shutdown().await;
                return SessionEnd::UpstreamClosed;
            }
            Ok(_) => {}
        }
        if send(client, &buf).await.is_err() {
            return SessionEnd::ClientWriteFailed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_that_are_not_resp_pass_unchanged_until_the_end() {
        // An RDB without a trailing CRLF, then a command: nothing is framed.
        let stream = b"$5\r\nREDIS*1\r\n$4\r\nPING\r\n\n\n".to_vec();
        let mut upstream = &stream[..];
        let mut client = Vec::new();
        let end = replies(&mut upstream, &mut client).await;
        assert!(matches!(end, SessionEnd::UpstreamClosed));
        assert_eq!(client, stream);
    }

    #[tokio::test]
    async fn the_client_bytes_behind_the_sync_go_first() {
        let (_tx, mut shutdown) = watch::channel(false);
        let mut client = &b"REPLCONF ACK 10\r\n"[..];
        let mut upstream = Vec::new();
        let unread = BytesMut::from(&b"REPLCONF ACK 0\r\n"[..]);
        let end = requests(&mut client, &mut upstream, unread, true, &mut shutdown).await;
        assert!(matches!(end, RequestsEnd::ClientGone));
        assert_eq!(upstream, b"REPLCONF ACK 0\r\nREPLCONF ACK 10\r\n");
    }
}
