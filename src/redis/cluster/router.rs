//! One upstream connection to a Redis Cluster, as the rest of the proxy
//! sees it: requests in, replies out in the same order, over an in-process
//! pipe ([`connect`]). Behind it a task holds a connection per master it
//! has needed and sends each request where its keys live.
//!
//! The rules, per command (the README's table says the same):
//! - **One slot.** A command whose keys share a slot goes to that slot's
//!   master; keys in several slots get Redis Cluster's own `-CROSSSLOT`.
//!   A keyless command goes to the first master (the one serving slot 0).
//! - **Redirects.** `MOVED` updates the slot map and sends the request
//!   again to the master it names (the whole map is asked again in the
//!   background); `ASK` sends `ASKING` and the request there, map
//!   unchanged; `TRYAGAIN` (a slot mid-migration) is retried a few times
//!   50 ms apart. The client sees none of them.
//! - **Split and merged.** `MGET`, `MSET`, `DEL`, `UNLINK`, `EXISTS` and
//!   `TOUCH` across slots: one command per slot, replies merged in order
//!   (counts added up). `DBSIZE` and `KEYS` ask every master and add up or
//!   join; `FLUSHALL`, `FLUSHDB`, `SCRIPT LOAD/FLUSH` and `FUNCTION
//!   LOAD/FLUSH/DELETE` run on every master. `SCAN` walks the masters in
//!   turn: its cursor carries the master's index in its low 8 bits.
//! - **The proxy's fence script** (cachefence's own `EVALSHA`s: a batch of
//!   several clients' or commands' operations, an invalidation of many
//!   keys) is split by slot the same way, one batch call per slot, and its
//!   reply put back together element by element.
//! - **Connection state.** `HELLO`, `AUTH`, `CLIENT SETNAME`/`TRACKING`/…
//!   go to every master this connection uses, now and later. `CLIENT
//!   REPLY` is kept here: the masters always answer, and the router drops
//!   what the client did not ask for.
//!   `SELECT` other than 0 fails as in cluster mode.
//! - **Transactions.** `MULTI` is answered here and sent, with the
//!   commands after it, to the master of the first key (or of the `WATCH`ed
//!   keys): a transaction's keys must live on one master, as in Redis
//!   Cluster (a redirect inside one is the client's error, and `EXEC` then
//!   fails with `EXECABORT`).
//! - **Pub/sub and MONITOR.** From `SUBSCRIBE`, `PSUBSCRIBE`, `MONITOR`
//!   (first master) or `SSUBSCRIBE` (its channel's master) on, the
//!   connection is a plain relay to that one master.
//! - **`CLUSTER SLOTS/SHARDS/NODES/INFO/MYID`** are answered as a one-node
//!   cluster at the proxy's address ([`super::local`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::keys::{KeyTable, slot};
use super::{Cluster, SlotMap};
use crate::config::Upstream;
use crate::fence::failover::Failovers;
use crate::fence::script::{self, ScriptCall};
use crate::net::Stream;
use crate::redis::UpstreamError;
use crate::redis::sentinel::host_port;
use crate::resp::encode::{command, command_words, error};
use crate::resp::reply::ReplyScanner;
use crate::resp::request::RequestFramer;

/// Bytes the pipe between the proxy and a router holds each way.
const PIPE_BYTES: usize = 256 * 1024;
/// Requests in flight per router before it stops reading more.
const MAX_IN_FLIGHT: usize = 4096;
/// Redirects followed per request before the redirect is the reply.
const MAX_REDIRECTS: u32 = 5;
/// `TRYAGAIN` retried this many times, this far apart.
const TRYAGAIN_RETRIES: u32 = 5;
const TRYAGAIN_PAUSE: Duration = Duration::from_millis(50);
/// Frames a node's reader may hand over before the router takes them.
const EVENTS: usize = 1024;
/// The largest request the router takes (the proxy checked the client's).
const MAX_REQUEST: usize = 1 << 30;

type Addr = (String, u16);

/// Opens a router for `upstream`'s cluster and returns the proxy's end of
/// its pipe. The slot map, the key table and a connection to the first
/// master are made first: an unreachable cluster fails here, as one Redis
/// would.
pub async fn connect(
    upstream: &Upstream,
    cluster: &Arc<Cluster>,
    timeout: Duration,
) -> Result<Stream, UpstreamError> {
    let map = cluster.map(upstream, timeout).await?;
    let table = cluster.table(upstream, timeout).await?;
    let (events_tx, events_rx) = mpsc::channel(EVENTS);
    let mut router = Router {
        upstream: upstream.clone(),
        cluster: cluster.clone(),
        table,
        timeout,
        nodes: HashMap::new(),
        next_node: 0,
        events_tx,
        events_rx,
        order: VecDeque::new(),
        entries: HashMap::new(),
        next_id: 0,
        state: Vec::new(),
        txn: None,
        relay: None,
        resp3: false,
        quiet: Quiet::No,
        closing: false,
    };
    router.node(&map.nodes[0]).await?;
    let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(router.run(theirs));
    Ok(Stream::Pipe(Box::new(ours)))
}

struct Router {
    upstream: Upstream,
    cluster: Arc<Cluster>,
    table: Arc<KeyTable>,
    timeout: Duration,
    nodes: HashMap<Addr, Node>,
    next_node: u64,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    /// Requests in the proxy's order, awaiting their replies.
    order: VecDeque<u64>,
    entries: HashMap<u64, Entry>,
    next_id: u64,
    /// Commands that set connection state, replayed on every new master.
    state: Vec<Bytes>,
    txn: Option<Txn>,
    /// Pub/sub or MONITOR: everything goes to and comes from this master,
    /// from this request on.
    relay: Option<(Addr, Bytes)>,
    /// The client switched to RESP3 (`HELLO 3`).
    resp3: bool,
    /// `CLIENT REPLY`.
    quiet: Quiet,
    /// The transaction's master was lost: the router ends.
    closing: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Quiet {
    No,
    Off,
    Skip,
}

/// A connection to one master.
struct Node {
    id: u64,
    writer: WriteHalf<Stream>,
    /// Written and not yet answered, in order.
    fifo: VecDeque<Waiting>,
    /// Gathered for the next write.
    out: BytesMut,
    reader: tokio::task::JoinHandle<()>,
    /// Counted in the cluster's connections per node until dropped.
    counted: Option<(Arc<Cluster>, Addr)>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some((cluster, addr)) = self.counted.take()
            && let Some(mut count) = cluster.connections.get_mut(&addr)
        {
            *count = count.saturating_sub(1);
        }
    }
}

enum Waiting {
    Reply(u64),
    /// A reply the client does not get (`ASKING`, a replayed `HELLO` …).
    Discard,
}

enum Event {
    Frame { node: u64, frame: Bytes },
    Lost { node: u64, reason: String },
    Retry(u64),
}

/// A transaction in progress on this connection.
#[derive(Default)]
struct Txn {
    /// The master it runs on, once a key (or `WATCH`) chose one.
    node: Option<Addr>,
    /// `MULTI` answered here and not sent yet (no master chosen).
    multi_pending: bool,
    /// Between `MULTI` and `EXEC`/`DISCARD`.
    multi: bool,
}

