//! Test harness shared by the integration tests and the proto-tests runner:
//! scratch `redis-server` processes on free loopback ports, the proxy run
//! in-process, and a raw RESP client that reads whole frames.
//!
//! A missing `redis-server` is a test failure with a clear message, never a
//! skip.
#![allow(dead_code)]

pub mod pg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use cachefence::app::App as Context;
use cachefence::config::{Config, Settings};
use cachefence::server::Server;

/// How long any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it holds, for at most `WAIT`.
pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(what, WAIT, check).await
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
pub async fn eventually_within(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a redis-server log says the server accepts connections.
fn says_ready(log: &[u8]) -> bool {
    log.windows(b"Ready to accept connections".len())
        .any(|w| w == b"Ready to accept connections")
}

/// A free loopback port (bound once, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding an ephemeral loopback port")
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch `redis-server` owned by one test; killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts `redis-server` with extra `--name value` arguments.
    pub fn start_with(args: &[&str]) -> RedisServer {
        Self::start_on_with(free_port(), args)
    }

    /// Starts `redis-server` on a given port.
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_on_with(port, &[])
    }

    /// Starts `redis-server` on `port`; when the port was taken meanwhile
    /// (`free_port` releases it before the server binds it), on another free
    /// port unless the caller asked for this one.
    fn start_on_with(port: u16, args: &[&str]) -> RedisServer {
        Self::try_start(port, args).unwrap_or_else(|| {
            (0..5)
                .find_map(|_| Self::try_start(free_port(), args))
                .expect("redis-server could not bind a free loopback port in 6 attempts")
        })
    }

    fn try_start(port: u16, args: &[&str]) -> Option<RedisServer> {
        // One directory per start: a server stopped on the same port (ports
        // are reused) removes its own directory, never this one's log.
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("cachefence-test-redis-{}-{port}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating a scratch dir for redis-server");
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn().then_some(server)
    }

    /// Spawns the server; false if it could not bind its port.
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let log = self.dir.join("redis.log");
        // Restarts append to the same log: only what this start writes counts.
        let logged = std::fs::metadata(&log).map_or(0, |m| m.len() as usize);
        let mut command = Command::new("redis-server");
        command
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--enable-debug-command", "yes"])
            .arg("--logfile")
            .arg(&log)
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start `redis-server` ({e}). The tests need Redis 7 installed: \
                 `apt-get install -y redis-server`, or run `bash scripts/test.sh`, which installs it."
            )
        });
        self.child = Some(child);
        self.wait_ready(&log, logged)
    }

    /// Waits until our child says in its log that it accepts connections;
    /// false if it exited first (the port was taken). Nothing connects before
    /// that, so a server of someone else's that holds the port (another
    /// test's) never sees a connection from here. Then exactly one
    /// connection checks the pid (`INFO server`), so the client ids tests
    /// see do not depend on how long start-up took.
    fn wait_ready(&mut self, log: &std::path::Path, logged: usize) -> bool {
        use std::io::{Read, Write};
        let deadline = Instant::now() + WAIT;
        let pid = self.child.as_ref().expect("spawned").id();
        loop {
            if self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some()
            {
                self.child = None;
                return false;
            }
            let text = std::fs::read(log).unwrap_or_default();
            if says_ready(text.get(logged..).unwrap_or_default()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} not ready within {WAIT:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut reply = Vec::new();
        // A listener that resets the connection is not our server either.
        let written = stream.write_all(b"INFO server\r\n").is_ok();
        let mut chunk = [0u8; 4096];
        // `$<len>\r\n...\r\n` or an error line; read until complete.
        while written && frame_len(&reply).is_none() {
            match stream.read(&mut chunk) {
                Ok(n) if n > 0 => reply.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        let reply = String::from_utf8_lossy(&reply);
        if reply.contains(&format!("process_id:{pid}\r\n")) {
            return true;
        }
        if reply.starts_with("-NOAUTH") {
            // INFO needs the password; but redis-server exits at once when it
            // cannot bind, so if our child still runs a moment later, the
            // port (and the server that answered) is ours.
            std::thread::sleep(Duration::from_millis(100));
            if self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_none()
            {
                return true;
            }
            self.child = None;
            return false;
        }
        // Someone else's server holds the port; ours will exit.
        let _ = self.child.take().map(|mut c| {
            let _ = c.kill();
            c.wait()
        });
        false
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory: empty,
    /// unless it was started with persistence (`--appendonly yes`).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server could not bind port {} again",
            self.port
        );
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("server running").id().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.signal_quietly();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisServer {
    fn signal_quietly(&self) -> std::io::Result<()> {
        // A paused server must be resumed to die cleanly.
        let pid = self
            .child
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default();
        Command::new("kill")
            .args(["-CONT", &pid])
            .stderr(Stdio::null())
            .status()
            .map(|_| ())
    }
}

/// The proxy running in-process on an ephemeral port.
pub struct Proxy {
    pub addr: SocketAddr,
    pub ctx: std::sync::Arc<Context>,
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

/// The `cachefence` binary run as a process of its own (signals, kills,
/// restarts, its log), listening on `port`; killed on drop.
pub struct ProxyProcess {
    child: Child,
    pub port: u16,
    pub pid: u32,
    args: Vec<String>,
    /// Soft RLIMIT_NOFILE it runs with (`"hard"`: the hard limit), if set.
    nofile: Option<String>,
    log: PathBuf,
}

impl ProxyProcess {
    /// `cachefence --listen 127.0.0.1:<free port> <args>`, once it listens.
    pub fn start(args: &[&str]) -> ProxyProcess {
        ProxyProcess::start_with_nofile(args, None)
    }

    /// The same with its soft RLIMIT_NOFILE set to `nofile` (a number, or
    /// `"hard"` for the hard limit) through `sh -c 'ulimit -n ...; exec ...'`.
    pub fn start_with_nofile(args: &[&str], nofile: Option<String>) -> ProxyProcess {
        ProxyProcess::start_on(free_port(), args.iter().map(|a| a.to_string()).collect(), nofile)
    }

    fn start_on(port: u16, args: Vec<String>, nofile: Option<String>) -> ProxyProcess {
        static STARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("cachefence-test-{}-{port}-{n}.log", std::process::id()));
        let stderr = std::fs::File::create(&log).expect("creating the proxy's log file");
        let mut command = match &nofile {
            None => Command::new(env!("CARGO_BIN_EXE_cachefence")),
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(r#"l=$1; shift; [ "$l" = hard ] && l=$(ulimit -H -n); ulimit -n "$l" || exit 97; exec "$@""#)
                    .args(["sh", limit, env!("CARGO_BIN_EXE_cachefence")]);
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
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

    /// Kills it and starts it again on the same port with the same arguments.
    pub fn restart(&mut self) {
        self.kill();
        *self = ProxyProcess::start_on(self.port, self.args.clone(), self.nofile.clone());
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Encodes a command as a multibulk request.
pub fn cmd(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Same, from a whitespace-separated string (no quoting).
pub fn cmds(line: &str) -> Vec<u8> {
    let args: Vec<&[u8]> = line.split_whitespace().map(str::as_bytes).collect();
    cmd(&args)
}

/// A raw client that sends bytes and reads whole RESP frames.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: impl tokio::net::ToSocketAddrs) -> RawClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn from_stream(stream: TcpStream) -> RawClient {
        let _ = stream.set_nodelay(true);
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to server");
    }

    /// Sends a command and returns its reply, or `None` if the connection
    /// failed or no reply came within `timeout` (for clients that expect
    /// faults).
    pub async fn call_within(&mut self, line: &str, timeout: Duration) -> Option<String> {
        self.stream.write_all(&cmds(line)).await.ok()?;
        let frame = self.read_frame_within(timeout).await?;
        Some(String::from_utf8_lossy(&frame).into_owned())
    }

    /// Reads one complete frame (its raw bytes), or `None` on EOF or if none
    /// completes within `timeout`.
    pub async fn read_frame_within(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(len) = frame_len(&self.buf) {
                return Some(self.buf.drain(..len).collect());
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads one frame or panics.
    pub async fn read_frame(&mut self) -> Vec<u8> {
        match self.read_frame_within(WAIT).await {
            Some(frame) => frame,
            None => panic!(
                "no complete reply within {WAIT:?}; buffered: {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Sends a command and returns its reply as text (lossy).
    pub async fn call(&mut self, line: &str) -> String {
        self.send(&cmds(line)).await;
        String::from_utf8_lossy(&self.read_frame().await).into_owned()
    }

    /// Reads until EOF (bounded by `WAIT`), returning everything unread.
    pub async fn read_to_close(&mut self) -> (Vec<u8>, bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
                Err(_) => return (out, false),
            }
        }
    }

    /// Whatever arrives within `wait` (expected: nothing).
    pub async fn read_quiet(&mut self, wait: Duration) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(wait, self.stream.read(&mut chunk)).await {
            out.extend_from_slice(&chunk[..n]);
        }
        out
    }
}

/// Length of the first complete RESP2/RESP3 frame in `buf`. Deliberately
/// independent of the proxy's own scanner.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    walk(buf, 0)
}

fn walk(buf: &[u8], pos: usize) -> Option<usize> {
    let line_end = pos + buf.get(pos..)?.windows(2).position(|w| w == b"\r\n")?;
    let body = std::str::from_utf8(&buf[pos + 1..line_end]).ok()?;
    let next = line_end + 2;
    match buf[pos] {
        b'$' | b'!' | b'=' => match body.parse::<i64>().ok()? {
            -1 => Some(next),
            n => {
                let end = next + n as usize + 2;
                (buf.len() >= end).then_some(end)
            }
        },
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n: i64 = body.parse().ok()?;
            let items = if matches!(buf[pos], b'%' | b'|') {
                n * 2
            } else {
                n.max(0)
            };
            let mut at = next;
            for _ in 0..items {
                at = walk(buf, at)?;
            }
            if buf[pos] == b'|' { walk(buf, at) } else { Some(at) }
        }
        _ => Some(next),
    }
}

/// Bytes as a readable, unambiguous string (`\r\n` and non-printables escaped).
pub fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
