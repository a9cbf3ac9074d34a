//! The proxy under test, in the three ways the tests run it: [`Proxy`] in
//! process (its `App` at hand), [`ProxyProcess`] as a child process (the
//! built binary: signals, kills, restarts, resource limits, its log, its
//! `/proc` figures), and [`cachefence_command`] for one-shot subcommands
//! (`--check`, `pg install`, `audit`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tempfile::NamedTempFile;

use cachefence::config::{Config, Settings};
use cachefence::server::Server;
// The proxy's shared state, as `Server::context` returns it: the one place
// the harness names its type.
use cachefence::app::App;

use crate::redis::free_port;
use crate::wait::WAIT;

/// Every key fenced, SETs that are not fills stored (`on_write = "write"`):
/// the mode the race tests and the proto-tests' "fences on" run in, so
/// that a SET then a GET answers as Redis does. Nothing is fenced by
/// default; a test that wants the defaults of a declared cache writes its
/// own `[[cache]]` section.
pub const FENCE_EVERY_KEY: &str = "[[cache]]\npattern = \"*\"\non_write = \"write\"\n";

/// The proxy running in-process on an ephemeral port.
pub struct Proxy {
    pub addr: SocketAddr,
    pub ctx: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream` with `toml` settings on top.
    pub async fn start(upstream: &str, toml: &str) -> Proxy {
        let mut settings: Settings = cachefence::config::parse_settings(toml).expect("test settings parse");
        settings.listen.get_or_insert_with(|| "127.0.0.1:0".to_string());
        settings
            .upstream
            .get_or_insert_with(|| upstream.parse().expect("test upstream parses"));
        let config = Config::resolve(settings, None).expect("test config is valid");
        Proxy::serve(config).await
    }

    /// Starts a proxy from the config file `path` (the way `--config`
    /// does), listening on a free port: a reload re-reads that file.
    pub async fn start_file(path: &std::path::Path) -> Proxy {
        let flags = Settings {
            listen: Some("127.0.0.1:0".to_string()),
            ..Default::default()
        };
        let config = Config::load(Some(path), flags).expect("test config file is valid");
        Proxy::serve(config).await
    }

    async fn serve(config: Config) -> Proxy {
        let server = Server::bind(config).await.expect("binding the proxy");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let addr = server.local_addr();
        let ctx = server.context();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Proxy {
            addr,
            ctx,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits for the server to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT * 2, task)
                .await
                .expect("proxy shut down in time")
                .expect("proxy task")
                .expect("proxy run");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The built `cachefence` binary.
///
/// Cargo builds the binary of the package for its integration tests and
/// tells them where it is in `CARGO_BIN_EXE_cachefence`, at compile time
/// (`env!`, which a library such as this one does not get) and, when
/// `cargo test` runs them, in their environment: that is used first. A test
/// executable run by hand (`target/debug/deps/config-<hash>`) has no such
/// variable; the binary is then where Cargo put it for that same build,
/// next to the `deps/` directory holding the test executable
/// (`target/<profile>/cachefence`, also under `--target <triple>` or a
/// custom `CARGO_TARGET_DIR`). A binary that is not there fails the test
/// with a message saying so.
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("CARGO_BIN_EXE_cachefence") {
                return PathBuf::from(path);
            }
            let test = std::env::current_exe().expect("the test executable's path");
            let profile = test
                .parent()
                .filter(|deps| deps.ends_with("deps"))
                .and_then(|deps| deps.parent())
                .unwrap_or_else(|| {
                    panic!(
                        "{} is not in a Cargo `deps/` directory: cannot find the cachefence binary \
                         (run the tests with `cargo test`)",
                        test.display()
                    )
                });
            let binary = profile.join(format!("cachefence{}", std::env::consts::EXE_SUFFIX));
            assert!(
                binary.is_file(),
                "no cachefence binary at {} (`cargo test` builds it for the integration tests)",
                binary.display()
            );
            binary
        })
        .clone()
}

/// `cachefence` as a one-shot command (`--check`, `pg install`, `audit`):
/// the caller adds the arguments and runs it.
pub fn cachefence_command() -> Command {
    Command::new(binary())
}

/// The soft limit on open files (RLIMIT_NOFILE) a [`ProxyProcess`] starts
/// with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nofile {
    /// Raised to the hard limit.
    Hard,
    /// This many.
    Soft(u64),
}

/// The `cachefence` binary run as a process of its own (signals, kills,
/// restarts, its log, its resource use), listening on `port`; killed on
/// drop.
pub struct ProxyProcess {
    child: Child,
    pub port: u16,
    pub pid: u32,
    args: Vec<String>,
    nofile: Option<Nofile>,
    /// Its stderr; removed on drop.
    log: NamedTempFile,
}

impl ProxyProcess {
    /// `cachefence --listen 127.0.0.1:<free port> <args>`, once it listens.
    pub fn start(args: &[&str]) -> ProxyProcess {
        ProxyProcess::start_on(free_port(), owned(args), None)
    }

    /// The same with its soft RLIMIT_NOFILE set to `nofile`, through
    /// `sh -c 'ulimit -n ...; exec ...'` (a failing `ulimit` exits 97).
    pub fn start_with_nofile(args: &[&str], nofile: Nofile) -> ProxyProcess {
        ProxyProcess::start_on(free_port(), owned(args), Some(nofile))
    }

    fn start_on(port: u16, args: Vec<String>, nofile: Option<Nofile>) -> ProxyProcess {
        let log = tempfile::Builder::new()
            .prefix(&format!("cachefence-test-{port}-"))
            .suffix(".log")
            .tempfile()
            .expect("creating the proxy's log file");
        let stderr = log.reopen().expect("opening the proxy's log file");
        let mut command = match nofile {
            None => Command::new(binary()),
            Some(limit) => {
                let limit = match limit {
                    Nofile::Hard => "hard".to_string(),
                    Nofile::Soft(n) => n.to_string(),
                };
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(r#"l=$1; shift; [ "$l" = hard ] && l=$(ulimit -H -n); ulimit -n "$l" || exit 97; exec "$@""#)
                    .args(["sh", &limit])
                    .arg(binary());
                sh
            }
        };
        let child = command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting cachefence");
        let pid = child.id();
        let mut proxy = ProxyProcess {
            child,
            port,
            pid,
            args,
            nofile,
            log,
        };
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            proxy.assert_running();
            assert!(
                Instant::now() < deadline,
                "cachefence did not start listening: {}",
                proxy.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What it wrote to stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// Sends a signal (`-HUP`, `-STOP`, …) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.pid.to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {name} {}", self.pid);
    }

    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("polling the proxy") {
            panic!("cachefence exited ({status}): {}", self.logs());
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (at most `WAIT`) for it to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the proxy") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cachefence did not exit: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills it and starts it again on the same port with the same arguments
    /// and limits.
    pub fn restart(&mut self) {
        self.kill();
        *self = ProxyProcess::start_on(self.port, self.args.clone(), self.nofile);
    }

    /// Its resident memory (VmRSS of `/proc/<pid>/status`), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    /// How many file descriptors it has open (`/proc/<pid>/fd`).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("reading /proc/<pid>/fd of the proxy")
            .count()
    }

    /// User plus system CPU time, in clock ticks (1/100 s on Linux).
    pub fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).expect("reading /proc/<pid>/stat");
        let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..].split(' ').collect();
        // Fields 14 and 15 of stat(5); fields[0] is field 3.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// The soft limit on open files it runs with (`/proc/<pid>/limits`).
    pub fn nofile(&self) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("a Max open files line");
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // The log file goes with `self.log`.
        self.kill();
    }
}

/// The resident memory (VmRSS) of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc/<pid>/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// The value of an `INFO`-style line `<field>:<value>` of `info` (Redis'
/// `INFO`, `CACHE.INFO`).
pub fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
}

/// [`info_field`] as a number.
pub fn info_number(info: &str, field: &str) -> Option<u64> {
    info_field(info, field)?.parse().ok()
}
