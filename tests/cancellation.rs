//! Cancellation over HTTP against the real engine: clients that disconnect mid-generation must
//! leave nothing running. Its own test binary, so that no other test's load distorts the timings.

mod common;

use std::time::{Duration, Instant};

use common::{base_args, metric, post, scrape, spawn, tiny_model_dir, TestServer};
use serde_json::json;

const CLIENTS: usize = 50;

fn body(i: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "messages": [{"role": "user", "content": format!("Client {i}: I drink green tea and walk my dog every morning.")}],
        "extraction_types": ["memory"]
    }))
    .unwrap()
}

async fn gauge(s: &TestServer, name: &str) -> f64 {
    metric(&scrape(s).await, name).unwrap_or_else(|| panic!("{name} missing"))
}

/// Median latency of `n` requests sent one after another.
async fn median_latency(s: &TestServer, n: usize) -> Duration {
    let mut took = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        let (status, _, b) = post(&s.base, "/extract/memory", None, body(1000 + i)).await;
        assert_eq!(status, 200, "{b}");
        took.push(started.elapsed());
    }
    took.sort();
    took[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_disconnecting_mid_generation_leave_nothing_running() {
    let mut args = base_args(&tiny_model_dir());
    // Long outputs, and room for every client at once: if cancelled generations kept running,
    // the engine would still be busy with all of them.
    args.extend(
        [
            "--no-auth",
            "--max-concurrent",
            "64",
            "--max-queue",
            "64",
            "--max-items",
            "4",
            "--max-text-chars",
            "48",
        ]
        .map(String::from),
    );
    let s = spawn(args);
    let baseline = median_latency(&s, 3).await;

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let base = s.base.clone();
            tokio::spawn(async move { post(&base, "/extract/memory", None, body(i)).await })
        })
        .collect();
    // Wait until most clients are generating, then all of them go away.
    let deadline = Instant::now() + Duration::from_secs(120);
    while gauge(&s, "memex_in_flight_requests").await < (CLIENTS / 2) as f64 {
        assert!(
            Instant::now() < deadline,
            "the clients never got generating"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let finished_before_abort = tasks.iter().filter(|t| t.is_finished()).count();
    for t in &tasks {
        t.abort();
    }

    // The server sees the disconnects and frees every slot.
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
        if in_flight == 0.0 && queued == 0.0 && cancelled >= (CLIENTS / 2) as f64 {
            assert!(cancelled as usize + finished_before_abort >= CLIENTS / 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in flight {in_flight}, queued {queued}, cancelled {cancelled}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Nothing left running in the engine: the next requests are as fast as before.
    let after = median_latency(&s, 3).await;
    assert!(
        after <= baseline * 3 + Duration::from_secs(1),
        "after the disconnects a request took {after:?}, before {baseline:?}"
    );
}
