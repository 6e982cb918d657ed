//! The native engine: continuous batching of mixed-length requests on one dedicated thread.
//!
//! mistralrs 0.8.1 batches only sequences of identical length (its CPU scheduler runs the
//! shortest bucket alone), so concurrent extractions of real, different-length dialogues ran one
//! after another and slower than alone. Here every step runs all scheduled sequences together:
//!
//! - `scheduler`: who runs this step and how many tokens (decode first, chunked prefill after),
//!   and what happens to the sequences after it;
//! - `step`: the step's runs flattened into rows, planned once for both forward passes;
//! - `host_model`: the forward pass on our CPU kernels (`weights`: Llama / Qwen2 / Qwen3;
//!   `linear`: the matmul kernels, which read each weight once per step for all rows;
//!   `attention`: every row over its own cached keys and values, split across cores);
//! - `tensor_model`: the same step as candle tensor ops on a device (the GPU path), over a KV
//!   pool of device tensors with the same block tables;
//! - `kv_cache`: the KV block pool, block manager and prefix cache;
//! - `sequence`: a generation in flight, with its llguidance matcher;
//! - `tokenizer`: the tokenizer and chat template (rebuilt from GGUF metadata when needed);
//! - `bpe`: our byte-level BPE encoder, the same ids as `tokenizers` several times faster.
//!
//! Sampling is greedy under the branch's JSON schema; the masks of a step are computed in
//! parallel, tokens the grammar forces are appended without sampling (they ride along in the next
//! step's forward pass), and a sequence finishes the moment the grammar is complete.

mod attention;
pub mod bpe;
mod host_model;
mod kv_cache;
mod linear;
mod math;
mod paged_attention;
mod sampler;
mod scheduler;
mod sequence;
mod step;
mod tensor_model;
pub(crate) mod tokenizer;
mod weights;

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use candle_core::quantized::GgmlDType;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use tokio::sync::oneshot;

use super::stats::StepCostFit;
use super::{
    Engine, EngineCounters, EngineError, FinishReason, GenerateRequest, Generation, ModelInfo,
    ModelSource, PromptMessage,
};
use host_model::{HostModel, HostPass};
use kv_cache::{BlockManager, KvPool, BLOCK_SIZE};
use sampler::Dry;
use scheduler::Scheduler;
use sequence::{Finished, Sequence};
use std::sync::atomic::Ordering::Relaxed;
use step::ForwardPass;
use tokenizer::{ChatTemplate, Encoder};

#[derive(Debug, Clone)]
pub struct NativeOptions {
    /// Most sequences in one step.
    pub max_running: usize,
    /// Most tokens in one step (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// Memory for the KV block pool. Pages are touched only as blocks are used.
    pub kv_cache_bytes: usize,
    /// DRY repetition-penalty multiplier (0 = off), as for the reference engine.
    pub repetition_guard: f32,
    /// Reuse the KV blocks of prompt prefixes already computed (the branch templates).
    pub prefix_cache: bool,
    /// Where the forward pass runs.
    pub device: NativeDevice,
    /// What a safetensors checkpoint's linear layers become at load; `None`: the device's
    /// default (`q8_0` on the CPU, the checkpoint's own precision on a GPU).
    pub quantize: Option<Quantize>,
    /// The tensor path's decode rows copy their keys out of the pool (the reference) instead of
    /// reading them in place (`paged_attention`): for the benches to compare the two.
    pub gather_decode: bool,
    /// Counters the step loop updates, read by `/metrics`.
    pub stats: Arc<EngineCounters>,
    /// Fault injection for tests of a dying engine: the engine thread panics when it takes
    /// this many-th submission (the warm-up is the first). `None` in normal operation.
    pub panic_at_submission: Option<u64>,
}

/// `--quantize`: a safetensors checkpoint's linear layers as they load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Quantize {
    /// 8-bit blocks: logits within a few hundredths of the dense model's, a quarter of f32.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks: an eighth of f32, at a visible cost in accuracy.
    #[value(name = "q4_0")]
    Q4_0,
    /// Dense f32 on the CPU (bf16 on a GPU).
    None,
}

impl Quantize {
    fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::None => None,
        }
    }
}

/// Where the native engine runs its forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeDevice {
    /// Our CPU kernels over a host KV pool (`host_model`).
    Cpu,
    /// candle tensor ops on the first CUDA GPU, bf16 (`tensor_model`); needs a `cuda` build.
    Cuda,
    /// The GPU code path on the CPU device, f32: for checking it on a machine without a GPU
    /// (several times slower than `cpu`).
    CpuTensors,
}

impl NativeDevice {
    pub const DEFAULT: Self = if cfg!(feature = "native-cuda") {
        Self::Cuda
    } else {
        Self::Cpu
    };
}

