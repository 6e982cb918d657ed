//! The real `memex` binary: readiness before and after warm-up, SIGTERM/SIGINT drains and exits 0,
//! the drain timeout bounds the exit, one JSON log line per request (never a key), and auth that
//! is off only when asked for.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::binary::Binary;
use common::openapi::Spec;
use common::{base_args, set_flag, tiny_model_dir};
use memex::limits::KeyHash;
use serde_json::{json, Value};

/// The secret logged key hashes are computed under.
const HASH_SECRET: &str = "lifecycle-hash-secret";

/// `memex serve` with JSON logs and key hashes under [`HASH_SECRET`]; returns once it listens.
fn start(args: Vec<String>, key_file: Option<&str>) -> Binary {
    Binary::start(
        &args,
        key_file,
        &[
            ("RUST_LOG", "info,mistralrs_core=warn,mistralrs=warn"),
            ("MEMEX_KEY_HASH_SECRET", HASH_SECRET),
        ],
    )
}

fn signal(s: &Binary, name: &str) {
    let ok = Command::new("kill")
        .args([format!("-{name}"), s.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{name}");
}

/// Waits until one request generates and at least `queued` wait behind it.
async fn wait_for_backlog(s: &Binary, queued: f64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.metric("memex_in_flight_requests").await < 1.0
        || s.metric("memex_queued_requests").await < queued
    {
        assert!(Instant::now() < deadline, "no backlog formed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn extract_body(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "messages": [{"role": "user", "content": format!("Request {i}: I run every morning and I like oolong tea.")}],
        "extraction_types": ["memory"]
    }))
    .unwrap()
}

/// A request that may find the server gone: the status, or None for a connection error.
async fn try_post(base: &str, key: Option<&str>, i: usize) -> Option<u16> {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/extract/memory"))
        .header("content-type", "application/json")
        .body(extract_body(i))
        .timeout(Duration::from_secs(300));
    if let Some(k) = key {
        r = r.header("authorization", format!("Token {k}"));
    }
    Some(r.send().await.ok()?.status().as_u16())
}

#[tokio::test]
async fn sigterm_drains_accepted_requests_then_exits_zero() {
    const KEY: &str = "lifecycle-secret-key-31";
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--max-concurrent",
            "1",
            "--max-queue",
            "8",
            "--queue-timeout",
            "300",
            // Queued, not refused for a wait longer than the default quarter second.
            "--max-slot-wait",
            "300",
            "--drain-timeout",
            "120",
        ]
        .map(String::from),
    );
    let mut s = start(args, Some(&format!("{KEY} rps=0 tpm=0\n")));

    // The port answers from the start: work is turned away with a retry hint while the model
    // loads, the process is live, and ready only after loading and the warm-up generation.
    let (status, headers, body) =
        common::post(&s.base, "/extract/memory", Some(KEY), extract_body(0)).await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (503, Some(50004)),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    let spec = Spec::fetch(&s.base).await;
    spec.check("/extract/memory", "post", status, &headers, &body);
    let (live, _, body) = common::get(&format!("{}/health/live", s.base)).await;
    assert_eq!(live, 200, "{body}");
    let mut readiness = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, headers, body) = common::get(&format!("{}/health/ready", s.base)).await;
        let body: Value = serde_json::from_str(&body).unwrap();
        spec.check("/health/ready", "get", status, &headers, &body);
        readiness.push(status);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(readiness[0], 503, "ready before the model was loaded");
    let log = s.json_lines();
    let position = |msg: &str| {
        log.iter()
            .position(|l| l["fields"]["message"] == msg)
            .unwrap_or_else(|| panic!("no log line {msg:?}"))
    };
    assert!(position("warm-up generation done") < position("ready"));

    // Four accepted requests: one generating, three queued. Then SIGTERM.
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let base = s.base.clone();
            tokio::spawn(async move { try_post(&base, Some(KEY), i).await })
        })
        .collect();
    wait_for_backlog(&s, 2.0).await;
    signal(&s, "TERM");

    // Draining: not ready, and new work is turned away with a retry hint...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = common::get(&format!("{}/health/ready", s.base)).await;
        if status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never turned unready after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, headers, body) =
        common::post(&s.base, "/extract/memory", Some(KEY), extract_body(99)).await;
    assert_eq!(
        (status, body["code"].as_u64()),
        (503, Some(50004)),
        "{body}"
    );
    assert!(body["message"].as_str().unwrap().contains("shutting down"));
    assert!(headers.contains_key("retry-after"));

    // ...while every accepted request is finished, and then the process exits 0.
    for r in requests {
        assert_eq!(r.await.unwrap(), Some(200));
    }
    let (status, _) = s.exit(Duration::from_secs(60)).await;
    assert!(status.success(), "exit status {status}");

    // One log line per request, with who, what and how long; never the key.
    let log = s.json_lines();
    assert!(!s.all_output().contains(KEY), "the key was logged");
    let requests: Vec<&Value> = log
        .iter()
        .filter(|l| {
            l["fields"]["message"] == "request" && l["fields"]["route"] == "/extract/memory"
        })
        .collect();
    let ok: Vec<&&Value> = requests
        .iter()
        .filter(|l| l["fields"]["status"] == 200)
        .collect();
    assert_eq!(ok.len(), 4, "{requests:?}");
    for line in ok {
        let f = &line["fields"];
        assert_eq!(f["key_hash"], KeyHash::of(HASH_SECRET, KEY).as_str());
        assert_eq!(f["code"], "0");
        assert_eq!(f["request_id"].as_str().unwrap().len(), 36);
        for field in [
            "input_tokens",
            "prompt_tokens",
            "generated_tokens",
            "queue_ms",
            "inference_ms",
            "total_ms",
        ] {
            assert!(f[field].is_number(), "{field} missing in {line}");
        }
    }
    assert!(requests
        .iter()
        .any(|l| l["fields"]["status"] == 503 && l["fields"]["code"] == "50004"));
    assert!(log.iter().any(|l| l["fields"]["message"] == "drained"));
}

