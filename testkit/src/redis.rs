//! Scratch `redis-server` processes on free loopback ports, one per test.
//!
//! A missing `redis-server` is a test failure with a clear message, never a
//! skip.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::frame_len;
use crate::files::ScratchDir;
use crate::wait::WAIT;

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
    dir: ScratchDir,
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

    /// Starts `redis-server` on `port` with `args`; `None` if the port was
    /// taken.
    pub fn try_start_on(port: u16, args: &[&str]) -> Option<RedisServer> {
        Self::try_start(port, args)
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
        // One directory per start (tempfile names it): a server stopped on
        // the same port (ports are reused) removes its own directory, never
        // this one's log.
        let dir = ScratchDir::new(&format!("redis-{port}"));
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
        let log = self.dir.file("redis.log");
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
            .arg(self.dir.path())
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
        // The scratch directory goes with `self.dir`.
        self.kill();
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