/// What runs a step's forward pass. Both passes take the same runs and block tables, so the
/// scheduler, block manager and prefix cache do not know which one they drive.
type Executor = Box<dyn ForwardPass>;

impl Default for NativeOptions {
    fn default() -> Self {
        Self {
            max_running: 32,
            step_tokens: 512,
            kv_cache_bytes: 2 << 30,
            repetition_guard: 0.8,
            prefix_cache: true,
            device: NativeDevice::DEFAULT,
            quantize: None,
            gather_decode: false,
            stats: Arc::default(),
            panic_at_submission: None,
        }
    }
}

struct Submission {
    prompt: Vec<u32>,
    matcher: Matcher,
    max_tokens: usize,
    reply: sequence::Reply,
    submitted: Instant,
}

pub struct NativeEngine {
    tx: mpsc::Sender<Submission>,
    tokenizer: Arc<tokenizers::Tokenizer>,
    encoder: Encoder,
    chat: Arc<ChatTemplate>,
    factory: Arc<ParserFactory>,
    max_positions: usize,
    info: ModelInfo,
    stats: Arc<EngineCounters>,
    /// Set when the engine thread has ended (a panic in a step): nothing will be answered.
    failure: Arc<std::sync::Mutex<Option<String>>>,
}

impl NativeEngine {
    pub fn load(source: &ModelSource, opts: &NativeOptions) -> anyhow::Result<Self> {
        let started = Instant::now();
        let (weights, tokenizer, chat) = match source {
            ModelSource::Safetensors { dir } => {
                let quantize = opts.quantize.unwrap_or(match opts.device {
                    NativeDevice::Cpu => Quantize::Q8_0,
                    NativeDevice::Cuda | NativeDevice::CpuTensors => Quantize::None,
                });
                let w = weights::Weights::from_safetensors_dir(dir, quantize.ggml())?;
                let (t, c) = tokenizer::from_hf_dir(dir)?;
                (w, t, c)
            }
            ModelSource::Gguf {
                file,
                tokenizer_dir,
            } => {
                if let Some(q) = opts.quantize {
                    anyhow::bail!(
                        "--quantize {q:?} applies to safetensors checkpoints; the GGUF {} keeps \
                         the types it was quantized to",
                        file.display()
                    );
                }
                let (w, content) = weights::Weights::from_gguf(file)?;
                let (t, c) = match tokenizer_dir {
                    Some(dir) => tokenizer::from_hf_dir(dir)?,
                    None => tokenizer::from_gguf(&content)?,
                };
                (w, t, c)
            }
        };
        let vocab = weights.config.vocab;
        let resident_bytes = weights.resident_bytes();
        let weights_loaded = started.elapsed();
        let byte_tok = toktrie_hf_tokenizers::ByteTokenizer::from_tokenizer(tokenizer.clone())?;
        let env = byte_tok.into_tok_env(Some(vocab))?;
        let factory = Arc::new(ParserFactory::new_simple(&env)?);
        let eos: Vec<u32> = factory.tok_env().tok_trie().eos_tokens().to_vec();
        let config = weights.config.clone();
        let (executor, blocks): (Executor, usize) = match opts.device {
            NativeDevice::Cpu => {
                let model = HostModel::new(weights);
                let blocks = pool_blocks(&config, opts.kv_cache_bytes, 4);
                let pool = KvPool::new(config.layers, config.kv_heads, config.head_dim, blocks);
                (Box::new(HostPass { model, pool }), blocks)
            }
            NativeDevice::Cuda | NativeDevice::CpuTensors => {
                let (dev, dtype) = if opts.device == NativeDevice::Cuda {
                    let dev = candle_core::Device::new_cuda(0)
                        .map_err(|e| anyhow::anyhow!("--native-device cuda: {e}"))?;
                    (dev, candle_core::DType::BF16)
                } else {
                    (candle_core::Device::Cpu, candle_core::DType::F32)
                };
                let blocks = pool_blocks(&config, opts.kv_cache_bytes, dtype.size_in_bytes());
                let mut m = tensor_model::TensorModel::new(&weights, &dev, dtype, blocks)?;
                if opts.gather_decode {
                    m = m.with_decode_attention(tensor_model::DecodeAttention::Gather);
                }
                drop(weights);
                (Box::new(m), blocks)
            }
        };
        // A generation must fit the model's positions and, alone, the KV pool.
        let max_positions = executor.max_positions().min(blocks * BLOCK_SIZE);

        let tokenizer = Arc::new(tokenizer);
        let encoder = Encoder::new(tokenizer.clone());
        let dry = (opts.repetition_guard > 0.0)
            .then(|| Dry::new(opts.repetition_guard, &super::DRY_BREAKERS, &tokenizer));
        let (tx, rx) = mpsc::channel::<Submission>();
        let stats = opts.stats.clone();
        let opts = opts.clone();
        let failure = Arc::new(std::sync::Mutex::new(None));
        let failed = failure.clone();
        std::thread::Builder::new()
            .name("memex-engine".into())
            .spawn(move || {
                // A panic is a bug whose damage to the scheduler and KV state cannot be bounded,
                // so it is not contained: the thread ends, every waiting request fails
                // (`Unavailable`), and `failure` tells readiness and the server, which exits
                // non-zero so that the orchestrator restarts it.
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    engine_loop(executor, blocks, rx, opts, eos, dry)
                }));
                let why = match ended {
                    Ok(()) => "the engine thread stopped".to_string(),
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        format!("the engine thread panicked: {msg}")
                    }
                };
                if let Ok(mut f) = failed.lock() {
                    *f = Some(why);
                }
            })?;
        let info = ModelInfo {
            name: source.name(),
            max_sequence_len: Some(max_positions),
            load_time: started.elapsed(),
        };
        tracing::info!(
            model = %info.name,
            load_seconds = info.load_time.as_secs_f64(),
            weights_seconds = weights_loaded.as_secs_f64(),
            weights_mib = resident_bytes >> 20,
            "native engine loaded"
        );
        Ok(Self {
            tx,
            encoder,
            tokenizer,
            chat: Arc::new(chat),
            factory,
            max_positions,
            info,
            stats,
            failure,
        })
    }
}