struct Entry {
    /// The request as sent, for a redirect.
    request: Bytes,
    reply: Option<Bytes>,
    redirects: u32,
    /// A part of a split request: its parent and its index there.
    part_of: Option<(u64, usize)>,
    gather: Option<Gather>,
    /// Inside a transaction: redirects are the client's errors.
    in_txn: bool,
    /// A fence script group: `NOSCRIPT` is answered by sending the source.
    fence_group: Option<ScriptCall>,
    scan: Option<(usize, usize)>,
    slot: Option<u16>,
    /// `CLIENT REPLY OFF`/`SKIP`: the client gets no reply.
    silent: bool,
}

impl Entry {
    fn new(request: Bytes) -> Entry {
        Entry {
            request,
            reply: None,
            redirects: 0,
            part_of: None,
            gather: None,
            in_txn: false,
            fence_group: None,
            scan: None,
            slot: None,
            silent: false,
        }
    }
}

struct Gather {
    merge: Merge,
    parts: Vec<Option<Bytes>>,
    left: usize,
}

enum Merge {
    /// Integer replies added up (`DEL`, `EXISTS`, `DBSIZE` …).
    Sum,
    /// The first error, else the first reply (`MSET`, `FLUSHALL` …).
    First,
    /// Arrays joined (`KEYS`).
    Concat,
    /// `MGET`: per part, the positions of its elements in the reply.
    Positions(Vec<Vec<usize>>, usize),
    /// The fence script's operations put back together.
    Fence(FenceMerge),
}

/// How a split fence script call's reply is rebuilt: per operation, where
/// its pieces are (part, element) and how they combine.
struct FenceMerge {
    batch: bool,
    ops: Vec<(OpMerge, Vec<(usize, usize)>)>,
}

#[derive(Clone, Copy)]
enum OpMerge {
    /// One piece: its element as is.
    One,
    /// Counts added up (a `DEL`/`UNLINK` split by slot).
    Sum,
    /// The first error, else the first piece (`MSET`).
    First,
    /// Keys in several slots that cannot be split.
    CrossSlot,
}

const CROSSSLOT: &str = "CROSSSLOT Keys in request don't hash to the same slot";

impl Router {
    async fn run(mut self, pipe: DuplexStream) {
        let (mut pipe_rd, mut pipe_wr) = tokio::io::split(pipe);
        let mut input = BytesMut::with_capacity(16 * 1024);
        let mut framer = RequestFramer::new(MAX_REQUEST);
        let mut output = BytesMut::new();
        loop {
            if let Some(relay) = self.relay.take() {
                self.relay(relay, &mut pipe_rd, &mut pipe_wr, input).await;
                return;
            }
            self.deliver(&mut output);
            if !output.is_empty() {
                if pipe_wr.write_all(&output).await.is_err() {
                    return;
                }
                output.clear();
            }
            if self.closing {
                return;
            }
            let reading = self.order.len() < MAX_IN_FLIGHT;
            tokio::select! {
                read = pipe_rd.read_buf(&mut input), if reading => {
                    match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    loop {
                        let frame = match framer.next(&input) {
                            Ok(Some(frame)) => frame,
                            Ok(None) => break,
                            Err(e) => {
                                warn!(error = %e.0, "cluster router: a request it cannot frame");
                                return;
                            }
                        };
                        let raw = input.split_to(frame.len).freeze();
                        if frame.argc == 0 {
                            continue;
                        }
                        let args = frame.all_args(&raw);
                        self.dispatch(raw, args).await;
                        if self.relay.is_some() {
                            break;
                        }
                    }
                    self.flush_nodes().await;
                }
                Some(event) = self.events_rx.recv() => {
                    self.on_event(event).await;
                    // Take what else arrived before writing.
                    while let Ok(event) = self.events_rx.try_recv() {
                        self.on_event(event).await;
                    }
                    self.flush_nodes().await;
                }
            }
        }
    }

    /// Pub/sub or MONITOR: once every earlier reply is delivered, `first`
    /// (the request that started it) and everything after it go to `addr`
    /// as they are, and what `addr` sends comes back as it is.
    async fn relay(
        &mut self,
        (addr, first): (Addr, Bytes),
        pipe_rd: &mut ReadHalf<DuplexStream>,
        pipe_wr: &mut WriteHalf<DuplexStream>,
        mut input: BytesMut,
    ) {
        let mut output = BytesMut::new();
        loop {
            self.deliver(&mut output);
            if !output.is_empty() && pipe_wr.write_all(&output).await.is_err() {
                return;
            }
            output.clear();
            if self.order.is_empty() {
                break;
            }
            let Some(event) = self.events_rx.recv().await else {
                return;
            };
            self.on_event(event).await;
            self.flush_nodes().await;
        }
        // What the master still owes is the connection's state replayed on
        // it (a connection opened for this relay): sent first, its replies
        // dropped, then the relay.
        let (node_id, mut discard) = match self.node(&addr).await {
            Ok(node) => {
                let owed = node.fifo.len();
                node.fifo.clear();
                (node.id, owed)
            }
            Err(e) => {
                let _ = pipe_wr.write_all(&error(&format!("ERR cachefence: {e}"))).await;
                return;
            }
        };
        self.flush_nodes().await;
        let mut pending = BytesMut::from(&first[..]);
        pending.extend_from_slice(&input);
        input.clear();
        loop {
            if !pending.is_empty() {
                let Some(node) = self.nodes.get_mut(&addr) else {
                    return;
                };
                if node.writer.write_all(&pending).await.is_err() {
                    return;
                }
                pending.clear();
            }
            tokio::select! {
                read = pipe_rd.read_buf(&mut pending) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                event = self.events_rx.recv() => match event {
                    Some(Event::Frame { node, .. }) if node == node_id && discard > 0 => discard -= 1,
                    Some(Event::Frame { node, frame }) if node == node_id => {
                        if pipe_wr.write_all(&frame).await.is_err() {
                            return;
                        }
                    }
                    Some(Event::Lost { node, .. }) if node == node_id => return,
                    Some(_) => {}
                    None => return,
                },
            }
        }
    }

    /// Moves every reply now complete, in order, to `output`.
    fn deliver(&mut self, output: &mut BytesMut) {
        while let Some(&id) = self.order.front() {
            if self.entries.get(&id).is_none_or(|e| e.reply.is_none()) {
                break;
            }
            self.order.pop_front();
            let entry = self.entries.remove(&id).expect("checked");
            if !entry.silent {
                output.extend_from_slice(&entry.reply.expect("checked"));
            }
        }
    }

    /// A new request from the proxy, its reply dropped under `CLIENT REPLY
    /// OFF` or `SKIP`.
    async fn dispatch(&mut self, raw: Bytes, args: Vec<Bytes>) {
        let (before, quiet) = (self.order.len(), self.quiet);
        self.route(raw, args).await;
        if quiet == Quiet::No || self.quiet != quiet {
            return;
        }
        for id in self.order.iter().skip(before) {
            if let Some(entry) = self.entries.get_mut(id) {
                entry.silent = true;
            }
        }
        if quiet == Quiet::Skip {
            self.quiet = Quiet::No;
        }
    }

