//! The engine: the one place that runs the model.
//!
//! The pipeline asks for exactly one thing — "generate for these chat messages under this JSON
//! schema, at most N tokens" — through the [`Engine`] trait. Everything about how that happens
//! (which inference library, batching, model loading, stop tokens, cancellation) stays behind it,
//! so the HTTP layer and the pipeline can be tested against any engine and a new engine can be
//! dropped in without touching them.
//!
//! Cancellation is by drop: dropping the future returned by [`Engine::generate`] must stop the
//! generation within a few tokens. Implementations therefore drive requests as streams.

pub mod mistral;
pub mod model_source;
pub mod native;
pub mod stats;

pub use stats::{EngineCounters, EngineStats, StepCost};

use std::time::Duration;

use async_trait::async_trait;

pub use model_source::ModelSource;

/// DRY sequence breakers, for both engines: JSON punctuation. A repeat is only penalised inside
/// a run of text between them, so a model looping on a phrase inside a string is pushed out of
/// the loop while the JSON structure that every item repeats is left alone.
pub const DRY_BREAKERS: [&str; 8] = ["\"", ",", ":", "{", "}", "[", "]", "\n"];

/// Which engine serves the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The dedicated engine: continuous batching of mixed-length requests.
    Native,
    /// mistralrs 0.8.1's high-level engine, kept as the reference backend.
    Mistralrs,
}

impl EngineKind {
    /// The default for this build. A `cuda` build defaults to mistralrs: the native engine's
    /// GPU path (`native::tensor_model`) is checked against its CPU kernels on the CPU device,
    /// but has not yet run on a GPU. `--engine native` selects it there.
    pub const DEFAULT: Self = if cfg!(feature = "cuda") {
        Self::Mistralrs
    } else {
        Self::Native
    };
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Mistralrs => "mistralrs",
        })
    }
}

/// Load `source` on the chosen engine.
pub async fn load(
    kind: EngineKind,
    source: &ModelSource,
    mistral: &mistral::MistralOptions,
    native: &native::NativeOptions,
) -> anyhow::Result<std::sync::Arc<dyn Engine>> {
    Ok(match kind {
        EngineKind::Mistralrs => {
            std::sync::Arc::new(mistral::MistralEngine::load(source, mistral).await?)
        }
        EngineKind::Native => {
            let (source, native) = (source.clone(), native.clone());
            // Reading and dequantising weights is blocking work.
            let engine =
                tokio::task::spawn_blocking(move || native::NativeEngine::load(&source, &native))
                    .await??;
            std::sync::Arc::new(engine)
        }
    })
}

/// Allowance per message for chat-template framing where an engine cannot count it exactly
/// (`<|im_start|>role\n` ... `<|im_end|>\n` is five tokens in ChatML).
pub const TEMPLATE_TOKENS_PER_MESSAGE: usize = 8;

/// A chat message handed to the model's own chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    pub role: PromptRole,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptRole {
    System,
    User,
}

impl PromptRole {
    /// The name chat templates and OpenAI-style servers know the role by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
        }
    }
}

/// One constrained generation.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub messages: Vec<PromptMessage>,
    /// JSON schema the output must satisfy. It must be bounded (every string and array has a
    /// maximum) so that every generation ends within `max_tokens`.
    pub schema: serde_json::Value,
    /// Upper bound on generated tokens. Set above the schema's worst case: hitting it means the
    /// output is truncated JSON, which the caller treats as a failure.
    pub max_tokens: usize,
}

/// Why a generation ended.
/// A generation that ends any other way (an engine error, a cancelled request) is an
/// [`EngineError`], not a finish reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The grammar completed and an end token was produced.
    Stop,
    /// `max_tokens` (or the model's context) ran out first.
    Length,
}

/// The result of one generation, with what the observability layer needs.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache instead of a forward pass.
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From submission to the first generated token (queueing and prefill included).
    pub time_to_first_token: Duration,
    /// From submission to the last token.
    pub total_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine rejected the request before running it (e.g. a grammar it cannot compile).
    #[error("request rejected by the engine: {0}")]
    Rejected(String),
    /// The model or sampler failed mid-generation (e.g. the known EOS-versus-grammar error).
    #[error("generation failed: {0}")]
    Generation(String),
    /// The engine's worker is gone; nothing will be answered any more.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
}

/// Static facts about the loaded model, for logs, `/health` and metrics.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Name the model is served under (file or directory name).
    pub name: String,
    /// Largest total sequence the model accepts (prompt plus generation).
    pub max_sequence_len: Option<usize>,
    pub load_time: Duration,
}

#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Generate under a JSON-schema constraint. Dropping the returned future cancels the work.
    async fn generate(&self, request: GenerateRequest) -> Result<Generation, EngineError>;

    /// Count tokens of `text` with the served model's own tokenizer (no special tokens added).
    async fn count_tokens(&self, text: String) -> Result<usize, EngineError>;

    /// Tokens of the whole prompt `generate` would run for these messages: chat template
    /// included, encoded as `generate` encodes it. Engines that do not render the template
    /// themselves count the contents plus [`TEMPLATE_TOKENS_PER_MESSAGE`] per message (and one
    /// more for the assistant's opening): enough for ChatML-style templates.
    async fn count_prompt(&self, messages: Vec<PromptMessage>) -> Result<usize, EngineError> {
        let mut total = TEMPLATE_TOKENS_PER_MESSAGE;
        for m in messages {
            total += self.count_tokens(m.content).await? + TEMPLATE_TOKENS_PER_MESSAGE;
        }
        Ok(total)
    }

    /// Why the engine can no longer generate (its worker ended), or `None` while it can.
    /// Readiness turns red on it and the server exits non-zero.
    fn failure(&self) -> Option<String> {
        None
    }

    fn info(&self) -> &ModelInfo;

    /// The scheduler's counters, for engines that have them (the native engine).
    fn stats(&self) -> Option<EngineStats> {
        None
    }
}
