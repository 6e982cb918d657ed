//! The extraction pipeline: dialogue in, memory lists out. Pure logic plus calls to the
//! [`Engine`] trait, so it is tested without HTTP and the HTTP layer never sees a prompt.
//!
//! clean → count input tokens → detect language → choose branches → per branch, concurrently:
//! render prompt → constrained generation → parse → assemble the response lists.
//!
//! A branch that fails is retried once with a nudged prompt (a different prompt changes the first
//! token's logits, which is what the known "EOS does not satisfy the grammar" failure needs). If
//! the retry fails too, the whole request fails naming the branch: a success never hides a
//! missing branch.

pub mod branch;
pub mod clean;
pub mod language;
pub mod output;
pub mod prompt;
pub mod schema;

use std::sync::Arc;
use std::time::Duration;

use crate::api::types::{ExtractData, ExtractionType, WireMessage};
use crate::engine::{Engine, EngineError, FinishReason, GenerateRequest, PromptMessage};
use branch::{Branch, Requested};
use language::DetectedLanguage;
use output::BranchOutput;
use prompt::Prompts;
use schema::OutputLimits;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("`messages` is missing or empty")]
    NoMessages,
    #[error("messages[{index}].content is empty after trimming")]
    EmptyContent { index: usize },
    #[error(
        "`extraction_types` is empty: name \"memory\", \"preference\" or both, or leave it out"
    )]
    NoExtractionTypes,
    #[error("input has {counted} tokens, over the limit of {limit}")]
    TooManyTokens { counted: usize, limit: usize },
    #[error("the {branch} branch failed: {reason}")]
    Branch { branch: Branch, reason: String },
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
}

/// What a client asked for, after HTTP parsing.
#[derive(Debug, Clone)]
pub struct ExtractInput {
    pub messages: Option<Vec<WireMessage>>,
    pub extraction_types: Option<Vec<ExtractionType>>,
}

/// Per-branch numbers for logs, headers and metrics.
#[derive(Debug, Clone)]
pub struct BranchStats {
    pub branch: Branch,
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    pub time_to_first_token: Duration,
    pub generation_time: Duration,
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub struct Extraction {
    pub data: ExtractData,
    pub input_tokens: usize,
    pub language: &'static str,
    pub branches: Vec<BranchStats>,
}

/// A request that passed every input check, with its token count; see [`Extractor::prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    dialogue: clean::Dialogue,
    requested: Requested,
    pub input_tokens: usize,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub max_input_tokens: usize,
    pub limits: OutputLimits,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_input_tokens: 8_000,
            limits: OutputLimits::default(),
        }
    }
}

pub struct Extractor {
    engine: Arc<dyn Engine>,
    prompts: Prompts,
    config: PipelineConfig,
}

/// Appended to the user prompt on the retry.
const RETRY_NUDGE: &str = "\n\nReply now with the JSON object only.";

