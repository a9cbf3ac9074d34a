//! The `[postgres]` section: the change log's connection, outbox and
//! `[[postgres.table]]` mappings (table → key templates), resolved and
//! checked at load; the change log (`src/changelog/`) consumes it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::template::{KeyTemplate, QualifiedName};
use super::{Secret, Span};

/// The `[postgres]` table of the config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// `postgres://user[:password]@host[:port]/database`; empty: no change log.
    #[serde(default)]
    pub url: Secret,
    /// Connections in the consumer's pool (the `LISTEN` connection is extra).
    #[serde(default = "PostgresSection::default_pool_size")]
    pub pool_size: u32,
    /// How often the outbox is polled when no `NOTIFY` arrives (NOTIFY is
    /// not durable: a notification sent while the proxy was away is lost).
    #[serde(default = "PostgresSection::default_poll_interval")]
    pub poll_interval: Span,
    /// Outbox rows claimed per transaction.
    #[serde(default = "PostgresSection::default_batch_size")]
    pub batch_size: u32,
    /// The `NOTIFY` channel.
    #[serde(default = "PostgresSection::default_channel")]
    pub channel: String,
    /// The outbox table, `schema.table`.
    #[serde(default = "PostgresSection::default_outbox")]
    pub outbox: String,
    /// `[[postgres.table]]`: which keys a row of a table maps to.
    #[serde(default, rename = "table", skip_serializing_if = "Vec::is_empty")]
    pub tables: Vec<TableMapping>,
    /// Streaming replicas of `url` that readers may read from
    /// (`postgres://…` each): their replay lag sizes `lag_window = "auto"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<Secret>,
    /// How often the replicas' lag is measured.
    #[serde(default = "PostgresSection::default_lag_poll")]
    pub lag_poll: Span,
    /// Added to the largest lag measured over `lag_interval`.
    #[serde(default = "PostgresSection::default_lag_margin")]
    pub lag_margin: Span,
    /// How far back the largest measured lag is taken from.
    #[serde(default = "PostgresSection::default_lag_interval")]
    pub lag_interval: Span,
}

impl PostgresSection {
    fn default_pool_size() -> u32 {
        4
    }
    fn default_poll_interval() -> Span {
        Span(Duration::from_secs(1))
    }
    fn default_batch_size() -> u32 {
        500
    }
    fn default_channel() -> String {
        "cachefence".to_string()
    }
    fn default_outbox() -> String {
        "cachefence.outbox".to_string()
    }
    fn default_lag_poll() -> Span {
        Span(Duration::from_millis(100))
    }
    fn default_lag_margin() -> Span {
        Span(Duration::from_millis(100))
    }
    fn default_lag_interval() -> Span {
        Span(Duration::from_secs(10))
    }

    pub fn defaults() -> PostgresSection {
        PostgresSection {
            url: Secret::default(),
            pool_size: Self::default_pool_size(),
            poll_interval: Self::default_poll_interval(),
            batch_size: Self::default_batch_size(),
            channel: Self::default_channel(),
            outbox: Self::default_outbox(),
            tables: Vec::new(),
            replicas: Vec::new(),
            lag_poll: Self::default_lag_poll(),
            lag_margin: Self::default_lag_margin(),
            lag_interval: Self::default_lag_interval(),
        }
    }

