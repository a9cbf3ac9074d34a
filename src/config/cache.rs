//! Which keys are fenced and how: the `[[cache]]` sections of the config.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{LagWindow, Span};

/// What a C2 fill inside the lag window does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LagPolicy {
    /// Store with a TTL that ends `lag_window` after the last invalidation
    /// when it is the only one inside the window, else do not store: no
    /// read is staler than `lag_window`.
    #[default]
    ShortTtl,
    /// Store with a TTL that ends `lag_window` after the last invalidation,
    /// whatever came before it: hot keys stay cacheable, and a read may be
    /// stale up to twice `lag_window` after a write (the rule before #16).
    ShortTtlLast,
    /// Do not store.
    Refuse,
}

impl LagPolicy {
    /// The name the config file gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            LagPolicy::ShortTtl => "short_ttl",
            LagPolicy::ShortTtlLast => "short_ttl_last",
            LagPolicy::Refuse => "refuse",
        }
    }

    /// How the fence script is told (`lag_mode`).
    pub fn script_mode(self) -> &'static [u8] {
        match self {
            LagPolicy::ShortTtl => b"0",
            LagPolicy::Refuse => b"1",
            LagPolicy::ShortTtlLast => b"2",
        }
    }
}

/// What a SET-family command without a ticket (a write) does.
///
/// The default is `Invalidate`: under a pool, a writer's SET and another
/// request's late fill look alike, and only turning ticketless SETs into
/// invalidations keeps C1 for every client model (docs/consistency.md,
/// "Client models and ticket_scope"). `Write` keeps Redis' SET-then-GET for
/// write-through caches, at the price of that window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnWrite {
    /// Store the value and bump the fence atomically.
    Write,
    /// Delete the key and bump the fence (the value is not stored).
    #[default]
    Invalidate,
    /// Answer an error.
    Reject,
}

/// Which outstanding misses a SET of a fenced key is judged against: those
/// that could have produced it. Clients rarely send a request's miss and
/// its fill on one connection (pools borrow any connection; multiplexing
/// clients share one among threads), so the default is every connection
/// from the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketScope {
    /// Only the connection's own misses: exact, and the best hit ratio, for
    /// clients that keep one connection per thread and never share it.
    Connection,
    /// Every connection from the same client IP address (one application
    /// host's pool), through any cachefence process.
    #[default]
    Client,
    /// Every connection of every client.
    All,
}

/// How a refused fill is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStaleFill {
    /// `+OK`, as if stored (the application cannot tell, the cache stays right).
    #[default]
    Ok,
    /// `-STALE ...`.
    Error,
}

/// `lag_window_max` when `lag_window = "auto"` does not say.
pub const DEFAULT_LAG_WINDOW_MAX: Duration = Duration::from_secs(5);

/// One `[[cache]]` section as written in the file.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    pub pattern: Option<String>,
    pub lease_ttl: Option<Span>,
    pub lag_window: Option<LagWindow>,
    /// With `lag_window = "auto"`: the longest window the measured lag may
    /// set; above it (or with no measurement) fills inside it are refused.
    pub lag_window_max: Option<Span>,
    pub lag_policy: Option<LagPolicy>,
    pub hold: Option<Span>,
    pub on_write: Option<OnWrite>,
    pub on_stale_fill: Option<OnStaleFill>,
    pub double_delete: Option<Span>,
    pub ticket_scope: Option<TicketScope>,
}

impl CacheSection {
    /// Every setting at its default. `pattern` has none: a section says
    /// which keys are a cache, nothing fences them by default.
    pub fn defaults() -> CacheSection {
        CacheSection {
            pattern: None,
            lease_ttl: Some(Span(Duration::from_secs(10))),
            lag_window: Some(LagWindow::Fixed(Span(Duration::ZERO))),
            // Set only with `lag_window = "auto"`; [`DEFAULT_LAG_WINDOW_MAX`].
            lag_window_max: None,
            lag_policy: Some(LagPolicy::ShortTtl),
            hold: Some(Span(Duration::from_millis(200))),
            on_write: Some(OnWrite::Invalidate),
            on_stale_fill: Some(OnStaleFill::Ok),
            double_delete: Some(Span(Duration::ZERO)),
            ticket_scope: Some(TicketScope::Client),
        }
    }
}

