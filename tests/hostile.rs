//! Hostile clients against the real binary: slow and silent connections are closed within the
//! read timeouts while normal requests are served at normal speed, the connection cap answers
//! 503, the key is checked before the body is read (and before `100 Continue`), HTTP/2 is not
//! spoken, a client that closes behind a pipelined request or half-closes has its generation
//! cancelled, and a dead engine turns readiness red and ends the process non-zero.

mod common;

use std::time::{Duration, Instant};

use common::binary::{parse_response, read_until_closed, trickle, Binary};
use common::{base_args, set_flag, tiny_model_dir};
use serde_json::json;
use tokio::io::AsyncWriteExt;

const KEY: &str = "hostile-test-key-0b7e";

fn keys() -> String {
    format!("{KEY} rps=0 tpm=0\n")
}

fn extract_body(text: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "messages": [{"role": "user", "content": text}],
        "extraction_types": ["memory"]
    }))
    .unwrap()
}

/// A complete request as raw bytes.
fn raw_request(body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /extract/memory HTTP/1.1\r\nhost: memex\r\ncontent-type: application/json\r\n\
         authorization: Token {KEY}\r\ncontent-length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

async fn timed_extract(base: &str, i: usize) -> Duration {
    let started = Instant::now();
    let (status, _, body) = common::post(
        base,
        "/extract/memory",
        Some(KEY),
        extract_body(&format!("I drink tea every morning ({i})")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    started.elapsed()
}

#[tokio::test]
async fn slow_and_silent_connections_are_closed_within_the_read_timeouts() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--header-read-timeout",
            "1",
            "--body-read-timeout",
            "1",
            "--idle-timeout",
            "2",
            "--max-concurrent",
            "4",
        ]
        .map(String::from),
    );
    let s = Binary::start(&args, Some(&keys()), &[]);
    s.wait_ready().await;
    let baseline = timed_extract(&s.base, 0).await;

    const TRICKLE: Duration = Duration::from_millis(150);
    // Closed by the header-read timeout: (1 s after the first byte) heads that never end, and
    // garbage that never ends a head. Closed by the idle timeout (2 s): silent connections.
    // Answered 408 and closed by the body-read timeout (1 s): bodies that never end.
    let head = b"POST /extract/memory HTTP/1.1\r\nhost: memex\r\nx-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec();
    let garbage = vec![b'z'; 200];
    let mut body_trickle = raw_request(&[b' '; 400], "");
    body_trickle.truncate(body_trickle.len() - 400);
    let body_head_len = body_trickle.len();
    body_trickle.extend_from_slice(&[b' '; 400]);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let kind = i % 4;
        let mut stream = s.connect().await;
        let (head, garbage, body) = (head.clone(), garbage.clone(), body_trickle.clone());
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            let writer = async {
                match kind {
                    0 => trickle(&mut w, &head, TRICKLE).await,
                    1 => trickle(&mut w, &garbage, TRICKLE).await,
                    2 => {}
                    _ => {
                        w.write_all(&body[..body_head_len]).await.unwrap();
                        trickle(&mut w, &body[body_head_len..], TRICKLE).await;
                    }
                }
                std::future::pending::<()>().await;
            };
            let reader = read_until_closed(&mut r, Duration::from_secs(20));
            let closed = tokio::select! {
                closed = reader => closed,
                () = writer => unreachable!(),
            };
            (kind, closed)
        }));
    }
    // Meanwhile, normal requests are answered at normal speed.
    let mut during = Vec::new();
    for i in 1..=3 {
        during.push(timed_extract(&s.base, i).await);
    }
    for t in tasks {
        let (kind, closed) = t.await.unwrap();
        let (bytes, after) = closed.unwrap_or_else(|| panic!("kind {kind} never closed"));
        let limit = match kind {
            2 => Duration::from_secs(2),
            _ => Duration::from_secs(1),
        };
        // The deadline, plus scheduling slack on a loaded two-core machine.
        assert!(
            after >= limit.mul_f64(0.9) && after < limit + Duration::from_secs(3),
            "kind {kind} closed after {after:?}"
        );
        if kind == 3 {
            let (status, _, body) = parse_response(&bytes);
            assert_eq!(
                (status, body["code"].as_u64()),
                (408, Some(40000)),
                "{body}"
            );
        } else {
            assert!(
                bytes.is_empty() || bytes.starts_with(b"HTTP/1.1 4"),
                "{bytes:?}"
            );
        }
    }
    let slowest = during.iter().max().unwrap();
    assert!(
        *slowest < baseline * 4 + Duration::from_secs(2),
        "baseline {baseline:?}, during the slow clients {during:?}"
    );
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_the_cap_frees_on_close() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(["--max-connections", "3"].map(String::from));
    let s = Binary::start(&args, Some(&keys()), &[]);
    s.wait_ready().await;
    // The readiness probes' connections close lazily on the client's side: let them go first.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut held: Vec<_> = futures::future::join_all((0..3).map(|_| s.connect())).await;
    // Let the server accept them all before the one over the cap; all three stay open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for h in &mut held {
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_millis(50),
            tokio::io::AsyncReadExt::read(h, &mut b),
        );
        assert!(
            read.await.is_err(),
            "a connection within the cap was answered or closed"
        );
    }
    let mut over = s.connect().await;
    over.write_all(&raw_request(&extract_body("hi"), ""))
        .await
        .unwrap();
    let (bytes, _) = read_until_closed(&mut over, Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("not closed: {}", s.all_output()));
    let (status, head, body) = parse_response(&bytes);
    assert_eq!(
        (status, body["code"].as_u64()),
        (503, Some(50004)),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(body["message"].as_str().unwrap().contains('3'), "{body}");

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = common::get(&format!("{}/health/live", s.base)).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "cap never freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        s.metric("memex_rejections_total{reason=\"connections\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn the_key_is_checked_before_the_body_is_read() {
    let args = base_args(&tiny_model_dir());
    let s = Binary::start(&args, Some(&keys()), &[]);
    s.wait_ready().await;

    // A 900 KB body announced, none sent, no key: 401 at once, and no `100 Continue` first.
    for expect in ["", "expect: 100-continue\r\n"] {
        let mut c = s.connect().await;
        let head = format!(
            "POST /extract/memory HTTP/1.1\r\nhost: memex\r\ncontent-type: application/json\r\n\
             content-length: 900000\r\n{expect}\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let (bytes, _) = read_until_closed(&mut c, Duration::from_secs(5))
            .await
            .expect("answered and closed without the body");
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            !bytes.starts_with(b"HTTP/1.1 100"),
            "100 Continue sent without a key"
        );
        let (status, _, body) = parse_response(&bytes);
        assert_eq!(
            (status, body["code"].as_u64()),
            (401, Some(40100)),
            "{body}"
        );
    }
    // With a valid key, `Expect: 100-continue` is honoured.
    let mut c = s.connect().await;
    let body = extract_body("I like green tea.");
    let request = raw_request(&body, "expect: 100-continue\r\nconnection: close\r\n");
    c.write_all(&request[..request.len() - body.len()])
        .await
        .unwrap();
    let mut first = [0u8; 25];
    tokio::io::AsyncReadExt::read_exact(&mut c, &mut first)
        .await
        .unwrap();
    assert!(first.starts_with(b"HTTP/1.1 100 Continue"), "{first:?}");
    c.write_all(&body).await.unwrap();
    let (bytes, _) = read_until_closed(&mut c, Duration::from_secs(120))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("HTTP/1.1 200"), "{text}");

    // An HTTP/2 (h2c) preface is not spoken: an HTTP/1 error or a close, never an h2 frame.
    let mut c = s.connect().await;
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (bytes, _) = read_until_closed(&mut c, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(
        bytes.is_empty() || bytes.starts_with(b"HTTP/1.1 "),
        "answered in HTTP/2: {bytes:?}"
    );
}

/// Long generations, so that a cancellation is seen long before one ends by itself.
fn slow_generation_args() -> Vec<String> {
    let mut args = base_args(&tiny_model_dir());
    set_flag(&mut args, "--max-items", "6");
    set_flag(&mut args, "--max-text-chars", "120");
    args.extend(["--max-concurrent", "2"].map(String::from));
    args
}

async fn wait_for_metric(s: &Binary, series: &str, at_least: f64, within: Duration) -> Duration {
    let started = Instant::now();
    while s.metric(series).await < at_least {
        assert!(
            started.elapsed() < within,
            "{series} below {at_least} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn a_client_that_pipelines_and_closes_or_half_closes_is_cancelled_at_once() {
    let s = Binary::start(&slow_generation_args(), Some(&keys()), &[]);
    s.wait_ready().await;
    let cancelled = "memex_requests_cancelled_total{route=\"/extract/memory\"}";

    // Pipelined: an extraction and a probe behind it in one write, then the socket is closed.
    let mut c = s.connect().await;
    let mut bytes = raw_request(
        &extract_body("I run every morning and like oolong tea."),
        "",
    );
    bytes.extend_from_slice(b"GET /health/live HTTP/1.1\r\nhost: memex\r\n\r\n");
    c.write_all(&bytes).await.unwrap();
    wait_for_metric(&s, "memex_in_flight_requests", 1.0, Duration::from_secs(30)).await;
    drop(c);
    let took = wait_for_metric(&s, cancelled, 1.0, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(2), "noticed after {took:?}");

    // Half-closed: the request, then FIN. Treated as gone: closed at once without an answer,
    // and no generation left running (hyper may close before the handler even starts).
    let mut c = s.connect().await;
    c.write_all(&raw_request(&extract_body("I swim on Sundays."), ""))
        .await
        .unwrap();
    c.shutdown().await.unwrap();
    let (answer, after) = read_until_closed(&mut c, Duration::from_secs(5))
        .await
        .expect("closed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(after < Duration::from_secs(2), "closed after {after:?}");
    let started = Instant::now();
    while s.metric("memex_in_flight_requests").await > 0.0 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a generation kept running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answered = "memex_requests_total{code=\"0\",route=\"/extract/memory\",status=\"200\"}";
    assert_eq!(s.metric(answered).await, 0.0, "a gone client was answered");
}

#[tokio::test]
async fn a_dead_engine_turns_readiness_red_and_exits_non_zero() {
    let mut s = Binary::start(
        &base_args(&tiny_model_dir()),
        Some(&keys()),
        // The warm-up is the engine's first generation; it dies taking the second.
        &[("MEMEX_FAULT_ENGINE_PANIC_AT", "2")],
    );
    s.wait_ready().await;
    let (status, _, body) = common::post(
        &s.base,
        "/extract/memory",
        Some(KEY),
        extract_body("I like tea."),
    )
    .await;
    // The request's engine is gone: a 500 (never a hang).
    assert_eq!(
        (status, body["code"].as_u64()),
        (500, Some(50000)),
        "{body}"
    );
    // Red within moments (the engine thread records its death once it has unwound), until the
    // process is gone.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match reqwest::get(format!("{}/health/ready", s.base)).await {
            Ok(r) if r.status() == 503 => break,
            Ok(r) => assert!(
                Instant::now() < deadline,
                "readiness stayed {} with a dead engine",
                r.status()
            ),
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (exit, _) = s.exit(Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(1), "{}", s.all_output());
    assert!(s
        .json_lines()
        .iter()
        .any(|l| l["fields"]["message"] == "the inference engine stopped"));
}

#[tokio::test]
async fn output_limits_the_context_cannot_hold_fail_the_start() {
    // 1 MiB of KV pool: 2,048 positions, fewer than the longest answer the default output limits
    // allow (about 9,800 tokens).
    let mut args = base_args(&tiny_model_dir());
    for (flag, value) in [
        ("--max-items", "6"),
        ("--max-text-chars", "200"),
        ("--max-label-chars", "32"),
        ("--max-tags", "4"),
    ] {
        set_flag(&mut args, flag, value);
    }
    args.extend(["--kv-cache-mb", "1"].map(String::from));
    let mut s = Binary::start(&args, Some(&keys()), &[]);
    let (exit, _) = s.exit(Duration::from_secs(60)).await;
    assert_eq!(exit.code(), Some(1));
    let out = s.all_output();
    assert!(out.contains("do not fit the model's context"), "{out}");
}
