//! The byte streams a session runs on: plain TCP, or TLS on either side.
//!
//! A session splits both of its streams into a read half and a write half
//! ([`Split`]). Plain TCP is split with [`TcpStream::split`], which borrows
//! the socket and takes no lock; only a TLS stream, whose two directions
//! share one rustls state, is split with [`tokio::io::split`]. A session
//! with no TLS on either side runs on the bare `TcpStream` halves (see
//! `session::run`), so TLS costs the plain path nothing.
//!
//! An upstream connection to a master found through Sentinel is
//! [`Stream::Revocable`]: a failover revokes every connection to the old
//! master at once ([`Revoker`]), so nothing more is written to it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;

/// A client or upstream connection.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: rustls' state is large and the plain variant is the common one.
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
    /// An upstream connection a [`Revoker`] can end.
    Revocable(Box<Revocable>),
    /// The proxy's end of a pipe to a task that speaks for Redis (a Redis
    /// Cluster's router, `redis::cluster::router`).
    Pipe(Box<tokio::io::DuplexStream>),
}

/// Ends a group of connections at once: every [`Revocable`] made before
/// [`Revoker::revoke`] fails its next read or write, and a read waiting
/// for data is woken to fail (a session blocked on the old master learns
/// of the failover at once, not when Sentinel closes its connection).
#[derive(Debug, Default)]
pub struct Revoker {
    generation: AtomicU64,
    /// The wakers of live connections' reads (dead ones are pruned as the
    /// list grows).
    readers: Mutex<Readers>,
}

#[derive(Debug, Default)]
struct Readers {
    list: Vec<Weak<AtomicWaker>>,
    /// The list is pruned when it reaches this length.
    prune_at: usize,
}

impl Revoker {
    /// Wraps `stream`, made while the revoker was at `generation`: if a
    /// revocation came in between, the stream is revoked already.
    pub fn wrap(self: &Arc<Self>, stream: Stream, generation: u64) -> Stream {
        let waker = Arc::new(AtomicWaker::new());
        {
            let mut readers = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            if readers.list.len() >= readers.prune_at {
                readers.list.retain(|w| w.strong_count() > 0);
                readers.prune_at = (readers.list.len() * 2).max(64);
            }
            readers.list.push(Arc::downgrade(&waker));
        }
        Stream::Revocable(Box::new(Revocable {
            inner: stream,
            currency: Currency {
                revoker: self.clone(),
                generation,
            },
            waker,
        }))
    }

    /// The generation a connection made now belongs to.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Ends every connection made so far.
    pub fn revoke(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let readers = std::mem::take(&mut *self.readers.lock().unwrap_or_else(|p| p.into_inner()));
        for waker in readers.list.iter().filter_map(Weak::upgrade) {
            waker.wake();
        }
    }
}

/// A stream that a [`Revoker`] can end.
#[derive(Debug)]
pub struct Revocable {
    inner: Stream,
    /// Which revoker, and the generation it was made in.
    currency: Currency,
    waker: Arc<AtomicWaker>,
}

impl Revocable {
    fn check(&self) -> io::Result<()> {
        match self.currency.is_current() {
            true => Ok(()),
            false => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the upstream master changed (Sentinel failover)",
            )),
        }
    }
}

impl Stream {
    /// A check that the stream is still current (a Sentinel upstream's
    /// connection to the master a failover replaced is not), if it can
    /// be revoked.
    pub fn currency(&self) -> Option<Currency> {
        match self {
            Stream::Revocable(revocable) => Some(revocable.currency.clone()),
            _ => None,
        }
    }
}

/// Whether a revocable stream is still current: the stream's own check,
/// and a copy of it kept apart (the stream is owned by its reader and
/// writer).
#[derive(Debug, Clone)]
pub struct Currency {
    revoker: Arc<Revoker>,
    generation: u64,
}

impl Currency {
    pub fn is_current(&self) -> bool {
        self.revoker.generation() == self.generation
    }
}

impl AsyncRead for Revocable {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => {
                this.waker.register(cx.waker());
                // A revocation between the check and the registration.
                this.check()?;
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Revocable {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl From<TcpStream> for Stream {
    fn from(stream: TcpStream) -> Self {
        Stream::Plain(stream)
    }
}

impl From<tokio_rustls::server::TlsStream<TcpStream>> for Stream {
    fn from(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(stream.into()))
    }
}

impl From<tokio_rustls::client::TlsStream<TcpStream>> for Stream {
    fn from(stream: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        Stream::Tls(Box::new(stream.into()))
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Revocable(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Stream::Pipe(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Revocable(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Stream::Pipe(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            Stream::Revocable(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            Stream::Pipe(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Revocable(s) => s.is_write_vectored(),
            Stream::Pipe(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Revocable(s) => Pin::new(&mut **s).poll_flush(cx),
            Stream::Pipe(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Revocable(s) => Pin::new(&mut **s).poll_shutdown(cx),
            Stream::Pipe(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// A connection that can be used by both directions of a session at once.
pub trait Split: Send {
    type Read<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

/// Lock-free: both halves borrow the socket.
impl Split for TcpStream {
    type Read<'a> = tcp::ReadHalf<'a>;
    type Write<'a> = tcp::WriteHalf<'a>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.split()
    }
}

/// Through a lock, taken for each poll (uncontended: both halves are
/// polled by the session's one task).
impl Split for Stream {
    type Read<'a> = tokio::io::ReadHalf<&'a mut Stream>;
    type Write<'a> = tokio::io::WriteHalf<&'a mut Stream>;
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        tokio::io::split(self)
    }
}
