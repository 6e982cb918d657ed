//! Per-key limits shared across replicas through a real `redis-server` (`--limits-redis`): two
//! memex processes serving one key together stay within one key's rate and token quota; when
//! Redis is killed, `--limits-redis-fail open` serves with each process's own limits and `closed`
//! answers 503/50004; when Redis comes back (empty), the shared limits resume. Skipped, saying
//! so, when `redis-server` is not installed (`.ci/run` installs Debian's package).
//!
//! The bounds are GCRA's own (at most `burst + rps × elapsed` cells, `tpm + tpm/60 × elapsed`
//! tokens), with elapsed time measured around all the requests, so they hold on a slow machine;
//! one key's limits counted twice (no sharing) break them by a wide margin.

mod common;

use std::time::{Duration, Instant};

use common::binary::Binary;
use common::{base_args, dialogue_of_tokens, tiny_model_dir};
use memex::test_redis::RedisServer;
use serde_json::json;

/// Both processes hash keys under the same secret, so they name the same Redis state.
const SECRET: &str = "limits-redis-test-secret";
/// The request-rate key: 2 per second after a burst of 4.
const RATE_KEY: &str = "shared-rate-key-5d2c91";
const RPS: f64 = 2.0;
const BURST: f64 = 4.0;
/// The token-quota key: 600 input tokens per minute.
const QUOTA_KEY: &str = "shared-quota-key-8e17a4";
const TPM: f64 = 600.0;