impl CacheSection {
    /// A section for the keys matching `pattern`, every other setting at
    /// its default (what `--cache PATTERN` declares).
    pub fn for_pattern(pattern: &str) -> CacheSection {
        CacheSection {
            pattern: Some(pattern.to_string()),
            ..CacheSection::defaults()
        }
    }

    /// Every key at the defaults: the lease API's rules when no section
    /// is declared.
    fn every_key() -> CacheSection {
        CacheSection::for_pattern("*")
    }
}

/// The rules for the keys matching one pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub pattern: String,
    pub lease_ttl: Duration,
    /// The fixed window, or with `lag_auto` the ceiling (`lag_window_max`):
    /// the longest window any fill of these keys is judged by, so what
    /// fences keep invalidation times for.
    pub lag_window: Duration,
    /// `lag_window = "auto"`: the window in force is the measured one
    /// ([`crate::fence::lag::LagGauge`]), up to `lag_window`.
    pub lag_auto: bool,
    pub lag_policy: LagPolicy,
    pub hold: Duration,
    pub on_write: OnWrite,
    pub on_stale_fill: OnStaleFill,
    pub double_delete: Option<Duration>,
    pub ticket_scope: TicketScope,
}

impl Policy {
    pub fn from_section(section: &CacheSection) -> anyhow::Result<Policy> {
        let d = CacheSection::defaults();
        let span = |v: Option<Span>, default: Option<Span>| v.or(default).expect("defaulted").0;
        let pattern = section.pattern.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "`pattern` is missing: say which keys are a cache (e.g. \"user:*\"; \"*\" for every key)"
            )
        })?;
        let policy = Policy {
            pattern,
            lease_ttl: span(section.lease_ttl, d.lease_ttl),
            lag_window: match section.lag_window.or(d.lag_window).expect("defaulted") {
                LagWindow::Fixed(span) => span.0,
                LagWindow::Auto => section.lag_window_max.map_or(DEFAULT_LAG_WINDOW_MAX, |s| s.0),
            },
            lag_auto: section.lag_window == Some(LagWindow::Auto),
            lag_policy: section.lag_policy.or(d.lag_policy).expect("defaulted"),
            hold: span(section.hold, d.hold),
            on_write: section.on_write.or(d.on_write).expect("defaulted"),
            on_stale_fill: section.on_stale_fill.or(d.on_stale_fill).expect("defaulted"),
            double_delete: Some(span(section.double_delete, d.double_delete)).filter(|d| !d.is_zero()),
            ticket_scope: section.ticket_scope.or(d.ticket_scope).expect("defaulted"),
        };
        anyhow::ensure!(!policy.pattern.is_empty(), "`pattern` must not be empty");
        anyhow::ensure!(
            policy.lag_auto || section.lag_window_max.is_none(),
            "`lag_window_max` is the ceiling of `lag_window = \"auto\"` (pattern `{}`)",
            policy.pattern
        );
        anyhow::ensure!(
            !policy.lag_auto || !policy.lag_window.is_zero(),
            "`lag_window_max` must be greater than 0 (pattern `{}`)",
            policy.pattern
        );
        anyhow::ensure!(
            policy.lease_ttl >= Duration::from_millis(100),
            "`lease_ttl` must be at least 100ms (pattern `{}`)",
            policy.pattern
        );
        anyhow::ensure!(
            policy.hold <= policy.lease_ttl,
            "`hold` must not exceed `lease_ttl` (pattern `{}`)",
            policy.pattern
        );
        Ok(policy)
    }

    /// How long a fence outlives its last change: every ticket it could
    /// admit is older than `lease_ttl` by then, and the lag rule is moot
    /// after `lag_window`.
    pub fn fence_ttl(&self) -> Duration {
        let margin = (self.lease_ttl / 10).max(Duration::from_secs(1));
        self.lease_ttl + self.lag_window + margin
    }
}

/// Distinct policies one process may have seen over all its reloads.
pub const MAX_KNOWN_POLICIES: usize = 4096;

