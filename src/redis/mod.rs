//! The Redis client the proxy uses for itself: opening an upstream connection
//! (TLS, AUTH, SELECT) and sending one command that must not fail. Client
//! sessions, the invalidation workers and `cachefence audit` all connect here.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Upstream;
use crate::net::Stream;
use crate::resp::encode::command;
use crate::resp::reply::ReplyScanner;

pub mod cluster;
pub mod login;
pub mod sentinel;
pub mod shared;

#[derive(Debug, Clone, thiserror::Error)]
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

impl UpstreamError {
    /// What happened, without the address (for a message that names it).
    pub fn detail(&self) -> String {
        match self {
            UpstreamError::Unreachable { reason, .. } => format!("unreachable ({reason})"),
            UpstreamError::Rejected { step, reply, .. } => format!("refused the proxy's {step} ({reply})"),
        }
    }
}

/// Connects to the upstream and runs the proxy's own handshake (the TLS
/// handshake with `upstream_tls`, AUTH with the configured credentials,
/// SELECT of the URL's database), all within `timeout`. A Sentinel upstream
/// connects to the master its sentinels name ([`sentinel`]); a Redis
/// Cluster upstream opens a router to the cluster ([`cluster`]).
pub async fn connect(upstream: &Upstream, timeout: Duration) -> Result<Stream, UpstreamError> {
    if let Some(cluster) = &upstream.cluster {
        return cluster::router::connect(upstream, cluster, timeout).await;
    }
    match &upstream.sentinel {
        Some(sentinel) => sentinel::connect(upstream, sentinel, timeout).await,
        None => connect_to(upstream, &upstream.host, upstream.port, timeout).await,
    }
}

/// [`connect`] to the Redis at `host:port`.
pub(crate) async fn connect_to(
    upstream: &Upstream,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Stream, UpstreamError> {
    let addr = sentinel::host_port(host, port);
    let unreachable = |reason: String| UpstreamError::Unreachable {
        addr: addr.clone(),
        reason,
    };
    let attempt = async {
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        let mut stream = match &upstream.tls {
            None => Stream::Plain(tcp),
            Some(tls) => {
                let (connector, name) = tls.client(host).map_err(|e| unreachable(e.to_string()))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| unreachable(format!("TLS handshake failed: {e}")))?;
                Stream::from(tls)
            }
        };
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

/// Why one command sent with [`call`] did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Redis answered an error (its text, without `-` and CRLF) or bytes
    /// that are not RESP.
    #[error("{0}")]
    Refused(String),
}

/// Sends one command and requires a non-error reply.
pub async fn call<S>(stream: &mut S, request: &[u8]) -> Result<(), CallError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    call_reply(stream, request).await.map(|_| ())
}

/// Sends one command and returns its reply, which must not be an error.
pub async fn call_reply<S>(stream: &mut S, request: &[u8]) -> Result<BytesMut, CallError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await?;
    // A TLS stream may keep the end of the request until flushed.
    stream.flush().await?;
    let mut buf = BytesMut::with_capacity(256);
    let mut scanner = ReplyScanner::default();
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let frame = scanner
            .advance(&buf)
            .map_err(|e| CallError::Refused(e.to_string()))?;
        if let Some(frame) = frame {
            if frame.is_error() {
                let text = String::from_utf8_lossy(&buf[1..frame.end - 2]).into_owned();
                return Err(CallError::Refused(text));
            }
            buf.truncate(frame.end);
            return Ok(buf);
        }
    }
}

/// One step of the proxy's own handshake.
async fn handshake(
    stream: &mut Stream,
    args: &[&[u8]],
    step: &'static str,
    addr: &str,
) -> Result<(), UpstreamError> {
    call(stream, &command(args)).await.map_err(|error| match error {
        CallError::Io(e) => UpstreamError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        },
        CallError::Refused(reply) => UpstreamError::Rejected {
            addr: addr.to_string(),
            step,
            reply,
        },
    })
}
