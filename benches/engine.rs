//! Prefill and decode tokens/s at 1, 4 and 8 concurrent requests, through the `Engine` trait only,
//! and llama.cpp's server beside it on the same GGUF files, prompts and schemas.
//!
//!     scripts/fetch-models.sh --smollm2          # optional: SmolLM2-135M-Instruct Q4_1 GGUF
//!     cargo bench --bench engine                 # tiny Qwen3 and SmolLM2 (when fetched)
//!     cargo bench --bench engine -- tiny         # only models whose name contains "tiny"
//!     MEMEX_BENCH_MODELS=q4km=.cache/models/qwen2.5-0.5b/qwen2.5-0.5b.gguf@.cache/models/qwen2.5-0.5b/tokenizer \
//!     MEMEX_BENCH_LLAMA=.cache/llama.cpp/bin/llama-server cargo bench --bench engine -- q4km
//!
//! Environment: `MEMEX_BENCH_ENGINE` (`native`, the default, or `mistralrs`; see [`build_engine`]),
//! `MEMEX_BENCH_NATIVE_DEVICE` (the native engine's `--native-device`: `cpu`, the default in a CPU
//! build, `cuda` or `cpu-tensors`), `MEMEX_BENCH_LEVELS` (default `1,4,8`), `MEMEX_BENCH_ROUNDS`
//! (rounds per level, median kept; default 3), `MEMEX_BENCH_DECODE_CHARS` (length of the forced output string; default 256),
//! `MEMEX_BENCH_SMOLLM2` (GGUF path; default the fetch script's), `MEMEX_BENCH_MODELS` (more
//! models: `name=path[@tokenizer dir],...`, GGUF files or safetensors directories),
//! `MEMEX_BENCH_MAX_RUNNING`, `MEMEX_BENCH_KV_MB`, `MEMEX_BENCH_STEP_TOKENS` (the native engine's
//! `--max-num-seqs`, `--kv-cache-mb`, `--step-tokens`; default the engine's defaults), `MEMEX_ROOT`
//! (the repository, when the binary runs away from the tree it was built in),
//! `MEMEX_BENCH_QUANTIZE` (`--quantize` for safetensors models), `MEMEX_BENCH_GATHER_DECODE=1`
//! (the tensor path's reference decode attention instead of the paged op),
//! `MEMEX_BENCH_DECODE_ONLY=1`
//! (skip the prefill rounds), `MEMEX_BENCH_PREFILL_DIALOGUE` (the corpus dialogue the prefill
//! prompts are built on; default `en-1000-1`; `zh-1000-1` is ~2,900 SmolLM2 tokens), `MEMEX_BENCH_DECODE_PROMPT=branches` (decode after the real branch
//! prompts of a ~1,000-token dialogue, three sequences a dialogue, instead of a short prompt each:
//! the sequences share the system prompt and their request's dialogue; the prefix cache is on and
//! the prompts are prefilled by an untimed pass first, so the round times decode alone; memex
//! only: llama.cpp runs with its prompt cache off), `MEMEX_BENCH_LLAMA` (a
//! `llama-server` binary: GGUF models are then also run there, one server after the other, with
//! `MEMEX_BENCH_THREADS` threads, default all), `MEMEX_BENCH_OUT` (also write the results as JSON
//! there).
//!
//! Two workloads, each isolating one phase:
//! - prefill: the real memory-branch prompt for a ~1,000-token corpus dialogue (rendered by the
//!   pipeline), with a schema that allows only `{"ok":true}` or `{"ok":false}`. Rate = prompt
//!   tokens of all requests / time until the last first token.
//! - decode: a short prompt and a schema that forces one string of exactly N characters. Rate =
//!   generated tokens after the first / time from the first first-token to the last token.
//!
//! No prompt is ever sent twice (the prefix cache would make a repeat nearly free, in memex and in
//! llama.cpp): every request's dialogue opens with its own fixed-width session tag, so the
//! requests of a round differ by a token or so in length; the branch template before the
//! dialogue is shared, as in real traffic.
//!
//! llama.cpp gets each prompt on its chat endpoint (its GGUF chat template, as memex applies
//! it), with `cache_prompt` off, `max_tokens: 1` for prefill and the same JSON schema as its
//! `response_format` for decode. Its rates are computed as memex's: prompt tokens / time until
//! the last request's first token, and generated tokens after the first / time from the first
//! first-token to the end (a request's first token is placed `predicted_ms` before its response).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use memex::engine::mistral::MistralOptions;
use memex::engine::native::{NativeDevice, NativeOptions, Quantize};
use memex::engine::{
    Engine, FinishReason, GenerateRequest, Generation, ModelSource, PromptMessage, PromptRole,
};
use memex::pipeline::branch::Branch;
use memex::pipeline::clean::{self, Dialogue};
use memex::pipeline::language;
use memex::pipeline::prompt::Prompts;