    /// Where a request goes.
    async fn route(&mut self, raw: Bytes, args: Vec<Bytes>) {
        let name = args[0].to_ascii_uppercase();
        let sub = args.get(1).map(|a| a.to_ascii_uppercase());
        let in_multi = self.txn.as_ref().is_some_and(|t| t.multi);
        match (&name[..], sub.as_deref()) {
            (b"CLUSTER", Some(sub)) => {
                let me = self
                    .cluster
                    .advertise
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                let resp3 = self.resp3;
                if let Some(reply) = super::local::cluster_reply(sub, (&me.0, me.1), resp3) {
                    return self.local(reply);
                }
                if matches!(sub, b"COUNTKEYSINSLOT" | b"GETKEYSINSLOT")
                    && let Some(slot) = args
                        .get(2)
                        .and_then(|s| std::str::from_utf8(s).ok()?.parse::<u16>().ok())
                {
                    return self.single(raw, Some(slot % 16384), in_multi).await;
                }
                self.single(raw, None, in_multi).await
            }
            (b"SELECT", _) => match args.get(1).map(|a| &a[..]) {
                Some(b"0") => self.local(Bytes::from_static(b"+OK\r\n")),
                _ => self.local(error("ERR SELECT is not allowed in cluster mode")),
            },
            (b"READONLY" | b"READWRITE" | b"ASKING", _) => self.local(Bytes::from_static(b"+OK\r\n")),
            // Not subscribed (a relay would have taken it): what Redis
            // answers, one confirmation per channel, count 0.
            (b"UNSUBSCRIBE" | b"PUNSUBSCRIBE" | b"SUNSUBSCRIBE", _) => {
                let reply = unsubscribed(&name.to_ascii_lowercase(), &args[1..], self.resp3);
                self.local(reply)
            }
            (b"SUBSCRIBE" | b"PSUBSCRIBE" | b"MONITOR", _) => {
                let first = self.first_master().await;
                self.start_relay(first, raw);
            }
            (b"SSUBSCRIBE", _) => {
                let target = match args.get(1) {
                    Some(channel) => self.master_of(slot(channel)).await,
                    None => self.first_master().await,
                };
                self.start_relay(target, raw);
            }
            (b"HELLO" | b"AUTH" | b"RESET", _) => {
                match (&name[..], args.get(1).map(|a| &a[..])) {
                    (b"HELLO", Some(b"3")) => self.resp3 = true,
                    (b"HELLO", Some(b"2")) => self.resp3 = false,
                    (b"RESET", _) => (self.resp3, self.quiet) = (false, Quiet::No),
                    _ => {}
                }
                self.state_command(raw, &name).await
            }
            (b"CLIENT", Some(b"SETNAME" | b"TRACKING" | b"NO-EVICT" | b"NO-TOUCH" | b"SETINFO")) => {
                self.state_command(raw, &name).await
            }
            // Kept here: every master answers, the client gets what it asked.
            (b"CLIENT", Some(b"REPLY")) => match args.get(2).map(|a| a.to_ascii_uppercase()).as_deref() {
                Some(b"ON") => {
                    self.quiet = Quiet::No;
                    self.local(Bytes::from_static(b"+OK\r\n"))
                }
                Some(b"OFF") => self.quiet = Quiet::Off,
                Some(b"SKIP") => self.quiet = Quiet::Skip,
                _ => self.single(raw, None, false).await,
            },
            (b"MULTI", _) => self.multi(raw).await,
            (b"EXEC" | b"DISCARD", _) => self.end_multi(raw, &name).await,
            (b"WATCH", _) => self.watch(raw, &args).await,
            (b"UNWATCH", _) => {
                let target = self.txn.as_ref().and_then(|t| t.node.clone());
                if !in_multi {
                    self.txn = None;
                }
                match target {
                    Some(node) => self.send_new(node, raw, false).await,
                    None => self.single(raw, None, false).await,
                }
            }
            _ if in_multi => self.in_transaction(raw, &args).await,
            (b"MGET" | b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" | b"MSET", _) => {
                self.split(raw, &args, &name).await
            }
            (b"DBSIZE", _) => self.everywhere(raw, Merge::Sum).await,
            // Every master answers: PONG only when all of them do.
            (b"PING", _) => self.everywhere(raw, Merge::First).await,
            (b"KEYS", _) => self.everywhere(raw, Merge::Concat).await,
            (b"FLUSHALL" | b"FLUSHDB", _)
            | (b"SCRIPT", Some(b"LOAD" | b"FLUSH"))
            | (b"FUNCTION", Some(b"LOAD" | b"FLUSH" | b"DELETE")) => self.everywhere(raw, Merge::First).await,
            (b"SCAN", _) => self.scan(&args).await,
            (b"EVALSHA" | b"EVAL", _) if is_fence_script(&args) => self.fence_call(raw, &args).await,
            _ => {
                let keys = self.table.keys(&args);
                let mut slots = keys.iter().map(|&i| slot(&args[i]));
                match slots.next() {
                    None => self.single(raw, None, false).await,
                    Some(first) if slots.all(|s| s == first) => self.single(raw, Some(first), false).await,
                    Some(_) => self.local(error(CROSSSLOT)),
                }
            }
        }
    }

