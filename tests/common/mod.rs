//! Shared test server: one real memex (mistralrs engine) per test binary, on the tiny random
//! Qwen3 that `memex::tiny_model` writes into a temp dir. It runs on its own thread and runtime so
//! that it outlives each `#[tokio::test]`'s runtime.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::Parser;
use memex::config::{Cli, Command};

pub struct TestServer {
    pub base: String,
    pub model_dir: std::path::PathBuf,
}

/// Output bounds small enough that a random model's worst case stays quick.
pub const MAX_ITEMS: usize = 2;
pub const MAX_TEXT_CHARS: usize = 16;
pub const MAX_LABEL_CHARS: usize = 8;
pub const MAX_INPUT_TOKENS: usize = 2000;

static SERVER: OnceLock<TestServer> = OnceLock::new();

pub fn tiny_model_dir() -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        memex::tiny_model::write(d.path(), 42).expect("write tiny model");
        d
    });
    dir.path().to_path_buf()
}

pub fn server() -> &'static TestServer {
    SERVER.get_or_init(|| {
        let model_dir = tiny_model_dir();
        let cli = Cli::try_parse_from([
            "memex".to_string(),
            "serve".into(),
            "--model".into(),
            model_dir.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            "0".into(),
            "--max-items".into(),
            MAX_ITEMS.to_string(),
            "--max-text-chars".into(),
            MAX_TEXT_CHARS.to_string(),
            "--max-label-chars".into(),
            MAX_LABEL_CHARS.to_string(),
            "--max-tags".into(),
            "2".into(),
            "--max-input-tokens".into(),
            MAX_INPUT_TOKENS.to_string(),
            "--max-body-bytes".into(),
            "65536".into(),
        ])
        .expect("cli");
        let Command::Serve(args) = cli.command else {
            unreachable!()
        };
        memex::telemetry::init(false);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let running = memex::server::start(args).await.expect("server starts");
                tx.send(running.addr).unwrap();
                if let Err(e) = running.task.await.expect("server task") {
                    panic!("server failed: {e:#}");
                }
            });
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server bound");
        let base = format!("http://{addr}");
        // Tests call this from inside their own runtime: poll from a plain thread.
        let poll = base.clone();
        std::thread::spawn(move || wait_ready(&poll))
            .join()
            .expect("server ready");
        TestServer { base, model_dir }
    })
}

fn wait_ready(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("{base}/health")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

pub async fn post_json(
    path: &str,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    post_raw(path, serde_json::to_vec(body).unwrap()).await
}

pub async fn post_raw(
    path: &str,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let s = server();
    let r = reqwest::Client::new()
        .post(format!("{}{path}", s.base))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
    (status, headers, json)
}
