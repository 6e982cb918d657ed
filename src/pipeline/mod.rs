//! The extraction pipeline: dialogue in, memory lists out. Pure logic plus calls to the
//! [`Engine`] trait, so it is tested without HTTP and the HTTP layer never sees a prompt.
//!
//! `prepare`: clean → detect language → choose branches → render each branch's prompt → count
//! it. `run`: per branch, concurrently: constrained generation → parse → assemble the response
//! lists.
//!
//! Everything the model will read is counted before a request may use the engine, with the
//! engine's own encoding of the prompt (chat template included). The input limit
//! (`--max-input-tokens`) bounds the dialogue as it appears in the prompt, framing included
//! (`[role | time] ` and line breaks): a branch's prompt tokens less the tokens of the same
//! prompt with no dialogue. And every branch's whole prompt plus the longest answer its schema
//! allows must fit the model's context (and the KV pool), or the request is refused with
//! 413/40305 before it takes a rate cell's worth of engine time; at start the input limit is
//! lowered, with a warning, to what the context can hold ([`Extractor::fit_to_context`]).
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
pub mod types;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::{Engine, EngineError, FinishReason, GenerateRequest, PromptMessage};
use branch::{Branch, Requested};
use language::{DetectedLanguage, TemplateLang};
use output::BranchOutput;
use prompt::Prompts;
use schema::OutputLimits;
use types::{ExtractedItems, ExtractionType, InputMessage, Role};

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
    #[error("messages[{index}].chat_time {reason}")]
    BadChatTime { index: usize, reason: String },
    #[error("input has {counted} tokens, over the limit of {limit}")]
    TooManyTokens { counted: usize, limit: usize },
    #[error(
        "the {branch} prompt of {prompt} tokens plus its longest possible answer of {output} \
         tokens does not fit the model's context of {context} tokens"
    )]
    PromptTooLong {
        branch: Branch,
        prompt: usize,
        output: usize,
        context: usize,
    },
    #[error("the {branch} branch failed: {reason}")]
    Branch { branch: Branch, reason: String },
    #[error("tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("language detection failed: {0}")]
    Language(String),
    #[error("rendering the prompt template {0}")]
    Template(#[from] prompt::RenderError),
    /// The blocking task that cleans, detects and renders did not finish (a panic outside
    /// language detection).
    #[error("preparing the prompts failed: {0}")]
    Prepare(String),
}

/// What a client asked for, after HTTP parsing.
#[derive(Debug, Clone)]
pub struct ExtractInput {
    pub messages: Option<Vec<InputMessage>>,
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

impl BranchStats {
    /// Prompt tokens the engine computed: the rest came from its prefix cache (the template
    /// prefix, or the dialogue a sibling branch computed).
    pub fn prefill_tokens(&self) -> usize {
        self.prompt_tokens.saturating_sub(self.cached_prompt_tokens)
    }
}

#[derive(Debug, Clone)]
pub struct Extraction {
    pub items: ExtractedItems,
    pub input_tokens: usize,
    pub language: &'static str,
    pub branches: Vec<BranchStats>,
}

/// A request that passed every input check, with its token count and the engine requests it
/// will make; see [`Extractor::prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    requested: Requested,
    language: DetectedLanguage,
    requests: Vec<(Branch, GenerateRequest)>,
    pub input_tokens: usize,
}

impl Prepared {
    /// Branches the request will run (one engine sequence each).
    pub fn branches(&self) -> usize {
        self.requests.len()
    }
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub max_input_tokens: usize,
    pub limits: OutputLimits,
    /// A folder whose `.j2` files replace the built-in templates of the same name.
    pub templates: Option<std::path::PathBuf>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_input_tokens: 8_000,
            limits: OutputLimits::default(),
            templates: None,
        }
    }
}