/// The one place an engine is built: the way `server::load` builds it, selected by
/// `MEMEX_BENCH_ENGINE` (`native`, the default, or `mistralrs`).
async fn build_engine(source: &ModelSource) -> anyhow::Result<Arc<dyn Engine>> {
    use clap::ValueEnum;
    let defaults = NativeOptions::default();
    let which = std::env::var("MEMEX_BENCH_ENGINE").unwrap_or_else(|_| "native".into());
    let kind = memex::engine::EngineKind::from_str(&which, true)
        .map_err(|e| anyhow::anyhow!("MEMEX_BENCH_ENGINE {which:?}: {e}"))?;
    memex::engine::load(
        kind,
        source,
        &MistralOptions::default(),
        // Off, as llama.cpp's prompt cache is in the side-by-side: each round's prompts share
        // the branch template, and a cache would serve it. On for the branches decode workload,
        // which is about what a request's sequences share.
        &NativeOptions {
            prefix_cache: branch_decode(),
            device: native_device()?,
            quantize: match std::env::var("MEMEX_BENCH_QUANTIZE") {
                Ok(q) => Some(
                    Quantize::from_str(&q, true)
                        .map_err(|e| anyhow::anyhow!("MEMEX_BENCH_QUANTIZE {q:?}: {e}"))?,
                ),
                Err(_) => None,
            },
            gather_decode: std::env::var("MEMEX_BENCH_GATHER_DECODE").is_ok_and(|v| v == "1"),
            // The levels past 32 (the GPU check's 128 and 256) need more room than a CPU's
            // defaults: more running sequences, a KV pool that holds them, longer steps.
            max_running: env_or("MEMEX_BENCH_MAX_RUNNING", defaults.max_running),
            kv_cache_bytes: env_or("MEMEX_BENCH_KV_MB", defaults.kv_cache_bytes >> 20) << 20,
            step_tokens: env_or("MEMEX_BENCH_STEP_TOKENS", defaults.step_tokens),
            ..defaults
        },
    )
    .await
}

fn native_device() -> anyhow::Result<NativeDevice> {
    use clap::ValueEnum;
    match std::env::var("MEMEX_BENCH_NATIVE_DEVICE") {
        Ok(d) => NativeDevice::from_str(&d, true)
            .map_err(|e| anyhow::anyhow!("MEMEX_BENCH_NATIVE_DEVICE {d:?}: {e}")),
        Err(_) => Ok(NativeDevice::DEFAULT),
    }
}

/// The engine's label in the results: `native/<device>` or `mistralrs`.
fn engine_label() -> String {
    let engine = std::env::var("MEMEX_BENCH_ENGINE").unwrap_or_else(|_| "native".into());
    match native_device() {
        Ok(d) if engine == "native" => {
            use clap::ValueEnum;
            let name = d.to_possible_value().map(|v| v.get_name().to_string());
            let gather = std::env::var("MEMEX_BENCH_GATHER_DECODE").is_ok_and(|v| v == "1");
            let gather = if gather { "+gather" } else { "" };
            format!("native/{}{gather}", name.unwrap_or_default())
        }
        _ => engine,
    }
}