/// `memex serve` on the tiny model, its limits in `redis`, with these extra flags.
fn memex(redis: &RedisServer, keys: &str, extra: &[&str]) -> Binary {
    let mut args = base_args(&tiny_model_dir());
    args.extend(["--limits-redis".to_string(), redis.url()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Binary::start(&args, Some(keys), &[("MEMEX_KEY_HASH_SECRET", SECRET)])
}

/// A request that takes a request cell and nothing else: the content type is refused (415)
/// after the key's rate is checked. Its status and `Retry-After`.
async fn cheap(s: &Binary, key: &str) -> (u16, Option<String>, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/extract/memory", s.base))
        .header("authorization", format!("Token {key}"))
        .header("content-type", "text/plain")
        .body("hi")
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("request sent");
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry_after, r.json().await.expect("JSON envelope"))
}

/// Cheap requests to `s` until one gets `want` (at most `within`); how many it took.
async fn until_status(s: &Binary, key: &str, want: u16, within: Duration) -> usize {
    let started = Instant::now();
    for tries in 1.. {
        if cheap(s, key).await.0 == want {
            return tries;
        }
        assert!(
            started.elapsed() < within,
            "no {want} within {within:?}: {}",
            s.all_output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

async fn backend_errors(s: &Binary) -> f64 {
    s.metric("memex_limits_backend_errors_total{kind=\"timeout\"}")
        .await
        + s.metric("memex_limits_backend_errors_total{kind=\"error\"}")
            .await
}

#[tokio::test]
async fn two_processes_share_one_keys_rate_and_token_quota() {
    let Some(redis) = RedisServer::start("two_processes_share_one_keys_rate_and_token_quota")
    else {
        return;
    };
    let keys = format!("{RATE_KEY} rps={RPS} burst={BURST} tpm=0\n{QUOTA_KEY} rps=0 tpm={TPM}\n");
    // Closed, with a deadline no busy machine misses: a check that fails cannot fall back to a
    // process's own limits and so cannot let more through than the shared state allows.
    let flags = [
        "--limits-redis-fail",
        "closed",
        "--limits-redis-timeout",
        "2",
    ];
    let a = memex(&redis, &keys, &flags);
    let b = memex(&redis, &keys, &flags);
    a.wait_ready().await;
    b.wait_ready().await;
    for s in [&a, &b] {
        assert!(
            s.all_output()
                .contains("shared limits: connected to Redis, scripts loaded"),
            "{}",
            s.all_output()
        );
    }

    // Request rate: both processes, alternately, as fast as one client goes, for 3 s.
    let started = Instant::now();
    let (mut accepted, mut limited) = ([0usize; 2], [0usize; 2]);
    while started.elapsed() < Duration::from_secs(3) {
        for (i, s) in [&a, &b].into_iter().enumerate() {
            let (status, retry_after, body) = cheap(s, RATE_KEY).await;
            match status {
                415 => accepted[i] += 1,
                429 => {
                    assert_eq!(body["code"], 40300, "{body}");
                    assert!(retry_after.is_some(), "429 without Retry-After");
                    limited[i] += 1;
                }
                other => panic!("{other}: {body}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total = (accepted[0] + accepted[1]) as f64;
    // One key's worth across both: no more than its burst plus its rate over the time taken
    // (each process alone would be allowed that much, so twice it without sharing).
    assert!(
        total <= BURST + RPS * elapsed,
        "{accepted:?} accepted in {elapsed:.2} s: over {BURST} + {RPS}/s"
    );
    assert!(total >= BURST, "{accepted:?}: the burst is usable");
    assert!(
        limited[0] > 0 && limited[1] > 0 && accepted[0] > 0 && accepted[1] > 0,
        "both processes serve and limit the key: accepted {accepted:?}, limited {limited:?}"
    );

    // Token quota: valid requests of the same size, alternately, for at least 3 s.
    let body = serde_json::to_vec(&json!({
        "messages": dialogue_of_tokens(150),
        "extraction_types": ["memory"]
    }))
    .unwrap();
    let started = Instant::now();
    let (mut served, mut tokens, mut refused) = (0usize, 0f64, [0usize; 2]);
    while started.elapsed() < Duration::from_secs(3) || refused.contains(&0) {
        assert!(started.elapsed() < Duration::from_secs(300), "too slow");
        for (i, s) in [&a, &b].into_iter().enumerate() {
            let (status, headers, answer) =
                common::post(&s.base, "/extract/memory", Some(QUOTA_KEY), body.clone()).await;
            match status {
                200 => {
                    served += 1;
                    tokens += common::header_f64(&headers, "x-input-tokens");
                }
                429 => {
                    assert_eq!(answer["code"], 40301, "{answer}");
                    refused[i] += 1;
                }
                other => panic!("{other}: {answer}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        tokens <= TPM + TPM / 60.0 * elapsed,
        "{tokens} tokens ({served} requests) served in {elapsed:.1} s: over {TPM} + {TPM}/min"
    );
    assert!(
        tokens > TPM - 150.0,
        "{tokens} tokens: the whole minute's quota is usable at once"
    );
    assert_eq!(backend_errors(&a).await + backend_errors(&b).await, 0.0);
}

#[tokio::test]
async fn a_killed_redis_fails_open_or_closed_and_a_restarted_one_resumes_the_limits() {
    let Some(mut redis) = RedisServer::start("a_killed_redis_fails_open_or_closed") else {
        return;
    };
    // One cell per 100 s after a burst of 3: nothing refills during the test.
    const KEY: &str = "shared-outage-key-2b9f0e";
    let keys = format!("{KEY} rps=0.01 burst=3 tpm=0\n");
    let open = memex(
        &redis,
        &keys,
        &[
            "--limits-redis-fail",
            "open",
            "--limits-redis-timeout",
            "0.5",
        ],
    );
    let closed = memex(
        &redis,
        &keys,
        &[
            "--limits-redis-fail",
            "closed",
            "--limits-redis-timeout",
            "0.5",
        ],
    );
    open.wait_ready().await;
    closed.wait_ready().await;

    // Shared: the burst of 3 across both, then 429 from both.
    let statuses = [
        cheap(&open, KEY).await.0,
        cheap(&closed, KEY).await.0,
        cheap(&open, KEY).await.0,
        cheap(&closed, KEY).await.0,
        cheap(&open, KEY).await.0,
    ];
    assert_eq!(statuses, [415, 415, 415, 429, 429]);

    redis.kill();
    // Open: served with the process's own limiter, whose burst is untouched, then limited by it.
    let statuses = [
        cheap(&open, KEY).await.0,
        cheap(&open, KEY).await.0,
        cheap(&open, KEY).await.0,
        cheap(&open, KEY).await.0,
    ];
    assert_eq!(statuses, [415, 415, 415, 429], "{}", open.all_output());
    assert!(backend_errors(&open).await >= 4.0);
    let logged = open
        .json_lines()
        .iter()
        .filter(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("serving with this replica's own limits"))
        })
        .count();
    assert_eq!(logged, 1, "failures are logged at most every 10 s");
    // Closed: 503/50004 with Retry-After, counted.
    for _ in 0..3 {
        let (status, retry_after, body) = cheap(&closed, KEY).await;
        assert_eq!(
            (status, body["code"].as_u64()),
            (503, Some(50004)),
            "{body}"
        );
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    assert!(backend_errors(&closed).await >= 3.0);
    assert_eq!(
        closed
            .metric("memex_rejections_total{reason=\"limits_unavailable\"}")
            .await,
        3.0
    );

    // Restarted, empty: both reconnect on their own and take from one fresh burst of 3 again.
    // The open process's own limiter is spent, so a 415 from it can only come from Redis.
    redis.restart();
    until_status(&closed, KEY, 415, Duration::from_secs(30)).await;
    until_status(&open, KEY, 415, Duration::from_secs(30)).await;
    let mut accepted = 2;
    for _ in 0..3 {
        for s in [&open, &closed] {
            match cheap(s, KEY).await.0 {
                415 => accepted += 1,
                429 => {}
                other => panic!("{other}"),
            }
        }
    }
    assert_eq!(accepted, 3, "one shared burst after the restart");
    let errors = (backend_errors(&open).await, backend_errors(&closed).await);
    for _ in 0..4 {
        cheap(&open, KEY).await;
        cheap(&closed, KEY).await;
    }
    assert_eq!(
        (backend_errors(&open).await, backend_errors(&closed).await),
        errors,
        "no failures once Redis is back"
    );
}

#[test]
fn shared_limits_without_a_common_key_hash_secret_refuse_to_start() {
    // Redis is keyed by the key's hash: with a random secret per process no two replicas would
    // share a key's state, so the start fails (no Redis is needed to find that out).
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--limits-redis",
            "redis://127.0.0.1:1/",
            "--api-key",
            "some-key",
        ]
        .map(String::from),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memex"))
        .arg("serve")
        .args(&args)
        .env_remove("MEMEX_KEY_HASH_SECRET")
        .env_remove("MEMEX_API_KEY")
        .output()
        .expect("memex runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--key-hash-secret"), "{stderr}");
}
