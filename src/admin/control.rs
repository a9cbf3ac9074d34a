//! The `CACHE.*` commands that change something: `CACHE.AUTH`,
//! `CACHE.RELOAD`, `CACHE.INVALIDATE`.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::app::App;
use crate::fence::Client;
use crate::fence::Policy;
use crate::fence::history::Source;
use crate::fence::plan::{Plan, rewrite};
use crate::fence::script::{self, ScriptCall};
use crate::fence::translate::ScriptReply;
use crate::resp::value::Reply;

/// Whether the connection may run the commands `admin_password` guards.
pub fn admitted(client: &Client<'_>) -> bool {
    client.fences.admin_password.load().is_none() || client.admin.load(Ordering::Relaxed)
}

/// `CACHE.AUTH password`.
pub fn auth(client: &Client<'_>, given: &[u8]) -> Reply {
    match &*client.fences.admin_password.load() {
        None => Reply::Error("ERR cachefence: CACHE.AUTH called without an admin password configured".into()),
        Some(password) if same_secret(password.expose().as_bytes(), given) => {
            client.admin.store(true, Ordering::Relaxed);
            Reply::Status("OK")
        }
        Some(_) => {
            tracing::warn!("CACHE.AUTH with a wrong admin password");
            client.admin.store(false, Ordering::Relaxed);
            Reply::Error("WRONGPASS cachefence: invalid admin password".into())
        }
    }
}

/// `CACHE.RELOAD`: what was applied, and what needs a restart.
pub fn reload(app: &App) -> Reply {
    match app.reload("CACHE.RELOAD") {
        Ok(done) => {
            let names = |keys: Vec<&'static str>| {
                Reply::Array(
                    keys.into_iter()
                        .map(|k| Reply::Bulk(Bytes::from_static(k.as_bytes())))
                        .collect(),
                )
            };
            Reply::Map(vec![
                (Reply::Bulk("file".into()), Reply::Bulk(done.file.into())),
                (Reply::Bulk("applied".into()), names(done.applied)),
                (
                    Reply::Bulk("restart_required".into()),
                    names(done.restart_required),
                ),
            ])
        }
        Err(error) => Reply::Error(format!(
            "ERR cachefence: reload rejected, the running configuration is kept: {}",
            one_line(&format!("{error:#}"))
        )),
    }
}

/// `CACHE.INVALIDATE key…`: the same script as a client's `DEL`. Explicit
/// invalidations fence the keys even outside every pattern.
pub fn invalidate(client: &Client<'_>, keys: Vec<Bytes>) -> Plan {
    let fences = client.fences;
    let ttl = fences
        .scope()
        .policies()
        .map(Policy::fence_ttl)
        .max()
        .unwrap_or_default();
    let (all, args) = script::invalidation(&keys, ttl);
    fences.stats.invalidations.inc();
    fences.stats.keys_invalidated_admin.add(keys.len() as u64);
    rewrite(
        ScriptCall::new(all, args),
        ScriptReply::Command {
            keys,
            invalidation: Some(Source::Admin),
        },
    )
}

/// An error text fit for a RESP error line (TOML errors span lines).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Compares a secret in time independent of where the first difference is.
fn same_secret(expected: &[u8], given: &[u8]) -> bool {
    expected.len() == given.len() && expected.iter().zip(given).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"hunter2", b"hunter2"));
        assert!(!same_secret(b"hunter2", b"hunter3"));
        assert!(!same_secret(b"hunter2", b"hunter22"));
        assert!(!same_secret(b"", b"x"));
    }

    #[test]
    fn multi_line_errors_become_one_line() {
        assert_eq!(
            one_line("TOML parse error at line 3\n  |\n3 | x = \n"),
            "TOML parse error at line 3 | 3 | x ="
        );
    }
}