    /// Validates the section; `None` when no `url` is set (and no table is
    /// mapped).
    pub fn resolve(&self) -> anyhow::Result<Option<ChangeLogConfig>> {
        if self.url.expose().is_empty() {
            anyhow::ensure!(
                self.tables.is_empty(),
                "key `postgres.url`: `[[postgres.table]]` mappings need the database's url"
            );
            anyhow::ensure!(
                self.replicas.is_empty(),
                "key `postgres.url`: `replicas` are measured against the primary's url"
            );
            return Ok(None);
        }
        self.url
            .expose()
            .parse::<deadpool_postgres::tokio_postgres::Config>()
            .map_err(|e| anyhow::anyhow!("key `postgres.url`: {e}"))?;
        anyhow::ensure!(
            self.pool_size > 0,
            "key `postgres.pool_size`: must be greater than 0"
        );
        anyhow::ensure!(
            self.batch_size > 0,
            "key `postgres.batch_size`: must be greater than 0"
        );
        anyhow::ensure!(
            !self.poll_interval.0.is_zero(),
            "key `postgres.poll_interval`: must be greater than 0"
        );
        anyhow::ensure!(
            !self.channel.is_empty(),
            "key `postgres.channel`: must not be empty"
        );
        let mut replicas = Vec::with_capacity(self.replicas.len());
        for (i, url) in self.replicas.iter().enumerate() {
            let config = url
                .expose()
                .parse::<deadpool_postgres::tokio_postgres::Config>()
                .map_err(|e| anyhow::anyhow!("key `postgres.replicas` #{}: {e}", i + 1))?;
            let name = describe_target(&config);
            anyhow::ensure!(
                !replicas.iter().any(|r: &Replica| r.name == name),
                "key `postgres.replicas` #{}: {name} is listed twice",
                i + 1
            );
            replicas.push(Replica {
                name,
                url: url.clone(),
            });
        }
        anyhow::ensure!(
            !self.lag_poll.0.is_zero(),
            "key `postgres.lag_poll`: must be greater than 0"
        );
        anyhow::ensure!(
            self.lag_interval.0 >= self.lag_poll.0,
            "key `postgres.lag_interval`: must be at least `lag_poll`"
        );
        let outbox =
            QualifiedName::parse(&self.outbox).map_err(|e| anyhow::anyhow!("key `postgres.outbox`: {e}"))?;
        let mut tables = Vec::new();
        for (i, mapping) in self.tables.iter().enumerate() {
            let at = |e: String| anyhow::anyhow!("[[postgres.table]] #{} (`{}`): {e}", i + 1, mapping.table);
            let table = QualifiedName::parse(&mapping.table).map_err(at)?;
            if mapping.keys.is_empty() {
                return Err(at("`keys` is empty".into()));
            }
            let keys = mapping
                .keys
                .iter()
                .map(|k| KeyTemplate::parse(k))
                .collect::<Result<Vec<_>, _>>()
                .map_err(at)?;
            if tables.iter().any(|t: &Mapping| t.table == table) {
                return Err(at(
                    "the table is mapped twice (list all its keys in one entry)".into()
                ));
            }
            for (template, expression) in &mapping.values {
                if !mapping.keys.contains(template) {
                    return Err(at(format!(
                        "`values` names `{template}`, which is not one of its `keys` ({})",
                        mapping.keys.join(", ")
                    )));
                }
                if expression.trim().is_empty() {
                    return Err(at(format!("`values`: the expression of `{template}` is empty")));
                }
            }
            let values = mapping
                .keys
                .iter()
                .map(|k| mapping.values.get(k).cloned())
                .collect();
            tables.push(Mapping { table, keys, values });
        }
        Ok(Some(ChangeLogConfig {
            url: self.url.clone(),
            pool_size: self.pool_size as usize,
            poll_interval: self.poll_interval.0,
            batch_size: i64::from(self.batch_size),
            channel: self.channel.clone(),
            outbox,
            tables,
            replicas,
            lag_poll: self.lag_poll.0,
            lag_margin: self.lag_margin.0,
            lag_interval: self.lag_interval.0,
        }))
    }
}

/// One `[[postgres.table]]` entry as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapping {
    /// `schema.table` (or `table`, in `public`).
    pub table: String,
    /// Key templates: `user:{id}` renders column `id` of the row.
    pub keys: Vec<String>,
    /// For `cachefence audit`: key template → SQL expression over the row
    /// (aliased `t`) that renders the exact value the application caches
    /// under that key, e.g. `row_to_json(t)::text`. Templates without one
    /// are not compared. The triggers do not use it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