/// The fenced key space: the first section whose pattern matches wins.
///
/// A policy is named by its index in `known`, which only grows (equal
/// policies share an index): an index taken by a request before a reload
/// still names the same rules when its reply comes after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    /// Every distinct policy so far, in the order first seen.
    known: Vec<Policy>,
    /// The sections in force, in order, as indices into `known`.
    active: Vec<usize>,
    /// The lease API's policy for keys outside every pattern: the first
    /// section's, or the defaults when there is none.
    fallback: usize,
}

impl Scope {
    pub fn new(sections: &[CacheSection]) -> anyhow::Result<Scope> {
        let mut scope = Scope {
            known: Vec::with_capacity(sections.len()),
            active: Vec::with_capacity(sections.len()),
            fallback: 0,
        };
        for (i, section) in sections.iter().enumerate() {
            let policy = Policy::from_section(section)
                .map_err(|e| anyhow::anyhow!("[[cache]] section {}: {e}", i + 1))?;
            let index = scope.intern(policy)?;
            scope.active.push(index);
        }
        scope.fallback = match scope.active.first() {
            Some(&first) => first,
            None => scope.intern(Policy::from_section(&CacheSection::every_key())?)?,
        };
        Ok(scope)
    }

    /// The scope after a reload to `next`'s sections: the indices of
    /// policies this one knows stay what they were.
    pub fn succeeded_by(&self, next: &Scope) -> anyhow::Result<Scope> {
        let mut scope = Scope {
            known: self.known.clone(),
            active: Vec::with_capacity(next.active.len()),
            fallback: 0,
        };
        for policy in next.policies() {
            let index = scope.intern(policy.clone())?;
            scope.active.push(index);
        }
        scope.fallback = scope.intern(next.known[next.fallback].clone())?;
        Ok(scope)
    }

    /// Whether both have the same sections in force.
    pub fn same_sections(&self, other: &Scope) -> bool {
        self.policies().eq(other.policies())
    }

    fn intern(&mut self, policy: Policy) -> anyhow::Result<usize> {
        if let Some(index) = self.known.iter().position(|p| *p == policy) {
            return Ok(index);
        }
        anyhow::ensure!(
            self.known.len() < MAX_KNOWN_POLICIES,
            "{MAX_KNOWN_POLICIES} distinct [[cache]] sections were loaded since start; restart to load more"
        );
        self.known.push(policy);
        Ok(self.known.len() - 1)
    }

    /// The policy of `key` with its index, or `None` when the key is not fenced.
    pub fn policy(&self, key: &[u8]) -> Option<(usize, &Policy)> {
        self.active
            .iter()
            .map(|&i| (i, &self.known[i]))
            .find(|(_, p)| glob_match(p.pattern.as_bytes(), key))
    }

    /// The policy an index names (taken from this scope or an earlier one).
    pub fn policy_at(&self, index: usize) -> &Policy {
        &self.known[index]
    }

    /// The policy of `key`, else the fallback (the lease API fences any key).
    pub fn lease_policy(&self, key: &[u8]) -> (usize, &Policy) {
        self.policy(key)
            .unwrap_or((self.fallback, &self.known[self.fallback]))
    }

    /// The sections in force, in order.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.active.iter().map(|&i| &self.known[i])
    }
}