    /// A reply made here, in its place.
    fn local(&mut self, reply: Bytes) {
        let id = self.new_id();
        let mut entry = Entry::new(Bytes::new());
        entry.reply = Some(reply);
        self.entries.insert(id, entry);
        self.order.push_back(id);
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A request for one slot's master (`None`: the first master).
    async fn single(&mut self, raw: Bytes, slot: Option<u16>, in_txn: bool) {
        let target = match slot {
            Some(slot) => self.master_of(slot).await,
            None => self.first_master().await,
        };
        let id = self.new_id();
        let mut entry = Entry::new(raw.clone());
        entry.in_txn = in_txn;
        entry.slot = slot;
        self.entries.insert(id, entry);
        self.order.push_back(id);
        self.queue(target, Waiting::Reply(id), &raw).await;
    }

    /// A request for `node`, in the client's order.
    async fn send_new(&mut self, node: Addr, raw: Bytes, in_txn: bool) {
        let id = self.new_id();
        let mut entry = Entry::new(raw.clone());
        entry.in_txn = in_txn;
        self.entries.insert(id, entry);
        self.order.push_back(id);
        self.queue(node, Waiting::Reply(id), &raw).await;
    }

    async fn first_master(&mut self) -> Addr {
        self.map()
            .await
            .node(0)
            .cloned()
            .unwrap_or_else(|| self.any_master())
    }

    fn any_master(&self) -> Addr {
        self.cluster
            .current()
            .and_then(|m| m.nodes.first().cloned())
            .unwrap_or_else(|| self.cluster.seeds[0].clone())
    }

    async fn master_of(&mut self, slot: u16) -> Addr {
        let map = self.map().await;
        match map.node(slot) {
            Some(node) => node.clone(),
            // A slot no master serves: asked again; Redis answers CLUSTERDOWN
            // if it still has none.
            None => {
                let map = self.refresh(Some(&map)).await;
                map.and_then(|m| m.node(slot).cloned())
                    .unwrap_or_else(|| self.any_master())
            }
        }
    }

    async fn map(&mut self) -> Arc<SlotMap> {
        match self.cluster.current() {
            Some(map) => map,
            None => self.refresh(None).await.unwrap_or_else(|| Arc::new(empty_map())),
        }
    }

    async fn refresh(&mut self, seen: Option<&Arc<SlotMap>>) -> Option<Arc<SlotMap>> {
        match self.cluster.refresh(&self.upstream, self.timeout, seen).await {
            Ok(map) => Some(map),
            Err(error) => {
                warn!(%error, "cluster slot map could not be refreshed");
                None
            }
        }
    }

    /// The connection to `addr`, opened (and given this connection's
    /// state) if there is none.
    async fn node(&mut self, addr: &Addr) -> Result<&mut Node, UpstreamError> {
        if !self.nodes.contains_key(addr) {
            let stream = crate::redis::connect_to(&self.upstream, &addr.0, addr.1, self.timeout).await?;
            let (reader, writer) = tokio::io::split(stream);
            self.next_node += 1;
            let id = self.next_node;
            let reader = tokio::spawn(read_frames(id, reader, self.events_tx.clone()));
            let mut node = Node {
                id,
                writer,
                fifo: VecDeque::new(),
                out: BytesMut::new(),
                reader,
                counted: None,
            };
            for state in &self.state {
                node.out.extend_from_slice(state);
                node.fifo.push_back(Waiting::Discard);
            }
            debug!(node = %host_port(&addr.0, addr.1), "cluster node connection opened");
            *self.cluster.connections.entry(addr.clone()).or_default() += 1;
            node.counted = Some((self.cluster.clone(), addr.clone()));
            self.nodes.insert(addr.clone(), node);
        }
        Ok(self.nodes.get_mut(addr).expect("inserted"))
    }

    /// Queues `bytes` for `addr`; a master that cannot be reached answers
    /// the request with an error (and the map is asked again).
    async fn queue(&mut self, addr: Addr, waiting: Waiting, bytes: &[u8]) {
        match self.node(&addr).await {
            Ok(node) => {
                node.out.extend_from_slice(bytes);
                node.fifo.push_back(waiting);
            }
            Err(e) => {
                self.cluster.node_failed(&addr);
                if let Waiting::Reply(id) = waiting {
                    let reply = error(&format!("ERR cachefence: {e}"));
                    self.answer(id, reply);
                }
                let map = self.cluster.current();
                self.refresh(map.as_ref()).await;
            }
        }
    }

    /// Writes what each master has gathered.
    async fn flush_nodes(&mut self) {
        let mut failed = Vec::new();
        for (addr, node) in &mut self.nodes {
            if node.out.is_empty() {
                continue;
            }
            let out = node.out.split().freeze();
            if let Err(e) = node.writer.write_all(&out).await {
                failed.push((addr.clone(), e.to_string()));
            }
        }
        for (addr, reason) in failed {
            self.lost(&addr, &reason).await;
        }
    }

    /// A master's connection failed: what it owed is answered with errors,
    /// and the map is asked again. The connection of a transaction (or of
    /// watched keys) ends the router: its state went with it, as when the
    /// connection to one Redis breaks, and the session answers the client
    /// so.
    async fn lost(&mut self, addr: &Addr, reason: &str) {
        let Some(node) = self.nodes.remove(addr) else {
            return;
        };
        if self.txn.as_ref().is_some_and(|t| t.node.as_ref() == Some(addr)) {
            self.closing = true;
        }
        match node.fifo.is_empty() {
            // After QUIT, or an idle connection the node closed.
            true => debug!(node = %host_port(&addr.0, addr.1), reason, "cluster node connection closed"),
            false => {
                self.cluster.node_failed(addr);
                warn!(node = %host_port(&addr.0, addr.1), reason, owed = node.fifo.len(), "cluster node connection lost")
            }
        }
        let reply = error(&format!(
            "ERR cachefence: upstream {} lost ({reason})",
            host_port(&addr.0, addr.1)
        ));
        for waiting in &node.fifo {
            if let Waiting::Reply(id) = waiting {
                self.answer(*id, reply.clone());
            }
        }
        let map = self.cluster.current();
        self.refresh(map.as_ref()).await;
    }

    /// `reply` completes request `id` (a part completes its parent when it
    /// is the last one).
    fn answer(&mut self, id: u64, reply: Bytes) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let reply = match entry.scan.take() {
            Some((index, count)) => scan_reply(&reply, index, count).unwrap_or(reply),
            None => reply,
        };
        let Some((parent, part)) = entry.part_of else {
            entry.reply = Some(reply);
            return;
        };
        self.entries.remove(&id);
        let Some(parent_entry) = self.entries.get_mut(&parent) else {
            return;
        };
        let Some(gather) = parent_entry.gather.as_mut() else {
            return;
        };
        gather.parts[part] = Some(reply);
        gather.left -= 1;
        if gather.left == 0 {
            let parts: Vec<Bytes> = gather.parts.drain(..).map(Option::unwrap_or_default).collect();
            parent_entry.reply = Some(merge(&gather.merge, parts));
        }
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Frame { node, frame } => {
                // A RESP3 push (tracking) is no reply: the client's, after
                // every reply already owed (an invalidation must not pass
                // the value it invalidates).
                if frame.first() == Some(&b'>') {
                    self.local(frame);
                    return;
                }
                let Some((addr, waiting)) = self
                    .nodes
                    .iter_mut()
                    .find(|(_, n)| n.id == node)
                    .map(|(a, n)| (a.clone(), n.fifo.pop_front()))
                else {
                    return;
                };
                match waiting {
                    Some(Waiting::Reply(id)) => self.on_reply(id, frame).await,
                    Some(Waiting::Discard) if frame.first() == Some(&b'-') => debug!(
                        node = %host_port(&addr.0, addr.1),
                        reply = %String::from_utf8_lossy(&frame).trim_end(),
                        "an error from a cluster node for a command the client does not see"
                    ),
                    Some(Waiting::Discard) => {}
                    None => {
                        warn!(node = %host_port(&addr.0, addr.1), "a reply no request on this cluster connection asked for")
                    }
                }
            }
            Event::Lost { node, reason } => {
                if let Some(addr) = self
                    .nodes
                    .iter()
                    .find(|(_, n)| n.id == node)
                    .map(|(a, _)| a.clone())
                {
                    self.lost(&addr, &reason).await;
                }
            }
            Event::Retry(id) => {
                let Some(entry) = self.entries.get_mut(&id) else {
                    return;
                };
                if let Some(again) = rebound_request(&self.cluster.failovers, &entry.request) {
                    entry.request = again;
                }
                let (request, slot) = (entry.request.clone(), entry.slot);
                let target = match slot {
                    Some(slot) => self.master_of(slot).await,
                    None => self.first_master().await,
                };
                self.queue(target, Waiting::Reply(id), &request).await;
            }
        }
    }

    /// A master answered request `id`: a redirect is followed, anything
    /// else is the reply.
    async fn on_reply(&mut self, id: u64, frame: Bytes) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let redirect = match frame.first() == Some(&b'-') {
            true => Redirect::of(&frame),
            false => None,
        };
        if entry.in_txn {
            if let Some(Redirect::Moved(..) | Redirect::Ask(..)) = redirect {
                let text = String::from_utf8_lossy(&frame[1..frame.len() - 2]).into_owned();
                let reply = error(&format!(
                    "CROSSSLOT cachefence: the keys of a transaction must be on one cluster master ({text})"
                ));
                return self.answer(id, reply);
            }
            return self.answer(id, frame);
        }
        if redirect.is_none() || entry.redirects >= MAX_REDIRECTS {
            return self.answer(id, frame);
        }
        entry.redirects += 1;
        let redirect = redirect.expect("checked");
        if let Redirect::Moved(moved_slot, target) = &redirect {
            // A MOVED to a node that was no master is a failover, counted
            // here: before the call is judged again below.
            self.cluster.moved(*moved_slot, target.clone());
        }
        // Sent again, a fence call is judged with the failover bound as it
        // is now (the redirect may be the first sign of a failover).
        if let Some(again) = rebound_request(&self.cluster.failovers, &entry.request) {
            entry.request = again;
        }
        let (request, slot, redirects) = (entry.request.clone(), entry.slot, entry.redirects);
        let stats = &self.cluster.stats;
        match redirect {
            Redirect::Moved(_, target) => {
                self.refresh_in_background();
                self.queue(target, Waiting::Reply(id), &request).await;
            }
            Redirect::Ask(target) => {
                stats.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.queue(target.clone(), Waiting::Discard, &command(&[b"ASKING"]))
                    .await;
                self.queue(target, Waiting::Reply(id), &request).await;
            }
            Redirect::TryAgain if redirects <= TRYAGAIN_RETRIES => {
                stats.tryagain.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let events = self.events_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(TRYAGAIN_PAUSE * redirects).await;
                    let _ = events.send(Event::Retry(id)).await;
                });
            }
            Redirect::NoScript => match entry_group(&mut self.entries, id) {
                // A split fence call's group: sent again with the source.
                Some(group) => {
                    let request = group.encode(true);
                    let request = rebound_request(&self.cluster.failovers, &request).unwrap_or(request);
                    if let Some(entry) = self.entries.get_mut(&id) {
                        entry.request = request.clone();
                    }
                    let target = match slot {
                        Some(slot) => self.master_of(slot).await,
                        None => self.first_master().await,
                    };
                    self.queue(target, Waiting::Reply(id), &request).await;
                }
                None => self.answer(id, frame),
            },
            Redirect::TryAgain => self.answer(id, frame),
        }
    }

    fn refresh_in_background(&self) {
        let (cluster, upstream, timeout) = (self.cluster.clone(), self.upstream.clone(), self.timeout);
        let seen = cluster.current();
        tokio::spawn(async move {
            if let Err(error) = cluster.refresh(&upstream, timeout, seen.as_ref()).await {
                debug!(%error, "cluster slot map refresh after a MOVED failed");
            }
        });
    }

    /// A command of connection state: sent to every master this connection
    /// uses (the first one's reply is the client's), and to those it opens
    /// later.
    async fn state_command(&mut self, raw: Bytes, name: &[u8]) {
        if name == b"RESET" {
            self.state.clear();
            self.txn = None;
        } else {
            self.state.push(raw.clone());
        }
        let first = self.first_master().await;
        let others: Vec<Addr> = self.nodes.keys().filter(|a| **a != first).cloned().collect();
        self.send_new(first, raw.clone(), false).await;
        for other in others {
            self.queue(other, Waiting::Discard, &raw).await;
        }
    }

    /// Pub/sub or MONITOR from `raw` on (see [`Router::relay`]).
    fn start_relay(&mut self, node: Addr, raw: Bytes) {
        self.relay = Some((node, raw));
    }

    async fn multi(&mut self, raw: Bytes) {
        let txn = self.txn.get_or_insert_with(Txn::default);
        if txn.multi {
            return self.local(error("ERR MULTI calls can not be nested"));
        }
        txn.multi = true;
        match txn.node.clone() {
            // WATCH chose the master: MULTI goes there now.
            Some(node) => self.send_new(node, raw, true).await,
            None => {
                txn.multi_pending = true;
                self.local(Bytes::from_static(b"+OK\r\n"));
            }
        }
    }

    async fn end_multi(&mut self, raw: Bytes, name: &[u8]) {
        let Some(txn) = self.txn.take().filter(|t| t.multi) else {
            // Redis' own error for EXEC/DISCARD without MULTI.
            return self.single(raw, None, false).await;
        };
        match (txn.node, txn.multi_pending) {
            // MULTI never went out: nothing was queued.
            (_, true) if name == b"EXEC" => self.local(Bytes::from_static(b"*0\r\n")),
            (_, true) => self.local(Bytes::from_static(b"+OK\r\n")),
            (Some(node), false) => self.send_new(node, raw, true).await,
            (None, false) => self.single(raw, None, true).await,
        }
    }

    async fn watch(&mut self, raw: Bytes, args: &[Bytes]) {
        let keys = &args[1..];
        let Some(first) = keys.first().map(|k| slot(k)) else {
            return self.single(raw, None, false).await;
        };
        let node = self.master_of(first).await;
        let mut all_there = true;
        for key in keys {
            all_there &= self.master_of(slot(key)).await == node;
        }
        let txn = self.txn.get_or_insert_with(Txn::default);
        if !all_there || txn.node.as_ref().is_some_and(|n| *n != node) {
            return self.local(error(CROSSSLOT));
        }
        txn.node = Some(node.clone());
        self.send_new(node, raw, false).await;
    }

    /// A command between MULTI and EXEC: to the transaction's master,
    /// which the first one chooses.
    async fn in_transaction(&mut self, raw: Bytes, args: &[Bytes]) {
        let keys = self.table.keys(args);
        let node = match self.txn.as_ref().and_then(|t| t.node.clone()) {
            Some(node) => node,
            None => match keys.first() {
                Some(&i) => self.master_of(slot(&args[i])).await,
                None => self.first_master().await,
            },
        };
        let txn = self.txn.as_mut().expect("in MULTI");
        txn.node = Some(node.clone());
        if std::mem::take(&mut txn.multi_pending) {
            self.queue(node.clone(), Waiting::Discard, &command(&[b"MULTI"]))
                .await;
        }
        self.send_new(node, raw, true).await;
    }

    /// `MGET`, `MSET`, `DEL`, `UNLINK`, `EXISTS`, `TOUCH`: one command per
    /// slot, replies merged in order.
    async fn split(&mut self, raw: Bytes, args: &[Bytes], name: &[u8]) {
        let step = if name == b"MSET" { 2 } else { 1 };
        let keys: Vec<usize> = (1..args.len()).step_by(step).collect();
        let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
        for &i in &keys {
            let s = slot(&args[i]);
            match groups.iter_mut().find(|(g, _)| *g == s) {
                Some((_, members)) => members.push(i),
                None => groups.push((s, vec![i])),
            }
        }
        if groups.len() <= 1 || (step == 2 && args.len().is_multiple_of(2)) {
            return self.single(raw, groups.first().map(|g| g.0), false).await;
        }
        let merge = match name {
            b"MGET" => Merge::Positions(
                groups
                    .iter()
                    .map(|(_, m)| m.iter().map(|i| i - 1).collect())
                    .collect(),
                keys.len(),
            ),
            b"MSET" => Merge::First,
            _ => Merge::Sum,
        };
        let parts: Vec<(Option<u16>, Bytes)> = groups
            .iter()
            .map(|(s, members)| {
                let mut words: Vec<Bytes> = vec![args[0].clone()];
                for &i in members {
                    words.extend(args[i..i + step].iter().cloned());
                }
                (Some(*s), command_words(&words))
            })
            .collect();
        self.gather(raw, merge, parts, None).await;
    }

    /// A command every master runs.
    async fn everywhere(&mut self, raw: Bytes, merge: Merge) {
        let map = self.map().await;
        let parts = map.nodes.iter().map(|_| (None, raw.clone())).collect::<Vec<_>>();
        let nodes = map.nodes.clone();
        self.gather_on(raw, merge, parts, nodes, None).await;
    }

    /// A parent entry in order, and its parts sent by slot (`groups`: each
    /// part's fence script call, for a `NOSCRIPT`).
    async fn gather(
        &mut self,
        raw: Bytes,
        merge: Merge,
        parts: Vec<(Option<u16>, Bytes)>,
        groups: Option<Vec<ScriptCall>>,
    ) {
        let mut targets = Vec::with_capacity(parts.len());
        for (s, _) in &parts {
            targets.push(match s {
                Some(s) => self.master_of(*s).await,
                None => self.first_master().await,
            });
        }
        self.gather_on(raw, merge, parts, targets, groups).await;
    }

    /// A parent entry in order, and each part sent to its master. A part
    /// without a slot (a command for every master) follows no redirect.
    async fn gather_on(
        &mut self,
        raw: Bytes,
        merge: Merge,
        parts: Vec<(Option<u16>, Bytes)>,
        targets: Vec<Addr>,
        groups: Option<Vec<ScriptCall>>,
    ) {
        let parent = self.new_id();
        let mut entry = Entry::new(raw);
        entry.gather = Some(Gather {
            merge,
            parts: vec![None; parts.len()],
            left: parts.len(),
        });
        self.entries.insert(parent, entry);
        self.order.push_back(parent);
        let mut groups = groups.map(|g| g.into_iter());
        for (index, ((s, bytes), target)) in parts.into_iter().zip(targets).enumerate() {
            let id = self.new_id();
            let mut part = Entry::new(bytes.clone());
            part.part_of = Some((parent, index));
            part.slot = s;
            part.fence_group = groups.as_mut().and_then(Iterator::next);
            if s.is_none() {
                part.redirects = MAX_REDIRECTS;
            }
            self.entries.insert(id, part);
            self.queue(target, Waiting::Reply(id), &bytes).await;
        }
    }

    /// `SCAN <cursor> …`: the master in the cursor's low 8 bits, its own
    /// cursor in the rest.
    async fn scan(&mut self, args: &[Bytes]) {
        let map = self.map().await;
        let cursor = args
            .get(1)
            .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok());
        let Some(cursor) = cursor else {
            return self.local(error("ERR invalid cursor"));
        };
        let (index, inner) = ((cursor & 0xff) as usize, cursor >> 8);
        let Some(node) = map.nodes.get(index).cloned() else {
            return self.local(error("ERR invalid cursor"));
        };
        let mut words = args.to_vec();
        words[1] = Bytes::from(inner.to_string());
        let request = command_words(&words);
        let id = self.new_id();
        let mut entry = Entry::new(request.clone());
        entry.scan = Some((index, map.nodes.len()));
        entry.redirects = MAX_REDIRECTS;
        self.entries.insert(id, entry);
        self.order.push_back(id);
        self.queue(node, Waiting::Reply(id), &request).await;
    }

    /// The proxy's fence script call: as is when its keys share a slot,
    /// else split into one batch call per slot.
    async fn fence_call(&mut self, raw: Bytes, args: &[Bytes]) {
        let Some((mut ops, batch)) = decode_fence_call(args) else {
            return self.single(raw, None, false).await;
        };
        let raw = match rebound(&self.cluster.failovers, &mut ops) {
            true => encode_fence_call(&ops, batch, args[0].eq_ignore_ascii_case(b"EVAL")),
            false => raw,
        };
        let slots: Vec<u16> = ops
            .iter()
            .flat_map(|op| op.keys.iter().map(|k| slot(k)))
            .collect();
        match slots.first() {
            None => return self.single(raw, None, false).await,
            Some(first) if slots.iter().all(|s| s == first) => {
                return self.single(raw, Some(*first), false).await;
            }
            Some(_) => {}
        }
        let (groups, merge) = split_fence_ops(&ops, batch);
        let calls: Vec<ScriptCall> = groups.iter().map(|(_, calls)| script::batch(calls)).collect();
        let parts = groups
            .iter()
            .zip(&calls)
            .map(|((s, _), call)| (Some(*s), call.encode(false)))
            .collect();
        self.gather(raw, Merge::Fence(merge), parts, Some(calls)).await;
    }
}

