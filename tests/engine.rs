//! Both engines (the native one, on its CPU kernels and on its GPU tensor path run on the CPU,
//! and the mistralrs reference), on the tiny random Qwen3:
//! constrained output is complete JSON, generation stops the moment the JSON is complete, counts
//! use the model's tokenizer, both engines generate the same greedy output, and a bad model path
//! fails at start with its name and without touching the network.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use memex::engine::mistral::MistralOptions;
use memex::engine::native::{NativeDevice, NativeOptions};
use memex::engine::{
    Engine, EngineKind, FinishReason, GenerateRequest, ModelSource, PromptMessage, PromptRole,
};
use memex::pipeline::branch::Branch;
use memex::pipeline::schema::{schema_for, worst_case_tokens, OutputLimits};
use tokio::sync::OnceCell;

/// An engine under test: the backend, and for the native one where its forward pass runs.
#[derive(Debug, Clone, Copy)]
enum Under {
    Native(NativeDevice),
    Mistralrs,
}

/// The native engine on its CPU kernels and on its tensor path (on the CPU device, or on the GPU
/// with `MEMEX_TEST_TENSOR_DEVICE=cuda` in a `cuda` build), and the reference.
fn all() -> [Under; 3] {
    let tensors = match std::env::var("MEMEX_TEST_TENSOR_DEVICE").as_deref() {
        Ok("cuda") => NativeDevice::Cuda,
        _ => NativeDevice::CpuTensors,
    };
    [
        Under::Native(NativeDevice::Cpu),
        Under::Native(tensors),
        Under::Mistralrs,
    ]
}

async fn load(under: Under) -> Arc<dyn Engine> {
    load_with_guard(under, 0.8).await
}

async fn load_with_guard(under: Under, repetition_guard: f32) -> Arc<dyn Engine> {
    let (kind, device) = match under {
        Under::Native(d) => (EngineKind::Native, d),
        Under::Mistralrs => (EngineKind::Mistralrs, NativeDevice::Cpu),
    };
    let source = ModelSource::resolve(&common::tiny_model_dir(), None).unwrap();
    memex::engine::load(
        kind,
        &source,
        &MistralOptions {
            repetition_guard,
            ..MistralOptions::default()
        },
        &NativeOptions {
            repetition_guard,
            device,
            ..NativeOptions::default()
        },
    )
    .await
    .unwrap()
}

/// Every engine under test, loaded once for the whole file.
async fn engines() -> Vec<(Under, Arc<dyn Engine>)> {
    static LOADED: [OnceCell<Arc<dyn Engine>>; 3] = [
        OnceCell::const_new(),
        OnceCell::const_new(),
        OnceCell::const_new(),
    ];
    let mut loaded = Vec::new();
    for (cell, under) in LOADED.iter().zip(all()) {
        loaded.push((under, cell.get_or_init(|| load(under)).await.clone()));
    }
    loaded
}

fn request(user: &str, limits: &OutputLimits, branch: Branch) -> GenerateRequest {
    let schema = schema_for(branch, limits);
    GenerateRequest {
        max_tokens: worst_case_tokens(&schema),
        schema,
        messages: vec![
            PromptMessage {
                role: PromptRole::System,
                content: "Answer in JSON.".into(),
            },
            PromptMessage {
                role: PromptRole::User,
                content: user.into(),
            },
        ],
    }
}

// One runtime for the whole file: the engine's background tasks live on it.
fn rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

#[test]
fn constrained_output_is_complete_json_and_stops_at_its_end() {
    rt().block_on(async {
        let limits = OutputLimits {
            max_items: 3,
            max_text_chars: 20,
            max_label_chars: 10,
            max_tags: 2,
            ..OutputLimits::default()
        };
        for (kind, e) in engines().await {
            for (i, branch) in Branch::ALL.into_iter().enumerate() {
                let g = e
                    .generate(request(&format!("dialogue number {i}"), &limits, branch))
                    .await
                    .unwrap();
                assert_eq!(
                    g.finish,
                    FinishReason::Stop,
                    "{kind:?} {branch}: {}",
                    g.text
                );
                let v: serde_json::Value = serde_json::from_str(&g.text)
                    .unwrap_or_else(|err| panic!("{branch}: not JSON ({err}): {}", g.text));
                assert!(v.is_object());
                // One token per byte with this tokenizer, plus the end token: any dead token after
                // the closing brace (the grammar-EOS mismatch) would show here.
                assert!(
                    g.generated_tokens <= g.text.len() + 1,
                    "{branch}: {} tokens for {} bytes: {}",
                    g.generated_tokens,
                    g.text.len(),
                    g.text
                );
                assert!(g.prompt_tokens > 0);
                assert!(g.time_to_first_token <= g.total_time);
            }
        }
    });
}