/// Redis' glob matching (`KEYS`, `SCAN MATCH`): `*`, `?`, `[abc]`, `[^a-z]`,
/// and `\` to escape.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match pattern.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => {
            let rest = rest
                .iter()
                .position(|&b| b != b'*')
                .map_or(&[][..], |i| &rest[i..]);
            if rest.is_empty() {
                return true;
            }
            (0..=text.len()).any(|i| glob_match(rest, &text[i..]))
        }
        Some((b'?', rest)) => !text.is_empty() && glob_match(rest, &text[1..]),
        Some((b'[', rest)) => {
            let Some((&c, text_rest)) = text.split_first() else {
                return false;
            };
            let (negate, mut class) = match rest.split_first() {
                Some((b'^', r)) => (true, r),
                _ => (false, rest),
            };
            let mut matched = false;
            loop {
                match class {
                    [] => break,
                    [b']', r @ ..] => {
                        class = r;
                        break;
                    }
                    [b'\\', e, r @ ..] => {
                        matched |= *e == c;
                        class = r;
                    }
                    [lo, b'-', hi, r @ ..] if *hi != b']' => {
                        let (lo, hi) = if lo <= hi { (*lo, *hi) } else { (*hi, *lo) };
                        matched |= (lo..=hi).contains(&c);
                        class = r;
                    }
                    [x, r @ ..] => {
                        matched |= *x == c;
                        class = r;
                    }
                }
            }
            matched != negate && glob_match(class, text_rest)
        }
        Some((b'\\', [escaped, rest @ ..])) => text.first() == Some(escaped) && glob_match(rest, &text[1..]),
        Some((&p, rest)) => text.first() == Some(&p) && glob_match(rest, &text[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_policy_names_are_the_config_files() {
        for policy in [LagPolicy::ShortTtl, LagPolicy::ShortTtlLast, LagPolicy::Refuse] {
            let toml = toml::to_string(&CacheSection {
                lag_policy: Some(policy),
                ..CacheSection::default()
            })
            .unwrap();
            assert!(
                toml.contains(&format!("lag_policy = \"{}\"", policy.as_str())),
                "{toml}"
            );
        }
    }

    #[test]
    fn globs_match_like_redis() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "anything", true),
            ("user:*", "user:42", true),
            ("user:*", "users:42", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("key\\*", "key*", true),
            ("key\\*", "key1", false),
            ("*:profile:*", "user:profile:7", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *want,
                "{pattern} vs {text}"
            );
        }
    }

    #[test]
    fn first_matching_section_wins_and_others_pass_through() {
        let sections = vec![
            CacheSection {
                pattern: Some("session:*".into()),
                on_write: Some(OnWrite::Write),
                ..Default::default()
            },
            CacheSection {
                pattern: Some("user:*".into()),
                ..Default::default()
            },
        ];
        let scope = Scope::new(&sections).unwrap();
        assert_eq!(scope.policy(b"session:1").unwrap().1.on_write, OnWrite::Write);
        assert_eq!(
            scope.policy(b"user:1").unwrap().1.on_write,
            OnWrite::Invalidate,
            "the default"
        );
        assert_eq!(scope.policy(b"user:1").unwrap().0, 1);
        assert!(scope.policy(b"other").is_none());
        let bad = CacheSection {
            hold: Some(Span(Duration::from_secs(60))),
            ..CacheSection::for_pattern("*")
        };
        assert!(Scope::new(&[bad]).is_err());
        let no_pattern = CacheSection::default();
        let error = Scope::new(&[no_pattern]).unwrap_err().to_string();
        assert!(error.contains("`pattern` is missing"), "{error}");
    }

    #[test]
    fn a_reload_keeps_the_indices_of_known_policies() {
        let section = |pattern: &str, on_write| CacheSection {
            pattern: Some(pattern.into()),
            on_write: Some(on_write),
            ..Default::default()
        };
        let before = Scope::new(&[section("a:*", OnWrite::Write), section("b:*", OnWrite::Write)]).unwrap();
        let (b_index, _) = before.policy(b"b:1").unwrap();
        let file = Scope::new(&[section("b:*", OnWrite::Write), section("a:*", OnWrite::Reject)]).unwrap();
        let after = before.succeeded_by(&file).unwrap();
        assert!(!after.same_sections(&before) && after.same_sections(&file));
        // A reply to a request planned before the reload finds its rules.
        assert_eq!(after.policy_at(b_index).pattern, "b:*");
        assert_eq!(after.policy(b"b:1").unwrap().0, b_index);
        assert_eq!(after.policy(b"a:1").unwrap().1.on_write, OnWrite::Reject);
        assert_eq!(after.policy_at(0).on_write, OnWrite::Write);
        let patterns: Vec<&str> = after.policies().map(|p| p.pattern.as_str()).collect();
        assert_eq!(patterns, ["b:*", "a:*"]);
        // Reloading the same sections again adds nothing.
        let again = after.succeeded_by(&file).unwrap();
        assert_eq!(again.known.len(), 3);
        assert_eq!(again, after);
        // No sections: nothing fenced, the lease API uses the defaults.
        let none = Scope::new(&[]).unwrap();
        assert!(none.policy(b"a:1").is_none());
        assert_eq!(none.lease_policy(b"a:1").1.lease_ttl, Duration::from_secs(10));
    }
}
