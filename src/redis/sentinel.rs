//! A master found through Redis Sentinel (`upstream =
//! "redis-sentinel://s1:26379,s2:26379/mymaster"`, #19).
//!
//! - **Finding the master.** Every upstream connection asks for the master
//!   the sentinels name (`SENTINEL GET-MASTER-ADDR-BY-NAME`, first sentinel
//!   that answers, with `sentinel_user`/`sentinel_password` when set),
//!   connects to it with the proxy's handshake and checks `ROLE`: an
//!   address that is no master (a stale answer mid-failover) is asked
//!   again, as the Sentinel client guidelines say. The answer is kept, so
//!   only the first connection and those after a change ask.
//! - **Following it.** A background task subscribes to `+switch-master` on
//!   one sentinel (the next one when it fails) and asks again whenever it
//!   (re)connects, so a switch announced while no sentinel was followed is
//!   seen too.
//! - **A switch.** Every connection to the old master is revoked at once
//!   ([`crate::net::Revoker`]): nothing more is written to it. Sessions owed
//!   replies on it get errors, as when a connection to Redis breaks, and
//!   connect again (to the new master) on their next request; a client is
//!   not closed, so pools keep their connections. The failover is recorded
//!   for the fence layer: tickets from before it admit no fill
//!   ([`crate::fence::failover`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{CallError, UpstreamError, call_reply};
use crate::config::{Secret, Upstream};
use crate::fence::failover::Failovers;
use crate::net::{Revoker, Stream};
use crate::resp::encode::command;
use crate::resp::reply::ReplyScanner;
use crate::resp::value::Value;

/// A sentinel's port when the URL names none.
pub const DEFAULT_PORT: u16 = 26379;
/// Pause before following the next sentinel after one failed.
const RETRY: Duration = Duration::from_millis(500);
/// A followed sentinel silent this long is sent a `PING`; silent twice
/// that long, it is given up for the next.
const PING_EVERY: Duration = Duration::from_secs(5);
/// How often a connection finds a master that is no master before it
/// gives up (each time asking the sentinels again).
const ROLE_ATTEMPTS: u32 = 3;

/// The sentinels, the master they watch, and what they said last.
#[derive(Debug)]
pub struct Sentinel {
    pub sentinels: Vec<(String, u16)>,
    pub master_name: String,
    pub user: Option<String>,
    pub password: Option<Secret>,
    master: Mutex<Master>,
    /// Ends every connection to a master that is no longer one.
    pub revoker: Arc<Revoker>,
    pub failovers: Arc<Failovers>,
    pub stats: SentinelStats,
}

#[derive(Debug, Default)]
struct Master {
    /// The master the sentinels named last.
    last: Option<(String, u16)>,
    /// `last` turned out not to be a master: ask again.
    stale: bool,
}

/// Counters for `CACHE.INFO`.
#[derive(Debug, Default)]
pub struct SentinelStats {
    /// Times the sentinels were asked for the master.
    pub asked: AtomicU64,
    /// Sentinels that could not be reached or answered an error.
    pub errors: AtomicU64,
    /// Masters that answered `ROLE` as something else.
    pub not_master: AtomicU64,
}

impl PartialEq for Sentinel {
    fn eq(&self, other: &Sentinel) -> bool {
        self.sentinels == other.sentinels
            && self.master_name == other.master_name
            && self.user == other.user
            && self.password == other.password
    }
}

impl Eq for Sentinel {}

impl Sentinel {
    pub fn new(sentinels: Vec<(String, u16)>, master_name: String) -> Sentinel {
        Sentinel {
            sentinels,
            master_name,
            user: None,
            password: None,
            master: Mutex::default(),
            revoker: Arc::default(),
            failovers: Arc::default(),
            stats: SentinelStats::default(),
        }
    }

    /// `redis-sentinel://s1:p1,s2:p2/name`, without credentials.
    pub fn url(&self) -> String {
        let sentinels: Vec<String> = self.sentinels.iter().map(|(h, p)| host_port(h, *p)).collect();
        format!("redis-sentinel://{}/{}", sentinels.join(","), self.master_name)
    }

    /// The master named last, unless it turned out to be none.
    pub fn master(&self) -> Option<(String, u16)> {
        let master = self.master.lock().unwrap_or_else(|p| p.into_inner());
        master.last.clone().filter(|_| !master.stale)
    }

