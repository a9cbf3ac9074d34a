//! Invalidations the proxy sends on nobody's behalf — second deletes,
//! change-log rows, retried client deletes — on an upstream connection of
//! its own, through the same script as a client's `DEL`: a fenced key is
//! deleted and its fence moved atomically, so fills of reads made before
//! are refused.

use std::time::Duration;

use bytes::Bytes;

use super::Scope;
use super::script;
use crate::config::Upstream;
use crate::net::Stream;
use crate::redis;
use crate::resp::encode::command;

/// Keys per script call: Lua's `unpack` of the command's arguments must
/// stay well below its stack limit (8000).
const KEYS_PER_CALL: usize = 1000;

/// The connection: which database it has selected, and whether the script
/// was sent with its source on it.
struct Connection {
    stream: Stream,
    db: u32,
    loaded: bool,
}

pub struct Invalidator {
    upstream: Upstream,
    timeout: Duration,
    connection: Option<Connection>,
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator")
            .field("upstream", &self.upstream)
            .field("connected", &self.connection.is_some())
            .finish()
    }
}

impl Invalidator {
    /// Connects lazily; every call is bounded by `timeout`.
    pub fn new(upstream: Upstream, timeout: Duration) -> Invalidator {
        Invalidator {
            upstream,
            timeout,
            connection: None,
        }
    }

    /// Invalidates `keys` in database `db`: the fenced ones (per `scope`)
    /// with their fences moved, the others with a plain `DEL`. `Ok` once
    /// Redis acknowledged every key; on an error the connection is dropped
    /// (the next call opens a new one) and some keys may have been done.
    pub async fn invalidate(&mut self, db: u32, keys: &[Bytes], scope: Option<&Scope>) -> Result<(), String> {
        let mut fenced: Vec<(Duration, Vec<Bytes>)> = Vec::new();
        let mut plain = Vec::new();
        for key in keys {
            match scope.and_then(|s| s.policy(key)) {
                Some((_, policy)) => {
                    let ttl = policy.fence_ttl();
                    match fenced.iter_mut().find(|(t, _)| *t == ttl) {
                        Some((_, group)) => group.push(key.clone()),
                        None => fenced.push((ttl, vec![key.clone()])),
                    }
                }
                None => plain.push(key.clone()),
            }
        }
        let mut requests = Vec::new();
        for (ttl, group) in &fenced {
            for chunk in group.chunks(KEYS_PER_CALL) {
                requests.push(Request::Script(script::invalidation(chunk, *ttl)));
            }
        }
        for chunk in plain.chunks(KEYS_PER_CALL) {
            let mut words: Vec<&[u8]> = vec![b"DEL"];
            words.extend(chunk.iter().map(|k| &k[..]));
            requests.push(Request::Plain(command(&words)));
        }
        let result = tokio::time::timeout(self.timeout, self.send(db, &requests)).await;
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error,
            Err(_) => format!("no reply within {:?}", self.timeout),
        };
        self.connection = None;
        Err(error)
    }

    async fn send(&mut self, db: u32, requests: &[Request]) -> Result<(), String> {
        if self.connection.is_none() {
            let stream = redis::connect(&self.upstream, self.timeout)
                .await
                .map_err(|e| e.to_string())?;
            self.connection = Some(Connection {
                stream,
                db: self.upstream.db,
                loaded: false,
            });
        }
        let conn = self.connection.as_mut().expect("connected");
        if conn.db != db {
            let index = db.to_string();
            let select = command(&[b"SELECT", index.as_bytes()]);
            redis::call(&mut conn.stream, &select)
                .await
                .map_err(|e| format!("SELECT {db}: {e}"))?;
            conn.db = db;
        }
        for request in requests {
            let bytes = match request {
                Request::Plain(bytes) => bytes.clone(),
                Request::Script((keys, args)) => {
                    let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
                    let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
                    match conn.loaded {
                        true => script::call(&keys, &args),
                        false => script::call_with_source(&keys, &args),
                    }
                }
            };
            redis::call(&mut conn.stream, &bytes)
                .await
                .map_err(|e| e.to_string())?;
            conn.loaded |= matches!(request, Request::Script(_));
        }
        Ok(())
    }
}

enum Request {
    /// The fence script's invalidation: keys and arguments.
    Script((Vec<Bytes>, Vec<Bytes>)),
    /// `DEL` of keys outside the fenced scope.
    Plain(Bytes),
}