#[async_trait]
impl Engine for NativeEngine {
    async fn generate(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let submitted = Instant::now();
        let encoder = self.encoder.clone();
        let chat = self.chat.clone();
        let factory = self.factory.clone();
        // Template rendering, tokenising and grammar compilation are CPU work: off the async
        // workers, and off the engine thread so they never delay a step.
        let max_tokens = request.max_tokens;
        let (prompt, matcher) = tokio::task::spawn_blocking(move || {
            let prompt = encode_prompt(&chat, &encoder, &request.messages)?;
            let grammar = TopLevelGrammar::from_json_schema(request.schema);
            let parser = factory
                .create_parser(grammar)
                .map_err(|e| EngineError::Rejected(format!("schema: {e}")))?;
            Ok::<_, EngineError>((prompt, Matcher::new(Ok(parser))))
        })
        .await
        .map_err(|e| EngineError::Generation(e.to_string()))??;
        if prompt.len() >= self.max_positions {
            return Err(EngineError::Rejected(format!(
                "prompt of {} tokens does not fit the {} positions available (model context \
                 and KV pool)",
                prompt.len(),
                self.max_positions
            )));
        }
        // The schema's worst case can exceed the context; real outputs are far shorter. A
        // generation that does reach the end finishes with `Length`, which the caller reports.
        let max_tokens = max_tokens.min(self.max_positions - prompt.len());
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Submission {
                prompt,
                matcher,
                max_tokens,
                reply,
                submitted,
            })
            .map_err(|_| EngineError::Unavailable("engine thread stopped".into()))?;
        // Dropping `answer` (caller gone) closes the channel: the engine drops the sequence.
        let finished: Finished = answer
            .await
            .map_err(|_| EngineError::Unavailable("engine thread stopped".into()))??;
        let tokenizer = self.tokenizer.clone();
        let ids = finished.generated.clone();
        let text = tokio::task::spawn_blocking(move || tokenizer.decode(&ids, true))
            .await
            .map_err(|e| EngineError::Generation(e.to_string()))?
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(Generation {
            text,
            finish: finished.finish,
            prompt_tokens: finished.prompt_tokens,
            cached_prompt_tokens: finished.cached_prompt_tokens,
            generated_tokens: finished.generated.len(),
            time_to_first_token: finished.time_to_first_token,
            total_time: finished.total_time,
        })
    }

    async fn count_tokens(&self, text: String) -> Result<usize, EngineError> {
        let encoder = self.encoder.clone();
        tokio::task::spawn_blocking(move || encoder.count(&text).map_err(EngineError::Tokenizer))
            .await
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?
    }

    async fn count_prompt(&self, messages: Vec<PromptMessage>) -> Result<usize, EngineError> {
        let (chat, encoder) = (self.chat.clone(), self.encoder.clone());
        tokio::task::spawn_blocking(move || {
            encode_prompt(&chat, &encoder, &messages).map(|ids| ids.len())
        })
        .await
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn stats(&self) -> Option<super::EngineStats> {
        Some(self.stats.snapshot())
    }
}