/// A validated mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapping {
    pub table: QualifiedName,
    pub keys: Vec<KeyTemplate>,
    /// The `values` expression of each of `keys` (same order), if any.
    pub values: Vec<Option<String>>,
}

/// The validated `[postgres]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeLogConfig {
    pub url: Secret,
    pub pool_size: usize,
    pub poll_interval: Duration,
    pub batch_size: i64,
    pub channel: String,
    pub outbox: QualifiedName,
    pub tables: Vec<Mapping>,
    /// The replicas whose lag `lag_window = "auto"` follows.
    pub replicas: Vec<Replica>,
    pub lag_poll: Duration,
    pub lag_margin: Duration,
    pub lag_interval: Duration,
}

/// A streaming replica of the primary.
#[derive(Debug, Clone, PartialEq)]
pub struct Replica {
    /// `host:port`, for logs, `CACHE.INFO` and metric labels (never the url).
    pub name: String,
    pub url: Secret,
}

impl Replica {
    pub fn pg_config(&self) -> deadpool_postgres::tokio_postgres::Config {
        self.url.expose().parse().expect("validated in resolve")
    }
}

/// `host:port` of a connection config (the first host), without credentials.
fn describe_target(config: &deadpool_postgres::tokio_postgres::Config) -> String {
    use deadpool_postgres::tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

impl ChangeLogConfig {
    /// Whether the outbox is consumed: a section that names replicas and
    /// maps no table is there for the replicas' lag alone.
    pub fn consumes(&self) -> bool {
        !self.tables.is_empty() || self.replicas.is_empty()
    }

    pub fn pg_config(&self) -> deadpool_postgres::tokio_postgres::Config {
        self.url.expose().parse().expect("validated in resolve")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(table: &str) -> anyhow::Result<Option<ChangeLogConfig>> {
        let text = format!("url = \"postgres://u@h/db\"\n[[table]]\n{table}");
        toml::from_str::<PostgresSection>(&text)?.resolve()
    }

    #[test]
    fn values_belong_to_the_entrys_own_key_templates() {
        let config = resolve(
            "table = \"users\"\nkeys = [\"user:{id}\", \"user:email:{email}\"]\n\
             values = { \"user:{id}\" = \"row_to_json(t)::text\" }\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            config.tables[0].values,
            [Some("row_to_json(t)::text".to_string()), None]
        );
        let error = resolve(
            "table = \"users\"\nkeys = [\"user:{id}\", \"u:{email}\"]\nvalues = { \"user:{idd}\" = \"t.name\" }\n",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "[[postgres.table]] #1 (`users`): `values` names `user:{idd}`, which is not one of its `keys` (user:{id}, u:{email})"
        );
        let error =
            resolve("table = \"users\"\nkeys = [\"user:{id}\"]\nvalues = { \"user:{id}\" = \" \" }\n")
                .unwrap_err();
        assert_eq!(
            error.to_string(),
            "[[postgres.table]] #1 (`users`): `values`: the expression of `user:{id}` is empty"
        );
        // No `values`: the mapping is as before.
        let config = resolve("table = \"users\"\nkeys = [\"user:{id}\"]\n")
            .unwrap()
            .unwrap();
        assert_eq!(config.tables[0].values, [None]);
    }

    #[test]
    fn pg_install_ignores_value_expressions() {
        let keys = "table = \"users\"\nkeys = [\"user:{id}\", \"user:email:{email}\"]\n";
        let plain = resolve(keys).unwrap().unwrap();
        let with_values = resolve(&format!(
            "{keys}values = {{ \"user:{{id}}\" = \"row_to_json(t)::text\", \"user:email:{{email}}\" = \"t.id::text\" }}\n"
        ))
        .unwrap()
        .unwrap();
        assert_ne!(plain, with_values);
        assert_eq!(
            crate::changelog::install::install_sql(&plain).unwrap(),
            crate::changelog::install::install_sql(&with_values).unwrap()
        );
        assert_eq!(
            crate::changelog::install::uninstall_sql(&plain),
            crate::changelog::install::uninstall_sql(&with_values)
        );
    }
}