/// The native engine computes a prompt prefix it has seen once: the second request, sharing a
/// long system prompt with the first, reports those tokens as cached (and the engine's counters
/// agree); with `prefix_cache` off nothing is reused.
#[test]
fn a_shared_prompt_prefix_is_computed_once() {
    rt().block_on(async {
        let limits = OutputLimits {
            max_items: 2,
            max_text_chars: 10,
            max_label_chars: 8,
            max_tags: 1,
            ..OutputLimits::default()
        };
        // The tiny model's tokenizer is byte-level: about one token per character.
        let system = "You extract memories from dialogues. ".repeat(8);
        let req = |user: &str| {
            let mut r = request(user, &limits, Branch::Memory);
            r.messages[0].content = system.clone();
            r
        };
        let source = ModelSource::resolve(&common::tiny_model_dir(), None).unwrap();
        for prefix_cache in [true, false] {
            let opts = NativeOptions {
                prefix_cache,
                ..NativeOptions::default()
            };
            let e = memex::engine::load(
                EngineKind::Native,
                &source,
                &MistralOptions::default(),
                &opts,
            )
            .await
            .unwrap();
            let first = e.generate(req("first dialogue")).await.unwrap();
            let second = e.generate(req("another, longer dialogue")).await.unwrap();
            let stats = e.stats().expect("the native engine has counters");
            assert_eq!(first.cached_prompt_tokens, 0, "nothing was cached before");
            assert_eq!(second.finish, FinishReason::Stop);
            if prefix_cache {
                // At least the whole blocks of the shared system prompt, never the whole prompt.
                let shared_blocks = (system.len() / 16).saturating_sub(1);
                assert!(
                    second.cached_prompt_tokens >= shared_blocks * 16,
                    "{} cached of a ~{}-token shared prefix",
                    second.cached_prompt_tokens,
                    system.len()
                );
                assert!(second.cached_prompt_tokens < second.prompt_tokens);
                assert!(stats.prefix_hits >= 1);
                assert!(stats.prefix_hit_tokens >= second.cached_prompt_tokens as u64);
            } else {
                assert_eq!(second.cached_prompt_tokens, 0);
                assert_eq!(stats.prefix_hits, 0);
            }
            assert!(stats.steps > 0 && stats.step_tokens >= stats.steps);
            assert!(stats.kv_blocks_total > 0);
        }
    });
}

#[test]
fn counts_tokens_with_the_models_tokenizer() {
    rt().block_on(async {
        for (_, e) in engines().await {
            assert_eq!(e.count_tokens("hello".into()).await.unwrap(), 5);
            assert_eq!(e.count_tokens("杭州".into()).await.unwrap(), 6);
            assert_eq!(e.count_tokens(String::new()).await.unwrap(), 0);
        }
    });
}

#[test]
fn dropping_a_generation_does_not_wedge_the_engine() {
    rt().block_on(async {
        for (kind, e) in engines().await {
            let limits = OutputLimits::default();
            for i in 0..4 {
                let req = request(&format!("cancel me {i}"), &limits, Branch::Memory);
                let fut = e.generate(req);
                // Cancel mid-flight (or before it starts): the future is dropped.
                let _ = tokio::time::timeout(Duration::from_millis(30), fut).await;
            }
            let started = Instant::now();
            let small = OutputLimits {
                max_items: 1,
                max_text_chars: 8,
                max_label_chars: 4,
                max_tags: 1,
                ..OutputLimits::default()
            };
            let g = e
                .generate(request(
                    "after cancellations",
                    &small,
                    Branch::ExplicitPreference,
                ))
                .await
                .unwrap();
            assert_eq!(g.finish, FinishReason::Stop, "{kind:?}");
            assert!(started.elapsed() < Duration::from_secs(60), "{kind:?}");
        }
    });
}

