//! A PostgreSQL primary and a streaming replica of the test's own:
//! `initdb` into a scratch directory, the primary on a free loopback port,
//! `pg_basebackup -R` for the replica on another, with a
//! `recovery_min_apply_delay` the test can change while it runs
//! ([`Replicated::set_apply_delay`]), stop and start. Both are stopped and
//! their directory removed on drop.
//!
//! The binaries are the machine's PostgreSQL server's (`initdb` on `PATH`,
//! else the newest `/usr/lib/postgresql/*/bin`); when run as root they run
//! as the `postgres` user (PostgreSQL refuses root). Missing binaries are a
//! test failure with a message saying so, never a skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use deadpool_postgres::tokio_postgres::{self, Client, NoTls};

use crate::files::ScratchDir;
use crate::redis::free_port;
use crate::wait::WAIT;

/// A primary and its streaming replica.
pub struct Replicated {
    pub primary_port: u16,
    pub replica_port: u16,
    bin: PathBuf,
    dir: ScratchDir,
    /// Run as `postgres` (the tests run as root).
    as_postgres: bool,
}

/// The directory of `initdb` and `pg_ctl`.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CACHEFENCE_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    if let Some(path) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| dir.join("initdb").is_file())
        // Its own directory (a link on PATH may stand alone there).
        .and_then(|dir| std::fs::canonicalize(dir.join("initdb")).ok())
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .filter(|dir| dir.join("pg_basebackup").is_file())
    {
        return path;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "PostgreSQL's server binaries (initdb, pg_ctl, pg_basebackup) were not found on PATH or in \
             /usr/lib/postgresql/*/bin; the replica-lag tests start a primary and a replica of their own \
             (apt-get install postgresql, or set CACHEFENCE_TEST_PG_BIN)"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

impl Replicated {
    /// Starts a primary and a replica that applies each change
    /// `apply_delay` after its commit.
    pub fn start(apply_delay: Duration) -> Replicated {
        let bin = bin_dir();
        let as_postgres = is_root();
        let dir = ScratchDir::new("pg-replicated");
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .expect("running chown");
            assert!(status.success(), "chown -R postgres {}", dir.path().display());
        }
        let pg = Replicated {
            primary_port: free_port(),
            replica_port: free_port(),
            bin,
            dir,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data("primary"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        pg.ctl_start("primary", pg.primary_port);
        let primary_port = pg.primary_port.to_string();
        pg.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary_port,
                "-U",
                "postgres",
                "-D",
                &pg.data("replica"),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        pg.write_apply_delay(apply_delay);
        pg.ctl_start("replica", pg.replica_port);
        pg
    }

    /// Sets `recovery_min_apply_delay` in the replica's
    /// `postgresql.auto.conf` (not on the command line, which a reload
    /// could not override).
    fn write_apply_delay(&self, delay: Duration) {
        let path = self.dir.file("replica").join("postgresql.auto.conf");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with("recovery_min_apply_delay"))
            .map(str::to_string)
            .collect();
        lines.push(format!("recovery_min_apply_delay = '{}ms'", delay.as_millis()));
        std::fs::write(&path, lines.join("\n") + "\n")
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    fn data(&self, name: &str) -> String {
        self.dir.file_str(name)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.as_postgres {
            true => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            }
            false => Command::new(path),
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        let output = self.command(program).args(args).output();
        succeeded(&format!("{program} {args:?}"), output)
    }

    fn options(&self, port: u16) -> String {
        format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.dir.path().display()
        )
    }

    fn ctl_start(&self, name: &str, port: u16) {
        let options = self.options(port);
        let log = self.dir.file_str(&format!("{name}.log"));
        let wait = WAIT.as_secs().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(name),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                &wait,
                "start",
            ],
        );
    }

    fn url(port: u16) -> String {
        format!("postgres://postgres@127.0.0.1:{port}/postgres")
    }

    pub fn primary_url(&self) -> String {
        Self::url(self.primary_port)
    }

    pub fn replica_url(&self) -> String {
        Self::url(self.replica_port)
    }

    pub async fn primary(&self) -> Client {
        connect(&self.primary_url()).await
    }

    pub async fn replica(&self) -> Client {
        connect(&self.replica_url()).await
    }

    /// Changes the replica's `recovery_min_apply_delay` (a reload: the
    /// replica keeps streaming).
    pub async fn set_apply_delay(&self, delay: Duration) {
        self.write_apply_delay(delay);
        self.run_off_runtime("pg_ctl", &["-D", &self.data("replica"), "reload"])
            .await;
    }

    /// Stops the replica (fast shutdown).
    pub async fn stop_replica(&self) {
        self.run_off_runtime(
            "pg_ctl",
            &["-D", &self.data("replica"), "-m", "fast", "-w", "stop"],
        )
        .await;
    }

    /// Starts the replica again, with no apply delay.
    pub async fn start_replica(&self) {
        self.write_apply_delay(Duration::ZERO);
        let options = self.options(self.replica_port);
        let log = self.dir.file_str("replica.log");
        let wait = WAIT.as_secs().to_string();
        let data = self.data("replica");
        self.run_off_runtime(
            "pg_ctl",
            &[
                "-D", &data, "-o", &options, "-l", &log, "-w", "-t", &wait, "start",
            ],
        )
        .await;
    }

    /// [`Replicated::run`] on a blocking thread: the runtime's threads keep
    /// serving the proxy and its lag monitor meanwhile.
    async fn run_off_runtime(&self, program: &str, args: &[&str]) {
        let mut command = self.command(program);
        command.args(args);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("the blocking task ran");
        succeeded(&format!("{program} {args:?}"), output);
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// The output of `what`, which must have run and exited 0.
fn succeeded(what: &str, output: std::io::Result<Output>) -> Output {
    let output = output.unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A connection to `url`, or a failure naming it.
pub async fn connect(url: &str) -> Client {
    let connecting = tokio_postgres::connect(url, NoTls);
    let (client, connection) = match tokio::time::timeout(WAIT, connecting).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => panic!("PostgreSQL at {url} is unreachable: {e}"),
        Err(_) => panic!("PostgreSQL at {url} did not answer within {WAIT:?}"),
    };
    tokio::spawn(connection);
    client
}

impl Drop for Replicated {
    fn drop(&mut self) {
        for name in ["replica", "primary"] {
            let _ = self
                .command("pg_ctl")
                .args(["-D", &self.data(name), "-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
