//! Serving under load, over HTTP against the real engine on the tiny random Qwen3: API keys,
//! per-key rate limits and token quotas, the input-token limit (also with the real Qwen3
//! tokenizer), admission (bounded queue, queue time-out), metrics and response headers, and every
//! response checked against the server's own OpenAPI document.

mod common;

use std::time::{Duration, Instant};

use common::openapi::Spec;
use common::{
    base_args, dialogue_of_tokens, get, header_f64, metric, post, post_with_auth, scrape, server,
    set_flag, spawn, spawn_with_keys, tiny_model_dir, Answer, TEST_KEY,
};
use serde_json::{json, Value};

const EXTRACT: &str = "/extract/memory";

fn memory_request(n_tokens: usize) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"messages": dialogue_of_tokens(n_tokens), "extraction_types": ["memory"]}),
    )
    .unwrap()
}

fn assert_error(answer: &Answer, status: u16, code: u64) {
    let (s, _, body) = answer;
    assert_eq!(
        (*s, body["code"].as_u64().unwrap_or(0)),
        (status, code),
        "{body}"
    );
    assert!(body["data"].is_null(), "{body}");
    assert!(!body["message"].as_str().unwrap().is_empty());
}

fn retry_after(answer: &Answer) -> u64 {
    answer.1["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

// ---------------------------------------------------------------------------------------------
// Auth

#[tokio::test]
async fn requests_without_a_valid_key_get_401_with_the_contract_codes() {
    let s = server();
    let spec = Spec::fetch(&s.base).await;
    let body = memory_request(20);
    for (authorization, code) in [
        (None, 40100),
        (Some("Bearer memex-test-key-4f1c9a"), 40100),
        (Some("memex-test-key-4f1c9a"), 40100),
        (Some("Token"), 40100),
        (Some("Token not-a-key"), 40132),
        (Some("Token memex-test-key-4f1c9"), 40132),
    ] {
        let answer = post_with_auth(&s.base, EXTRACT, authorization, body.clone()).await;
        assert_error(&answer, 401, code);
        assert!(answer.1.contains_key("x-request-id"));
        spec.check(EXTRACT, "post", answer.0, &answer.1, &answer.2);
    }
    // The scheme is case-insensitive, like every HTTP auth scheme.
    let ok = post_with_auth(&s.base, EXTRACT, Some(&format!("token {TEST_KEY}")), body).await;
    assert_eq!(ok.0, 200, "{}", ok.2);
    spec.check(EXTRACT, "post", ok.0, &ok.1, &ok.2);
}

#[tokio::test]
async fn probes_metrics_and_spec_need_no_key() {
    let s = server();
    for path in [
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/openapi.json",
    ] {
        let (status, _, body) = get(&format!("{}{path}", s.base)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limits and the input limit

const KEYS: &str = "\
# rate: one request per 5 s after a burst of two
rate-a rps=0.2 burst=2 tpm=0
rate-b rps=0.2 burst=2 tpm=0
# quota: 100 input tokens a minute, no request-rate limit
quota-a rps=0 tpm=100
quota-b rps=0 tpm=100
# two requests, then one per 1,000 s; 60 tokens a minute: what a too-long request must not use up
strict rps=0.001 burst=2 tpm=60
# two requests, then one per 1,000 s: invalid requests use them up too
invalid-a rps=0.001 burst=2 tpm=0
";

/// One server for the limit tests: limits are per key, so the tests do not disturb each other.
fn limits_server() -> &'static common::TestServer {
    static S: std::sync::OnceLock<common::TestServer> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let mut args = base_args(&tiny_model_dir());
        args.extend(["--max-input-tokens", "300"].map(String::from));
        spawn_with_keys(args, KEYS)
    })
}

#[tokio::test]
async fn request_rate_is_limited_per_key_with_retry_after() {
    let s = limits_server();
    let spec = Spec::fetch(&s.base).await;
    // Three at once from each of two keys: two pass per key (the burst), one is limited.
    let mut tasks = Vec::new();
    for key in ["rate-a", "rate-a", "rate-a", "rate-b", "rate-b", "rate-b"] {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            (
                key,
                post(&base, EXTRACT, Some(key), memory_request(20)).await,
            )
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for key in ["rate-a", "rate-b"] {
        let (mut ok, mut limited) = (0, 0);
        for (_, answer) in answers.iter().filter(|(k, _)| *k == key) {
            spec.check(EXTRACT, "post", answer.0, &answer.1, &answer.2);
            if answer.0 == 200 {
                ok += 1;
                continue;
            }
            assert_error(answer, 429, 40300);
            // One cell every 5 s: the wait is at most 5 s, in whole seconds.
            assert!((1..=5).contains(&retry_after(answer)), "{:?}", answer.1);
            limited += 1;
        }
        assert_eq!((ok, limited), (2, 1), "{key}");
    }
    let text = scrape(s).await;
    assert!(metric(&text, "memex_rejections_total{reason=\"rate\"}").unwrap() >= 2.0);
}

#[tokio::test]
async fn token_quota_is_per_key_and_says_when_to_retry() {
    let s = limits_server();
    let spec = Spec::fetch(&s.base).await;
    let first = post(&s.base, EXTRACT, Some("quota-a"), memory_request(60)).await;
    assert_eq!(first.0, 200, "{}", first.2);
    let second = post(&s.base, EXTRACT, Some("quota-a"), memory_request(60)).await;
    assert_error(&second, 429, 40301);
    spec.check(EXTRACT, "post", second.0, &second.1, &second.2);
    // 20 tokens short at 100 a minute: about 12 s.
    let wait = retry_after(&second);
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    // Another key's quota is untouched.
    let other = post(&s.base, EXTRACT, Some("quota-b"), memory_request(60)).await;
    assert_eq!(other.0, 200, "{}", other.2);
    // Larger than the whole quota: told so, not just "wait".
    let never = post(&s.base, EXTRACT, Some("quota-b"), memory_request(150)).await;
    assert_error(&never, 429, 40301);
    let msg = never.2["message"].as_str().unwrap();
    assert!(msg.contains("whole quota of 100"), "{msg}");
    let text = scrape(s).await;
    assert!(metric(&text, "memex_rejections_total{reason=\"quota\"}").unwrap() >= 2.0);
}

#[tokio::test]
async fn too_long_input_takes_a_request_cell_but_no_quota() {
    let s = limits_server();
    let spec = Spec::fetch(&s.base).await;
    // `strict` has two requests and 60 tokens a minute. An over-long request (its framing
    // counted too) takes a request cell, never tokens.
    let answer = post(&s.base, EXTRACT, Some("strict"), memory_request(300)).await;
    assert_error(&answer, 413, 40305);
    let msg = answer.2["message"].as_str().unwrap();
    assert!(msg.contains("limit of 300"), "{msg}");
    spec.check(EXTRACT, "post", answer.0, &answer.1, &answer.2);
    // 40 tokens and their framing: within the 60 tokens, which the 413 did not touch.
    let ok = post(&s.base, EXTRACT, Some("strict"), memory_request(40)).await;
    assert_eq!(ok.0, 200, "{}", ok.2);
    // And now both requests are used up.
    let limited = post(&s.base, EXTRACT, Some("strict"), memory_request(5)).await;
    assert_error(&limited, 429, 40300);
    let text = scrape(s).await;
    assert!(metric(&text, "memex_rejections_total{reason=\"too_long\"}").unwrap() >= 1.0);
}

#[tokio::test]
async fn invalid_requests_are_rate_limited_like_any_other() {
    let s = limits_server();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let answer = post(&s.base, EXTRACT, Some("invalid-a"), b"{not json".to_vec()).await;
        statuses.push((answer.0, answer.2["code"].as_u64().unwrap()));
    }
    assert_eq!(
        statuses,
        [
            (400, 40000),
            (400, 40000),
            (429, 40300),
            (429, 40300),
            (429, 40300)
        ]
    );
}

#[tokio::test]
async fn refusals_for_overload_charge_neither_the_rate_nor_the_quota() {
    let mut args = base_args(&tiny_model_dir());
    set_flag(&mut args, "--max-items", "6");
    set_flag(&mut args, "--max-text-chars", "120");
    args.extend(["--max-concurrent", "1", "--max-queue", "0"].map(String::from));
    // `retry` may send two requests (then one per 1,000 s) and 100 tokens a minute: without
    // refunds, two 503s would use up both.
    let s = spawn_with_keys(args, "busy rps=0 tpm=0\nretry rps=0.001 burst=2 tpm=100\n");
    // One long generation holds the only slot.
    let base = s.base.clone();
    let busy =
        tokio::spawn(async move { post(&base, EXTRACT, Some("busy"), memory_request(30)).await });
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&scrape(&s).await, "memex_in_flight_requests") != Some(1.0) {
        assert!(Instant::now() < deadline, "the slot was never taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..4 {
        let answer = post(&s.base, EXTRACT, Some("retry"), memory_request(60)).await;
        if busy.is_finished() {
            break;
        }
        assert_error(&answer, 503, 50004);
    }
    assert_eq!(busy.await.unwrap().0, 200);
    // Both request cells and the whole minute's tokens are still there.
    let ok = post(&s.base, EXTRACT, Some("retry"), memory_request(60)).await;
    assert_eq!(ok.0, 200, "{}", ok.2);
}

// ---------------------------------------------------------------------------------------------
// Admission

#[tokio::test]
async fn beyond_the_queue_requests_get_503_at_once() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--no-auth",
            "--max-concurrent",
            "1",
            "--max-queue",
            "1",
            "--queue-timeout",
            "120",
            // The queue's own limits, not the predicted wait's.
            "--max-slot-wait",
            "120",
        ]
        .map(String::from),
    );
    let s = spawn(args);
    let spec = Spec::fetch(&s.base).await;
    let mut tasks = Vec::new();
    for i in 0..6 {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = post(&base, EXTRACT, None, memory_request(30 + i)).await;
            (answer, started.elapsed())
        }));
    }
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for t in tasks {
        let (answer, took) = t.await.unwrap();
        spec.check(EXTRACT, "post", answer.0, &answer.1, &answer.2);
        if answer.0 == 200 {
            ok.push(took);
        } else {
            assert_error(&answer, 503, 50004);
            assert!(retry_after(&answer) >= 1);
            refused.push(took);
        }
    }
    // One generates, one waits, the rest are turned away.
    assert!(ok.len() >= 2 && refused.len() >= 3, "{ok:?} {refused:?}");
    // "At once": every refusal came back before even the first generation finished.
    let fastest_ok = ok.iter().min().unwrap();
    assert!(
        refused.iter().all(|r| r < fastest_ok),
        "refusals {refused:?} vs answers {ok:?}"
    );
    let text = scrape(&s).await;
    assert!(metric(&text, "memex_rejections_total{reason=\"overloaded\"}").unwrap() >= 3.0);
    assert_eq!(metric(&text, "memex_in_flight_requests"), Some(0.0));
    assert_eq!(metric(&text, "memex_queued_requests"), Some(0.0));
}

