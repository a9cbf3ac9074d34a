//! A PostgreSQL schema of the test's own on the server the machine runs
//! (127.0.0.1:5432 unless `CACHEFENCE_TEST_PG_URL` says otherwise), created
//! for one test and dropped after it. An unreachable server fails the test
//! with a message saying so.

use std::sync::atomic::{AtomicU32, Ordering};

use deadpool_postgres::tokio_postgres::{self, Client, NoTls};

use cachefence::changelog::install::{self, Action};
use cachefence::config::{Config, Settings};

use crate::wait::WAIT;

pub fn url() -> String {
    std::env::var("CACHEFENCE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

pub async fn connect() -> Client {
    let url = url();
    let connecting = tokio_postgres::connect(&url, NoTls);
    let (client, connection) = match tokio::time::timeout(WAIT, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => panic!(
            "PostgreSQL is unreachable at {url} ({e}); the change-log tests need it \
             (start it, or set CACHEFENCE_TEST_PG_URL)"
        ),
        Err(_) => panic!("PostgreSQL at {url} did not answer within {:?}", WAIT),
    };
    tokio::spawn(connection);
    client
}

/// A schema named for this test, dropped (with everything in it) on drop.
pub struct Schema {
    pub name: String,
    pub client: Client,
}

impl Schema {
    pub async fn create(test: &str) -> Schema {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "cf_{test}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = connect().await;
        client
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            ))
            .await
            .expect("creating the test schema");
        Schema { name, client }
    }

    /// Runs SQL with `{s}` standing for the schema name.
    pub async fn exec(&self, sql: &str) {
        let sql = sql.replace("{s}", &self.name);
        self.client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {}", install::describe(&e)));
    }

    /// One integer.
    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{s}", &self.name);
        self.client.query_one(&sql, &[]).await.expect(&sql).get(0)
    }

    pub async fn outbox_len(&self) -> i64 {
        self.count("SELECT count(*) FROM {s}.outbox").await
    }

    /// The `[postgres]` section for this schema: its own outbox and
    /// channel, a fast poll, and `tables` as (table, key templates).
    pub fn toml(&self, tables: &[(&str, &[&str])]) -> String {
        let mut toml = format!(
            "[postgres]\nurl = \"{}\"\noutbox = \"{s}.outbox\"\nchannel = \"{s}\"\npoll_interval = \"200ms\"\n",
            url(),
            s = self.name
        );
        for (table, keys) in tables {
            let keys: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
            toml.push_str(&format!(
                "[[postgres.table]]\ntable = \"{}.{table}\"\nkeys = [{}]\n",
                self.name,
                keys.join(", ")
            ));
        }
        toml
    }

    /// `cachefence pg install` with `toml`'s `[postgres]` section.
    pub async fn install(&self, toml: &str) {
        let settings: Settings = cachefence::config::parse_settings(toml).expect("test settings parse");
        let config = Config::resolve(settings, None).expect("test config is valid");
        let changelog = config.changelog.expect("a [postgres] section");
        install::run(&changelog, Action::Install, false)
            .await
            .expect("pg install");
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A runtime of its own: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                if let Ok((client, connection)) = tokio_postgres::connect(&url(), NoTls).await {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .await;
                }
            });
            Ok::<(), std::io::Error>(())
        })
        .join();
    }
}