    /// The master named last, for `CACHE.INFO` (`None`: never asked yet).
    pub fn last_master(&self) -> Option<(String, u16)> {
        self.master.lock().unwrap_or_else(|p| p.into_inner()).last.clone()
    }

    /// The sentinels name `addr` as the master: a change from the one named
    /// before is a failover.
    pub fn observe(&self, addr: (String, u16)) {
        let mut master = self.master.lock().unwrap_or_else(|p| p.into_inner());
        master.stale = false;
        let changed = match &master.last {
            Some(old) if *old != addr => {
                info!(
                    master = %self.master_name,
                    from = %host_port(&old.0, old.1),
                    to = %host_port(&addr.0, addr.1),
                    "the master changed (Sentinel failover): connections to the old one are closed"
                );
                // The bound first: no fill is judged without it from here.
                self.failovers.record();
                self.revoker.revoke();
                true
            }
            _ => false,
        };
        master.last = Some(addr);
        drop(master);
        if changed {
            // Connections made from here reach the new master only.
            self.failovers.replay();
        }
    }

    /// `addr` answered that it is not a master.
    fn not_master(&self, addr: &(String, u16)) {
        self.stats.not_master.fetch_add(1, Ordering::Relaxed);
        let mut master = self.master.lock().unwrap_or_else(|p| p.into_inner());
        if master.last.as_ref() == Some(addr) {
            master.stale = true;
        }
    }

    /// Asks the sentinels in turn for the master; the first answer counts.
    pub async fn resolve(&self, timeout: Duration) -> Result<(String, u16), UpstreamError> {
        let each = (timeout / self.sentinels.len().max(1) as u32).max(Duration::from_millis(200));
        let mut reasons = Vec::new();
        for (host, port) in &self.sentinels {
            self.stats.asked.fetch_add(1, Ordering::Relaxed);
            let asked = async {
                let mut stream = self.open(host, *port).await?;
                self.ask(&mut stream).await
            };
            let reason = match tokio::time::timeout(each, asked).await {
                Ok(Ok(Some(addr))) => {
                    self.observe(addr.clone());
                    return Ok(addr);
                }
                Ok(Ok(None)) => format!("does not know master `{}`", self.master_name),
                Ok(Err(reason)) => reason,
                Err(_) => format!("no answer within {each:?}"),
            };
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            debug!(sentinel = %host_port(host, *port), %reason, "sentinel did not name the master");
            reasons.push(format!("{}: {reason}", host_port(host, *port)));
        }
        Err(UpstreamError::Unreachable {
            addr: self.url(),
            reason: format!("no sentinel named the master ({})", reasons.join("; ")),
        })
    }