#[tokio::test]
async fn queued_requests_time_out_with_503() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--no-auth",
            "--max-concurrent",
            "1",
            "--max-queue",
            "8",
            "--queue-timeout",
            "0.05",
            "--max-slot-wait",
            "120",
        ]
        .map(String::from),
    );
    let s = spawn(args);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = post(&base, EXTRACT, None, memory_request(30 + i)).await;
            (answer, started.elapsed())
        }));
    }
    let mut timed_out = 0;
    for t in tasks {
        let (answer, took) = t.await.unwrap();
        if answer.0 == 200 {
            continue;
        }
        assert_error(&answer, 503, 50004);
        assert!(answer.2["message"]
            .as_str()
            .unwrap()
            .contains("queue timeout"));
        // Waited for the timeout, and not unboundedly past it (generous for a loaded machine).
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(20),
            "{took:?}"
        );
        timed_out += 1;
    }
    assert!(timed_out >= 1, "nobody waited past the 50 ms queue timeout");
    let text = scrape(&s).await;
    assert_eq!(metric(&text, "memex_queued_requests"), Some(0.0));
    assert!(metric(&text, "memex_queue_wait_seconds_count").unwrap() >= 1.0);
}

// ---------------------------------------------------------------------------------------------
// Deadlines

/// POST a memory request asking for a deadline of `seconds` with `x-request-timeout`.
async fn post_with_deadline(base: &str, n_tokens: usize, seconds: &str) -> Answer {
    let r = reqwest::Client::new()
        .post(format!("{base}{EXTRACT}"))
        .header("content-type", "application/json")
        .header("x-request-timeout", seconds)
        .body(memory_request(n_tokens))
        .timeout(Duration::from_secs(600))
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.expect("JSON body"))
}

