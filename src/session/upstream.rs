//! Opening the upstream connection that a client session is paired with.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::resp::encode::command;
use crate::resp::reply::ReplyScanner;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {addr} unreachable ({reason})")]
    Unreachable { addr: String, reason: String },
    #[error("upstream {addr} refused the proxy's {step} ({reply})")]
    Rejected {
        addr: String,
        step: &'static str,
        reply: String,
    },
}

/// Connects to the upstream and runs the proxy's own handshake (AUTH with
/// the configured credentials, SELECT of the URL's database), all within
/// `timeout`.
pub async fn connect(upstream: &Upstream, timeout: Duration) -> Result<TcpStream, UpstreamError> {
    let addr = upstream.addr();
    let unreachable = |reason: String| UpstreamError::Unreachable {
        addr: addr.clone(),
        reason,
    };
    let attempt = async {
        let mut stream = TcpStream::connect((upstream.host.as_str(), upstream.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        if let Some(password) = &upstream.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &upstream.user {
                args.push(user.as_bytes());
            }
            args.push(password.expose().as_bytes());
            handshake(&mut stream, &args, "AUTH", &addr).await?;
        }
        if upstream.db != 0 {
            let db = upstream.db.to_string();
            handshake(&mut stream, &[b"SELECT", db.as_bytes()], "SELECT", &addr).await?;
        }
        Ok(stream)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
    }
}

/// Sends one command and requires a non-error reply.
async fn handshake(
    stream: &mut TcpStream,
    args: &[&[u8]],
    step: &'static str,
    addr: &str,
) -> Result<(), UpstreamError> {
    let io = |e: std::io::Error| UpstreamError::Unreachable {
        addr: addr.to_string(),
        reason: e.to_string(),
    };
    stream.write_all(&command(args)).await.map_err(io)?;
    let mut buf = BytesMut::with_capacity(256);
    let mut scanner = ReplyScanner::default();
    loop {
        if stream.read_buf(&mut buf).await.map_err(io)? == 0 {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let frame = scanner.advance(&buf).map_err(|e| UpstreamError::Rejected {
            addr: addr.to_string(),
            step,
            reply: e.to_string(),
        })?;
        if let Some(frame) = frame {
            if frame.is_error() {
                let reply = String::from_utf8_lossy(&buf[1..frame.end - 2]).into_owned();
                return Err(UpstreamError::Rejected {
                    addr: addr.to_string(),
                    step,
                    reply,
                });
            }
            return Ok(());
        }
    }
}
