//! `CACHE.*`: the commands the proxy answers itself, from `redis-cli` or
//! any client. Each is parsed once into an [`AdminCommand`] (name and
//! arity checked here, against the one table `COMMANDS`), then carried
//! out by its family:
//!
//! - [`inspect`]: `CACHE.HELP`, `CACHE.INFO`, `CACHE.STATS`,
//!   `CACHE.EXPLAIN`, `CACHE.FENCE`;
//! - [`control`]: `CACHE.AUTH`, `CACHE.RELOAD`, `CACHE.INVALIDATE`;
//! - [`lease`]: the explicit lease API, `CACHE.GET` and `CACHE.FILL`.
//!
//! A command either becomes a fence script call (sent in the client's
//! place, its reply translated) or is answered here.

pub mod control;
pub mod inspect;
pub mod lease;

use bytes::Bytes;

use crate::app::App;
use crate::fence::Client;
use crate::fence::plan::Plan;
use crate::resp::request::Frame;
use crate::resp::value::Reply;

/// A parsed `CACHE.*` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    Help,
    Stats,
    Explain(Bytes),
    Fence(Bytes),
    Invalidate(Vec<Bytes>),
    Auth(Bytes),
    Reload,
    Info,
    Get(Bytes),
    Fill {
        key: Bytes,
        token: Bytes,
        value: Bytes,
        /// `[EX s | PX ms]`, checked when the fill is planned.
        expiry: Vec<Bytes>,
    },
}

/// How many words (the name included) a command takes.
#[derive(Debug, Clone, Copy)]
enum Arity {
    /// Any number: extra words are ignored, as before.
    Any,
    Exactly(usize),
    AtLeast(usize),
    OneOf(usize, usize),
}

impl Arity {
    fn admits(self, n: usize) -> bool {
        match self {
            Arity::Any => true,
            Arity::Exactly(m) => n == m,
            Arity::AtLeast(m) => n >= m,
            Arity::OneOf(a, b) => n == a || n == b,
        }
    }
}

/// One command: its name, arity and `CACHE.HELP` line.
struct Spec {
    name: &'static str,
    arity: Arity,
    help: &'static str,
}

/// Every `CACHE.*` command, in `CACHE.HELP` order.
const COMMANDS: &[Spec] = &[
    Spec {
        name: "CACHE.HELP",
        arity: Arity::Any,
        help: "CACHE.HELP -- this list",
    },
    Spec {
        name: "CACHE.STATS",
        arity: Arity::Any,
        help: "CACHE.STATS -- counters: misses, tickets, fills accepted/refused by reason, writes, invalidations",
    },
    Spec {
        name: "CACHE.EXPLAIN",
        arity: Arity::Exactly(2),
        help: "CACHE.EXPLAIN <key> -- the key's recent history here: misses (ticket version), fills and why refused, invalidations by source, writes",
    },
    Spec {
        name: "CACHE.FENCE",
        arity: Arity::Exactly(2),
        help: "CACHE.FENCE <key> -- the key's fence: version, last invalidation, lease holder, ttl, outstanding tickets",
    },
    Spec {
        name: "CACHE.INVALIDATE",
        arity: Arity::AtLeast(2),
        help: "CACHE.INVALIDATE <key> [key ...] -- delete the keys and move their fences (in-flight fills are refused)",
    },
    Spec {
        name: "CACHE.AUTH",
        arity: Arity::Exactly(2),
        help: "CACHE.AUTH <password> -- unlock the admin commands (CACHE.INVALIDATE, CACHE.RELOAD) when admin_password is set",
    },
    Spec {
        name: "CACHE.RELOAD",
        arity: Arity::Exactly(1),
        help: "CACHE.RELOAD -- re-read the config file: [[cache]] sections, limits, log level now; lists what needs a restart",
    },
    Spec {
        name: "CACHE.INFO",
        arity: Arity::Any,
        help: "CACHE.INFO -- version, uptime, config file, listen address, upstream, fenced patterns (no secrets)",
    },
    Spec {
        name: "CACHE.GET",
        arity: Arity::Exactly(2),
        help: "CACHE.GET <key> -- [value, nil] on a hit; [nil, token] on a miss: a lease usable from any connection or proxy",
    },
    Spec {
        name: "CACHE.FILL",
        arity: Arity::OneOf(4, 6),
        help: "CACHE.FILL <key> <token> <value> [EX s|PX ms] -- store if nothing invalidated the key since the miss: OK or STALE",
    },
];

