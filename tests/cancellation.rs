//! Cancellation over HTTP against the real engine: clients that disconnect mid-generation must
//! leave nothing running. Its own test binary, so that no other test's load distorts the timings.

mod common;

use std::time::{Duration, Instant};

use common::{base_args, metric, post, scrape, set_flag, spawn, tiny_model_dir, TestServer};
use serde_json::json;

const CLIENTS: usize = 50;
/// Admission slots: requests in the engine at once.
const SLOTS: usize = 8;

fn body(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "messages": [{"role": "user", "content": format!("Client {i:04}: I drink green tea and walk my dog every morning.")}],
        "extraction_types": ["memory"]
    }))
    .unwrap()
}

/// The slowest of `n` requests sent one after another.
async fn slowest_of(s: &TestServer, n: usize) -> Duration {
    let mut took = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        let (status, _, b) = post(&s.base, "/extract/memory", None, body(1000 + i)).await;
        assert_eq!(status, 200, "{b}");
        took.push(started.elapsed());
    }
    took.into_iter().max().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_disconnecting_mid_generation_leave_nothing_running() {
    let mut args = base_args(&tiny_model_dir());
    args.extend(
        [
            "--no-auth",
            "--max-concurrent",
            &SLOTS.to_string(),
            "--max-queue",
            "64",
            // Every client is admitted (a slot or the queue): this test is about disconnects,
            // not about refusing what would miss a deadline or wait long for a slot.
            "--request-timeout",
            "3600",
            "--max-slot-wait",
            "3600",
        ]
        .map(String::from),
    );
    // Long outputs: generations that went on after their clients left would be easy to see.
    set_flag(&mut args, "--max-items", "6");
    set_flag(&mut args, "--max-text-chars", "120");
    let s = spawn(args);
    let baseline = slowest_of(&s, 2).await;

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let base = s.base.clone();
            tokio::spawn(async move { post(&base, "/extract/memory", None, body(i)).await })
        })
        .collect();
    // Every slot generating and the rest queued; then let them get past the (batched) prompt
    // processing into decoding, and go.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = scrape(&s).await;
        let in_flight = metric(&text, "memex_in_flight_requests").unwrap();
        let queued = metric(&text, "memex_queued_requests").unwrap();
        if in_flight == SLOTS as f64 && queued == (CLIENTS - SLOTS) as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in flight {in_flight}, queued {queued}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(baseline * 2).await;
    let finished_before_abort = tasks.iter().filter(|t| t.is_finished()).count();
    for t in &tasks {
        t.abort();
    }
    let aborted_at = Instant::now();

    // The server sees the disconnects and frees every slot and queue place.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = scrape(&s).await;
        let in_flight = metric(&text, "memex_in_flight_requests").unwrap();
        let queued = metric(&text, "memex_queued_requests").unwrap();
        let cancelled = metric(
            &text,
            "memex_requests_cancelled_total{route=\"/extract/memory\"}",
        )
        .unwrap_or(0.0);
        if in_flight == 0.0
            && queued == 0.0
            && cancelled as usize + finished_before_abort >= CLIENTS
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in flight {in_flight}, queued {queued}, cancelled {cancelled}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let freed = aborted_at.elapsed();

    // Nothing of theirs is left in the engine: the next requests are as fast as before. (Were
    // the abandoned generations still running, these would queue behind them in the engine.)
    let after = slowest_of(&s, 3).await;
    eprintln!("slowest request before {baseline:?}, after {after:?}; slots freed in {freed:?}");
    assert!(
        after <= baseline * 3 + Duration::from_secs(2),
        "after the disconnects a request took {after:?}, before {baseline:?}"
    );
}
