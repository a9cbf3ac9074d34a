//! One client connection, on a shared upstream connection
//! ([`crate::redis::shared`], `shared_connections` > 0) until it needs one of
//! its own ([`upstream`]), or paired 1:1 with its own upstream connection
//! from the start (opened with [`crate::redis::connect`]).
//!
//! Two directions run in one task and share the [`Pairing`] queue:
//!
//! - [`requests`]: client → upstream, in batches, every request leaving
//!   an [`Expect`] in the queue;
//! - [`replies`]: upstream → client, each frame paired with its request in
//!   order, through the reply buffer ([`outbox`]).
//!
//! Both are generic over the two halves of the upstream stream: that pair is
//! the seam where the shared connection plugs in ([`upstream::SharedRx`],
//! [`upstream::SharedTx`]), and where a per-node connection would. While Redis cannot be reached, [`offline`] answers.
//! After Redis accepts a `SYNC` / `PSYNC` the connection is a replication
//! [`link`]: both directions copy raw bytes.

pub mod expect;
pub mod link;
pub mod offline;
pub mod outbox;
pub mod pairing;
pub mod replies;
pub mod requests;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, warn};

use crate::app::App;
use crate::config::Live;
use crate::fence::Client;
use crate::fence::script::ScriptCall;
use crate::net::{Split, Stream};
use crate::redis::{self, UpstreamError};
use crate::resp::encode;
pub use pairing::{Expect, LocalReply, Pairing, Route};
use replies::forward_replies;
use requests::forward_requests;
use upstream::UpstreamWrite;

/// Bytes a replication link or the outbox works in.
const READ_CHUNK: usize = 16 * 1024;

/// How much a direction offers each read of its socket. Most of a session's
/// memory is its two read buffers, so it starts at 4 KiB (a pipeline of 16
/// 100-byte `SET`s fits), doubles up to 64 KiB while reads fill it (a
/// client pipelining large values pays no extra system calls: at 4 KiB
/// fixed, `redis-benchmark -P 16 -d 2000` cost the proxy 40% more CPU per
/// request) and halves back while they use less than an eighth of it.
#[derive(Debug)]
struct ReadSize(usize);

impl ReadSize {
    const MIN: usize = 4 * 1024;
    const MAX: usize = 64 * 1024;

    fn new() -> ReadSize {
        ReadSize(ReadSize::MIN)
    }

    /// Room for the next read: at least a quarter of the read size free.
    /// An empty buffer much larger than the read size (a large frame came
    /// once) is given back: `reserve` would keep it for the session's life.
    fn prepare(&self, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 4 * self.0 {
            *buf = BytesMut::with_capacity(self.0);
        } else if buf.capacity() - buf.len() < self.0 / 4 {
            buf.reserve(self.0);
        }
    }

    /// A read of `n` bytes happened.
    fn observe(&mut self, n: usize) {
        if n >= self.0 {
            self.0 = (self.0 * 2).min(ReadSize::MAX);
        } else if n < self.0 / 8 {
            self.0 = (self.0 / 2).max(ReadSize::MIN);
        }
    }
}
/// The proxy's own calls waiting to be written upstream, per connection.
const MAX_INJECTIONS: usize = 1024;
/// How often a session without `reply_timeout` looks whether a reload set one.
const REPLY_TIMEOUT_OFF_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// A script call the proxy sends upstream on its own behalf (a miss, or a
/// call sent again after `NOSCRIPT`), with what its reply means.
#[derive(Debug)]
pub struct Injection {
    pub call: ScriptCall,
    /// Send the script's source (Redis lost it).
    pub reload: bool,
    pub expect: Expect,
}