fn empty_map() -> SlotMap {
    SlotMap {
        nodes: Vec::new(),
        slots: vec![u16::MAX; super::keys::SLOTS],
    }
}

/// The confirmations of `kind` (`unsubscribe` …) for `channels` on a
/// connection subscribed to nothing: a push each under RESP3.
fn unsubscribed(kind: &[u8], channels: &[Bytes], resp3: bool) -> Bytes {
    let head = match resp3 {
        true => ">3\r\n",
        false => "*3\r\n",
    };
    let kind = String::from_utf8_lossy(kind);
    let mut out = BytesMut::new();
    let mut one = |channel: Option<&Bytes>| {
        out.extend_from_slice(format!("{head}${}\r\n{kind}\r\n", kind.len()).as_bytes());
        match channel {
            Some(c) => {
                out.extend_from_slice(format!("${}\r\n", c.len()).as_bytes());
                out.extend_from_slice(c);
                out.extend_from_slice(b"\r\n");
            }
            None if resp3 => out.extend_from_slice(b"_\r\n"),
            None => out.extend_from_slice(b"$-1\r\n"),
        }
        out.extend_from_slice(b":0\r\n");
    };
    match channels.is_empty() {
        true => one(None),
        false => channels.iter().for_each(|c| one(Some(c))),
    }
    out.freeze()
}

