//! The audit's result: what became of each sampled key, the stale ratio
//! in nines, and the stale keys, as text for people or JSON for machines.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::config::Span;

/// Stale keys listed at most.
pub const MAX_LISTED: usize = 10;
/// Bytes of a value shown for a stale key.
const SHOWN_BYTES: usize = 80;

/// What the audit concluded about one sampled key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The cached bytes are the value the row renders.
    Equal,
    /// It disagreed, and after the settle delay Redis no longer held that
    /// value or the row agreed with it: a change in flight.
    InFlight,
    /// Still cached, still different from the row's value.
    Stale {
        cached: Vec<u8>,
        database: Vec<u8>,
    },
    /// Still cached, and no row renders the key any more.
    StaleRowMissing {
        cached: Vec<u8>,
    },
    NotComparable(Reason),
}

/// Why a sampled key was not compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its template has no `values` expression.
    NoValueExpression,
    /// Its template has adjacent placeholders, or several templates fit it
    /// equally well.
    AmbiguousTemplate,
    /// Not a string in Redis (a hash, a list…).
    NotAString,
    /// Not exactly one way to read column values from it, or a value that
    /// is not valid for its column's type (`user:abc` for an integer id).
    KeyDoesNotParse,
    /// Several rows render the key (the key columns are not unique).
    SeveralRows,
    /// The value expression is NULL for the row.
    ValueNull,
    /// Gone from Redis between `SCAN` and `GET`.
    Vanished,
}

/// Keys not compared, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NotComparable {
    pub total: u64,
    pub no_value_expression: u64,
    pub ambiguous_template: u64,
    pub not_a_string: u64,
    pub key_does_not_parse: u64,
    pub several_rows: u64,
    pub value_null: u64,
    pub vanished: u64,
}

impl NotComparable {
    fn add(&mut self, reason: Reason) {
        self.total += 1;
        *match reason {
            Reason::NoValueExpression => &mut self.no_value_expression,
            Reason::AmbiguousTemplate => &mut self.ambiguous_template,
            Reason::NotAString => &mut self.not_a_string,
            Reason::KeyDoesNotParse => &mut self.key_does_not_parse,
            Reason::SeveralRows => &mut self.several_rows,
            Reason::ValueNull => &mut self.value_null,
            Reason::Vanished => &mut self.vanished,
        } += 1;
    }

    /// `(name, count, meaning)` of each reason.
    fn reasons(&self) -> [(&'static str, u64, &'static str); 7] {
        [
            (
                "no_value_expression",
                self.no_value_expression,
                "its template has no `values` expression",
            ),
            (
                "ambiguous_template",
                self.ambiguous_template,
                "its template cannot be read back ({a}{b}), or several fit",
            ),
            ("not_a_string", self.not_a_string, "a hash, list, set... in Redis"),
            (
                "key_does_not_parse",
                self.key_does_not_parse,
                "not one set of column values, or not valid for the column type",
            ),
            ("several_rows", self.several_rows, "several rows render the key"),
            ("value_null", self.value_null, "the value expression is NULL"),
            ("vanished", self.vanished, "gone from Redis before it was read"),
        ]
    }
}

/// The counts of one key template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TemplateCounts {
    pub table: String,
    pub template: String,
    pub sampled: u64,
    pub compared: u64,
    pub equal: u64,
    pub in_flight: u64,
    pub stale: u64,
    pub stale_row_missing: u64,
    pub not_comparable: u64,
}

/// A stale key, with both values cut to 80 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleKey {
    pub key: String,
    pub table: String,
    pub template: String,
    pub cached: String,
    pub cached_len: usize,
    /// `None`: no row renders the key.
    pub database: Option<String>,
    pub database_len: Option<usize>,
}

/// The whole result. `sampled = compared + not_comparable.total` and
/// `compared = equal + in_flight + stale + stale_row_missing`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The Redis sampled (`host:port`).
    pub redis: String,
    /// Keys asked for (`--sample`).
    pub sample: usize,
    pub sampled: u64,
    /// Every template's `SCAN` reached its end: fewer keys than asked
    /// exist, and all were sampled.
    pub scan_complete: bool,
    /// Why sampling stopped before `sample` keys and before the scans
    /// ended (a time or iteration limit), if it did.
    pub scan_stopped: Option<String>,
    pub settle_ms: u64,
    pub compared: u64,
    pub equal: u64,
    pub in_flight: u64,
    pub stale: u64,
    pub stale_row_missing: u64,
    pub not_comparable: NotComparable,
    /// `(stale + stale_row_missing) / compared`; `None` if nothing was
    /// compared.
    pub stale_ratio: Option<f64>,
    /// `-log10(stale_ratio)`; `None` without stale values.
    pub nines: Option<f64>,
    /// Without stale values: `log10(compared)`, the most nines this sample
    /// can show.
    pub nines_at_least: Option<f64>,
    pub templates: Vec<TemplateCounts>,
    /// The first stale keys (up to 10).
    pub stale_keys: Vec<StaleKey>,
}