/// Serves one client until either side closes, the client idles past
/// `timeout`, or a shutdown drains it.
pub async fn run(mut client: Stream, peer: SocketAddr, app: Arc<App>, shutdown: watch::Receiver<bool>) {
    let mut shutdown = shutdown;
    // A client Redis would ask for `AUTH` is not served on a shared
    // connection (logged in as it was opened), and nothing of its is
    // rewritten before it logs in ([`redis::login`]).
    let (logged_in, generation) = match &app.logins {
        Some(logins) => {
            logins
                .logged_in(&app.config.upstream, app.config.connect_timeout)
                .await
        }
        None => (true, 0),
    };
    let connected = match &app.shared {
        Some(pool) if logged_in => {
            let slot = pool.assign();
            pool.queue(slot, false, &app.metrics)
                .await
                .map(|queue| Upstream::Shared(slot, queue))
        }
        _ => redis::connect(&app.config.upstream, app.config.connect_timeout)
            .await
            .map(|stream| Upstream::Own(stream, BytesMut::new())),
    };
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(error @ UpstreamError::Rejected { .. }) => {
            // The proxy's own credentials are wrong: nothing will change that.
            app.metrics.upstream_connect_errors.inc();
            warn!(%error, "cannot serve client: upstream connection failed");
            let reply = encode::error(&format!("ERR cachefence: {error}"));
            let _ = client.write_all(&reply).await;
            let _ = client.shutdown().await;
            return;
        }
        // Once Redis is back this client keeps the connection that found it.
        Err(error) => match offline::serve_offline(&mut client, &app, error, &mut shutdown).await {
            Some((stream, unread)) => Upstream::Own(stream, unread),
            None => return,
        },
    };
    debug!(%peer, "session started");
    let ctx = (&*app, peer, (logged_in, generation));
    match upstream {
        Upstream::Shared(slot, queue) => {
            let (mut rd, mut wr) = upstream::shared_halves(app.clone(), slot, queue);
            let backlog = rd.backlog.clone();
            // Closed by the shared connection: its client does not read.
            let closed = Wait::new(Box::pin(backlog.close.notified()), || backlog.is_closed());
            tokio::select! {
                () = serve_client(client, (&mut rd, &mut wr), BytesMut::new(), ctx, &mut shutdown) => {}
                () = closed => debug!(%peer, "session closed: its replies stalled a shared connection"),
            }
        }
        // Without TLS to Redis, the upstream socket is split lock-free.
        Upstream::Own(Stream::Plain(mut upstream), unread) => {
            let (mut rd, mut wr) = upstream.split();
            serve_client(client, (&mut rd, &mut wr), unread, ctx, &mut shutdown).await
        }
        Upstream::Own(mut upstream, unread) => {
            let (mut rd, mut wr) = upstream.halves();
            serve_client(client, (&mut rd, &mut wr), unread, ctx, &mut shutdown).await
        }
    }
}