/// The prompt's token ids, exactly as generated from: special tokens only where the chat
/// template put them (see `tokenizer`).
fn encode_prompt(
    chat: &ChatTemplate,
    encoder: &Encoder,
    messages: &[PromptMessage],
) -> Result<Vec<u32>, EngineError> {
    let pieces = chat
        .render_pieces(messages)
        .map_err(|e| EngineError::Rejected(format!("chat template: {e}")))?;
    encoder
        .encode_pieces(&pieces)
        .map_err(EngineError::Tokenizer)
}

fn engine_loop(
    mut executor: Executor,
    blocks: usize,
    rx: mpsc::Receiver<Submission>,
    opts: NativeOptions,
    eos: Vec<u32>,
    dry: Option<Dry>,
) {
    let stats = opts.stats.clone();
    let mut sched = Scheduler::new(
        opts.max_running,
        opts.step_tokens,
        BlockManager::new(blocks, opts.prefix_cache),
        stats.clone(),
    );
    stats.step_budget.store(opts.step_tokens as u64, Relaxed);
    let mut cost = StepCostFit::default();
    let mut submissions = 0u64;
    let mut take = |s: Submission| {
        submissions += 1;
        if opts.panic_at_submission == Some(submissions) {
            panic!("injected fault at submission {submissions}");
        }
        Sequence::new(
            s.prompt,
            s.max_tokens,
            s.matcher,
            Some(s.reply),
            s.submitted,
        )
    };
    loop {
        // Block only when there is nothing to do; otherwise take whatever has arrived.
        if sched.is_idle() {
            match rx.recv() {
                Ok(s) => sched.add(take(s)),
                Err(_) => return,
            }
        }
        while let Ok(s) = rx.try_recv() {
            sched.add(take(s));
        }
        sched.drop_finished();
        let step_started = Instant::now();
        let planned = sched.plan();
        sched.publish();
        if planned == 0 {
            if !sched.is_idle() {
                // Nothing fits and nothing runs: cannot happen with a non-empty pool, but never
                // spin silently.
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }

        let prefill = sched.prefill_scheduled();
        let runs = sched.runs();
        let batch = runs.len();
        let result = executor.run(&runs);
        drop(runs);
        match result {
            Ok(logits) => sched.postprocess(logits, |s, l| advance(s, l, &eos, dry.as_ref())),
            Err(e) => {
                sched.fail_step(&e.to_string());
                continue;
            }
        }
        stats.steps.fetch_add(1, Relaxed);
        stats.step_sequences.fetch_add(batch as u64, Relaxed);
        stats.step_tokens.fetch_add(planned as u64, Relaxed);
        stats.prefill_tokens.fetch_add(prefill as u64, Relaxed);
        let took = step_started.elapsed();
        stats
            .step_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
        cost.add(planned, took.as_secs_f64());
        cost.publish(&stats);
        sched.publish();
    }
}

/// Blocks that `bytes` of KV memory hold, at `elem` bytes per value.
fn pool_blocks(c: &weights::Config, bytes: usize, elem: usize) -> usize {
    let bytes_per_block = c.layers * 2 * c.kv_heads * c.head_dim * elem * BLOCK_SIZE;
    (bytes / bytes_per_block).max(1)
}

/// Pick the next token under the grammar, append it and any forced tokens, and decide whether
/// the sequence is finished.
fn advance(
    s: &mut Sequence,
    logits: &mut [f32],
    eos: &[u32],
    dry: Option<&Dry>,
) -> Result<(), EngineError> {
    let err = |e: anyhow::Error| EngineError::Generation(format!("grammar: {e}"));
    s.first_token.get_or_insert_with(|| s.submitted.elapsed());
    let mask = s.matcher.compute_mask().map_err(err)?;
    if let Some(dry) = dry {
        dry.apply(logits, &s.tokens);
    }
    let tok = sampler::greedy(logits, &mask).ok_or_else(|| {
        EngineError::Generation("the grammar allows no token the model can produce".into())
    })?;
    if eos.contains(&tok) {
        s.finish = Some(FinishReason::Stop);
        return Ok(());
    }
    s.matcher.consume_token(tok).map_err(err)?;
    s.tokens.push(tok);
    let forced = s.matcher.compute_ff_tokens();
    if !forced.is_empty() {
        s.matcher.consume_tokens(&forced).map_err(err)?;
        s.tokens.extend_from_slice(&forced);
    }
    if s.matcher.is_stopped() || grammar_complete(&mut s.matcher) {
        s.finish = Some(FinishReason::Stop);
    } else if s.generated() >= s.max_tokens {
        s.finish = Some(FinishReason::Length);
    }
    Ok(())
}

/// True once the JSON is complete. Our grammars are one top-level object, so an accepting
/// matcher has just closed it: all it could still allow is trailing whitespace and an end token,
/// and running the model again to sample those would be wasted.
fn grammar_complete(m: &mut Matcher) -> bool {
    m.is_accepting().unwrap_or(false)
}