impl Report {
    /// Counts `outcome` of `key`, whose template is `templates[template]`.
    pub fn record(&mut self, template: usize, key: &str, outcome: &Outcome) {
        self.sampled += 1;
        let counts = &mut self.templates[template];
        counts.sampled += 1;
        if let Outcome::NotComparable(reason) = outcome {
            self.not_comparable.add(*reason);
            counts.not_comparable += 1;
            return;
        }
        self.compared += 1;
        counts.compared += 1;
        let (cached, database) = match outcome {
            Outcome::Equal => {
                self.equal += 1;
                counts.equal += 1;
                return;
            }
            Outcome::InFlight => {
                self.in_flight += 1;
                counts.in_flight += 1;
                return;
            }
            Outcome::Stale { cached, database } => {
                self.stale += 1;
                counts.stale += 1;
                (cached, Some(database))
            }
            Outcome::StaleRowMissing { cached } => {
                self.stale_row_missing += 1;
                counts.stale_row_missing += 1;
                (cached, None)
            }
            Outcome::NotComparable(_) => unreachable!("counted above"),
        };
        if self.stale_keys.len() < MAX_LISTED {
            let counts = &self.templates[template];
            self.stale_keys.push(StaleKey {
                key: key.to_string(),
                table: counts.table.clone(),
                template: counts.template.clone(),
                cached: shown(cached),
                cached_len: cached.len(),
                database: database.map(|d| shown(d)),
                database_len: database.map(Vec::len),
            });
        }
    }

    /// Stale values found, with or without their row.
    pub fn stale_total(&self) -> u64 {
        self.stale + self.stale_row_missing
    }

    /// Computes the ratio and the nines from the counts.
    pub fn finish(&mut self) {
        if self.compared == 0 {
            return;
        }
        let ratio = self.stale_total() as f64 / self.compared as f64;
        self.stale_ratio = Some(ratio);
        match self.stale_total() {
            0 => self.nines_at_least = Some((self.compared as f64).log10()),
            _ => self.nines = Some((1.0 / ratio).log10()),
        }
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        let scope = match (&self.scan_stopped, self.scan_complete) {
            (Some(why), _) => format!("; sampling stopped early: {why}"),
            (None, true) if (self.sampled as usize) < self.sample => {
                ": every key of the templates".to_string()
            }
            _ => String::new(),
        };
        writeln!(
            out,
            "cachefence audit: Redis {}, {} keys sampled (asked for {}{scope}), settle delay {}",
            self.redis,
            self.sampled,
            self.sample,
            Span(Duration::from_millis(self.settle_ms))
        )?;
        let line = |out: &mut String, indent: usize, name: &str, n: u64, note: &str| {
            let note = if note.is_empty() {
                String::new()
            } else {
                format!("   {note}")
            };
            let width = 24 - indent;
            writeln!(out, "{:indent$}{name:<width$}{n:>6}{note}", "")
        };
        line(out, 2, "compared", self.compared, "")?;
        line(out, 4, "equal", self.equal, "")?;
        line(
            out,
            4,
            "in_flight",
            self.in_flight,
            "disagreed, then settled within the delay",
        )?;
        line(out, 4, "stale", self.stale, "")?;
        line(
            out,
            4,
            "stale_row_missing",
            self.stale_row_missing,
            "cached, but no row renders the key",
        )?;
        line(out, 2, "not_comparable", self.not_comparable.total, "")?;
        for (name, n, meaning) in self.not_comparable.reasons() {
            if n > 0 {
                line(out, 4, name, n, meaning)?;
            }
        }
        match (self.stale_ratio, self.nines, self.nines_at_least) {
            (Some(ratio), Some(nines), _) => {
                writeln!(
                    out,
                    "stale ratio: {} ({} of {} compared)",
                    significant(ratio),
                    self.stale_total(),
                    self.compared
                )?;
                writeln!(out, "nines: {nines:.1}")?;
            }
            (_, _, Some(at_least)) => {
                writeln!(out, "stale ratio: 0 (0 of {} compared)", self.compared)?;
                writeln!(
                    out,
                    "nines: >= {at_least:.1} (no stale value in {} compared)",
                    self.compared
                )?;
            }
            _ => writeln!(out, "stale ratio: n/a (nothing compared)\nnines: n/a")?,
        }
        writeln!(out, "by key template:")?;
        let width = self.templates.iter().map(|t| t.template.len()).max().unwrap_or(0);
        for t in &self.templates {
            writeln!(
                out,
                "  {:<width$}  {}: sampled {}, compared {}, stale {}, not comparable {}",
                t.template,
                t.table,
                t.sampled,
                t.compared,
                t.stale + t.stale_row_missing,
                t.not_comparable
            )?;
        }
        if !self.stale_keys.is_empty() {
            writeln!(
                out,
                "stale keys ({} of {}):",
                self.stale_keys.len(),
                self.stale_total()
            )?;
            for s in &self.stale_keys {
                writeln!(out, "  {}  ({}, {})", s.key, s.table, s.template)?;
                writeln!(out, "    cached:   {}", quoted(&s.cached, s.cached_len))?;
                match (&s.database, s.database_len) {
                    (Some(d), Some(len)) => writeln!(out, "    database: {}", quoted(d, len))?,
                    _ => writeln!(out, "    database: no row")?,
                }
            }
        }
        Ok(())
    }
}