#[tokio::test]
async fn a_request_at_its_deadline_is_cancelled_and_frees_its_slot() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--no-auth",
            "--max-concurrent",
            "1",
            "--queue-timeout",
            "20",
        ]
        .map(String::from),
    );
    let s = spawn(args);
    let started = Instant::now();
    // 50 ms is far less than a 300-token generation takes on the tiny model.
    let answer = post_with_deadline(&s.base, 200, "0.05").await;
    assert_error(&answer, 503, 50004);
    let msg = answer.2["message"].as_str().unwrap();
    assert!(
        msg.contains("deadline of 0.1 s") || msg.contains("deadline of 0.0 s"),
        "{msg}"
    );
    assert!(retry_after(&answer) >= 1);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Its sequence and KV blocks go with it.
    let mut text = scrape(&s).await;
    for _ in 0..100 {
        if metric(&text, "memex_engine_running_sequences") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(&s).await;
    }
    assert_eq!(metric(&text, "memex_engine_running_sequences"), Some(0.0));
    assert_eq!(
        metric(
            &text,
            "memex_rejections_total{reason=\"deadline_exceeded\"}"
        ),
        Some(1.0)
    );
    assert_eq!(metric(&text, "memex_in_flight_requests"), Some(0.0));
    // The only slot is free again: the next request is answered, not queued behind a ghost.
    let answer = post(&s.base, EXTRACT, None, memory_request(40)).await;
    assert_eq!(answer.0, 200, "{}", answer.2);
    assert!(header_f64(&answer.1, "x-queue-time") < 1.0);
    // A malformed header is the client's error.
    let answer = post_with_deadline(&s.base, 20, "soon").await;
    assert_error(&answer, 400, 40000);
}

