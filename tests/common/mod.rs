//! Shared test servers: real memex (the native engine) on the tiny random Qwen3 that
//! `memex::tiny_model` writes into a temp dir. Each runs on its own thread and runtime so that it
//! outlives each `#[tokio::test]`'s runtime. [`server`] is the one default server of a test
//! binary; [`spawn`] starts one with its own flags.
#![allow(dead_code)]

pub mod binary;
pub mod openapi;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use memex::config::{Cli, Command};

pub struct TestServer {
    pub base: String,
    /// Base URL of `/metrics` (the API base unless `--metrics-port` was given).
    pub metrics_base: String,
    pub model_dir: PathBuf,
    pub state: memex::api::AppState,
    /// Keeps the key file alive as long as the server.
    _keys: Option<Arc<tempfile::TempDir>>,
}

/// Output bounds small enough that a random model's worst case stays quick.
pub const MAX_ITEMS: usize = 2;
pub const MAX_TEXT_CHARS: usize = 16;
pub const MAX_LABEL_CHARS: usize = 8;
pub const MAX_INPUT_TOKENS: usize = 2000;

/// The key of the default server; it has no rate limits.
pub const TEST_KEY: &str = "memex-test-key-4f1c9a";

static SERVER: OnceLock<TestServer> = OnceLock::new();

pub fn tiny_model_dir() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        memex::tiny_model::write(d.path(), 42).expect("write tiny model");
        d
    });
    dir.path().to_path_buf()
}

/// Flags every test server shares: loopback, any free port, small output bounds.
pub fn base_args(model_dir: &Path) -> Vec<String> {
    [
        "--model",
        &model_dir.display().to_string(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-items",
        &MAX_ITEMS.to_string(),
        "--max-text-chars",
        &MAX_TEXT_CHARS.to_string(),
        "--max-label-chars",
        &MAX_LABEL_CHARS.to_string(),
        "--max-tags",
        "2",
        "--max-body-bytes",
        "65536",
    ]
    .map(String::from)
    .to_vec()
}

/// Set `--name value` in `args`, replacing the value when the flag is already there (clap refuses
/// a flag given twice).
pub fn set_flag(args: &mut Vec<String>, name: &str, value: &str) {
    match args.iter().position(|a| a == name) {
        Some(i) => args[i + 1] = value.to_string(),
        None => args.extend([name.to_string(), value.to_string()]),
    }
}

/// The default server: key auth with [`TEST_KEY`] (no rate limits), input limit
/// [`MAX_INPUT_TOKENS`], admission wide enough never to turn a test away.
pub fn server() -> &'static TestServer {
    SERVER.get_or_init(|| {
        let mut args = base_args(&tiny_model_dir());
        // Room for every concurrent test of a binary: these tests are about answers, not load.
        args.extend(
            [
                "--max-input-tokens",
                &MAX_INPUT_TOKENS.to_string(),
                "--max-concurrent",
                "16",
                "--queue-timeout",
                "600",
                // Queued behind the adaptive limit rather than refused for the wait.
                "--max-slot-wait",
                "600",
            ]
            .map(String::from),
        );
        spawn_with_keys(args, &format!("{TEST_KEY} rps=0 tpm=0\n"))
    })
}

/// A server with a key file of the given content.
pub fn spawn_with_keys(mut args: Vec<String>, key_file: &str) -> TestServer {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keys");
    std::fs::write(&path, key_file).expect("write key file");
    args.extend(["--api-keys".into(), path.display().to_string()]);
    let mut s = spawn(args);
    s._keys = Some(Arc::new(dir));
    s
}

/// Start a server with exactly these `memex serve` flags and wait until it is ready.
pub fn spawn(args: Vec<String>) -> TestServer {
    let mut argv = vec!["memex".to_string(), "serve".into()];
    argv.extend(args);
    let cli = Cli::try_parse_from(argv).expect("cli");
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let model_dir = args.extractor.model.clone();
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
            tx.send((running.addr, running.metrics_addr, running.state.clone()))
                .unwrap();
            if let Err(e) = running.task.await.expect("server task") {
                panic!("server failed: {e:#}");
            }
        });
    });
    let (addr, metrics_addr, state) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server bound");
    let base = format!("http://{addr}");
    let metrics_base = metrics_addr
        .map(|a| format!("http://{a}"))
        .unwrap_or_else(|| base.clone());
    // Tests call this from inside their own runtime: poll from a plain thread.
    let poll = base.clone();
    std::thread::spawn(move || wait_ready(&poll))
        .join()
        .expect("server ready");
    TestServer {
        base,
        metrics_base,
        model_dir,
        state,
        _keys: None,
    }
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
            if let Ok(r) = client.get(format!("{base}/health/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "server never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

/// Status, headers and JSON body of one response.
pub type Answer = (u16, reqwest::header::HeaderMap, serde_json::Value);

pub async fn post_json(path: &str, body: &serde_json::Value) -> Answer {
    post_raw(path, serde_json::to_vec(body).unwrap()).await
}

/// POST to the default server with [`TEST_KEY`].
pub async fn post_raw(path: &str, body: Vec<u8>) -> Answer {
    post(&server().base, path, Some(TEST_KEY), body).await
}

/// POST with `Authorization: Token <key>` when a key is given.
pub async fn post(base: &str, path: &str, key: Option<&str>, body: Vec<u8>) -> Answer {
    post_with_auth(
        base,
        path,
        key.map(|k| format!("Token {k}")).as_deref(),
        body,
    )
    .await
}

/// POST with this exact `Authorization` header value, or none.
pub async fn post_with_auth(
    base: &str,
    path: &str,
    authorization: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let mut request = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(600));
    if let Some(a) = authorization {
        request = request.header("authorization", a);
    }
    let r = request.send().await.expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
    (status, headers, json)
}

pub async fn get(url: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.expect("body"))
}

/// The value of one series in a Prometheus text exposition, e.g.
/// `metric(&text, "memex_rejections_total{reason=\"auth\"}")`; labels as the encoder writes them
/// (sorted by name).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

pub async fn scrape(s: &TestServer) -> String {
    let (status, _, text) = get(&format!("{}/metrics", s.metrics_base)).await;
    assert_eq!(status, 200);
    text
}

/// A one-message dialogue of exactly `n` input tokens on the tiny model (one token per byte).
pub fn dialogue_of_tokens(n: usize) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": "x".repeat(n)}])
}

pub fn header_f64(headers: &reqwest::header::HeaderMap, name: &str) -> f64 {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} missing"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("header {name}: {e}"))
}
