//! The reference engine: mistralrs 0.8.1's high-level `Model`, driven as a stream.
//!
//! What this file has to get right (see `shared/docs/engine-notes.md`):
//! - Load only local paths, with no token source, so nothing ever reaches for the network.
//! - Greedy, thinking off, prefix cache off on CPU (it never evicts and RAM grows per request).
//! - With `cuda`, PagedAttention with the KV pool sized by a memory fraction, never the 4,096-token
//!   default that no 8k prompt fits.
//! - Stop on the grammar's end token. llguidance forces its own EOS (picked from the tokenizer's
//!   added tokens: `<|endoftext|>`, `</s>`, ...) once the JSON is complete, while the engine stops
//!   only on the model's chat EOS (`<|im_end|>` for ChatML models). When they differ, every
//!   request kept generating invisible end tokens until `max_len`. We find every end-of-text
//!   token the grammar may force and pass them as stop tokens on each request.
//! - Requests run as streams, so that dropping the future (client gone) stops the sequence at its
//!   next token; non-streaming requests in 0.8.1 run to the end regardless.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use either::Either;
use mistralrs::{
    Constraint, DrySamplingParams, GgufModelBuilder, Model, RequestBuilder, Response, StopTokens,
    TextMessageRole, TextMessages, TextModelBuilder, TokenSource,
};

use super::{
    Engine, EngineError, FinishReason, GenerateRequest, Generation, ModelInfo, ModelSource,
    PromptRole, DRY_BREAKERS,
};

/// The names llguidance's tokenizer bridge treats as EOS (toktrie_hf_tokenizers 1.9). Any of them
/// the vocabulary has becomes a stop token.
const GRAMMAR_EOS_NAMES: [&str; 5] = [
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<｜end▁of▁sentence｜>",
    "<eos>",
];

#[derive(Debug, Clone)]
pub struct MistralOptions {
    /// DRY repetition-penalty multiplier (0 = off). Small models loop on a phrase inside a
    /// string until its `maxLength`; this breaks the loop.
    pub repetition_guard: f32,
    /// Most sequences the engine runs at once.
    pub max_num_seqs: usize,
    /// Fraction of GPU memory for the PagedAttention KV pool (CUDA builds only).
    pub gpu_memory_fraction: f32,
}

impl Default for MistralOptions {
    fn default() -> Self {
        // The knobs both engines share default alike.
        let native = super::native::NativeOptions::default();
        Self {
            repetition_guard: native.repetition_guard,
            max_num_seqs: native.max_running,
            gpu_memory_fraction: 0.85,
        }
    }
}

pub struct MistralEngine {
    model: Model,
    dry: Option<DrySamplingParams>,
    tokenizer: Counter,
    stop_ids: Vec<u32>,
    info: ModelInfo,
}

/// How tokens are counted: locally when the model ships tokenizer.json (exact and off the engine
/// thread), otherwise through the engine, which is the only holder of a GGUF-embedded tokenizer.
enum Counter {
    Local(Arc<tokenizers::Tokenizer>),
    Engine,
}

impl MistralEngine {
    pub async fn load(source: &ModelSource, opts: &MistralOptions) -> anyhow::Result<Self> {
        let started = Instant::now();
        let model = match source {
            ModelSource::Safetensors { dir } => {
                let builder = TextModelBuilder::new(path_str(dir)?)
                    .with_token_source(TokenSource::None)
                    .with_max_num_seqs(opts.max_num_seqs)
                    .with_prefix_cache_n(None);
                let builder = device_setup_text(builder, opts)?;
                builder.build().await?
            }
            ModelSource::Gguf {
                file,
                tokenizer_dir,
            } => {
                let dir = file
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let name = file
                    .file_name()
                    .ok_or_else(|| anyhow::anyhow!("GGUF path has no file name"))?
                    .to_string_lossy()
                    .into_owned();
                let mut builder = GgufModelBuilder::new(path_str(dir)?, vec![name])
                    .with_token_source(TokenSource::None)
                    .with_max_num_seqs(opts.max_num_seqs)
                    .with_prefix_cache_n(None);
                if let Some(tok) = tokenizer_dir {
                    builder = builder.with_tok_model_id(path_str(tok)?);
                }
                let builder = device_setup_gguf(builder, opts)?;
                builder.build().await?
            }
        };

        let tokenizer = match source.tokenizer_json() {
            Some(path) => Counter::Local(Arc::new(
                tokenizers::Tokenizer::from_file(&path)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
            )),
            None => Counter::Engine,
        };
        let dry = (opts.repetition_guard > 0.0)
            .then(|| {
                DrySamplingParams::new_with_defaults(
                    opts.repetition_guard,
                    Some(DRY_BREAKERS.iter().map(|s| s.to_string()).collect()),
                    None,
                    Some(3),
                )
            })
            .transpose()?;
        let mut engine = Self {
            model,
            dry,
            tokenizer,
            stop_ids: Vec::new(),
            info: ModelInfo {
                name: source.name(),
                max_sequence_len: None,
                load_time: Duration::ZERO,
            },
        };
        engine.stop_ids = engine.grammar_eos_ids().await?;
        engine.info.max_sequence_len = engine.model.max_sequence_length().ok().flatten();
        engine.info.load_time = started.elapsed();
        tracing::info!(
            model = %engine.info.name,
            stop_ids = ?engine.stop_ids,
            load_seconds = engine.info.load_time.as_secs_f64(),
            "model loaded"
        );
        Ok(engine)
    }