/// `host:port` of a redirect.
fn parse_addr(text: &str) -> Option<Addr> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_string(), port.parse().ok()?))
}

/// Reads a master's replies, one frame at a time, for the router.
async fn read_frames(node: u64, mut reader: ReadHalf<Stream>, events: mpsc::Sender<Event>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut scanner = ReplyScanner::default();
    let reason = loop {
        match scanner.advance(&buf) {
            Ok(Some(frame)) => {
                let bytes = buf.split_to(frame.end).freeze();
                scanner.consume(frame.end);
                if events.send(Event::Frame { node, frame: bytes }).await.is_err() {
                    return;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => break e.to_string(),
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => break "closed by the node".to_string(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    let _ = events.send(Event::Lost { node, reason }).await;
}

/// What an error reply asks the router to do.
enum Redirect {
    Moved(u16, Addr),
    Ask(Addr),
    TryAgain,
    NoScript,
}

impl Redirect {
    fn of(frame: &[u8]) -> Option<Redirect> {
        let text = std::str::from_utf8(frame.get(1..frame.len().checked_sub(2)?)?).ok()?;
        let mut words = text.split(' ');
        match words.next()? {
            "MOVED" => {
                let slot = words.next()?.parse().ok()?;
                Some(Redirect::Moved(slot, parse_addr(words.next()?)?))
            }
            "ASK" => {
                words.next()?;
                Some(Redirect::Ask(parse_addr(words.next()?)?))
            }
            "TRYAGAIN" => Some(Redirect::TryAgain),
            "NOSCRIPT" => Some(Redirect::NoScript),
            _ => None,
        }
    }
}

/// The fence script group of entry `id`, taken (it is resent once).
fn entry_group(entries: &mut HashMap<u64, Entry>, id: u64) -> Option<ScriptCall> {
    entries.get_mut(&id)?.fence_group.take()
}

/// The merged reply of a split request.
fn merge(merge: &Merge, parts: Vec<Bytes>) -> Bytes {
    if !matches!(merge, Merge::Fence(_))
        && let Some(error) = parts.iter().find(|p| p.first() == Some(&b'-'))
    {
        return error.clone();
    }
    match merge {
        Merge::Sum => {
            let total: i64 = parts.iter().filter_map(|p| integer(p)).sum();
            Bytes::from(format!(":{total}\r\n"))
        }
        Merge::First => parts.into_iter().next().unwrap_or_default(),
        Merge::Concat => {
            let mut all = Vec::new();
            for part in &parts {
                all.extend(elements(part).unwrap_or_default());
            }
            array(&all)
        }
        Merge::Positions(positions, n) => {
            let mut slots: Vec<Bytes> = vec![Bytes::from_static(b"$-1\r\n"); *n];
            for (part, places) in parts.iter().zip(positions) {
                for (element, &place) in elements(part).unwrap_or_default().into_iter().zip(places) {
                    slots[place] = element;
                }
            }
            array(&slots)
        }
        Merge::Fence(fence) => merge_fence(fence, &parts),
    }
}

fn merge_fence(fence: &FenceMerge, parts: &[Bytes]) -> Bytes {
    // Each part is a batch call's reply: an array, or an error for all of it.
    let split: Vec<Result<Vec<Bytes>, Bytes>> = parts
        .iter()
        .map(|p| elements(p).ok_or_else(|| p.clone()))
        .collect();
    let piece = |(part, index): (usize, usize)| -> Bytes {
        match &split[part] {
            Ok(elements) => elements
                .get(index)
                .cloned()
                .unwrap_or_else(|| error("ERR cachefence: a short batch reply")),
            Err(whole) => whole.clone(),
        }
    };
    let ops: Vec<Bytes> = fence
        .ops
        .iter()
        .map(|(how, pieces)| match how {
            OpMerge::CrossSlot => error(CROSSSLOT),
            OpMerge::One => piece(pieces[0]),
            OpMerge::First => {
                let all: Vec<Bytes> = pieces.iter().map(|p| piece(*p)).collect();
                all.iter()
                    .find(|p| p.first() == Some(&b'-'))
                    .unwrap_or(&all[0])
                    .clone()
            }
            OpMerge::Sum => {
                let all: Vec<Bytes> = pieces.iter().map(|p| piece(*p)).collect();
                match all.iter().find(|p| p.first() == Some(&b'-')) {
                    Some(error) => error.clone(),
                    None => Bytes::from(format!(
                        ":{}\r\n",
                        all.iter().filter_map(|p| integer(p)).sum::<i64>()
                    )),
                }
            }
        })
        .collect();
    match fence.batch {
        true => array(&ops),
        false => ops.into_iter().next().unwrap_or_default(),
    }
}

fn integer(frame: &[u8]) -> Option<i64> {
    let body = frame.strip_prefix(b":")?.strip_suffix(b"\r\n")?;
    std::str::from_utf8(body).ok()?.parse().ok()
}

/// The elements of an array frame, each whole.
fn elements(frame: &Bytes) -> Option<Vec<Bytes>> {
    let rest = frame.strip_prefix(b"*")?;
    let line = memchr::memmem::find(rest, b"\r\n")?;
    let n: usize = std::str::from_utf8(&rest[..line]).ok()?.parse().ok()?;
    let mut at = 1 + line + 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let found = ReplyScanner::default().advance(&frame[at..]).ok()??;
        out.push(frame.slice(at..at + found.end));
        at += found.end;
    }
    (at == frame.len()).then_some(out)
}

fn array(elements: &[Bytes]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + elements.iter().map(Bytes::len).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", elements.len()).as_bytes());
    for element in elements {
        out.extend_from_slice(element);
    }
    out.freeze()
}

/// A `SCAN` reply of master `index` (of `count`) with the cursor the
/// client gets: the master's next cursor with the index in its low 8 bits,
/// or the next master's start, or 0 after the last.
fn scan_reply(reply: &Bytes, index: usize, count: usize) -> Option<Bytes> {
    let parts = elements(reply)?;
    let [cursor, keys] = &parts[..] else { return None };
    let digits = cursor.strip_prefix(b"$")?;
    let line = memchr::memmem::find(digits, b"\r\n")?;
    let text = &digits[line + 2..digits.len() - 2];
    let inner: u64 = std::str::from_utf8(text).ok()?.parse().ok()?;
    let next = match inner {
        0 if index + 1 < count => (index + 1) as u64,
        0 => 0,
        n if n < 1 << 56 => (n << 8) | index as u64,
        _ => {
            return Some(error(
                "ERR cachefence: a cluster node's SCAN cursor is too large to carry",
            ));
        }
    };
    let next = next.to_string();
    let cursor = Bytes::from(format!("${}\r\n{next}\r\n", next.len()));
    Some(array(&[cursor, keys.clone()]))
}

/// Whether `args` call the proxy's own fence script.
fn is_fence_script(args: &[Bytes]) -> bool {
    match (args[0].to_ascii_uppercase().as_slice(), args.get(1)) {
        (b"EVALSHA", Some(sha)) => &sha[..] == script::sha().as_bytes(),
        (b"EVAL", Some(source)) => &source[..] == script::source().as_bytes(),
        _ => false,
    }
}

/// The operations of a fence script call (`EVALSHA sha numkeys keys… args…`),
/// and whether it was a batch.
fn decode_fence_call(args: &[Bytes]) -> Option<(Vec<ScriptCall>, bool)> {
    // Counts come off the wire (a client may call the script itself): each
    // is checked against what is there before it is used.
    let numkeys: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
    let keys = args.get(3..3usize.checked_add(numkeys)?)?;
    let argv = args.get(3 + numkeys..)?;
    if argv.first().map(|a| &a[..]) != Some(b"batch") {
        return Some((vec![ScriptCall::new(keys.to_vec(), argv.to_vec())], false));
    }
    let n: usize = std::str::from_utf8(argv.get(1)?).ok()?.parse().ok()?;
    if n > argv.len().saturating_sub(2) {
        return None;
    }
    let mut ops = Vec::new();
    let (mut key_at, mut arg_at) = (0usize, 2 + n);
    let mut previous: Vec<Bytes> = Vec::new();
    for i in 0..n {
        let shape: u64 = std::str::from_utf8(argv.get(2 + i)?).ok()?.parse().ok()?;
        let (nkeys, nargs, shared) = (
            (shape / 100_000_000) as usize,
            ((shape / 10_000) % 10_000) as usize,
            (shape % 10_000) as usize,
        );
        let own = nargs.checked_sub(shared)?;
        let op_keys = keys.get(key_at..key_at.checked_add(nkeys)?)?.to_vec();
        key_at += nkeys;
        let mut op_args: Vec<Bytes> = previous.get(..shared)?.to_vec();
        op_args.extend(argv.get(arg_at..arg_at.checked_add(own)?)?.iter().cloned());
        arg_at += own;
        previous = op_args.clone();
        ops.push(ScriptCall::new(op_keys, op_args));
    }
    Some((ops, true))
}

/// Judges the fills among `ops` with the failover bound in force now
/// ([`crate::fence::failover`]): a call the proxy made before it learnt of
/// a failover, sent after, must not carry the lease of before. A `fill`'s
/// lease (ARGV 9) is lowered to the bound; a `set`'s (ARGV 4) becomes
/// `<lease>,<bound>`. Returns whether anything changed.
fn rebound(failovers: &Failovers, ops: &mut [ScriptCall]) -> bool {
    let micros = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<u64>().ok();
    let mut changed = false;
    for op in ops {
        match op.args.first().map(|a| &a[..]) {
            Some(b"fill") => {
                let Some(lease) = op.args.get(8).and_then(|a| micros(a)) else {
                    continue;
                };
                if let Some(bound) = failovers.ticket_bound(Duration::from_micros(lease)) {
                    op.edit(|_, args| args[8] = Bytes::from(bound.as_micros().to_string()));
                    changed = true;
                }
            }
            Some(b"set") => {
                let Some(arg) = op.args.get(3) else { continue };
                let (lease, old) = match arg.iter().position(|&b| b == b',') {
                    Some(comma) => (micros(&arg[..comma]), micros(&arg[comma + 1..])),
                    None => (micros(arg), None),
                };
                let Some(lease) = lease else { continue };
                let limit = old.unwrap_or(lease);
                if let Some(bound) = failovers.ticket_bound(Duration::from_micros(limit)) {
                    op.edit(|_, args| args[3] = Bytes::from(format!("{lease},{}", bound.as_micros())));
                    changed = true;
                }
            }
            _ => {}
        }
    }
    changed
}

/// `ops` as one fence script call again.
fn encode_fence_call(ops: &[ScriptCall], batch: bool, with_source: bool) -> Bytes {
    match batch {
        true => script::batch(ops).encode(with_source),
        false => ops[0].encode(with_source),
    }
}

/// [`rebound`] on a request as sent (`None`: not a fence call, or nothing
/// to change).
fn rebound_request(failovers: &Failovers, request: &Bytes) -> Option<Bytes> {
    let frame = RequestFramer::new(MAX_REQUEST).next(request).ok()??;
    let args = frame.all_args(request);
    if !is_fence_script(&args) {
        return None;
    }
    let (mut ops, batch) = decode_fence_call(&args)?;
    rebound(failovers, &mut ops)
        .then(|| encode_fence_call(&ops, batch, args[0].eq_ignore_ascii_case(b"EVAL")))
}

/// Fence operations grouped by slot (order kept within a slot), and how to
/// rebuild the reply. A `write`/`inval` of `DEL`/`UNLINK`/`MSET` whose keys
/// span slots is split into one operation per slot.
fn split_fence_ops(ops: &[ScriptCall], batch: bool) -> (Vec<(u16, Vec<ScriptCall>)>, FenceMerge) {
    let mut groups: Vec<(u16, Vec<ScriptCall>)> = Vec::new();
    let mut place = |s: u16, call: ScriptCall| -> (usize, usize) {
        let group = match groups.iter().position(|(g, _)| *g == s) {
            Some(group) => group,
            None => {
                groups.push((s, Vec::new()));
                groups.len() - 1
            }
        };
        groups[group].1.push(call);
        (group, groups[group].1.len() - 1)
    };
    let mut merge = FenceMerge {
        batch,
        ops: Vec::with_capacity(ops.len()),
    };
    for op in ops {
        let slots: Vec<u16> = op.keys.iter().map(|k| slot(k)).collect();
        match slots.first() {
            None => {
                let at = place(0, op.clone());
                merge.ops.push((OpMerge::One, vec![at]));
            }
            Some(first) if slots.iter().all(|s| s == first) => {
                let at = place(*first, op.clone());
                merge.ops.push((OpMerge::One, vec![at]));
            }
            Some(_) => match split_write_op(op) {
                Some((how, pieces)) => {
                    let at = pieces.into_iter().map(|(s, call)| place(s, call)).collect();
                    merge.ops.push((how, at));
                }
                None => merge.ops.push((OpMerge::CrossSlot, Vec::new())),
            },
        }
    }
    (groups, merge)
}

/// A `write`/`inval` operation (fence.lua: KEYS the command's keys then the
/// fences of the fenced ones; ARGV op, fence_ttl_ms, fenced_count, create,
/// own, the command) of `DEL`, `UNLINK` or `MSET`, one per slot.
fn split_write_op(op: &ScriptCall) -> Option<(OpMerge, Vec<(u16, ScriptCall)>)> {
    const COMMAND_AT: usize = 5;
    let name = op.args.get(COMMAND_AT)?.to_ascii_uppercase();
    let (how, step) = match (&op.args.first()?[..], &name[..]) {
        (b"write" | b"inval", b"DEL" | b"UNLINK") => (OpMerge::Sum, 1),
        (b"write" | b"inval", b"MSET") => (OpMerge::First, 2),
        _ => return None,
    };
    let fenced: usize = std::str::from_utf8(op.args.get(2)?).ok()?.parse().ok()?;
    let words = &op.args[COMMAND_AT + 1..];
    let command_keys = op.keys.len().checked_sub(fenced)?;
    let fences = &op.keys[command_keys..];
    let mut pieces: Vec<(u16, Vec<Bytes>, Vec<Bytes>)> = Vec::new();
    for chunk in words.chunks(step) {
        let key = &chunk[0];
        let s = slot(key);
        let at = match pieces.iter().position(|(p, _, _)| *p == s) {
            Some(at) => at,
            None => {
                pieces.push((s, Vec::new(), Vec::new()));
                pieces.len() - 1
            }
        };
        pieces[at].2.extend(chunk.iter().cloned());
        pieces[at].1.push(key.clone());
    }
    // A fence not in its key's slot (`cachefence::…`, a key with `}` and no
    // tag) moves in an operation of its own, without a command, after the
    // command's pieces (so `First` takes a command's reply).
    let placed: Vec<u16> = pieces.iter().map(|(s, _, _)| *s).collect();
    let mut strays: Vec<(u16, Vec<Bytes>)> = Vec::new();
    for fence in fences.iter().filter(|f| !placed.contains(&slot(f))) {
        let s = slot(fence);
        match strays.iter_mut().find(|(g, _)| *g == s) {
            Some((_, group)) => group.push(fence.clone()),
            None => strays.push((s, vec![fence.clone()])),
        }
    }
    let stray_calls = strays.into_iter().map(|(s, group)| {
        let args = vec![
            op.args[0].clone(),
            op.args[1].clone(),
            Bytes::from(group.len().to_string()),
            op.args[3].clone(),
            op.args[4].clone(),
        ];
        (s, ScriptCall::new(group, args))
    });
    let calls = pieces
        .into_iter()
        .map(|(s, keys, words)| {
            let own_fences: Vec<Bytes> = fences.iter().filter(|f| slot(f) == s).cloned().collect();
            let mut call_keys = keys;
            let count = own_fences.len();
            call_keys.extend(own_fences);
            let mut args = vec![
                op.args[0].clone(),
                op.args[1].clone(),
                Bytes::from(count.to_string()),
                op.args[3].clone(),
                op.args[4].clone(),
                op.args[COMMAND_AT].clone(),
            ];
            args.extend(words);
            (s, ScriptCall::new(call_keys, args))
        })
        .chain(stray_calls)
        .collect();
    Some((how, calls))
}

#[cfg(test)]
mod tests;