/// The repository (its corpus and model cache): `MEMEX_ROOT` when the bench binary runs away
/// from the tree it was built in (the GPU kit), else that tree.
fn root() -> PathBuf {
    std::env::var_os("MEMEX_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A corpus dialogue by id, cleaned as the pipeline cleans it.
fn corpus_dialogue(id: &str) -> Dialogue {
    let lang = &id[..2];
    let path = root().join(format!("loadtest/corpus/{lang}.json"));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let d = doc["dialogues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("no dialogue {id} in the corpus"));
    let body = serde_json::to_vec(&json!({"messages": d["messages"]})).unwrap();
    let req = memex::api::types::ExtractRequest::from_json(&body).unwrap();
    clean::clean(req.into_input().messages).unwrap()
}

fn guidance(mut schema: Value) -> Value {
    schema["x-guidance"] = json!({
        "whitespace_flexible": false, "item_separator": ",", "key_separator": ":",
        "json_allowed_escapes": "\"\\n"
    });
    schema
}

/// Requests tagged `tag` differ from every other tag's in their dialogue.
fn session(tag: usize) -> String {
    format!("[session {tag:06}] ")
}

fn prefill_request(tag: usize) -> GenerateRequest {
    let id = std::env::var("MEMEX_BENCH_PREFILL_DIALOGUE").unwrap_or_else(|_| "en-1000-1".into());
    let mut dialogue = corpus_dialogue(&id);
    dialogue.messages[0].content.insert_str(0, &session(tag));
    let prompts = Prompts::new(None).unwrap();
    let lang = language::detect(&dialogue);
    let messages = prompts.render(Branch::Memory, &lang, &dialogue, 6).unwrap();
    short_answer(messages)
}

/// `messages` answered `{"ok":true}` or `{"ok":false}`: the cost of their prefill alone.
fn short_answer(messages: Vec<PromptMessage>) -> GenerateRequest {
    GenerateRequest {
        messages,
        schema: guidance(json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": false
        })),
        max_tokens: 24,
    }
}

/// `MEMEX_BENCH_DECODE_PROMPT=branches`: decode after a request's branch prompts.
fn branch_decode() -> bool {
    std::env::var("MEMEX_BENCH_DECODE_PROMPT").is_ok_and(|v| v == "branches")
}

/// The decode workload's sequence `i` of a round whose tags start at `first`: with `branches`,
/// the real prompt of branch `i % 3` over the ~1,000-token dialogue tagged `first + i / 3`, so
/// sequences share the system prompt and, three by three, their dialogue, as a request's
/// branches do; otherwise a short prompt of its own.
fn decode_request(chars: usize, branches: bool, first: usize, i: usize) -> GenerateRequest {
    if !branches {
        return short_decode_request(chars, first + i);
    }
    let mut dialogue = corpus_dialogue("en-1000-1");
    dialogue.messages[0]
        .content
        .insert_str(0, &session(first + i / 3));
    let prompts = Prompts::new(None).unwrap();
    let lang = language::detect(&dialogue);
    GenerateRequest {
        messages: prompts
            .render(Branch::ALL[i % 3], &lang, &dialogue, 6)
            .unwrap(),
        ..short_decode_request(chars, first + i)
    }
}

fn short_decode_request(chars: usize, tag: usize) -> GenerateRequest {
    GenerateRequest {
        messages: vec![
            PromptMessage {
                role: PromptRole::System,
                content: "You write short notes about a user's day.".into(),
            },
            PromptMessage {
                role: PromptRole::User,
                content: format!(
                    "{}Describe a calm Saturday morning in a city by the river.",
                    session(tag)
                ),
            },
        ],
        schema: guidance(json!({
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": chars, "maxLength": chars}},
            "required": ["text"],
            "additionalProperties": false
        })),
        // Byte-level worst case (4 bytes a character) plus the JSON around it.
        max_tokens: 4 * chars + 32,
    }
}

struct Round {
    prompt_tokens: usize,
    generated_tokens: usize,
    /// Time until every request had its first token.
    last_first_token: Duration,
    first_first_token: Duration,
    wall: Duration,
    not_stopped: usize,
}

async fn round(engine: &Arc<dyn Engine>, requests: Vec<GenerateRequest>) -> Round {
    let started = Instant::now();
    let runs = requests.into_iter().map(|request| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let g: Generation = engine.generate(request).await.expect("generation");
            // Offsets from the common start (each Generation times from its own submission).
            (g, started.elapsed())
        })
    });
    let results: Vec<(Generation, Duration)> = futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    let wall = started.elapsed();
    let first_tokens = || {
        results
            .iter()
            .map(|(g, end)| *end - g.total_time + g.time_to_first_token)
    };
    Round {
        prompt_tokens: results.iter().map(|(g, _)| g.prompt_tokens).sum(),
        generated_tokens: results.iter().map(|(g, _)| g.generated_tokens).sum(),
        last_first_token: first_tokens().max().unwrap(),
        first_first_token: first_tokens().min().unwrap(),
        wall,
        not_stopped: results
            .iter()
            .filter(|(g, _)| g.finish != FinishReason::Stop)
            .count(),
    }
}