/// Up to 80 bytes of `value` (a UTF-8 character the cut would split is
/// left out), lossy UTF-8.
fn shown(value: &[u8]) -> String {
    let mut end = value.len().min(SHOWN_BYTES);
    if let Err(e) = std::str::from_utf8(&value[..end])
        && e.error_len().is_none()
    {
        end = e.valid_up_to();
    }
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// A shown value, quoted and escaped, with its full length when cut.
fn quoted(shown: &str, len: usize) -> String {
    match shown.len() < len {
        true => format!("{shown:?}... ({len} bytes)"),
        false => format!("{shown:?}"),
    }
}

/// `x` with three significant digits.
fn significant(x: f64) -> String {
    let digits = (2 - x.log10().floor() as i64).max(0) as usize;
    format!("{x:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcomes: &[Outcome]) -> Report {
        let mut report = Report {
            redis: "127.0.0.1:6379".into(),
            sample: 1000,
            settle_ms: 2000,
            templates: vec![TemplateCounts {
                table: "public.users".into(),
                template: "user:{id}".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        for (i, outcome) in outcomes.iter().enumerate() {
            report.record(0, &format!("user:{i}"), outcome);
        }
        report.finish();
        report
    }

    #[test]
    fn nines_are_the_stale_ratio_in_powers_of_ten() {
        let mut outcomes = vec![Outcome::Equal; 998];
        outcomes.push(Outcome::Stale {
            cached: b"old".to_vec(),
            database: b"new".to_vec(),
        });
        outcomes.push(Outcome::StaleRowMissing {
            cached: b"x".to_vec(),
        });
        let r = report(&outcomes);
        assert_eq!((r.compared, r.stale_total()), (1000, 2));
        assert_eq!(r.stale_ratio, Some(0.002));
        assert_eq!(format!("{:.3}", r.nines.unwrap()), "2.699");
        assert_eq!(r.nines_at_least, None);
        let text = r.text();
        assert!(
            text.contains("stale ratio: 0.00200 (2 of 1000 compared)\nnines: 2.7\n"),
            "{text}"
        );
        assert!(text.contains("    database: no row\n"), "{text}");

        let r = report(&vec![Outcome::Equal; 1000]);
        assert_eq!((r.nines, r.nines_at_least), (None, Some(3.0)));
        assert!(
            r.text()
                .contains("nines: >= 3.0 (no stale value in 1000 compared)\n")
        );

        let r = report(&[Outcome::NotComparable(Reason::NotAString)]);
        assert_eq!((r.stale_ratio, r.nines, r.nines_at_least), (None, None, None));
        assert!(r.text().contains("nines: n/a"));
        let r = report(&[Outcome::StaleRowMissing { cached: vec![] }]);
        assert_eq!(r.nines, Some(0.0));
    }

    #[test]
    fn listed_values_are_cut_and_escaped() {
        // 80 bytes would split the 40th `é`: it is left out.
        let long = format!("a{}", "é".repeat(100));
        let r = report(&[Outcome::Stale {
            cached: long.into_bytes(),
            database: b"a\"b\n".to_vec(),
        }]);
        let stale = &r.stale_keys[0];
        assert_eq!((stale.cached.len(), stale.cached_len), (79, 201));
        assert_eq!(stale.cached, format!("a{}", "é".repeat(39)));
        let text = r.text();
        assert!(text.contains(&format!("    cached:   \"a{}\"... (201 bytes)\n", "é".repeat(39))));
        assert!(text.contains("    database: \"a\\\"b\\n\"\n"), "{text}");
        let mut r = report(&vec![
            Outcome::StaleRowMissing {
                cached: b"v".to_vec()
            };
            12
        ]);
        assert_eq!(r.stale_keys.len(), MAX_LISTED);
        r.finish();
        assert!(r.text().contains("stale keys (10 of 12):"));
    }
}