/// Why a request is no admin command the proxy can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Redis' own wording, with the name as the client wrote it, lowercased.
    Arity(String),
    Unknown(String),
}

impl ParseError {
    pub fn reply(&self) -> Reply {
        match self {
            ParseError::Arity(name) => Reply::Error(format!(
                "ERR wrong number of arguments for '{}' command",
                name.to_lowercase()
            )),
            ParseError::Unknown(name) => {
                let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
                Reply::Error(format!(
                    "ERR unknown cachefence command '{name}'; try {}",
                    names.join(", ")
                ))
            }
        }
    }
}

impl AdminCommand {
    /// Parses the words of a `CACHE.*` request (the name first).
    pub fn parse(mut words: Vec<Bytes>) -> Result<AdminCommand, ParseError> {
        let name = String::from_utf8_lossy(&words[0]).to_ascii_uppercase();
        let Some(spec) = COMMANDS.iter().find(|c| c.name == name) else {
            return Err(ParseError::Unknown(name));
        };
        if !spec.arity.admits(words.len()) {
            return Err(ParseError::Arity(name));
        }
        let mut arg = |i: usize| std::mem::take(&mut words[i]);
        Ok(match spec.name {
            "CACHE.HELP" => AdminCommand::Help,
            "CACHE.STATS" => AdminCommand::Stats,
            "CACHE.EXPLAIN" => AdminCommand::Explain(arg(1)),
            "CACHE.FENCE" => AdminCommand::Fence(arg(1)),
            "CACHE.INVALIDATE" => AdminCommand::Invalidate(words.split_off(1)),
            "CACHE.AUTH" => AdminCommand::Auth(arg(1)),
            "CACHE.RELOAD" => AdminCommand::Reload,
            "CACHE.INFO" => AdminCommand::Info,
            "CACHE.GET" => AdminCommand::Get(arg(1)),
            "CACHE.FILL" => AdminCommand::Fill {
                key: arg(1),
                token: arg(2),
                value: arg(3),
                expiry: words.split_off(4),
            },
            _ => unreachable!("every name in COMMANDS is parsed"),
        })
    }

    /// Commands that need `CACHE.AUTH` first when `admin_password` is set.
    fn needs_admin(&self) -> bool {
        matches!(self, AdminCommand::Invalidate(_) | AdminCommand::Reload)
    }

    fn name(&self) -> &'static str {
        match self {
            AdminCommand::Help => "CACHE.HELP",
            AdminCommand::Stats => "CACHE.STATS",
            AdminCommand::Explain(_) => "CACHE.EXPLAIN",
            AdminCommand::Fence(_) => "CACHE.FENCE",
            AdminCommand::Invalidate(_) => "CACHE.INVALIDATE",
            AdminCommand::Auth(_) => "CACHE.AUTH",
            AdminCommand::Reload => "CACHE.RELOAD",
            AdminCommand::Info => "CACHE.INFO",
            AdminCommand::Get(_) => "CACHE.GET",
            AdminCommand::Fill { .. } => "CACHE.FILL",
        }
    }
}

