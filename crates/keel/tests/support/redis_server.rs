//! A throwaway `redis-server` on a free loopback port, for tests that need
//! a real Redis. It runs without persistence and is killed on drop.
//! `scripts/test` installs Debian's `redis-server` when it is missing; a
//! test never skips for lack of one.

// Each user (tests, benches) takes what it needs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a port nobody holds. A port taken between the
    /// pick and the server's bind (tests run in parallel) makes the server
    /// exit; another port is tried then.
    pub fn start() -> RedisServer {
        let mut why = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            let mut server = RedisServer {
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                child: None,
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => why = e,
            }
        }
        panic!("redis-server did not start on five free ports; last: {why}");
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Kills the server (its data is gone: nothing is persisted).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        let mut why = String::new();
        for _ in 0..5 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => why = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on {}: {why}", self.addr);
    }

    /// Runs redis-server on `self.addr` until it answers PING, or says why
    /// it did not (it exited, or it did not answer within 10 s).
    fn spawn(&mut self) -> Result<(), String> {
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            // Warnings only, so the unread pipe never fills.
            .args(["--loglevel", "warning"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test installs Debian's redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.answers_as(child.id()) {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut said = String::new();
                if let Some(mut out) = child.stdout.take() {
                    let _ = out.read_to_string(&mut said);
                }
                return Err(format!(
                    "exited ({status}) on {}: {}",
                    self.addr,
                    said.trim()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer on {} within 10 s", self.addr));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the server on `self.addr` is the process `pid` (not
    /// another test's server that took the port first).
    fn answers_as(&self, pid: u32) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        if stream.write_all(b"INFO server\r\n").is_err() {
            return false;
        }
        let want = format!("process_id:{pid}\r\n");
        let mut said = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            said.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&said);
            if text.contains(&want) {
                return true;
            }
            if text.contains("process_id:") && text.contains("\r\nrun_id:") {
                return false;
            }
        }
        false
    }

    /// Runs one command (inline protocol) and returns the raw reply.
    pub fn command(&self, line: &str) -> String {
        let mut stream = TcpStream::connect(self.addr).expect("connect to redis");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