/// Fresh session tags: no two requests of a run share a dialogue.
struct Tags(usize);

impl Tags {
    fn take(&mut self, n: usize) -> std::ops::Range<usize> {
        self.0 += n;
        self.0 - n..self.0
    }
}

/// What one server does with a round of requests.
trait Server {
    async fn run(&self, requests: Vec<GenerateRequest>) -> Round;
    fn label(&self) -> String;
}

struct Memex(Arc<dyn Engine>);

impl Server for Memex {
    async fn run(&self, requests: Vec<GenerateRequest>) -> Round {
        round(&self.0, requests).await
    }
    fn label(&self) -> String {
        engine_label()
    }
}

/// llama.cpp's server on the same file, started for the model and stopped after it.
struct Llama {
    child: std::process::Child,
    base: String,
    http: reqwest::Client,
}

impl Llama {
    async fn start(binary: &Path, model: &Path, slots: usize, slot_ctx: usize) -> Self {
        let port = 9391;
        let threads = env_or(
            "MEMEX_BENCH_THREADS",
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        );
        let log =
            std::fs::File::create(std::env::temp_dir().join("memex-bench-llama.log")).unwrap();
        let child = std::process::Command::new(binary)
            .args(["-m", &model.to_string_lossy(), "--port", &port.to_string()])
            .args(["--host", "127.0.0.1", "-t", &threads.to_string()])
            .args([
                "-np",
                &slots.to_string(),
                "-c",
                &(slots * slot_ctx).to_string(),
            ])
            .arg("--no-webui")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("llama-server starts");
        let me = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let started = Instant::now();
        loop {
            if let Ok(r) = me.http.get(format!("{}/health", me.base)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "llama-server not ready"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        me
    }
}

impl Drop for Llama {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server for Llama {
    async fn run(&self, requests: Vec<GenerateRequest>) -> Round {
        let started = Instant::now();
        let calls = requests.into_iter().map(|r| {
            let messages: Vec<Value> = r
                .messages
                .iter()
                .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
                .collect();
            let mut schema = r.schema.clone();
            schema.as_object_mut().unwrap().remove("x-guidance");
            let body = json!({
                "messages": messages,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "bench", "schema": schema}},
                "temperature": 0, "max_tokens": r.max_tokens, "cache_prompt": false,
            });
            let req = self
                .http
                .post(format!("{}/v1/chat/completions", self.base))
                .json(&body);
            async move {
                let v: Value = req.send().await.unwrap().json().await.unwrap();
                let end = started.elapsed();
                let t = &v["timings"];
                let n = |k: &str| t[k].as_f64().unwrap_or_else(|| panic!("llama-server: {v}"));
                let stopped = v["choices"][0]["finish_reason"] == "stop";
                // `predicted_ms` runs from the first token to the last: the first token came
                // that long before the response. (`prompt_ms` cannot place it: with parallel
                // slots it counts only the slot's own share of the batched prompt work.)
                let first = end.saturating_sub(Duration::from_secs_f64(n("predicted_ms") / 1e3));
                (
                    n("prompt_n") as usize,
                    n("predicted_n") as usize,
                    first,
                    stopped,
                )
            }
        });
        let results = futures::future::join_all(calls).await;
        let wall = started.elapsed();
        Round {
            prompt_tokens: results.iter().map(|r| r.0).sum(),
            generated_tokens: results.iter().map(|r| r.1).sum(),
            last_first_token: results.iter().map(|r| r.2).max().unwrap(),
            first_first_token: results.iter().map(|r| r.2).min().unwrap(),
            wall,
            not_stopped: results.iter().filter(|r| !r.3).count(),
        }
    }
    fn label(&self) -> String {
        "llama.cpp".into()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(serde::Serialize)]
struct Row {
    model: String,
    engine: String,
    concurrency: usize,
    prompt_tokens_per_request: usize,
    prefill_tokens_per_s: f64,
    generated_tokens_per_request: usize,
    decode_tokens_per_s: f64,
    decode_tokens_per_s_per_sequence: f64,
    rounds: usize,
}

async fn bench_server(
    name: &str,
    server: &impl Server,
    levels: &[usize],
    rounds: usize,
    tags: &mut Tags,
) -> Vec<Row> {
    let chars = env_or("MEMEX_BENCH_DECODE_CHARS", 256);
    // Decode alone, for high concurrency on big models (a 32 x 1,300-token prefill round is
    // many minutes on a laptop CPU, and prefill is compute-bound at any concurrency).
    let skip_prefill = env_or("MEMEX_BENCH_DECODE_ONLY", 0) == 1;
    let prefill = |tags: std::ops::Range<usize>| tags.map(prefill_request).collect::<Vec<_>>();
    let branches = branch_decode();
    let decode = |tags: std::ops::Range<usize>| {
        (0..tags.len())
            .map(|i| decode_request(chars, branches, tags.start, i))
            .collect::<Vec<_>>()
    };
    // Warm-up: first requests pay for one-off allocations and grammar setup.
    if !skip_prefill {
        server.run(prefill(tags.take(1))).await;
    }
    server.run(decode(tags.take(1))).await;

    let mut rows = Vec::new();
    for &n in levels {
        let mut pre = Vec::new();
        let mut dec = Vec::new();
        let mut per_seq = Vec::new();
        let (mut p_tokens, mut g_tokens) = (0, 0);
        for _ in 0..rounds {
            let mut not_stopped = 0;
            if !skip_prefill {
                let p = server.run(prefill(tags.take(n))).await;
                pre.push(p.prompt_tokens as f64 / p.last_first_token.as_secs_f64());
                p_tokens = p.prompt_tokens / n;
                not_stopped += p.not_stopped;
            }
            let requests = decode(tags.take(n));
            if branches {
                // The long prompts prefilled first (into the prefix cache), so that the round
                // times decode over them and not their prefill.
                let warm = requests.iter().map(|r| short_answer(r.messages.clone()));
                server.run(warm.collect()).await;
            }
            let d = server.run(requests).await;
            let window = (d.wall - d.first_first_token).as_secs_f64();
            let after_first = d.generated_tokens.saturating_sub(n);
            dec.push(after_first as f64 / window);
            per_seq.push(after_first as f64 / n as f64 / window);
            g_tokens = d.generated_tokens / n;
            not_stopped += d.not_stopped;
            if not_stopped > 0 {
                eprintln!(
                    "{name} x{n}: {not_stopped} generations ended by their length limit, not the grammar"
                );
            }
        }
        let row = Row {
            model: name.to_string(),
            engine: server.label(),
            concurrency: n,
            prompt_tokens_per_request: p_tokens,
            prefill_tokens_per_s: if skip_prefill { 0.0 } else { median(pre) },
            generated_tokens_per_request: g_tokens,
            decode_tokens_per_s: median(dec),
            decode_tokens_per_s_per_sequence: median(per_seq),
            rounds,
        };
        eprintln!(
            "{name} {} x{n}: prefill {:.0} tok/s ({} tokens each), decode {:.1} tok/s ({:.1} per sequence, {} tokens each)",
            row.engine,
            row.prefill_tokens_per_s,
            row.prompt_tokens_per_request,
            row.decode_tokens_per_s,
            row.decode_tokens_per_s_per_sequence,
            row.generated_tokens_per_request
        );
        rows.push(row);
    }
    rows
}

async fn bench_model(
    name: &str,
    source: ModelSource,
    levels: &[usize],
    rounds: usize,
    tags: &mut Tags,
) -> Vec<Row> {
    let t = Instant::now();
    let engine = build_engine(&source).await.expect("engine loads");
    eprintln!(
        "{name}: loaded in {:.1} s, resident {} MiB",
        t.elapsed().as_secs_f64(),
        resident_mib()
    );
    let mut rows = bench_server(name, &Memex(engine), levels, rounds, tags).await;
    let llama = std::env::var_os("MEMEX_BENCH_LLAMA").map(PathBuf::from);
    if let (Some(binary), ModelSource::Gguf { file, .. }) = (llama, &source) {
        let slots = levels.iter().copied().max().unwrap_or(1);
        let server = Llama::start(&binary, file, slots, 2048).await;
        rows.extend(bench_server(name, &server, levels, rounds, tags).await);
    }
    rows
}

/// This process's resident memory (memex's engine lives in it).
fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb >> 10)
}