#[tokio::test]
async fn sigint_exits_zero_within_the_drain_timeout_even_with_work_left() {
    let mut args = base_args(&tiny_model_dir());
    // Long generations and a long queue: far more work than the drain timeout allows.
    args.extend(
        [
            "--no-auth",
            "--max-concurrent",
            "1",
            "--max-queue",
            "16",
            "--queue-timeout",
            "300",
            "--max-slot-wait",
            "300",
            "--drain-timeout",
            "0.5",
        ]
        .map(String::from),
    );
    set_flag(&mut args, "--max-items", "6");
    set_flag(&mut args, "--max-text-chars", "120");
    let mut s = start(args, None);
    let warned = s.json_lines().into_iter().any(|l| {
        l["level"] == "WARN"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("authentication is OFF"))
    });
    assert!(warned, "--no-auth must be logged as a warning");
    common::get(&format!("{}/health/live", s.base)).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    while common::get(&format!("{}/health/ready", s.base)).await.0 != 200 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let _requests: Vec<_> = (0..8)
        .map(|i| {
            let base = s.base.clone();
            tokio::spawn(async move { try_post(&base, None, i).await })
        })
        .collect();
    wait_for_backlog(&s, 4.0).await;
    signal(&s, "INT");
    // Drain timeout 0.5 s, then at most a 2 s grace for open connections; generous margin.
    let (status, took) = s.exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(15), "exit took {took:?}");
    assert!(
        s.json_lines()
            .iter()
            .any(|l| l["fields"]["message"] == "drain timeout reached; abandoning the rest"),
        "{}",
        s.all_output()
    );
}

#[test]
fn without_keys_or_no_auth_the_server_refuses_to_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_memex"))
        .arg("serve")
        .args(base_args(&tiny_model_dir()))
        .env_remove("MEMEX_API_KEY")
        .env_remove("MEMEX_API_KEYS")
        .env_remove("MEMEX_NO_AUTH")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--no-auth"), "{stderr}");
}
