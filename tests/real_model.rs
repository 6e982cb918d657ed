//! A real instruct model in the loop: the seed's three examples through the whole server on
//! Qwen2.5-Coder-0.5B-Instruct (the GGUF as shipped, with its exact tokenizer directory).
//!
//! The tiny model is random and SmolLM2 is weak, so neither can notice a prompt, grammar or
//! engine change that leaves a real model with nothing to say, as compact-only JSON once did
//! (every list came back empty). Where the seed's sample responses have items, the lists here
//! must not be empty. Skips with a message when `scripts/fetch-models.sh --qwen2.5-0.5b` has not
//! run (CI runs it).

mod common;

use serde_json::{json, Value};

const GGUF: &str = "models/qwen2.5-0.5b/qwen2.5-0.5b.gguf";
const TOKENIZER: &str = "models/qwen2.5-0.5b/tokenizer/tokenizer.json";

fn server(test: &str) -> Option<common::TestServer> {
    let fetch = "--qwen2.5-0.5b";
    let gguf = memex::test_files::cached(GGUF, test, fetch)?;
    let tokenizer = memex::test_files::cached(TOKENIZER, test, fetch)?;
    let args = [
        "--model",
        &gguf.display().to_string(),
        "--tokenizer",
        &tokenizer.parent().unwrap().display().to_string(),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-auth",
        // What is judged here is the answer, not the time: a busy CI machine may take longer
        // than the default 30 s deadline for a three-branch request.
        "--request-timeout",
        "600",
    ]
    .map(String::from)
    .to_vec();
    Some(common::spawn(args))
}

async fn extract(s: &common::TestServer, body: Value) -> Value {
    let (status, _, answer) = common::post(
        &s.base,
        "/extract/memory",
        None,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["data"].clone()
}

fn items<'a>(data: &'a Value, list: &str) -> &'a Vec<Value> {
    data[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {data}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_examples_yield_memories_where_the_seed_has_them() {
    let Some(s) = server("the_seed_examples_yield_memories_where_the_seed_has_them") else {
        return;
    };

    // Seed 003, first example: a fact and an explicit preference.
    let alex = extract(
        &s,
        json!({"messages": [
            {"role": "system", "content": "Extract key memories from the dialogue."},
            {"role": "user", "content": "I'm Alex, 28, backend dev in Hangzhou, I play badminton."},
            {"role": "assistant", "content": "Hi Alex!"},
            {"role": "user", "content": "Keep replies short, not too wordy."}
        ]}),
    )
    .await;
    eprintln!("alex: {alex}");
    let memories = items(&alex, "memory_detail_list");
    assert!(!memories.is_empty(), "no memory: {alex}");
    let all = memories
        .iter()
        .map(|m| m["memory_value"].to_string())
        .collect::<String>();
    assert!(all.contains("Hangzhou") || all.contains("Alex"), "{alex}");
    let explicit = items(&alex, "preference_detail_list")
        .iter()
        .filter(|p| p["preference_type"] == "explicit_preference")
        .count();
    assert!(explicit > 0, "no explicit preference: {alex}");

    // Second example: one travel fact.
    let trip = extract(
        &s,
        json!({"messages": [{"role": "user",
                             "content": "Flying to Beijing next Wed, staying at Ji Hotel Chaoyang."}],
               "extraction_types": ["memory"]}),
    )
    .await;
    eprintln!("trip: {trip}");
    assert!(!items(&trip, "memory_detail_list").is_empty(), "{trip}");
    assert!(trip.get("preference_detail_list").is_none(), "{trip}");

    // Third example: explicit formatting preferences.
    let docs = extract(
        &s,
        json!({"messages": [
            {"role": "user", "content": "Use Markdown for docs, code blocks should have syntax highlighting."},
            {"role": "assistant", "content": "Got it."},
            {"role": "user", "content": "Also go easy on emoji."}
        ], "extraction_types": ["preference"]}),
    )
    .await;
    eprintln!("docs: {docs}");
    assert!(!items(&docs, "preference_detail_list").is_empty(), "{docs}");
    assert!(docs.get("memory_detail_list").is_none(), "{docs}");
}
