//! The Grafana dashboard (`deploy/grafana/memex.json`) queries only metrics that a live memex
//! exports: every `memex_*` name in its queries must be a family in `/metrics` after one
//! successful and one rejected request (labelled families appear only once used), and must be
//! one README documents.

mod common;

use std::collections::BTreeSet;

use common::{base_args, post, scrape, set_flag, spawn_with_keys, tiny_model_dir};
use serde_json::{json, Value};

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/memex.json");
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// What the dashboard must show (its panels), as metric families.
const REQUIRED: [&str; 10] = [
    "memex_requests_total",
    "memex_request_duration_seconds",
    "memex_queued_requests",
    "memex_in_flight_requests",
    "memex_time_to_first_token_seconds",
    "memex_generated_tokens_total",
    "memex_prompt_tokens_total",
    "memex_engine_step_sequences_total",
    "memex_engine_kv_blocks_used",
    "memex_rejections_total",
];

/// Every PromQL text in the dashboard: panel targets' `expr`, and the template variables' queries
/// (a string, or an object with a `query` string).
fn queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                    _ => queries(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The `memex_*` identifiers in one query (a name starts where no identifier character precedes).
fn metric_names(query: &str) -> Vec<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = Vec::new();
    for (i, _) in query.match_indices("memex_") {
        if query[..i].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let end = query[i..]
            .find(|c| !is_ident(c))
            .map_or(query.len(), |e| i + e);
        names.push(query[i..end].to_string());
    }
    names
}

/// The family a queried name belongs to: itself when `/metrics` has `# TYPE name`, else a
/// histogram's series (`_bucket`, `_sum`, `_count`) belong to the histogram.
fn family<'a>(name: &'a str, exposition: &str) -> Option<&'a str> {
    let typed = |n: &str, kind: Option<&str>| {
        exposition.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.next() == Some("#")
                && w.next() == Some("TYPE")
                && w.next() == Some(n)
                && kind.is_none_or(|k| w.next() == Some(k))
        })
    };
    if typed(name, None) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
        .filter(|base| typed(base, Some("histogram")))
}

#[test]
fn metric_names_are_found_at_identifier_starts_only() {
    assert_eq!(
        metric_names(
            r#"sum by (le) (rate(memex_x_bucket{job=~"memex"}[5m])) / my_memex_y + memex_z"#
        ),
        ["memex_x_bucket", "memex_z"]
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).expect("dashboard JSON");
    let mut texts = Vec::new();
    queries(&dashboard, &mut texts);
    let queried: BTreeSet<String> = texts.iter().flat_map(|q| metric_names(q)).collect();
    assert!(!queried.is_empty(), "no memex_* metric in the dashboard");
    for q in &texts {
        // A cheap syntax guard for hand-edited queries.
        for (open, close) in [('(', ')'), ('{', '}'), ('[', ']')] {
            assert_eq!(
                q.matches(open).count(),
                q.matches(close).count(),
                "unbalanced {open}{close} in {q}"
            );
        }
    }

    // The engine panels need the native engine (the default without `cuda`; named here so a
    // `cuda` test build checks the same families).
    let mut args = base_args(&tiny_model_dir());
    set_flag(&mut args, "--engine", "native");
    let s = spawn_with_keys(args, "dashboard-key-5e1 rps=0 tpm=0\n");
    let body = serde_json::to_vec(&json!({"messages": [
        {"role": "user", "content": "I like green tea."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "And black coffee on Mondays."}]}))
    .unwrap();
    let key = Some("dashboard-key-5e1");
    let ok = post(&s.base, "/extract/memory", key, body.clone()).await;
    assert_eq!(ok.0, 200, "{}", ok.2);
    let rejected = post(&s.base, "/extract/memory", Some("not-a-key"), body).await;
    assert_eq!(rejected.0, 401, "{}", rejected.2);
    let exposition = scrape(&s).await;

    let readme = std::fs::read_to_string(README).unwrap();
    let mut families = BTreeSet::new();
    let mut missing = Vec::new();
    for name in &queried {
        match family(name, &exposition) {
            Some(f) => {
                assert!(
                    readme.contains(&format!("`{f}`")),
                    "{f} (queried as {name}) is not in README's metrics tables"
                );
                families.insert(f.to_string());
            }
            None => missing.push(name.as_str()),
        }
    }
    assert!(
        missing.is_empty(),
        "queried by the dashboard but not in /metrics: {missing:?}\n{exposition}"
    );
    for f in REQUIRED {
        assert!(families.contains(f), "the dashboard has no panel on {f}");
    }
}