#[tokio::test]
async fn a_busy_server_refuses_at_once_what_it_cannot_answer_in_time() {
    let mut args = base_args(&tiny_model_dir());
    args.push("--no-auth".into());
    let s = spawn(args);
    // One at a time: never refused (nothing is outstanding when each arrives), and long enough
    // in all for the server to measure its throughput.
    let warm = Instant::now();
    let mut i = 0;
    while warm.elapsed() < Duration::from_secs(4) || i < 4 {
        let answer = post_with_deadline(&s.base, 100 + i, "30").await;
        assert_eq!(answer.0, 200, "{}", answer.2);
        i += 1;
    }
    let text = scrape(&s).await;
    assert_eq!(
        metric(&text, "memex_rejections_total{reason=\"deadline\"}"),
        Some(0.0)
    );
    // Twelve at once, each asking for an answer within a second: the work of twelve does not fit.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let base = s.base.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let answer = post_with_deadline(&base, 300 + i, "1").await;
            (answer, started.elapsed())
        }));
    }
    let mut refused = 0;
    let mut answered = 0;
    for t in tasks {
        let (answer, took) = t.await.unwrap();
        if answer.0 == 200 {
            answered += 1;
            continue;
        }
        assert_error(&answer, 503, 50004);
        let msg = answer.2["message"].as_str().unwrap();
        // Refused at once: it would finish too late, push an accepted request past its
        // deadline, or wait too long for a slot (src/limits/admission.rs).
        if ["would finish", "would push", "would wait"]
            .iter()
            .any(|m| msg.contains(m))
        {
            assert!(took < Duration::from_millis(500), "a refusal took {took:?}");
            assert!(retry_after(&answer) >= 1);
            refused += 1;
        } else {
            assert!(msg.contains("cancelled"), "{msg}");
        }
    }
    assert!(
        answered >= 1 && refused >= 1,
        "{answered} answered, {refused} refused"
    );
    let text = scrape(&s).await;
    assert_eq!(
        metric(&text, "memex_rejections_total{reason=\"deadline\"}"),
        Some(refused as f64)
    );
    assert!(metric(&text, "memex_predicted_service_seconds_count").unwrap() >= refused as f64);
    assert!(metric(&text, "memex_admission_limit").unwrap() >= 1.0);
}

// ---------------------------------------------------------------------------------------------
// Metrics, headers, OpenAPI