/// [`serve`], with the client's socket split lock-free when it has no TLS
/// (chosen once per connection: the session is the same code as before TLS).
async fn serve_client<R, W>(
    client: Stream,
    upstream: (&mut R, &mut W),
    unread: BytesMut,
    ctx: (&App, SocketAddr, (bool, u64)),
    shutdown: &mut watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send,
    W: UpstreamWrite,
{
    match client {
        Stream::Plain(mut client) => serve(&mut client, upstream, unread, ctx, shutdown).await,
        mut client => serve(&mut client, upstream, unread, ctx, shutdown).await,
    }
}

/// The upstream a session starts on.
enum Upstream {
    /// A connection of its own, and what the client sent while it was
    /// being reached (offline).
    Own(Stream, BytesMut),
    /// A slot of the shared connections, and its live job queue.
    Shared(usize, mpsc::Sender<crate::redis::shared::Job>),
}

/// Runs both directions until the session ends.
async fn serve<C, R, W>(
    client: &mut C,
    (upstream_rd, upstream_wr): (&mut R, &mut W),
    unread: BytesMut,
    (app, peer, (logged_in, generation)): (&App, SocketAddr, (bool, u64)),
    shutdown: &mut watch::Receiver<bool>,
) where
    C: Split,
    R: AsyncRead + Unpin + Send,
    W: UpstreamWrite,
{
    let shared = Shared::default();
    {
        let mut pairing = shared.pairing();
        pairing.db = app.config.upstream.db;
        if app.logins.is_some() {
            pairing.start_login(logged_in, generation);
        }
    }
    let fence = app.fences.as_ref().map(|fences| Client::new(fences, peer.ip()));
    // Boxed: the channel allocates a block of 32 slots as it is made, which
    // at an injection's own size was 4 KiB for every session, busy or not.
    let (inject_tx, inject_rx) = mpsc::channel::<Box<Injection>>(MAX_INJECTIONS);
    let (mut client_rd, mut client_wr) = client.halves();
    let end = {
        let requests = forward_requests(
            (&mut client_rd, unread),
            upstream_wr,
            &shared,
            app,
            fence.as_ref(),
            inject_rx,
            shutdown,
        );
        let misses = replies::Misses::new(inject_tx);
        let replies = forward_replies(upstream_rd, &mut client_wr, &shared, app, fence.as_ref(), misses);
        tokio::pin!(requests, replies);
        tokio::select! {
            end = &mut replies => end,
            end = &mut requests => match end {
                RequestsEnd::Idle => SessionEnd::Idle,
                RequestsEnd::ClientGone => SessionEnd::ClientGone,
                RequestsEnd::LinkClosed => SessionEnd::LinkClosed,
                // The replies direction finishes what is owed.
                RequestsEnd::UpstreamGone | RequestsEnd::RepliesDone => replies.await,
            },
        }
    };
    // After QUIT Redis closes at once; after a protocol error it lingers.
    if matches!(end, SessionEnd::Closed) && !shared.pairing().quit_locally {
        linger(&mut client_rd).await;
    }
    debug!(?end, "session ended");
}

/// After a closing error reply: read and drop what the client still sends,
/// briefly, so that closing with unread input (which makes the kernel send
/// RST) cannot destroy the reply before the client reads it.
async fn linger<R: AsyncRead + Unpin>(client: &mut R) {
    // On the heap: an array here would make every session's future 4 KiB
    // larger for the few that linger.
    let mut scratch = vec![0u8; 4096];
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), async {
        while matches!(client.read(&mut scratch).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[derive(Debug)]
enum RequestsEnd {
    /// Reading from the client failed.
    ClientGone,
    /// Idle past `timeout`.
    Idle,
    /// Writing to the upstream failed.
    UpstreamGone,
    /// The replies direction ended (it owns the injection sender). After the
    /// client's end, a shutdown or a protocol error the requests direction
    /// stops reading but keeps sending injections until then.
    RepliesDone,
    /// A replication link closed by a shutdown.
    LinkClosed,
}

#[derive(Debug)]
enum SessionEnd {
    Idle,
    ClientGone,
    /// Redis closed the connection (QUIT, CLIENT KILL, crash …).
    UpstreamClosed,
    /// Writing to the client failed.
    ClientWriteFailed,
    /// A reply of the proxy's closed the connection (protocol error).
    Closed,
    /// Shutdown: every pending reply was delivered.
    Drained,
    /// Redis sent bytes that are not RESP.
    MalformedReply,
    /// A replication link closed by a shutdown.
    LinkClosed,
}

/// State both directions share; locked only between awaits.
#[derive(Debug)]
struct Shared {
    pairing: Mutex<Pairing>,
    /// Wakes the replies direction: a local reply or a drain was queued.
    wake_replies: Notify,
    /// Set before `wake_replies` is notified, taken by the replies
    /// direction ([`Wait`]).
    replies_woken: AtomicBool,
    /// Wakes the requests direction: the pending queue has room again.
    room: Notify,
    /// Wakes the requests direction while a `SYNC` waits for its answer
    /// (see [`pairing::Link`]).
    link: Notify,
    /// Wakes the requests direction while a probed run waits for the
    /// `MGET` of its fences: how it goes on is in [`Pairing::resume`].
    resumed: Notify,
    /// Where the client's idle time starts, as Redis counts it: the end of
    /// the wall-clock second in which it last sent or received anything
    /// (see [`Shared::touch`]).
    last_activity: Mutex<Instant>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            pairing: Mutex::default(),
            wake_replies: Notify::new(),
            replies_woken: AtomicBool::new(false),
            room: Notify::new(),
            link: Notify::new(),
            resumed: Notify::new(),
            last_activity: Mutex::new(idle_from()),
        }
    }
}

/// The instant a client active now starts to be idle, as Redis counts it:
/// Redis keeps the second of a client's last interaction and closes it once
/// the current second is more than `timeout` past it, so a client is closed
/// between `timeout` and `timeout` + 1 s after its last request, by where
/// in its second that request came. The proxy closes at the same point
/// (the end of that wall-clock second, plus `timeout`), so a client that
/// Redis keeps is kept.
fn idle_from() -> Instant {
    let now = Instant::now();
    let into_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(Duration::ZERO, |d| {
            Duration::from_nanos(u64::from(d.subsec_nanos()))
        });
    now + (Duration::from_secs(1) - into_second)
}

impl Shared {
    fn pairing(&self) -> MutexGuard<'_, Pairing> {
        self.pairing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records activity, which only the idle `timeout` needs.
    fn touch(&self, live: &Live) {
        if live.timeout().is_some() {
            *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = idle_from();
        }
    }

    fn last_activity(&self) -> Instant {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply of the proxy's own in request order.
    fn reply_locally(&self, reply: Bytes, close: bool) {
        self.pairing().push(Expect::Local { reply, close });
        self.wake_replies();
    }

    /// Wakes the replies direction ([`Shared::wake_replies`]).
    fn wake_replies(&self) {
        self.replies_woken.store(true, Ordering::Release);
        self.wake_replies.notify_one();
    }
}

fn drain(shared: &Shared) {
    shared.pairing().draining = true;
    shared.wake_replies();
}

/// A wait that a session's task polls at each of its wake-ups (two per
/// request), made cheap. Polling a `Notify` or `watch` wait takes its
/// waiter lock every time (5% of the proxy's instructions per `GET`,
/// `bench/callgrind.sh`, for one such wait); this polls it only until it
/// has registered this task, and from then on reads `done`, an atomic the
/// waking side sets before it wakes. A `done` found set ends the wait even
/// if the inner one was not woken yet; a wait woken without it (a `Notify`
/// permit left from before) ends it too, as it would have.
struct Wait<F, D> {
    wait: F,
    done: D,
    /// The task the inner wait's registered waiter wakes.
    waker: Option<std::task::Waker>,
}

impl<F, D> Wait<F, D> {
    fn new(wait: F, done: D) -> Wait<F, D> {
        Wait {
            wait,
            done,
            waker: None,
        }
    }
}

impl<F, D> std::future::Future for Wait<F, D>
where
    F: std::future::Future + Unpin,
    D: FnMut() -> bool + Unpin,
{
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::task::Poll;
        let this = &mut *self;
        if (this.done)() {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        this.waker = Some(cx.waker().clone());
        std::pin::Pin::new(&mut this.wait).poll(cx).map(|_| ())
    }
}

/// Writes all of `bytes` and flushes: a TLS stream may keep the end of
/// what it was given until flushed (for plain TCP, flushing does nothing).
pub(crate) async fn send<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod read_size_tests {
    use super::*;

    #[test]
    fn the_read_size_follows_the_reads_and_a_large_empty_buffer_goes() {
        let mut size = ReadSize::new();
        for expected in [8 << 10, 16 << 10, 32 << 10, 64 << 10, 64 << 10] {
            size.observe(size.0);
            assert_eq!(size.0, expected);
        }
        size.observe(size.0 / 4);
        assert_eq!(size.0, 64 << 10, "a read of a quarter keeps it");
        for expected in [32 << 10, 16 << 10, 8 << 10, 4 << 10, 4 << 10] {
            size.observe(10);
            assert_eq!(size.0, expected);
        }
        // A 1 MiB frame came and went: the buffer is not kept.
        let mut buf = BytesMut::with_capacity(1 << 20);
        size.prepare(&mut buf);
        assert!(buf.capacity() < 16 << 10, "{}", buf.capacity());
        // A buffer holding part of a frame keeps it, with room to read.
        buf.extend_from_slice(&[b'x'; 4000]);
        size.prepare(&mut buf);
        assert_eq!(&buf[..], &[b'x'; 4000][..]);
        assert!(buf.capacity() - buf.len() >= ReadSize::MIN / 4);
    }
}

#[cfg(test)]
mod wait_tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(20);
    const BOUND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_wait_ends_when_its_flag_is_set_and_it_is_woken() {
        let notify = Arc::new(Notify::new());
        let flag = Arc::new(AtomicBool::new(false));
        let taken = flag.clone();
        let mut wait = Wait::new(Box::pin(notify.notified()), move || {
            taken.swap(false, Ordering::AcqRel)
        });
        assert!(tokio::time::timeout(QUIET, &mut wait).await.is_err());
        // Polled again by the same task: the short path, the inner wait not
        // polled; the wake must still reach this task.
        let waker = tokio::spawn({
            let (notify, flag) = (notify.clone(), flag.clone());
            async move {
                tokio::time::sleep(QUIET).await;
                flag.store(true, Ordering::Release);
                notify.notify_one();
            }
        });
        assert!(tokio::time::timeout(BOUND, &mut wait).await.is_ok());
        waker.await.unwrap();
        assert!(!flag.load(Ordering::Acquire), "the flag is taken");
    }

    #[tokio::test]
    async fn a_wait_ends_at_a_permit_left_from_before_it_was_made() {
        let notify = Notify::new();
        notify.notify_one();
        let wait = Wait::new(Box::pin(notify.notified()), || false);
        assert!(tokio::time::timeout(BOUND, wait).await.is_ok());
    }

    #[tokio::test]
    async fn a_wait_whose_flag_is_set_ends_without_being_woken() {
        let notify = Notify::new();
        let mut wait = Wait::new(Box::pin(notify.notified()), || false);
        assert!(tokio::time::timeout(QUIET, &mut wait).await.is_err());
        let wait = Wait::new(Box::pin(notify.notified()), || true);
        assert!(tokio::time::timeout(QUIET, wait).await.is_ok());
    }

    #[tokio::test]
    async fn a_shutdown_wait_ends_at_the_change_and_at_the_senders_end() {
        for close in [false, true] {
            let (tx, rx) = watch::channel(false);
            let mut changes = rx.clone();
            let mut wait = Wait::new(
                Box::pin(async move {
                    let _ = changes.changed().await;
                }),
                move || rx.has_changed().unwrap_or(true),
            );
            assert!(tokio::time::timeout(QUIET, &mut wait).await.is_err());
            tokio::spawn(async move {
                tokio::time::sleep(QUIET).await;
                match close {
                    true => drop(tx),
                    false => tx.send(true).unwrap(),
                }
            });
            assert!(
                tokio::time::timeout(BOUND, &mut wait).await.is_ok(),
                "close: {close}"
            );
        }
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    #[test]
    fn idle_time_starts_at_the_end_of_the_wall_clock_second() {
        for _ in 0..3 {
            let before = Instant::now();
            let from = idle_from();
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            assert!(from > before && from <= Instant::now() + Duration::from_secs(1));
            // It falls on a whole second of the wall clock (give or take
            // the two clock reads).
            let to_boundary = from.saturating_duration_since(Instant::now());
            let at = (wall + to_boundary).subsec_millis();
            assert!(!(5..995).contains(&at), "{at} ms into a second");
            std::thread::sleep(Duration::from_millis(137));
        }
    }
}
