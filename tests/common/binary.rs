//! The real `memex` binary as a child process, for tests of connection behaviour: its address
//! (from the "listening" log line), its output, readiness, and raw sockets to it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Binary {
    pub child: Child,
    output: Arc<Mutex<Vec<String>>>,
    pub addr: String,
    pub base: String,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// `memex serve` with these flags (and JSON logs), a key file when given, extra environment;
    /// returns once it listens (not ready: see [`Binary::wait_ready`]).
    pub fn start(args: &[String], key_file: Option<&str>, env: &[(&str, &str)]) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_memex"));
        cmd.arg("serve").args(args).arg("--log-json");
        if let Some(keys) = key_file {
            let path = dir.path().join("keys");
            std::fs::write(&path, keys).unwrap();
            cmd.arg("--api-keys").arg(path);
        }
        cmd.env("RUST_LOG", "info")
            .env_remove("MEMEX_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("memex binary starts");
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().unwrap(), output.clone());
        collect(child.stderr.take().unwrap(), output.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            let found = output.lock().unwrap().iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["fields"]["message"] == "listening; loading model")
                    .then(|| v["fields"]["addr"].as_str().map(str::to_owned))
                    .flatten()
            });
            if let Some(addr) = found {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("memex exited with {status}: {:?}", output.lock().unwrap());
            }
            assert!(Instant::now() < deadline, "no listening line");
            std::thread::sleep(Duration::from_millis(5));
        };
        Binary {
            child,
            output,
            base: format!("http://{addr}"),
            addr,
            _dir: dir,
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while super::get(&format!("{}/health/ready", self.base)).await.0 != 200 {
            assert!(
                Instant::now() < deadline,
                "never ready: {}",
                self.all_output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn connect(&self) -> TcpStream {
        TcpStream::connect(&self.addr).await.expect("connect")
    }

    pub fn all_output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn json_lines(&self) -> Vec<Value> {
        let lines = self.output.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A series' value; 0 when it does not exist yet (labelled series appear on first use).
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, _, text) = super::get(&format!("{}/metrics", self.base)).await;
        super::metric(&text, series).unwrap_or(0.0)
    }

    /// Wait for the process to exit; its exit status and how long that took.
    pub async fn exit(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            assert!(
                started.elapsed() < limit,
                "still running after {limit:?}: {}",
                self.all_output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn collect(stream: impl std::io::Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            into.lock().unwrap().push(line);
        }
    });
}

/// Read until the server closes the connection (or `limit` passes: then `None`). What was read,
/// and when the close came.
pub async fn read_until_closed(
    s: &mut (impl AsyncReadExt + Unpin),
    limit: Duration,
) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((out, started.elapsed())),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Status line and body (the part after the head) of a raw HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> (u16, String, Value) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_string(), json)
}

/// Write `bytes` one at a time, `every` apart, until done or the server closes.
pub async fn trickle(s: &mut (impl AsyncWriteExt + Unpin), bytes: &[u8], every: Duration) {
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() {
            return;
        }
        tokio::time::sleep(every).await;
    }
}