/// Plans a `CACHE.*` request of `client`'s connection (database `db`).
pub fn plan(client: &Client<'_>, app: &App, frame: &Frame, request: &[u8], db: u32) -> Plan {
    let command = match AdminCommand::parse(frame.all_args(request)) {
        Ok(command) => command,
        Err(error) => return Plan::Local(error.reply()),
    };
    if command.needs_admin() && !control::admitted(client) {
        return Plan::Local(Reply::Error(format!(
            "NOAUTH cachefence: {} needs CACHE.AUTH <admin password> first",
            command.name()
        )));
    }
    match command {
        AdminCommand::Help => Plan::Local(inspect::help()),
        AdminCommand::Stats => Plan::Local(inspect::stats(client.fences, app)),
        AdminCommand::Info => Plan::Local(inspect::info(client.fences, app)),
        AdminCommand::Explain(key) => Plan::Local(inspect::explain(client.fences, &key)),
        AdminCommand::Fence(key) => inspect::fence(key),
        AdminCommand::Auth(password) => Plan::Local(control::auth(client, &password)),
        AdminCommand::Reload => Plan::Local(control::reload(app)),
        AdminCommand::Invalidate(keys) => control::invalidate(client, keys),
        AdminCommand::Get(key) => lease::get(client, key, db),
        AdminCommand::Fill {
            key,
            token,
            value,
            expiry,
        } => lease::fill(client, key, &token, value, expiry, db),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<AdminCommand, ParseError> {
        AdminCommand::parse(
            line.split(' ')
                .map(|w| Bytes::copy_from_slice(w.as_bytes()))
                .collect(),
        )
    }

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn names_are_case_insensitive_and_arguments_typed() {
        assert_eq!(parse("cache.stats"), Ok(AdminCommand::Stats));
        assert_eq!(parse("Cache.Explain k"), Ok(AdminCommand::Explain(b("k"))));
        assert_eq!(
            parse("CACHE.INVALIDATE a b"),
            Ok(AdminCommand::Invalidate(vec![b("a"), b("b")]))
        );
        assert_eq!(
            parse("CACHE.FILL k cf1.1.2 v EX 10"),
            Ok(AdminCommand::Fill {
                key: b("k"),
                token: b("cf1.1.2"),
                value: b("v"),
                expiry: vec![b("EX"), b("10")],
            })
        );
        // As before the typed parse: extra words after HELP, STATS, INFO are ignored.
        assert_eq!(parse("CACHE.HELP me"), Ok(AdminCommand::Help));
    }

    #[test]
    fn arity_errors_are_redis_own_wording() {
        for line in [
            "CACHE.EXPLAIN",
            "CACHE.FENCE a b",
            "CACHE.INVALIDATE",
            "CACHE.AUTH",
            "CACHE.RELOAD now",
            "CACHE.GET",
            "CACHE.FILL k t v EX",
        ] {
            let error = parse(line).expect_err(line);
            let name = line.split(' ').next().unwrap().to_lowercase();
            assert_eq!(
                error.reply(),
                Reply::Error(format!("ERR wrong number of arguments for '{name}' command")),
                "{line}"
            );
        }
    }

    #[test]
    fn an_unknown_name_lists_every_command_once() {
        let Reply::Error(text) = parse("CACHE.NOPE x").unwrap_err().reply() else {
            panic!("an error reply");
        };
        assert_eq!(
            text,
            "ERR unknown cachefence command 'CACHE.NOPE'; try CACHE.HELP, CACHE.STATS, CACHE.EXPLAIN, \
             CACHE.FENCE, CACHE.INVALIDATE, CACHE.AUTH, CACHE.RELOAD, CACHE.INFO, CACHE.GET, CACHE.FILL"
        );
    }

    #[test]
    fn help_has_one_line_per_command_in_table_order() {
        let Reply::Array(lines) = inspect::help() else {
            panic!("an array");
        };
        assert_eq!(lines.len(), COMMANDS.len());
        for (line, spec) in lines.iter().zip(COMMANDS) {
            let Reply::Bulk(text) = line else {
                panic!("bulk lines")
            };
            assert!(
                text.starts_with(spec.name.as_bytes()),
                "{spec:?}",
                spec = spec.name
            );
        }
    }
}