pub struct Extractor {
    engine: Arc<dyn Engine>,
    prompts: Arc<Prompts>,
    config: PipelineConfig,
    /// Prompt tokens of a branch's prompt with no dialogue, per branch and language: what a
    /// prompt holds besides the dialogue. Counted on first use (a few dozen entries at most).
    overheads: std::sync::Mutex<HashMap<(Branch, TemplateLang, &'static str), usize>>,
}

/// Appended to the user prompt on the retry.
const RETRY_NUDGE: &str = "\n\nReply now with the JSON object only.";
/// Tokens kept free in the context beyond prompt and answer: the retry's nudge.
const CONTEXT_MARGIN: usize = 16;
/// Room the start-up fit leaves besides: a non-English dialogue adds a sentence naming its
/// language to the English instructions.
const LANGUAGE_NOTE_MARGIN: usize = 48;

impl Extractor {
    pub fn new(engine: Arc<dyn Engine>, config: PipelineConfig) -> anyhow::Result<Self> {
        let prompts = Prompts::new(config.templates.as_deref())?;
        for (name, file) in prompts.overridden() {
            tracing::info!(template = name, file = %file.display(), "template overridden");
        }
        language::warm_up();
        Ok(Self {
            engine,
            prompts: Arc::new(prompts),
            config,
            overheads: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Lower `--max-input-tokens`, with a warning, when the model's context cannot hold that
    /// much dialogue beside every branch's instructions and longest possible answer; fail when
    /// it cannot hold even an empty dialogue (the output limits are then too large for the
    /// model). Run once at start, before the server takes requests.
    pub async fn fit_to_context(&mut self) -> anyhow::Result<()> {
        let Some(context) = self.context() else {
            return Ok(());
        };
        let mut room = usize::MAX;
        let mut widest = (Branch::Memory, 0, 0);
        let languages = [
            DetectedLanguage {
                template: TemplateLang::En,
                name: "English",
            },
            DetectedLanguage {
                template: TemplateLang::Zh,
                name: "Chinese",
            },
        ];
        for language in &languages {
            for branch in Branch::ALL {
                let overhead = self
                    .overhead(branch, language)
                    .await
                    .map_err(|e| anyhow::anyhow!("counting the prompt templates: {e}"))?;
                let output = self.output_bound(branch);
                let fixed = overhead + output + CONTEXT_MARGIN + LANGUAGE_NOTE_MARGIN;
                if fixed >= context {
                    anyhow::bail!(
                        "the {branch} prompt's instructions ({overhead} tokens) and its longest \
                     possible answer ({output} tokens, from --max-items, --max-text-chars, \
                     --max-label-chars and --max-tags) do not fit the model's context of \
                     {context} tokens: lower the output limits or serve a longer-context model"
                    );
                }
                if context - fixed < room {
                    room = context - fixed;
                    widest = (branch, overhead, output);
                }
            }
        }
        if self.config.max_input_tokens > room {
            let (branch, overhead, output) = widest;
            tracing::warn!(
                configured = self.config.max_input_tokens,
                lowered_to = room,
                context,
                %branch,
                instructions_tokens = overhead,
                answer_tokens = output,
                "--max-input-tokens lowered: the model's context cannot hold that much dialogue \
                 beside the prompt's instructions and its longest possible answer"
            );
            self.config.max_input_tokens = room;
        }
        Ok(())
    }

    /// Positions a generation may use: the model's context, and for the native engine the KV
    /// pool.
    fn context(&self) -> Option<usize> {
        self.engine.info().max_sequence_len
    }

    fn output_bound(&self, branch: Branch) -> usize {
        schema::worst_case_tokens(&schema::schema_for(branch, &self.config.limits))
    }

    /// Tokens of `branch`'s prompt in `language` with an empty dialogue.
    async fn overhead(
        &self,
        branch: Branch,
        language: &DetectedLanguage,
    ) -> Result<usize, PipelineError> {
        let key = (branch, language.template, language.name);
        let cached = self
            .overheads
            .lock()
            .ok()
            .and_then(|m| m.get(&key).copied());
        if let Some(n) = cached {
            return Ok(n);
        }
        let empty = clean::Dialogue {
            messages: Vec::new(),
        };
        let request = branch_request(&self.prompts, branch, language, &empty, &self.config.limits)?;
        let tokens = self
            .engine
            .count_prompt(request.messages)
            .await
            .map_err(|e| PipelineError::Tokenizer(e.to_string()))?;
        if let Ok(mut m) = self.overheads.lock() {
            m.insert(key, tokens);
        }
        Ok(tokens)
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
        let message = InputMessage {
            role: Role::User,
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

    /// Validate, clean, render and count: everything a request is checked against before it may
    /// use the engine. Cheap next to generation, so the server runs it before the token quota
    /// and admission, and a request over a limit never takes quota or a queue place.
    pub async fn prepare(&self, input: ExtractInput) -> Result<Prepared, PipelineError> {
        if input.extraction_types.as_ref().is_some_and(Vec::is_empty) {
            return Err(PipelineError::NoExtractionTypes);
        }
        let requested = Requested::from_types(input.extraction_types.as_deref());
        // Cleaning, language detection and rendering are CPU work on up to a whole body: off
        // the async workers.
        let prompts = self.prompts.clone();
        let limits = self.config.limits;
        let (language, requests) = tokio::task::spawn_blocking(move || {
            let dialogue = clean::clean(input.messages)?;
            let language = detect_language(&dialogue)?;
            let requests = branch::choose(requested, &dialogue)
                .into_iter()
                .map(|b| {
                    Ok((
                        b,
                        branch_request(&prompts, b, &language, &dialogue, &limits)?,
                    ))
                })
                .collect::<Result<Vec<_>, PipelineError>>()?;
            Ok::<_, PipelineError>((language, requests))
        })
        .await
        .map_err(|e| PipelineError::Prepare(e.to_string()))??;

        // The engine tokenizes on a blocking thread (or its own), never on the async workers.
        let counts = futures::future::try_join_all(
            requests
                .iter()
                .map(|(_, r)| self.engine.count_prompt(r.messages.clone())),
        )
        .await
        .map_err(|e| PipelineError::Tokenizer(e.to_string()))?;
        let mut input_tokens = 0;
        for ((branch, _), &prompt) in requests.iter().zip(&counts) {
            let overhead = self.overhead(*branch, &language).await?;
            input_tokens = input_tokens.max(prompt.saturating_sub(overhead));
        }
        if input_tokens > self.config.max_input_tokens {
            return Err(PipelineError::TooManyTokens {
                counted: input_tokens,
                limit: self.config.max_input_tokens,
            });
        }
        if let Some(context) = self.context() {
            for ((branch, request), &prompt) in requests.iter().zip(&counts) {
                if prompt + request.max_tokens + CONTEXT_MARGIN > context {
                    return Err(PipelineError::PromptTooLong {
                        branch: *branch,
                        prompt,
                        output: request.max_tokens,
                        context,
                    });
                }
            }
        }
        Ok(Prepared {
            requested,
            language,
            requests,
            input_tokens,
        })
    }

    /// Generate for a prepared request: language, branches, prompts, engine, output mapping.
    pub async fn run(&self, prepared: Prepared) -> Result<Extraction, PipelineError> {
        let Prepared {
            requested,
            language,
            requests,
            input_tokens,
            ..
        } = prepared;
        let runs = requests
            .into_iter()
            .map(|(b, request)| self.run_branch(b, request));
        // try_join_all drops (and so cancels) the sibling branches as soon as one fails.
        let results = futures::future::try_join_all(runs).await?;

        let mut items = ExtractedItems {
            memories: requested.memory.then(Vec::new),
            preferences: requested.preference.then(Vec::new),
        };
        let mut stats = Vec::with_capacity(results.len());
        for (out, s) in results {
            match out {
                BranchOutput::Memories(m) => items.memories.get_or_insert_with(Vec::new).extend(m),
                BranchOutput::Preferences(p) => {
                    items.preferences.get_or_insert_with(Vec::new).extend(p)
                }
            }
            stats.push(s);
        }
        Ok(Extraction {
            items,
            input_tokens,
            language: language.name,
            branches: stats,
        })
    }

    /// The engine requests an extraction would make, without running them: what `memex render`
    /// prints, and what the side-by-side benchmark sends to other servers.
    pub fn render(
        messages: Option<Vec<InputMessage>>,
        extraction_types: Option<&[ExtractionType]>,
        limits: &OutputLimits,
        prompts: &Prompts,
    ) -> Result<Vec<(Branch, GenerateRequest)>, PipelineError> {
        let dialogue = clean::clean(messages)?;
        let language = language::detect(&dialogue);
        branch::choose(Requested::from_types(extraction_types), &dialogue)
            .into_iter()
            .map(|branch| {
                let request = branch_request(prompts, branch, &language, &dialogue, limits)?;
                Ok((branch, request))
            })
            .collect()
    }

    async fn run_branch(
        &self,
        branch: Branch,
        mut request: GenerateRequest,
    ) -> Result<(BranchOutput, BranchStats), PipelineError> {
        let fail = |reason: String| PipelineError::Branch { branch, reason };

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
    let messages = prompts.render(branch, language, dialogue, limits.max_items)?;
    Ok(GenerateRequest {
        messages,
        max_tokens: schema::worst_case_tokens(&schema),
        schema,
    })
}

/// lingua has no error to return: a failure is a panic, caught here so that the request fails
/// naming language detection rather than as a failed blocking task.
fn detect_language(dialogue: &clean::Dialogue) -> Result<DetectedLanguage, PipelineError> {
    std::panic::catch_unwind(|| language::detect(dialogue)).map_err(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panicked".into());
        PipelineError::Language(reason)
    })
}

fn nudge(messages: &mut [PromptMessage]) {
    if let Some(last) = messages.last_mut() {
        if !last.content.ends_with(RETRY_NUDGE) {
            last.content.push_str(RETRY_NUDGE);
        }
    }
}