#[test]
fn every_engine_generates_the_same_greedy_output() {
    rt().block_on(async {
        let limits = OutputLimits {
            max_items: 2,
            max_text_chars: 24,
            max_label_chars: 8,
            max_tags: 2,
            ..OutputLimits::default()
        };
        // Without the repetition guard: the tiny model's logits are nearly flat, so the guard's
        // equal penalties leave exact ties whose winner depends on the last float bit.
        let under = all();
        let mut loaded = Vec::new();
        for u in under {
            loaded.push(load_with_guard(u, 0.0).await);
        }
        for branch in Branch::ALL {
            let mut texts = Vec::new();
            for (kind, e) in under.iter().zip(&loaded) {
                let g = e
                    .generate(request("I am Alex and I like tea.", &limits, branch))
                    .await
                    .unwrap();
                texts.push((kind, g.prompt_tokens, g.text));
            }
            // Same prompt tokens (same template and tokenizer) and the same greedy tokens under
            // the same grammar and repetition guard: the logits agree where it matters. On a
            // GPU the tensor path runs in bf16, whose rounding reorders the tiny model's nearly
            // flat logits, so there only its prompt must agree (its output is in the message;
            // the unit tests compare its logits with the CPU kernels' in f32 on the GPU).
            for other in &texts[1..] {
                assert_eq!(texts[0].1, other.1, "{branch}: prompt tokens differ");
                if !matches!(other.0, Under::Native(NativeDevice::Cuda)) {
                    assert_eq!(texts[0].2, other.2, "{branch}: {texts:?}");
                } else if texts[0].2 != other.2 {
                    eprintln!("{branch}: bf16 on the GPU chose other tokens: {texts:?}");
                }
            }
        }
    });
}

#[test]
fn missing_model_path_fails_fast_naming_it() {
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memex"))
        .args(["serve", "--model", "/nonexistent/qwen3-0.6b", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/qwen3-0.6b"), "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");
    // No 30 s hub time-out: the path is checked before any loader sees it.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn directory_missing_a_tokenizer_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    memex::tiny_model::write(dir.path(), 1).unwrap();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_memex"))
        .args(["serve", "--port", "0", "--model"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tokenizer.json"), "{stderr}");
}

/// One prefill per dialogue: a request's three branch prompts start with the same dialogue, so
/// the native engine computes its KV blocks for one branch and the other two reuse them, even
/// though all three are submitted at once.
#[test]
fn a_requests_branches_compute_its_dialogue_once() {
    use memex::pipeline::types::{InputMessage, Role};
    use memex::pipeline::{ExtractInput, Extractor, PipelineConfig};
    rt().block_on(async {
        let source = ModelSource::resolve(&common::tiny_model_dir(), None).unwrap();
        let engine = memex::engine::load(
            EngineKind::Native,
            &source,
            &MistralOptions::default(),
            &NativeOptions::default(),
        )
        .await
        .unwrap();
        let config = PipelineConfig {
            limits: OutputLimits {
                max_items: 1,
                max_text_chars: 8,
                max_label_chars: 4,
                max_tags: 1,
                ..OutputLimits::default()
            },
            ..PipelineConfig::default()
        };
        let extractor = Extractor::new(engine, config).unwrap();
        // Two user turns, so the implicit branch runs too; about 1,200 bytes, and the tiny
        // model's tokenizer is byte-level: about 1,200 dialogue tokens.
        let turn = |role, text: &str| InputMessage {
            role,
            content: Some(text.repeat(12)),
            chat_time: None,
        };
        let messages = vec![
            turn(Role::User, "I moved to Hangzhou and I cycle to work. "),
            turn(Role::Assistant, "That sounds like a pleasant commute. "),
            turn(
                Role::User,
                "I also swim twice a week, never in the morning. ",
            ),
        ];
        let dialogue_bytes: usize = messages
            .iter()
            .map(|m| m.content.as_ref().unwrap().len())
            .sum();
        let out = extractor
            .extract(ExtractInput {
                messages: Some(messages),
                extraction_types: None,
            })
            .await
            .unwrap();
        assert_eq!(out.branches.len(), 3);
        let prompt: usize = out.branches.iter().map(|b| b.prompt_tokens).sum();
        let prefill: usize = out.branches.iter().map(|b| b.prefill_tokens()).sum();
        let cached: usize = out.branches.iter().map(|b| b.cached_prompt_tokens).sum();
        assert_eq!(prefill + cached, prompt);
        // Two of the three branches took the dialogue from the cache, to within the partial
        // block at its end; with the instructions first they would each have computed it.
        assert!(
            cached >= 2 * (dialogue_bytes - 16),
            "{cached} tokens cached of {prompt}; the dialogue is ~{dialogue_bytes} tokens"
        );
        assert!(prefill < prompt - 2 * (dialogue_bytes - 16));
    });
}
