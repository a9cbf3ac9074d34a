//! `cachefence pg install|uninstall`: the outbox table and the triggers
//! that fill it, created and removed idempotently in one transaction.
//!
//! The trigger runs in the writer's transaction, so a change and the keys
//! it invalidates commit (or roll back) together: nothing the database
//! committed can be missing from the outbox.

use deadpool_postgres::tokio_postgres::{self, Client, NoTls};

use crate::config::postgres::{ChangeLogConfig, Mapping};
use crate::config::template::{QualifiedName, ident, literal};

/// Body delimiter of the generated functions.
const DOLLAR: &str = "$cachefence$";

/// The trigger's name on every mapped table (one per outbox).
fn trigger_name(outbox: &QualifiedName) -> String {
    ident(&format!("cachefence_{}_{}", outbox.schema, outbox.name))
}

/// The trigger function of one table, in the outbox's schema.
fn function_name(outbox: &QualifiedName, table: &QualifiedName) -> String {
    format!(
        "{}.{}",
        ident(&outbox.schema),
        ident(&format!("{}_{}_{}", outbox.name, table.schema, table.name))
    )
}

/// The statements `pg install` runs, in one transaction.
pub fn install_sql(config: &ChangeLogConfig) -> Result<String, String> {
    let outbox = &config.outbox;
    let mut sql = String::from("BEGIN;\n");
    // Two installs at once wait for each other instead of racing on
    // CREATE … IF NOT EXISTS.
    sql.push_str("SELECT pg_advisory_xact_lock(hashtext('cachefence pg install'));\n");
    sql.push_str(&format!(
        "CREATE SCHEMA IF NOT EXISTS {};\n",
        ident(&outbox.schema)
    ));
    sql.push_str(&format!(
        "CREATE TABLE IF NOT EXISTS {} (\n  id bigserial PRIMARY KEY,\n  keys text[] NOT NULL,\n  created_at timestamptz NOT NULL DEFAULT clock_timestamp()\n);\n",
        outbox.sql()
    ));
    for mapping in &config.tables {
        let function = function_name(outbox, &mapping.table);
        let body = function_body(config, mapping);
        if body.contains(DOLLAR) {
            return Err(format!(
                "a key template of table {} contains `{DOLLAR}`, the generated function's delimiter",
                mapping.table
            ));
        }
        sql.push_str(&format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {DOLLAR}\n{body}{DOLLAR};\n"
        ));
        let (trigger, table) = (trigger_name(outbox), mapping.table.sql());
        sql.push_str(&format!("DROP TRIGGER IF EXISTS {trigger} ON {table};\n"));
        sql.push_str(&format!(
            "CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table}\n  FOR EACH ROW EXECUTE FUNCTION {function}();\n"
        ));
    }
    sql.push_str("COMMIT;\n");
    Ok(sql)
}

/// A trigger function: the keys of the old row (UPDATE, DELETE) and of the
/// new row (INSERT, UPDATE), without NULLs and duplicates, as one outbox
/// row, then a `NOTIFY` (PostgreSQL folds the notifications of one
/// transaction into one).
fn function_body(config: &ChangeLogConfig, mapping: &Mapping) -> String {
    let keys = |row: &str| {
        mapping
            .keys
            .iter()
            .map(|k| k.sql(row))
            .collect::<Vec<_>>()
            .join(",\n      ")
    };
    format!(
        "DECLARE
  changed text[] := '{{}}';
BEGIN
  IF TG_OP <> 'INSERT' THEN
    changed := changed || ARRAY[
      {old}];
  END IF;
  IF TG_OP <> 'DELETE' THEN
    changed := changed || ARRAY[
      {new}];
  END IF;
  changed := ARRAY(SELECT DISTINCT k FROM unnest(changed) AS k WHERE k IS NOT NULL ORDER BY k);
  IF cardinality(changed) > 0 THEN
    INSERT INTO {outbox} (keys) VALUES (changed);
    PERFORM pg_notify({channel}, '');
  END IF;
  RETURN NULL;
END
",
        old = keys("OLD"),
        new = keys("NEW"),
        outbox = config.outbox.sql(),
        channel = literal(&config.channel),
    )
}

/// The statements `pg uninstall` runs: triggers, functions and the outbox
/// (with any rows not yet consumed) are dropped.
pub fn uninstall_sql(config: &ChangeLogConfig) -> String {
    let outbox = &config.outbox;
    let mut sql = String::from("BEGIN;\n");
    for mapping in &config.tables {
        // A DO block: DROP TRIGGER … ON a table that no longer exists is an
        // error even with IF EXISTS.
        sql.push_str(&format!(
            "DO {DOLLAR} BEGIN\n  IF to_regclass({table_text}) IS NOT NULL THEN\n    DROP TRIGGER IF EXISTS {trigger} ON {table};\n  END IF;\nEND {DOLLAR};\n",
            table_text = literal(&mapping.table.sql()),
            trigger = trigger_name(outbox),
            table = mapping.table.sql(),
        ));
        sql.push_str(&format!(
            "DROP FUNCTION IF EXISTS {}();\n",
            function_name(outbox, &mapping.table)
        ));
    }
    sql.push_str(&format!("DROP TABLE IF EXISTS {};\n", outbox.sql()));
    sql.push_str("COMMIT;\n");
    sql
}

/// Every mapped table exists and has the columns its templates name.
pub async fn check_columns(client: &Client, config: &ChangeLogConfig) -> anyhow::Result<()> {
    for (i, mapping) in config.tables.iter().enumerate() {
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_attribute a \
                 WHERE a.attrelid = to_regclass($1)::oid AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&mapping.table.sql()],
            )
            .await?;
        let columns: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        anyhow::ensure!(
            !columns.is_empty(),
            "[[postgres.table]] #{}: table {} does not exist",
            i + 1,
            mapping.table
        );
        for template in &mapping.keys {
            for column in template.columns() {
                anyhow::ensure!(
                    columns.iter().any(|c| c == column),
                    "[[postgres.table]] #{}: table {} has no column `{column}` (key template `{}`); its columns: {}",
                    i + 1,
                    mapping.table,
                    template.source,
                    columns.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `pg install` / `pg uninstall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Install,
    Uninstall,
}

/// Runs `action` against the configured database, or with `dry_run` only
/// returns the SQL. Returns the SQL it ran.
pub async fn run(config: &ChangeLogConfig, action: Action, dry_run: bool) -> anyhow::Result<String> {
    let sql = match action {
        Action::Install => install_sql(config).map_err(anyhow::Error::msg)?,
        Action::Uninstall => uninstall_sql(config),
    };
    if dry_run {
        return Ok(sql);
    }
    let (client, connection) = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        config.pg_config().connect(NoTls),
    )
    .await
    .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within 10s"))?
    .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {}", describe(&e)))?;
    let connection = tokio::spawn(connection);
    if action == Action::Install {
        check_columns(&client, config).await?;
    }
    client
        .batch_execute(&sql)
        .await
        .map_err(|e| anyhow::anyhow!("{} failed: {}", action.name(), describe(&e)))?;
    drop(client);
    let _ = connection.await;
    Ok(sql)
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::Install => "pg install",
            Action::Uninstall => "pg uninstall",
        }
    }
}

/// A PostgreSQL error with the server's message, not only "db error".
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}