fn models(tmp: &Path) -> Vec<(String, ModelSource)> {
    let mut out = Vec::new();
    let tiny = tmp.join("tiny-qwen3");
    memex::tiny_model::write(&tiny, 42).expect("write tiny model");
    out.push((
        "tiny-qwen3".to_string(),
        ModelSource::resolve(&tiny, None).unwrap(),
    ));
    let smol = std::env::var_os("MEMEX_BENCH_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    match ModelSource::resolve(&smol, None) {
        Ok(source) => out.push(("smollm2-135m-q4_1".to_string(), source)),
        Err(e) => eprintln!("skipping SmolLM2 ({e}); run scripts/fetch-models.sh --smollm2"),
    }
    let extra = std::env::var("MEMEX_BENCH_MODELS").unwrap_or_default();
    for spec in extra.split(',').filter(|s| !s.is_empty()) {
        let (name, path) = spec
            .split_once('=')
            .expect("MEMEX_BENCH_MODELS: name=path[@tokenizer dir]");
        let (path, tokenizer) = match path.split_once('@') {
            Some((p, t)) => (p, Some(PathBuf::from(t))),
            None => (path, None),
        };
        let source = ModelSource::resolve(Path::new(path), tokenizer.as_deref())
            .unwrap_or_else(|e| panic!("MEMEX_BENCH_MODELS {name}: {e}"));
        out.push((name.to_string(), source));
    }
    out
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters models by name.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let levels: Vec<usize> = std::env::var("MEMEX_BENCH_LEVELS")
        .unwrap_or_else(|_| "1,4,8".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MEMEX_BENCH_LEVELS: numbers"))
        .collect();
    let rounds = env_or("MEMEX_BENCH_ROUNDS", 3usize).max(1);
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut rows = Vec::new();
    let mut tags = Tags(0);
    for (name, source) in models(tmp.path()) {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        rows.extend(rt.block_on(bench_model(&name, source, &levels, rounds, &mut tags)));
    }

    println!("\n| model | engine | concurrent | prompt tokens | prefill tok/s | generated tokens | decode tok/s | decode tok/s per sequence |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {} | {:.1} | {:.1} |",
            r.model,
            r.engine,
            r.concurrency,
            r.prompt_tokens_per_request,
            r.prefill_tokens_per_s,
            r.generated_tokens_per_request,
            r.decode_tokens_per_s,
            r.decode_tokens_per_s_per_sequence
        );
    }
    if let Some(out) = std::env::var_os("MEMEX_BENCH_OUT") {
        std::fs::write(&out, serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    }
}
