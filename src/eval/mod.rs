//! `memex eval`: a labelled dataset in, quality figures out, so that every prompt, model or
//! engine change can be judged by the same numbers (docs/eval.md).
//!
//! Each dialogue runs through the same path as `memex extract` ([`crate::batch::answer`]: the
//! server's checks, pipeline and engine, in-process), its answer is scored against its labels
//! by a fixed matching rule ([`matching`]), and the scores are pooled per language group
//! ([`report`]). Nothing here calls a model to judge: the figures are deterministic for a given
//! set of answers.

pub mod dataset;
pub mod matching;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::batch::progress::Progress;
use crate::config::ExtractorArgs;
use report::DialogueResult;

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// The labelled dataset (JSON lines; docs/eval.md).
    #[arg(default_value = "eval/dialogues.jsonl")]
    pub dataset: PathBuf,

    /// Print JSON (the figures per language group, and every dialogue's scores and output)
    /// instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Least normalized token overlap for an extracted memory to match an expected one (0 to 1).
    #[arg(long, default_value_t = matching::DEFAULT_THRESHOLD, value_parser = fraction)]
    pub match_threshold: f64,

    /// Dialogues extracting at once (latency per dialogue grows with it).
    #[arg(long, visible_alias = "concurrency", env = "MEMEX_MAX_CONCURRENT", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent: u32,

    #[command(flatten)]
    pub extractor: ExtractorArgs,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a number between 0 and 1")),
    }
}

/// Run the dataset and print the report; the results in dataset order.
pub async fn run(args: EvalArgs) -> anyhow::Result<Vec<DialogueResult>> {
    let dialogues = dataset::load(&args.dataset)?;
    let extractor = crate::batch::load_extractor(&args.extractor).await?;
    let limits = args.extractor.pipeline().limits;
    let threshold = args.match_threshold;

    let progress = Progress::new("memex eval", Some(dialogues.len() as u64), true);
    let reporter = progress.spawn_plain_reporter(true);
    let slots = Arc::new(Semaphore::new(args.max_concurrent as usize));
    let mut tasks = JoinSet::new();
    for (index, dialogue) in dialogues.into_iter().enumerate() {
        let slot = slots.clone().acquire_owned().await?;
        let (extractor, progress) = (extractor.clone(), progress.clone());
        tasks.spawn(async move {
            let started = Instant::now();
            // The dataset's requests were checked to parse when it was loaded.
            let answer = match dialogue.parsed_request() {
                Ok(request) => crate::batch::answer(&extractor, request).await,
                Err(e) => Err(e),
            };
            let seconds = started.elapsed().as_secs_f64();
            drop(slot);
            let generated = answer.as_ref().map_or(0, |e| {
                e.branches.iter().map(|b| b.generated_tokens).sum::<usize>()
            });
            let answer = answer.map(|extraction| extraction.items.into());
            let result = report::score(&dialogue, answer, seconds, &limits, threshold);
            progress.answered(result.code == 0, generated);
            (index, result)
        });
    }
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        results.push(done?);
    }
    if let Some(r) = reporter {
        r.abort();
    }
    progress.finish();
    results.sort_by_key(|(index, _)| *index);
    let results: Vec<DialogueResult> = results.into_iter().map(|(_, r)| r).collect();

    let groups = report::groups(&results);
    if args.json {
        let out = serde_json::json!({
            "dataset": args.dataset.display().to_string(),
            "model": args.extractor.model.display().to_string(),
            "match_threshold": threshold,
            "summary": groups,
            "dialogues": results,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", report::table(&groups, threshold));
    }
    Ok(results)
}