#[tokio::test]
async fn metrics_on_their_own_port_count_what_happened_and_never_a_key() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(["--metrics-port", "0", "--max-input-tokens", "100"].map(String::from));
    let s = spawn_with_keys(args, "metrics-secret-key-77 rps=0 tpm=0\n");
    assert_ne!(s.metrics_base, s.base);
    let key = Some("metrics-secret-key-77");

    let ok = post(
        &s.base,
        EXTRACT,
        key,
        serde_json::to_vec(&json!({"messages": [
        {"role": "user", "content": "I like green tea."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And black coffee on Mondays."}]}))
        .unwrap(),
    )
    .await;
    assert_eq!(ok.0, 200, "{}", ok.2);
    for h in [
        "x-request-id",
        "x-queue-time",
        "x-inference-time",
        "x-prompt-tokens",
        "x-generated-tokens",
        "x-cached-prompt-tokens",
        "x-prefill-tokens",
    ] {
        assert!(header_f64_or_id(&ok.1, h), "{h} missing or not a number");
    }
    // What the engine computed is what it was sent less what its prefix cache served.
    assert_eq!(
        header_f64(&ok.1, "x-prefill-tokens"),
        header_f64(&ok.1, "x-prompt-tokens") - header_f64(&ok.1, "x-cached-prompt-tokens")
    );
    assert!(header_f64(&ok.1, "x-inference-time") > 0.0);
    assert!(header_f64(&ok.1, "x-generated-tokens") > 0.0);
    let invalid = post(&s.base, EXTRACT, key, b"{not json".to_vec()).await;
    assert_error(&invalid, 400, 40000);
    let too_long = post(&s.base, EXTRACT, key, memory_request(101)).await;
    assert_error(&too_long, 413, 40305);
    let unknown = post(&s.base, EXTRACT, Some("nope"), memory_request(5)).await;
    assert_error(&unknown, 401, 40132);
    // Error responses carry the request id too.
    assert!(unknown.1.contains_key("x-request-id"));

    let (status, _, _) = get(&format!("{}/metrics", s.base)).await;
    assert_eq!(status, 404, "metrics are only on the metrics port");
    let text = scrape(&s).await;
    assert!(!text.contains("metrics-secret-key-77") && !text.contains("nope"));
    let at_least_one = [
        "memex_requests_total{code=\"0\",route=\"/extract/memory\",status=\"200\"}",
        "memex_requests_total{code=\"40000\",route=\"/extract/memory\",status=\"400\"}",
        "memex_requests_total{code=\"40132\",route=\"/extract/memory\",status=\"401\"}",
        "memex_requests_total{code=\"40305\",route=\"/extract/memory\",status=\"413\"}",
        "memex_request_duration_seconds_count{route=\"/extract/memory\"}",
        "memex_queue_wait_seconds_count",
        "memex_time_to_first_token_seconds_count{branch=\"memory\"}",
        "memex_generation_duration_seconds_count{branch=\"explicit_preference\"}",
        "memex_generation_duration_seconds_count{branch=\"implicit_preference\"}",
        "memex_prompt_tokens_total{branch=\"memory\"}",
        "memex_prefill_tokens_total{branch=\"memory\"}",
        "memex_generated_tokens_total{branch=\"memory\"}",
        "memex_input_tokens_total",
        "memex_rejections_total{reason=\"invalid\"}",
        "memex_rejections_total{reason=\"too_long\"}",
        "memex_rejections_total{reason=\"auth\"}",
        "memex_build_info{version=\"0.1.0\"}",
        // The native engine's own counters, read through the engine trait.
        "memex_engine_steps_total",
        "memex_engine_step_sequences_total",
        "memex_engine_step_tokens_total",
        "memex_engine_step_prefill_tokens_total",
        "memex_engine_step_token_budget",
        "memex_engine_kv_blocks_total",
    ];
    for series in at_least_one {
        let v = metric(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert!(v >= 1.0, "{series} = {v}");
    }
    assert!(metric(&text, "memex_model_load_seconds").unwrap() > 0.0);
    assert!(metric(&text, "memex_engine_step_seconds_total").unwrap() > 0.0);
    // The step cost admission predicts with: the prefill chunks and the decode steps of the
    // warm-up and the request separate its two parts, and a token costs something.
    let fixed = metric(&text, "memex_engine_step_fixed_seconds").unwrap();
    let per_token = metric(&text, "memex_engine_step_token_seconds").unwrap();
    assert!(
        per_token > 0.0 && fixed >= 0.0,
        "{fixed} + {per_token}/token"
    );
    assert!(
        metric(&text, "memex_engine_step_prefill_tokens_total").unwrap()
            < metric(&text, "memex_engine_step_tokens_total").unwrap(),
        "decode tokens are step tokens too"
    );
    // Every branch prompt starts with the same system template: after warm-up and a request,
    // the prefix cache has been used, and the per-branch counter agrees with the engine's.
    let hits = metric(&text, "memex_engine_prefix_cache_hit_tokens_total").unwrap();
    let cached = metric(&text, "memex_prompt_cached_tokens_total{branch=\"memory\"}").unwrap();
    assert!(
        cached > 0.0 && hits >= cached,
        "cached {cached}, engine hits {hits}"
    );
    for zero in [
        "memex_in_flight_requests",
        "memex_queued_requests",
        "memex_rejections_total{reason=\"rate\"}",
        "memex_rejections_total{reason=\"quota\"}",
        "memex_rejections_total{reason=\"overloaded\"}",
        "memex_engine_errors_total{kind=\"generation\"}",
        "memex_branch_retries_total{branch=\"memory\"}",
        "memex_engine_running_sequences",
        "memex_engine_waiting_sequences",
        "memex_engine_kv_blocks_used",
        "memex_engine_preemptions_total",
    ] {
        assert!(metric(&text, zero).is_some(), "{zero} missing:\n{text}");
    }
}

fn header_f64_or_id(headers: &reqwest::header::HeaderMap, name: &str) -> bool {
    let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    name == "x-request-id" || v.parse::<f64>().is_ok()
}

#[tokio::test]
async fn live_responses_match_the_openapi_document() {
    let s = server();
    let spec = Spec::fetch(&s.base).await;
    assert_eq!(spec.raw()["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    for path in ["/health", "/health/live", "/health/ready"] {
        let (status, headers, text) = get(&format!("{}{path}", s.base)).await;
        spec.check(
            path,
            "get",
            status,
            &headers,
            &serde_json::from_str(&text).unwrap(),
        );
    }
    let cases: Vec<(&str, Value)> = vec![
        (
            EXTRACT,
            json!({"messages": [{"role": "user", "content": "I'm Alex, I play badminton."},
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Short replies please."}]}),
        ),
        (
            "/api/openmem/v1/extract/memory",
            json!({"messages": dialogue_of_tokens(10), "extraction_types": ["preference"]}),
        ),
        (EXTRACT, json!({"messages": []})),
        (
            EXTRACT,
            json!({"messages": [{"role": "robot", "content": "hi"}]}),
        ),
        (
            EXTRACT,
            json!({"messages": dialogue_of_tokens(common::MAX_INPUT_TOKENS + 1)}),
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (path, body) in cases {
        let answer = post(
            &s.base,
            path,
            Some(TEST_KEY),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
        spec.check(path, "post", answer.0, &answer.1, &answer.2);
        seen.insert(answer.0);
    }
    let huge = post(&s.base, EXTRACT, Some(TEST_KEY), vec![b' '; 70_000]).await;
    spec.check(EXTRACT, "post", huge.0, &huge.1, &huge.2);
    seen.insert(huge.0);
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![200, 400, 413]);
}

// ---------------------------------------------------------------------------------------------
// The input limit with the production tokenizer

/// Where `scripts/fetch-models.sh --qwen3-tokenizer` puts the real Qwen3 tokenizer.
fn qwen3_tokenizer_dir() -> Option<std::path::PathBuf> {
    let cache = std::env::var_os("MEMEX_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"));
    let dir = cache.join("models/qwen3-tokenizer");
    dir.join("tokenizer.json").is_file().then_some(dir)
}

/// A dialogue whose contents, joined as the server counts them, are exactly `n` Qwen3 tokens.
fn qwen3_dialogue(tok: &tokenizers::Tokenizer, n: usize) -> Value {
    let count = |messages: &[String]| tok.encode_fast(messages.join("\n"), false).unwrap().len();
    let turn = "I moved to Hangzhou last spring and I play badminton on Saturdays with my team.";
    let mut messages: Vec<String> = Vec::new();
    while count(&messages) + 40 < n {
        messages.push(format!("{turn} {}", messages.len()));
    }
    // Top up one word at a time (" word" is one token in Qwen3's vocabulary).
    let mut last = String::from("Also");
    messages.push(last.clone());
    while count(&messages) < n {
        last.push_str(" tea");
        *messages.last_mut().unwrap() = last.clone();
    }
    assert_eq!(count(&messages), n, "could not hit {n} tokens exactly");
    let roles = ["user", "assistant"];
    Value::Array(
        messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| json!({"role": roles[i % 2], "content": m}))
            .collect(),
    )
}

#[tokio::test]
async fn qwen3_tokenizer_input_limit_is_8000_with_framing_counted() {
    let Some(tokenizer_dir) = qwen3_tokenizer_dir() else {
        eprintln!(
            "SKIPPED qwen3_tokenizer_input_limit_is_8000_with_framing_counted: the Qwen3 tokenizer \
             is not in .cache/models/qwen3-tokenizer; run `scripts/fetch-models.sh --qwen3-tokenizer` (CI does)"
        );
        return;
    };
    let model = tempfile::tempdir().unwrap();
    memex::tiny_model::write_with_tokenizer(model.path(), 42, &tokenizer_dir).unwrap();
    let tok = tokenizers::Tokenizer::from_file(tokenizer_dir.join("tokenizer.json")).unwrap();
    // The default limit: no --max-input-tokens.
    let mut args = base_args(model.path());
    args.push("--no-auth".into());
    let s = spawn(args);

    // 8,010 tokens of contents: over, and the count includes each message's framing.
    let over = json!({"messages": qwen3_dialogue(&tok, 8010), "extraction_types": ["preference"]});
    let answer = post(&s.base, EXTRACT, None, serde_json::to_vec(&over).unwrap()).await;
    assert_error(&answer, 413, 40305);
    let msg = answer.2["message"].as_str().unwrap();
    assert!(msg.contains("limit of 8000"), "{msg}");
    let counted: usize = msg.split_whitespace().find_map(|w| w.parse().ok()).unwrap();
    let framing = counted - 8010;
    assert!(framing > 0, "{msg}");

    // The same dialogue shape, its contents shortened until contents and framing land just
    // under the limit: the framing changes with the message count, so each answer's count
    // (the 413's message, or the 200's x-input-tokens) steers the next try.
    let mut target = 8010 - framing;
    let mut input = 0;
    for _ in 0..8 {
        let under =
            json!({"messages": qwen3_dialogue(&tok, target), "extraction_types": ["preference"]});
        let answer = post(&s.base, EXTRACT, None, serde_json::to_vec(&under).unwrap()).await;
        let counted: usize = if answer.0 == 413 {
            assert_error(&answer, 413, 40305);
            let msg = answer.2["message"].as_str().unwrap();
            let counted = msg.split_whitespace().find_map(|w| w.parse().ok()).unwrap();
            assert!(counted > 8000, "{msg}");
            counted
        } else {
            assert_eq!(answer.0, 200, "{}", answer.2);
            input = answer.1["x-input-tokens"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(input <= 8000, "x-input-tokens {input}");
            if input >= 7950 {
                break;
            }
            input
        };
        target = target + 7975 - counted;
    }
    assert!((7950..=8000).contains(&input), "x-input-tokens {input}");
}

#[tokio::test]
async fn a_small_context_lowers_the_input_limit_so_near_limit_input_is_413_not_500() {
    // A 3 MiB KV pool on the tiny model holds 6,144 positions: less than the prompts'
    // instructions (about 2,700 byte-level tokens), an 8,000-token dialogue and the longest
    // answer together.
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--no-auth",
            "--kv-cache-mb",
            "3",
            "--max-input-tokens",
            "8000",
        ]
        .map(String::from),
    );
    let s = spawn(args);
    let over = post(&s.base, EXTRACT, None, memory_request(3000)).await;
    assert_error(&over, 413, 40305);
    let msg = over.2["message"].as_str().unwrap();
    let limit: usize = msg
        .rsplit("limit of ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no limit in {msg}"));
    assert!((500..3000).contains(&limit), "lowered to {limit}: {msg}");
    // Just under the lowered limit: answered, because the whole prompt and answer fit.
    let near = post(&s.base, EXTRACT, None, memory_request(limit - 40)).await;
    assert_eq!(near.0, 200, "{}", near.2);
}