    async fn grammar_eos_ids(&self) -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::new();
        for name in GRAMMAR_EOS_NAMES {
            let toks = self.tokenize(name.to_string()).await?;
            if let [id] = toks[..] {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    async fn tokenize(&self, text: String) -> Result<Vec<u32>, EngineError> {
        match &self.tokenizer {
            Counter::Local(tok) => {
                let tok = tok.clone();
                tokio::task::spawn_blocking(move || {
                    tok.encode_fast(text, false)
                        .map(|e| e.get_ids().to_vec())
                        .map_err(|e| EngineError::Tokenizer(e.to_string()))
                })
                .await
                .map_err(|e| EngineError::Tokenizer(e.to_string()))?
            }
            // The engine answers tokenize requests between steps, on its own thread.
            Counter::Engine => self
                .model
                .tokenize(Either::Right(text), None, false, false, None)
                .await
                .map_err(|e| EngineError::Tokenizer(e.to_string())),
        }
    }
}

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("model path {} is not valid UTF-8", p.display()))
}

#[cfg(feature = "cuda")]
fn paged_attention(opts: &MistralOptions) -> anyhow::Result<mistralrs::PagedAttentionConfig> {
    mistralrs::PagedAttentionMetaBuilder::default()
        .with_gpu_memory(mistralrs::MemoryGpuConfig::Utilization(
            opts.gpu_memory_fraction,
        ))
        .build()
}

#[cfg(feature = "cuda")]
fn device_setup_text(b: TextModelBuilder, o: &MistralOptions) -> anyhow::Result<TextModelBuilder> {
    Ok(b.with_paged_attn(paged_attention(o)?))
}
#[cfg(not(feature = "cuda"))]
fn device_setup_text(b: TextModelBuilder, _: &MistralOptions) -> anyhow::Result<TextModelBuilder> {
    Ok(b.with_force_cpu())
}
#[cfg(feature = "cuda")]
fn device_setup_gguf(b: GgufModelBuilder, o: &MistralOptions) -> anyhow::Result<GgufModelBuilder> {
    Ok(b.with_paged_attn(paged_attention(o)?))
}
#[cfg(not(feature = "cuda"))]
fn device_setup_gguf(b: GgufModelBuilder, _: &MistralOptions) -> anyhow::Result<GgufModelBuilder> {
    Ok(b.with_force_cpu())
}

fn finish_reason(s: &str) -> Result<FinishReason, EngineError> {
    match s {
        "stop" => Ok(FinishReason::Stop),
        "length" => Ok(FinishReason::Length),
        other => Err(EngineError::Generation(format!(
            "the engine ended the generation with `{other}`"
        ))),
    }
}

#[async_trait]
impl Engine for MistralEngine {
    async fn generate(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let started = Instant::now();
        let mut messages = TextMessages::new();
        for m in request.messages {
            let role = match m.role {
                PromptRole::System => TextMessageRole::System,
                PromptRole::User => TextMessageRole::User,
            };
            messages = messages.add_message(role, m.content);
        }
        let builder = RequestBuilder::from(messages)
            .set_constraint(Constraint::JsonSchema(request.schema))
            .set_sampler_temperature(0.0)
            .set_sampler_max_len(request.max_tokens)
            .set_sampler_stop_toks(StopTokens::Ids(self.stop_ids.clone()))
            .enable_thinking(false);
        let builder = match &self.dry {
            Some(dry) => builder.set_sampler_dry_params(dry.clone()),
            None => builder,
        };

        let mut stream = self
            .model
            .stream_chat_request(builder)
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;

        let mut text = String::new();
        let mut first_token: Option<Duration> = None;
        let mut finish: Option<FinishReason> = None;
        let mut usage = None;
        while let Some(response) = stream.next().await {
            match response {
                Response::Chunk(chunk) => {
                    first_token.get_or_insert_with(|| started.elapsed());
                    for choice in chunk.choices {
                        if let Some(delta) = choice.delta.content {
                            text.push_str(&delta);
                        }
                        if let Some(reason) = choice.finish_reason {
                            finish = Some(finish_reason(&reason)?);
                        }
                    }
                    if chunk.usage.is_some() {
                        usage = chunk.usage;
                    }
                    if finish.is_some() {
                        break;
                    }
                }
                Response::ModelError(msg, _) => return Err(EngineError::Generation(msg)),
                Response::InternalError(e) => return Err(EngineError::Generation(e.to_string())),
                Response::ValidationError(e) => return Err(EngineError::Rejected(e.to_string())),
                _ => {
                    return Err(EngineError::Generation(
                        "unexpected response kind from the engine".into(),
                    ))
                }
            }
        }
        let finish = finish.ok_or_else(|| {
            EngineError::Generation("engine closed the stream before finishing".into())
        })?;
        let (prompt_tokens, generated_tokens) = usage
            .map(|u| (u.prompt_tokens, u.completion_tokens))
            .unwrap_or_default();
        let total_time = started.elapsed();
        Ok(Generation {
            text,
            finish,
            prompt_tokens,
            // The reference backend runs with its prefix cache off.
            cached_prompt_tokens: 0,
            generated_tokens,
            time_to_first_token: first_token.unwrap_or(total_time),
            total_time,
        })
    }

    async fn count_tokens(&self, text: String) -> Result<usize, EngineError> {
        self.tokenize(text).await.map(|t| t.len())
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }
}
