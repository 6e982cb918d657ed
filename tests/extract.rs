//! `memex extract` and `memex eval`, the real binary on the tiny random Qwen3: every input line
//! gets one whole output line with the server's codes (bad lines and duplicates included), a
//! re-run resumes, `--retry-failed` reruns retryable failures, SIGINT mid-run leaves valid JSONL
//! that a re-run completes, and eval reports on a small dataset.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{base_args, tiny_model_dir, MAX_ITEMS, MAX_TEXT_CHARS};
use serde_json::{json, Value};

/// The test servers' model flags (small output bounds), without the serving ones.
fn model_args() -> Vec<String> {
    let mut args = base_args(&tiny_model_dir());
    for flag in ["--host", "--port"] {
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
    }
    args
}

fn memex(sub: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_memex"));
    cmd.arg(sub)
        .args(args)
        .args(model_args())
        .env("RUST_LOG", "warn,mistralrs_core=error")
        .env_remove("MEMEX_MAX_CONCURRENT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn extract(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend(extra);
    memex("extract", &args).output().expect("memex runs")
}

/// Every output line, parsed; panics on a line that is not whole JSON.
fn read_output(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "half a line at the end"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn by_id(lines: &[Value]) -> HashMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l.clone()))
        .collect()
}

fn body(i: usize) -> Value {
    json!({"messages": [
        {"role": "user", "content": format!("Note {i}: I moved to Leeds and I like oolong tea.")}
    ], "extraction_types": ["memory"]})
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success_line(line: &Value) {
    assert_eq!(line["error"], Value::Null, "{line}");
    assert_eq!(line["response"]["status_code"], 200, "{line}");
    let envelope = &line["response"]["body"];
    assert_eq!(envelope["code"], 0);
    let memories = envelope["data"]["memory_detail_list"].as_array().unwrap();
    assert!(memories.len() <= MAX_ITEMS);
    for m in memories {
        assert!(m["memory_value"].as_str().unwrap().chars().count() <= MAX_TEXT_CHARS);
    }
    assert!(line["response"]["stats"]["input_tokens"].as_u64().unwrap() > 0);
}

fn assert_error_line(line: &Value, status: u64, code: u64) {
    assert_eq!(line["response"]["status_code"], status, "{line}");
    assert_eq!(line["response"]["body"]["code"], code, "{line}");
    assert_eq!(line["response"]["body"]["data"], Value::Null, "{line}");
    assert_eq!(line["error"]["code"], code, "{line}");
    assert!(!line["error"]["message"].as_str().unwrap().is_empty());
}

#[test]
fn every_line_gets_one_answer_with_the_servers_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let batch = json!({"custom_id": "b", "method": "POST", "url": "/extract/memory",
                       "body": {"messages": [{"role": "user", "content": "我住在杭州，喜欢喝绿茶。"}]}});
    let mut with_id = body(1);
    with_id["custom_id"] = json!("a");
    let too_many_tokens = json!({"custom_id": "long", "messages": common::dialogue_of_tokens(120)});
    let over_bytes =
        json!({"custom_id": "big", "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let lines = [
        with_id.to_string(),                                       // 1: a
        batch.to_string(),                                         // 2: b
        body(3).to_string(),                                       // 3: line-3
        "{\"custom_id\": \"broken\", \"messages\": [".to_string(), // 4: not JSON
        json!({"custom_id": "empty", "messages": []}).to_string(), // 5: 40002
        String::new(),                                             // 6: blank, skipped
        too_many_tokens.to_string(),                               // 7: 40305
        json!({"custom_id": "role", "messages": [{"role": "robot", "content": "x"}]}).to_string(),
        with_id.to_string(),    // 9: duplicate of 1
        over_bytes.to_string(), // 10: over the byte limit
        json!({"custom_id": "c", "url": "/v1/chat/completions", "body": body(11)}).to_string(),
    ];
    write_lines(&input, &lines);
    let out = extract(
        &input,
        &output,
        &["--max-input-tokens", "100", "--no-progress"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = read_output(&output);
    assert_eq!(
        lines.len(),
        10,
        "one line per non-blank input line: {lines:#?}"
    );
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    for id in [
        "a", "b", "line-3", "line-4", "empty", "long", "role", "line-10", "c",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let found = |id: &str, line: u64| {
        lines
            .iter()
            .find(|l| l["custom_id"] == id && l["line"] == line)
            .unwrap_or_else(|| panic!("{id} at line {line}"))
    };
    assert_success_line(found("a", 1));
    assert_success_line(found("line-3", 3));
    // The batch shape without extraction_types gets both lists, as on the server.
    let b = found("b", 2);
    assert_eq!(b["error"], Value::Null, "{b}");
    assert!(b["response"]["body"]["data"]["preference_detail_list"].is_array());
    assert_eq!(b["response"]["stats"]["language"], "Chinese");

    assert_error_line(found("line-4", 4), 400, 40000);
    assert!(found("line-4", 4)["error"]["message"]
        .as_str()
        .unwrap()
        .contains("line 4"));
    assert_error_line(found("empty", 5), 400, 40002);
    let long = found("long", 7);
    assert_error_line(long, 413, 40305);
    assert!(
        long["error"]["message"].as_str().unwrap().contains("100"),
        "{long}"
    );
    assert_error_line(found("role", 8), 400, 40000);
    let dup = found("a", 9);
    assert_error_line(dup, 400, 40000);
    assert_eq!(dup["duplicate_of"], 1);
    assert!(dup["error"]["message"].as_str().unwrap().contains("line 1"));
    // Over --max-body-bytes (65536): refused as the server refuses it, without reading its id.
    assert_error_line(found("line-10", 10), 413, 40000);
    assert_error_line(found("c", 11), 400, 40000);

    let err = stderr(&out);
    assert!(err.contains("10 answered (3 ok, 7 failed)"), "{err}");

    // A re-run has nothing left to do, duplicates included.
    let again = extract(
        &input,
        &output,
        &["--max-input-tokens", "100", "--no-progress"],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(read_output(&output).len(), 10);
    assert!(
        stderr(&again).contains("0 answered (0 ok, 0 failed), 10 skipped"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn a_rerun_skips_answered_ids_and_retry_failed_reruns_retryable_failures() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let lines: Vec<String> = ["done", "flaky", "refused", "new"]
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let mut b = body(i);
            b["custom_id"] = json!(id);
            b.to_string()
        })
        .collect();
    write_lines(&input, &lines);
    // An earlier run: one success, one retryable failure, one final failure, and a line it was
    // killed while writing.
    let earlier = |id: &str, line: u64, code: u64| {
        let error = (code != 0).then(|| json!({"code": code, "message": "earlier"}));
        json!({"custom_id": id, "line": line, "error": error,
               "response": {"status_code": 200, "request_id": "r", "body": {"code": code, "message": "earlier", "data": null}}})
        .to_string()
    };
    let previous = format!(
        "{}\n{}\n{}\n{{\"custom_id\": \"new\", \"li",
        earlier("done", 1, 0),
        earlier("flaky", 2, 50000),
        earlier("refused", 3, 40002)
    );
    std::fs::write(&output, previous).unwrap();

    let out = extract(&input, &output, &["--no-progress"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cut a partial last line"),
        "{}",
        stderr(&out)
    );
    let lines = read_output(&output);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert_success_line(&by_id(&lines)["new"]);
    assert!(
        stderr(&out).contains("1 answered (1 ok, 0 failed), 3 skipped"),
        "{}",
        stderr(&out)
    );

    let out = extract(&input, &output, &["--no-progress", "--retry-failed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = read_output(&output);
    assert_eq!(lines.len(), 5);
    // The latest line for an id is its answer.
    assert_success_line(&lines[4]);
    assert_eq!(lines[4]["custom_id"], "flaky");
    assert!(stderr(&out).contains("1 answered (1 ok, 0 failed), 3 skipped"));

    // Not ours: refused before anything is read or loaded.
    let foreign = dir.path().join("foreign.jsonl");
    std::fs::write(&foreign, "{\"hello\": 1}\n").unwrap();
    let out = extract(&input, &foreign, &["--no-progress"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to append"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn stdin_to_stdout() {
    let mut child = memex("extract", &["-", "--output", "-", "--no-progress"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..3 {
        writeln!(stdin, "{}", body(i)).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let ids: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ["line-1", "line-2", "line-3"]);
}

/// Start `memex extract` on `n` lines, wait for its first answers, and interrupt it `signals`
/// times; returns its exit code, stderr, and the input and output paths.
fn interrupt(dir: &Path, n: usize, signals: usize) -> (Option<i32>, String, PathBuf, PathBuf) {
    let (input, output) = (dir.join("in.jsonl"), dir.join("out.jsonl"));
    let lines: Vec<String> = (0..n).map(|i| body(i).to_string()).collect();
    write_lines(&input, &lines);
    let mut child = memex(
        "extract",
        &[
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--max-concurrent",
            "2",
        ],
    )
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&output).map_or(0, |t| t.lines().count()) < 2 {
        assert!(Instant::now() < deadline, "no answers");
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    for _ in 0..signals {
        let ok = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "slow to stop");
    (out.status.code(), stderr(&out), input, output)
}

#[test]
fn sigint_mid_run_leaves_whole_lines_and_a_rerun_completes_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let n = 60;
    let (code, err, input, output) = interrupt(dir.path(), n, 1);
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let first = read_output(&output);
    assert!(
        !first.is_empty() && first.len() < n,
        "{} lines",
        first.len()
    );
    for l in &first {
        assert_success_line(l);
    }

    let out = extract(&input, &output, &["--no-progress"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = read_output(&output);
    assert_eq!(all.len(), n, "each line answered exactly once");
    let ids = by_id(&all);
    assert_eq!(ids.len(), n);
    for i in 1..=n {
        assert!(ids.contains_key(&format!("line-{i}")));
    }
}

#[test]
fn a_second_sigint_abandons_in_flight_lines_and_the_output_stays_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err, _, output) = interrupt(dir.path(), 200, 2);
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("abandon"), "{err}");
    let lines = read_output(&output);
    assert!(lines.len() < 200);
    for l in &lines {
        assert_success_line(l);
    }
}

#[test]
fn eval_reports_on_a_small_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("d.jsonl");
    let line = |id: &str, lang: &str, tags: Value, content: &str, facts: Value| {
        json!({"id": id, "language": lang, "tags": tags,
               "request": {"messages": [{"role": "user", "content": content}]},
               "expected": {"facts": facts, "preferences": []}})
        .to_string()
    };
    write_lines(
        &dataset,
        &[
            line(
                "en-1",
                "en",
                json!(["facts"]),
                "I live in Leeds.",
                json!(["The user lives in Leeds."]),
            ),
            line(
                "zh-1",
                "zh",
                json!(["facts"]),
                "我住在杭州。",
                json!(["用户住在杭州。"]),
            ),
            line(
                "en-2",
                "en",
                json!(["nothing"]),
                "What time is it?",
                json!([]),
            ),
        ],
    );
    // An input limit the model's context cannot hold is lowered with a warning: the warning
    // goes to stderr and stdout stays the JSON report alone.
    let out = memex(
        "eval",
        &[
            dataset.to_str().unwrap(),
            "--json",
            "--max-input-tokens",
            "1000000",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("lowered"), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let all = &report["summary"]["all"];
    assert_eq!(all["dialogues"], 3);
    assert_eq!(all["facts"]["expected"], 2);
    assert_eq!(all["nothing_dialogues"], 1);
    assert!(all["schema_validity"].as_f64().unwrap() <= 1.0);
    assert!(all["latency_max_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["summary"]["zh"]["dialogues"], 1);
    let dialogues = report["dialogues"].as_array().unwrap();
    assert_eq!(dialogues.len(), 3);
    assert_eq!(dialogues[1]["id"], "zh-1");

    let table = memex("eval", &[dataset.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains("fact recall") && text.contains("zh"),
        "{text}"
    );
}