    /// A connection to one sentinel, logged in when credentials are set.
    async fn open(&self, host: &str, port: u16) -> Result<TcpStream, String> {
        let mut stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        if let Some(password) = &self.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &self.user {
                args.push(user.as_bytes());
            }
            args.push(password.expose().as_bytes());
            call_reply(&mut stream, &command(&args))
                .await
                .map_err(|e| format!("AUTH: {e}"))?;
        }
        Ok(stream)
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` on `stream`.
    async fn ask(&self, stream: &mut TcpStream) -> Result<Option<(String, u16)>, String> {
        let request = command(&[
            b"SENTINEL",
            b"GET-MASTER-ADDR-BY-NAME",
            self.master_name.as_bytes(),
        ]);
        let reply = call_reply(stream, &request).await.map_err(|e| e.to_string())?;
        Ok(master_addr(&reply))
    }
}

/// The `[ip, port]` of a `GET-MASTER-ADDR-BY-NAME` reply (`None`: nil, or
/// not that shape).
fn master_addr(reply: &[u8]) -> Option<(String, u16)> {
    let Some(Value::Array(fields)) = Value::decode(reply, false) else {
        return None;
    };
    match &fields[..] {
        [Value::Bulk(ip), Value::Bulk(port)] => Some((
            std::str::from_utf8(ip).ok()?.to_string(),
            std::str::from_utf8(port).ok()?.parse().ok()?,
        )),
        _ => None,
    }
}

/// The new master of a `+switch-master` message for `name`:
/// `<name> <old ip> <old port> <new ip> <new port>`.
fn switched_to(payload: &[u8], name: &str) -> Option<(String, u16)> {
    let text = std::str::from_utf8(payload).ok()?;
    match text.split(' ').collect::<Vec<_>>()[..] {
        [master, _, _, ip, port] if master == name => Some((ip.to_string(), port.parse().ok()?)),
        _ => None,
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub fn host_port(host: &str, port: u16) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

/// Connects to the master the sentinels name, with the proxy's handshake,
/// all within `timeout`: the connection is revoked when the master changes.
pub async fn connect(
    upstream: &Upstream,
    sentinel: &Arc<Sentinel>,
    timeout: Duration,
) -> Result<Stream, UpstreamError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut attempt = 0;
    loop {
        attempt += 1;
        // Taken before the master is looked up: a switch from here on
        // revokes this connection too.
        let generation = sentinel.revoker.generation();
        let addr = match sentinel.master() {
            Some(addr) => addr,
            None => sentinel.resolve(left()).await?,
        };
        let mut stream = super::connect_to(upstream, &addr.0, addr.1, left()).await?;
        match is_master(&mut stream, left()).await {
            // A switch while connecting: that master is the old one now.
            Ok(true) if sentinel.revoker.generation() != generation && attempt < ROLE_ATTEMPTS => {}
            Ok(true) => return Ok(sentinel.revoker.wrap(stream, generation)),
            Ok(false) => {
                sentinel.not_master(&addr);
                warn!(
                    master = %sentinel.master_name,
                    addr = %host_port(&addr.0, addr.1),
                    attempt,
                    "the master the sentinels named is not a master; asking again"
                );
                if attempt >= ROLE_ATTEMPTS || left().is_zero() {
                    return Err(UpstreamError::Rejected {
                        addr: host_port(&addr.0, addr.1),
                        step: "ROLE",
                        reply: "not a master (a failover in progress?)".to_string(),
                    });
                }
                tokio::time::sleep((Duration::from_millis(100) * attempt).min(left())).await;
            }
            Err(reason) => {
                return Err(UpstreamError::Unreachable {
                    addr: host_port(&addr.0, addr.1),
                    reason,
                });
            }
        }
    }
}

/// Whether the server on `stream` says it is a master. A connection that
/// may not run `ROLE` (a user without it, or not logged in: the proxy's
/// probe of whether connections start logged in) cannot tell: taken as yes
/// (the sentinels said so).
async fn is_master(stream: &mut Stream, timeout: Duration) -> Result<bool, String> {
    match tokio::time::timeout(timeout, call_reply(stream, &command(&[b"ROLE"]))).await {
        Err(_) => Err(format!("no answer to ROLE within {timeout:?}")),
        Ok(Ok(reply)) => Ok(reply.starts_with(b"*3\r\n$6\r\nmaster\r\n")),
        Ok(Err(CallError::Refused(_))) => Ok(true),
        Ok(Err(error)) => Err(format!("ROLE: {error}")),
    }
}

/// Follows the sentinels for the life of the process: one at a time,
/// subscribed to `+switch-master`, the next when it fails. Tickets from
/// before the start admit no fill ([`Failovers::bound_from_now`]).
pub fn follow(sentinel: Arc<Sentinel>, timeout: Duration) {
    sentinel.failovers.bound_from_now();
    tokio::spawn(async move {
        for turn in 0usize.. {
            let (host, port) = sentinel.sentinels[turn % sentinel.sentinels.len()].clone();
            let error = follow_one(&sentinel, &host, port, timeout).await;
            sentinel.stats.errors.fetch_add(1, Ordering::Relaxed);
            warn!(
                sentinel = %host_port(&host, port),
                %error,
                "stopped following a sentinel; following the next"
            );
            tokio::time::sleep(RETRY).await;
        }
    });
}

/// Follows one sentinel until it fails: subscribes to its `+switch-master`
/// messages, then asks it for the master (on a second connection, so that
/// no switch falls between the answer and the subscription), then reads the
/// messages. Returns why it stopped.
async fn follow_one(sentinel: &Sentinel, host: &str, port: u16, timeout: Duration) -> String {
    let setup = async {
        let mut stream = sentinel.open(host, port).await?;
        stream
            .write_all(&command(&[b"SUBSCRIBE", b"+switch-master"]))
            .await
            .map_err(|e| format!("SUBSCRIBE: {e}"))?;
        let mut asking = sentinel.open(host, port).await?;
        sentinel.stats.asked.fetch_add(1, Ordering::Relaxed);
        if let Some(addr) = sentinel.ask(&mut asking).await? {
            sentinel.observe(addr);
        }
        Ok::<_, String>(stream)
    };
    let mut stream = match tokio::time::timeout(timeout, setup).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(reason)) => return reason,
        Err(_) => return format!("no answer within {timeout:?}"),
    };
    debug!(sentinel = %host_port(host, port), "following a sentinel");
    let mut buf = BytesMut::with_capacity(1024);
    let mut pinged = false;
    loop {
        // Whole frames first: the subscription's confirmation, `PING`'s
        // answer and the messages.
        loop {
            match ReplyScanner::default().advance(&buf) {
                Ok(Some(frame)) => {
                    let frame = buf.split_to(frame.end);
                    if let Some(addr) = switch_message(&frame, &sentinel.master_name) {
                        sentinel.observe(addr);
                    }
                }
                Ok(None) => break,
                Err(error) => return format!("a malformed message ({error})"),
            }
        }
        if buf.len() > 1 << 20 {
            return "a message larger than 1 MiB".to_string();
        }
        match tokio::time::timeout(PING_EVERY, stream.read_buf(&mut buf)).await {
            Ok(Ok(0)) => return "the sentinel closed the connection".to_string(),
            Ok(Ok(_)) => pinged = false,
            Ok(Err(error)) => return error.to_string(),
            Err(_) if pinged => return format!("no answer to PING within {PING_EVERY:?}"),
            Err(_) => {
                pinged = true;
                if let Err(error) = stream.write_all(&command(&[b"PING"])).await {
                    return error.to_string();
                }
            }
        }
    }
}

/// The new master of `name` if `frame` is a `+switch-master` message for it.
fn switch_message(frame: &[u8], name: &str) -> Option<(String, u16)> {
    let Some(Value::Array(parts)) = Value::decode(frame, false) else {
        return None;
    };
    match &parts[..] {
        [Value::Bulk(kind), Value::Bulk(channel), Value::Bulk(payload)]
            if &kind[..] == b"message" && &channel[..] == b"+switch-master" =>
        {
            switched_to(payload, name)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_address_reply_is_read() {
        assert_eq!(
            master_addr(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n"),
            Some(("127.0.0.1".to_string(), 6380))
        );
        assert_eq!(master_addr(b"*-1\r\n"), None);
        assert_eq!(master_addr(b"$-1\r\n"), None);
        assert_eq!(master_addr(b"*2\r\n$9\r\n127.0.0.1\r\n$2\r\nxx\r\n"), None);
    }

    #[test]
    fn a_switch_is_read_for_its_master_only() {
        let payload = b"mymaster 127.0.0.1 6379 127.0.0.2 6380";
        assert_eq!(
            switched_to(payload, "mymaster"),
            Some(("127.0.0.2".to_string(), 6380))
        );
        assert_eq!(switched_to(payload, "other"), None);
        assert_eq!(switched_to(b"mymaster 127.0.0.1 6379", "mymaster"), None);
        let message = b"*3\r\n$7\r\nmessage\r\n$14\r\n+switch-master\r\n$38\r\nmymaster 127.0.0.1 6379 127.0.0.2 6380\r\n";
        assert_eq!(
            switch_message(message, "mymaster"),
            Some(("127.0.0.2".to_string(), 6380))
        );
        let confirmation = b"*3\r\n$9\r\nsubscribe\r\n$14\r\n+switch-master\r\n:1\r\n";
        assert_eq!(switch_message(confirmation, "mymaster"), None);
    }

    #[test]
    fn a_changed_master_is_a_failover_and_revokes_connections() {
        let sentinel = Sentinel::new(vec![("127.0.0.1".into(), 26379)], "m".into());
        let first = ("127.0.0.1".to_string(), 7000);
        sentinel.observe(first.clone());
        sentinel.observe(first.clone());
        assert_eq!(sentinel.failovers.count(), 0);
        assert_eq!(sentinel.revoker.generation(), 0);
        // A master that is none: asked again, and the same answer is no failover.
        sentinel.not_master(&first);
        assert_eq!(sentinel.master(), None);
        sentinel.observe(first.clone());
        assert_eq!(sentinel.master(), Some(first));
        assert_eq!(sentinel.failovers.count(), 0);
        sentinel.observe(("127.0.0.1".to_string(), 7001));
        assert_eq!(sentinel.failovers.count(), 1);
        assert_eq!(sentinel.revoker.generation(), 1);
    }
}