impl Extractor {
    pub fn new(engine: Arc<dyn Engine>, config: PipelineConfig) -> anyhow::Result<Self> {
        let prompts = Prompts::new()?;
        prompts.self_check()?;
        language::warm_up();
        Ok(Self {
            engine,
            prompts,
            config,
        })
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// One short extraction through the whole path, before the server calls itself ready: the
    /// first generation pays one-off costs (grammar compilation, buffers) that would otherwise
    /// land on the first client, and a model that loads but cannot generate fails the start
    /// instead of every request.
    pub async fn warm_up(&self) -> Result<Duration, PipelineError> {
        let started = std::time::Instant::now();
        let message = WireMessage {
            role: crate::api::types::Role::User,
            content: Some("Hi, I'm Sam and I drink green tea every morning.".into()),
            chat_time: None,
        };
        self.extract(ExtractInput {
            messages: Some(vec![message]),
            extraction_types: Some(vec![ExtractionType::Memory]),
        })
        .await?;
        Ok(started.elapsed())
    }

    /// Both stages at once: for callers that do no admission of their own (warm-up, tools).
    pub async fn extract(&self, input: ExtractInput) -> Result<Extraction, PipelineError> {
        let prepared = self.prepare(input).await?;
        self.run(prepared).await
    }

    /// Validate, clean and count: everything a request is checked against before it may use the
    /// engine. Cheap next to generation, so the server runs it before rate limits and admission,
    /// and a request over the input limit never takes a queue place or a rate cell.
    pub async fn prepare(&self, input: ExtractInput) -> Result<Prepared, PipelineError> {
        if input.extraction_types.as_ref().is_some_and(Vec::is_empty) {
            return Err(PipelineError::NoExtractionTypes);
        }
        let dialogue = clean::clean(input.messages)?;
        let requested = Requested::from_types(input.extraction_types.as_deref());

        // The engine tokenizes on a blocking thread (or its own), never on the async workers.
        let input_tokens = self
            .engine
            .count_tokens(dialogue.joined_content())
            .await
            .map_err(|e| PipelineError::Tokenizer(e.to_string()))?;
        if input_tokens > self.config.max_input_tokens {
            return Err(PipelineError::TooManyTokens {
                counted: input_tokens,
                limit: self.config.max_input_tokens,
            });
        }
        Ok(Prepared {
            dialogue,
            requested,
            input_tokens,
        })
    }

    /// Generate for a prepared request: language, branches, prompts, engine, output mapping.
    pub async fn run(&self, prepared: Prepared) -> Result<Extraction, PipelineError> {
        let Prepared {
            dialogue,
            requested,
            input_tokens,
        } = prepared;
        let detect_on = dialogue.clone();
        let language = tokio::task::spawn_blocking(move || language::detect(&detect_on))
            .await
            .map_err(|e| PipelineError::Tokenizer(format!("language detection: {e}")))?;

        let branches = branch::choose(requested, &dialogue);
        let runs = branches
            .iter()
            .map(|&b| self.run_branch(b, &language, &dialogue));
        // try_join_all drops (and so cancels) the sibling branches as soon as one fails.
        let results = futures::future::try_join_all(runs).await?;

        let mut data = ExtractData {
            success: true,
            memory_detail_list: requested.memory.then(Vec::new),
            preference_detail_list: requested.preference.then(Vec::new),
        };
        let mut stats = Vec::with_capacity(results.len());
        for (out, s) in results {
            match out {
                BranchOutput::Memories(m) => data
                    .memory_detail_list
                    .get_or_insert_with(Vec::new)
                    .extend(m),
                BranchOutput::Preferences(p) => data
                    .preference_detail_list
                    .get_or_insert_with(Vec::new)
                    .extend(p),
            }
            stats.push(s);
        }
        Ok(Extraction {
            data,
            input_tokens,
            language: language.name,
            branches: stats,
        })
    }

    /// The engine requests an extraction would make, without running them: what `memex render`
    /// prints, and what the side-by-side benchmark sends to other servers.
    pub fn render(
        messages: Option<Vec<WireMessage>>,
        extraction_types: Option<&[ExtractionType]>,
        limits: &OutputLimits,
    ) -> Result<Vec<(Branch, GenerateRequest)>, PipelineError> {
        let dialogue = clean::clean(messages)?;
        let language = language::detect(&dialogue);
        let prompts = Prompts::new().map_err(|e| PipelineError::Branch {
            branch: Branch::Memory,
            reason: format!("prompt templates: {e}"),
        })?;
        branch::choose(Requested::from_types(extraction_types), &dialogue)
            .into_iter()
            .map(|branch| {
                let request = branch_request(&prompts, branch, &language, &dialogue, limits)?;
                Ok((branch, request))
            })
            .collect()
    }

    async fn run_branch(
        &self,
        branch: Branch,
        language: &DetectedLanguage,
        dialogue: &clean::Dialogue,
    ) -> Result<(BranchOutput, BranchStats), PipelineError> {
        let fail = |reason: String| PipelineError::Branch { branch, reason };
        let mut request = branch_request(
            &self.prompts,
            branch,
            language,
            dialogue,
            &self.config.limits,
        )?;

        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(branch, request.clone()).await {
                Ok((out, mut stats)) => {
                    stats.attempts = attempts;
                    return Ok((out, stats));
                }
                Err(reason) if attempts == 1 => {
                    tracing::warn!(%branch, %reason, "branch failed, retrying once");
                    nudge(&mut request.messages);
                }
                Err(reason) => return Err(fail(reason)),
            }
        }
    }

    async fn attempt(
        &self,
        branch: Branch,
        request: GenerateRequest,
    ) -> Result<(BranchOutput, BranchStats), String> {
        let max_tokens = request.max_tokens;
        let generation = self.engine.generate(request).await.map_err(|e| match e {
            EngineError::Unavailable(_) => format!("engine unavailable: {e}"),
            other => other.to_string(),
        })?;
        if generation.finish != FinishReason::Stop {
            return Err(format!(
                "generation ended by {:?} after {} tokens (limit {max_tokens}) before the JSON was complete",
                generation.finish, generation.generated_tokens
            ));
        }
        let out = output::parse(branch, &generation.text)?;
        Ok((
            out,
            BranchStats {
                branch,
                prompt_tokens: generation.prompt_tokens,
                cached_prompt_tokens: generation.cached_prompt_tokens,
                generated_tokens: generation.generated_tokens,
                time_to_first_token: generation.time_to_first_token,
                generation_time: generation.total_time,
                attempts: 1,
            },
        ))
    }
}

/// One branch's engine request: its prompt, its bounded schema and the schema's token bound.
fn branch_request(
    prompts: &Prompts,
    branch: Branch,
    language: &DetectedLanguage,
    dialogue: &clean::Dialogue,
    limits: &OutputLimits,
) -> Result<GenerateRequest, PipelineError> {
    let schema = schema::schema_for(branch, limits);
    let messages = prompts
        .render(branch, language, dialogue, limits.max_items)
        .map_err(|e| PipelineError::Branch {
            branch,
            reason: format!("prompt template: {e}"),
        })?;
    Ok(GenerateRequest {
        messages,
        max_tokens: schema::worst_case_tokens(&schema),
        schema,
    })
}

fn nudge(messages: &mut [PromptMessage]) {
    if let Some(last) = messages.last_mut() {
        if !last.content.ends_with(RETRY_NUDGE) {
            last.content.push_str(RETRY_NUDGE);
        }
    }
}
