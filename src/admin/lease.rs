//! The explicit lease API: `CACHE.GET key` answers `[value, nil]` on a hit
//! and `[nil, token]` on a miss; `CACHE.FILL key token value [EX s|PX ms]`
//! stores the value only if nothing invalidated the key since that miss.
//! The token carries the fence version and the miss time, so the fill may
//! come from any connection, process or proxy.

use bytes::Bytes;

use crate::fence::Client;
use crate::fence::Refusal;
use crate::fence::history::What;
use crate::fence::plan::{Claim, Plan, rewrite};
use crate::fence::translate::{ScriptReply, parse_lease_token};
use crate::resp::value::Reply;

/// `CACHE.GET key` in database `db`.
pub fn get(client: &Client<'_>, key: Bytes, db: u32) -> Plan {
    if client.undelivered(db, &key) {
        // No value and no lease: a delete of the key is still pending.
        return Plan::Local(Reply::Array(vec![Reply::Nil, Reply::Nil]));
    }
    let (policy, _) = client.fences.scope().lease_policy(&key);
    let call = client.miss_call(&key, policy, Claim::Force, 0);
    rewrite(call, ScriptReply::LeaseGet { key })
}

/// `CACHE.FILL key token value [EX s|PX ms]` in database `db`.
pub fn fill(
    client: &Client<'_>,
    key: Bytes,
    token: &[u8],
    value: Bytes,
    expiry: Vec<Bytes>,
    db: u32,
) -> Plan {
    let scope = client.fences.scope();
    let (policy, rules) = scope.lease_policy(&key);
    let Some((version, miss_us)) = parse_lease_token(token) else {
        return Plan::Local(Reply::Error("ERR cachefence: invalid lease token".into()));
    };
    if !valid_expiry(&expiry) {
        return Plan::Local(Reply::Error(
            "ERR syntax error (CACHE.FILL key token value [EX s|PX ms])".into(),
        ));
    }
    if client.undelivered(db, &key) {
        client.fences.stats.refused(Refusal::PendingDelete).inc();
        client.record(&key, What::FillRefused(Refusal::PendingDelete));
        return Plan::Local(Reply::Status("STALE"));
    }
    let call = client.fill_call(&key, rules, version, miss_us, false, &value, expiry);
    rewrite(
        call,
        ScriptReply::Fill {
            policy,
            key,
            lease_api: true,
        },
    )
}

/// No expiry, or `EX`/`PX` with a positive whole number.
fn valid_expiry(expiry: &[Bytes]) -> bool {
    match expiry {
        [] => true,
        [unit, amount] => {
            matches!(&unit.to_ascii_uppercase()[..], b"EX" | b"PX")
                && std::str::from_utf8(amount).is_ok_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<Bytes> {
        line.split_whitespace()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    #[test]
    fn expiry_is_ex_or_px_with_a_positive_count() {
        assert!(valid_expiry(&[]));
        assert!(valid_expiry(&words("EX 10")));
        assert!(valid_expiry(&words("px 1")));
        assert!(!valid_expiry(&words("EX 0")));
        assert!(!valid_expiry(&words("EX -1")));
        assert!(!valid_expiry(&words("KEEPTTL 1")));
        assert!(!valid_expiry(&words("EX ten")));
    }
}
