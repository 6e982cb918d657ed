//! `memex extract`: JSONL in, JSONL out, through the same [`Extractor`] and engine as `serve`,
//! in-process: for backfilling memories from existing chat logs without HTTP in between.
//!
//! The runner owns the flow of lines: [`input`] reads them (bounded: memory does not grow with
//! the file), a slot per in-flight request (`--max-concurrent`, as in `serve`) decides when the
//! next line is taken, each request runs on its own task, and [`output`] writes each answer as
//! one whole line the moment it is ready (completion order). Every input line gets exactly one
//! output line: a line that cannot be run gets an error line with the server's code for it.
//!
//! Resuming: the output file is appended to, and the ids it already answered are skipped
//! (failures with a retryable code are run again under `--retry-failed`). Interruption: the
//! first SIGINT/SIGTERM stops taking lines and lets the in-flight ones finish; the second
//! abandons them (they have no output line, so a re-run does them). Either way every line
//! written is whole.

pub mod input;
pub mod output;
pub mod progress;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::api::error::ApiError;
use crate::api::types::ExtractRequest;
use crate::config::ExtractorArgs;
use crate::engine::ModelSource;
use crate::pipeline::{Extraction, Extractor};
use input::ParsedLine;
use output::{Answered, LineSender, OutputLine, Resume, Retryable, Sink, Writer};
use progress::{clock, Progress, Tally};

#[derive(Debug, Clone, Args)]
pub struct ExtractArgs {
    /// Input: JSON lines, each a request body or a batch-file line (README); `-` reads stdin.
    pub input: PathBuf,

    /// Output JSON lines, appended to: ids it already answered are skipped (resume). `-` writes
    /// to stdout (no resume).
    #[arg(long, short)]
    pub output: PathBuf,

    /// Requests extracting at once (each runs up to 3 branches in the engine: keep 3 × this
    /// within --max-num-seqs).
    #[arg(long, visible_alias = "concurrency", env = "MEMEX_MAX_CONCURRENT", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent: u32,

    /// Run again the ids whose latest answer is a retryable error (50000, 50004).
    #[arg(long)]
    pub retry_failed: bool,

    /// No progress bar or progress lines (the summary is still printed).
    #[arg(long)]
    pub no_progress: bool,

    #[command(flatten)]
    pub extractor: ExtractorArgs,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Every input line has an output line.
    Complete,
    /// Stopped by a signal: lines were left unread or abandoned; a re-run does them.
    Interrupted,
}

/// Load the model on the chosen engine and build the pipeline on it: what `serve` does before
/// it is ready, without its metrics and warm-up.
pub async fn load_extractor(args: &ExtractorArgs) -> anyhow::Result<Arc<Extractor>> {
    let source = ModelSource::resolve(&args.model, args.tokenizer.as_deref())?;
    let engine = crate::engine::load(args.engine, &source, &args.mistral(), &args.native()).await?;
    let mut extractor = Extractor::new(engine, args.pipeline())?;
    extractor.fit_to_context().await?;
    Ok(Arc::new(extractor))
}

/// One request through the pipeline, with the server's checks, in the server's order (input
/// checks and the token limit, then generation), and its errors as the server's.
pub async fn answer(
    extractor: &Extractor,
    request: ExtractRequest,
) -> Result<Extraction, ApiError> {
    let prepared = extractor.prepare(request.into_input()).await?;
    Ok(extractor.run(prepared).await?)
}

pub async fn run(args: ExtractArgs) -> anyhow::Result<Finish> {
    let to_stdout = args.output == Path::new("-");
    // Everything that can fail on a path fails before the model loads.
    let resume = if to_stdout {
        Resume::default()
    } else {
        Resume::scan(&args.output)?
    };
    if resume.cut_bytes > 0 {
        eprintln!(
            "memex extract: cut a partial last line ({} bytes) off {}: an earlier run was killed \
             while writing it",
            resume.cut_bytes,
            args.output.display()
        );
    }
    let (source, total) = open_input(&args.input)?;
    let sink = if to_stdout {
        Sink::Stdout
    } else {
        Sink::append(&args.output)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", args.output.display()))?
    };
    // Until the model is loaded, a signal ends the process as usual: nothing is written yet.
    let extractor = load_extractor(&args.extractor).await?;
    let signals = watch_signals();

    let show = !args.no_progress;
    let progress = Progress::new("memex extract", total, show);
    let reporter = progress.spawn_plain_reporter(show);
    let writer = Writer::spawn(sink);
    let runner = Runner {
        extractor,
        resume,
        retry_failed: args.retry_failed,
        max_body_bytes: args.extractor.max_body_bytes,
        progress: progress.clone(),
        lines: writer.sender(),
        seen: HashMap::new(),
    };
    let slots = args.max_concurrent as usize;
    let outcome = runner.run(source, slots, signals).await;
    // Every task is done (or dropped): only the runner's sender is left, and it is gone now.
    let written = writer.finish();
    if let Some(r) = reporter {
        r.abort();
    }
    progress.finish();
    let outcome = outcome?;
    written.map_err(|e| anyhow::anyhow!("writing {}: {e}", args.output.display()))?;
    eprintln!(
        "memex extract: {}",
        summary(&outcome, &progress, &args.output)
    );
    Ok(outcome.finish)
}

/// What a run did, beyond the counters.
struct Outcome {
    finish: Finish,
    /// In-flight requests dropped by a second signal.
    abandoned: usize,
    /// Lines left unread by a signal.
    stopped_early: bool,
}

fn summary(outcome: &Outcome, progress: &Progress, output: &Path) -> String {
    let Tally {
        succeeded,
        failed,
        skipped,
        generated_tokens,
    } = progress.tally();
    let elapsed = progress.elapsed();
    let mut s = format!(
        "{} answered ({succeeded} ok, {failed} failed), {skipped} skipped (answered by an earlier \
         run), {generated_tokens} tokens generated, in {}",
        succeeded + failed,
        clock(elapsed)
    );
    if outcome.finish == Finish::Interrupted {
        s.push_str(&format!(
            "; interrupted: {}{} abandoned in flight. Run the same command again to do the rest",
            if outcome.stopped_early {
                "lines left unread, "
            } else {
                ""
            },
            outcome.abandoned
        ));
    }
    if output != Path::new("-") {
        s.push_str(&format!("; output: {}", output.display()));
    }
    s
}

/// The input and, for a file, its number of (non-blank) lines: counted in a first streaming
/// pass so that progress has a total and an ETA.
fn open_input(path: &Path) -> anyhow::Result<(Box<dyn Read + Send>, Option<u64>)> {
    if path == Path::new("-") {
        return Ok((Box::new(std::io::stdin()), None));
    }
    let open = || {
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))
    };
    let total = count_lines(open()?).ok();
    Ok((Box::new(open()?), total))
}

fn count_lines(file: std::fs::File) -> std::io::Result<u64> {
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let (mut count, mut blank) = (0u64, true);
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        for &b in buf {
            if b == b'\n' {
                count += u64::from(!blank);
                blank = true;
            } else if !b.is_ascii_whitespace() {
                blank = false;
            }
        }
        let n = buf.len();
        reader.consume(n);
    }
    Ok(count + u64::from(!blank))
}

/// SIGINT and SIGTERM, counted: the runner drains at the first and abandons at the second. The
/// handlers stay installed, so a second signal never kills the process half-way.
fn watch_signals() -> watch::Receiver<u32> {
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut int), Ok(mut term)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) else {
                return;
            };
            loop {
                tokio::select! {
                    _ = int.recv() => {},
                    _ = term.recv() => {},
                }
                tx.send_modify(|n| *n += 1);
            }
        }
        #[cfg(not(unix))]
        while tokio::signal::ctrl_c().await.is_ok() {
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

/// What to do with one parsed line.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// Answered by an earlier run.
    Skip,
    /// A repeat of an id used by this earlier line: an error line.
    Duplicate { first: u64 },
    /// Answer it now (run it, or write its parse error).
    Answer,
}

struct Runner {
    extractor: Arc<Extractor>,
    resume: Resume,
    retry_failed: bool,
    max_body_bytes: usize,
    progress: Progress,
    lines: LineSender,
    /// The first input line of every id taken in this run: duplicates are found by it. Ids
    /// only, never requests: this is what grows with the input (tens of bytes a line).
    seen: HashMap<String, u64>,
}

impl Runner {
    async fn run(
        mut self,
        source: Box<dyn Read + Send>,
        slots: usize,
        mut signals: watch::Receiver<u32>,
    ) -> anyhow::Result<Outcome> {
        let max_line = input::max_line_bytes(self.max_body_bytes);
        let mut lines = input::spawn_reader(source, max_line, slots);
        let slot_pool = Arc::new(Semaphore::new(slots));
        let mut tasks = JoinSet::new();
        let mut stopped_early = false;
        loop {
            while let Some(done) = tasks.try_join_next() {
                report_panic(done);
            }
            if self.lines.is_broken() {
                // Writing failed (disk full, a closed pipe): answers would be lost. The error
                // is reported from the writer once the in-flight ones are done.
                break;
            }
            let slot = tokio::select! {
                biased;
                _ = signals.changed() => { stopped_early = true; break; }
                slot = slot_pool.clone().acquire_owned() => slot.expect("the pool is never closed"),
            };
            let raw = tokio::select! {
                biased;
                _ = signals.changed() => { stopped_early = true; break; }
                item = lines.recv() => match item {
                    None => break,
                    Some(Err(e)) => {
                        drain(&mut tasks, &mut signals, &self.progress).await;
                        anyhow::bail!("reading the input: {e}");
                    }
                    Some(Ok(raw)) => raw,
                },
            };
            let parsed = input::parse(raw, self.max_body_bytes);
            match self.decide(&parsed) {
                Decision::Skip => self.progress.skipped(),
                Decision::Duplicate { first } => self.write(OutputLine::duplicate(
                    parsed.custom_id,
                    parsed.number,
                    first,
                )),
                Decision::Answer => match parsed.request {
                    Err(e) => self.write(OutputLine::answer(
                        parsed.custom_id,
                        parsed.number,
                        Err(e),
                        0.0,
                    )),
                    Ok(request) => {
                        let (extractor, lines, progress) = (
                            self.extractor.clone(),
                            self.lines.clone(),
                            self.progress.clone(),
                        );
                        tasks.spawn(async move {
                            let started = Instant::now();
                            let result = answer(&extractor, request).await;
                            let seconds = started.elapsed().as_secs_f64();
                            let line = OutputLine::answer(
                                parsed.custom_id,
                                parsed.number,
                                result,
                                seconds,
                            );
                            progress.answered(line.error.is_none(), line.generated_tokens());
                            lines.send(&line);
                            drop(slot);
                        });
                    }
                },
            }
        }
        // Stop the reader (it ends at its next line) and finish what is in flight.
        drop(lines);
        if stopped_early {
            self.progress.note(&format!(
                "memex extract: interrupted; taking no more lines, finishing {} in flight \
                 (interrupt again to abandon them)",
                tasks.len()
            ));
        }
        let abandoned = drain(&mut tasks, &mut signals, &self.progress).await;
        let finish = if stopped_early || abandoned > 0 {
            Finish::Interrupted
        } else {
            Finish::Complete
        };
        Ok(Outcome {
            finish,
            abandoned,
            stopped_early,
        })
    }

    fn decide(&mut self, line: &ParsedLine) -> Decision {
        let answered = self.resume.answered.get(&line.custom_id);
        if let Some(&first) = self.seen.get(&line.custom_id) {
            if answered.is_some_and(|a| a.duplicate_lines.contains(&line.number)) {
                return Decision::Skip;
            }
            return Decision::Duplicate { first };
        }
        self.seen.insert(line.custom_id.clone(), line.number);
        match answered {
            Some(Answered {
                latest: Some(Retryable::No),
                ..
            }) => Decision::Skip,
            Some(Answered {
                latest: Some(Retryable::Yes),
                ..
            }) if !self.retry_failed => Decision::Skip,
            _ => Decision::Answer,
        }
    }

    fn write(&self, line: OutputLine) {
        self.progress
            .answered(line.error.is_none(), line.generated_tokens());
        self.lines.send(&line);
    }
}

/// Wait for the in-flight tasks; at the second signal overall, abandon the rest. Returns how
/// many were abandoned.
async fn drain(
    tasks: &mut JoinSet<()>,
    signals: &mut watch::Receiver<u32>,
    progress: &Progress,
) -> usize {
    loop {
        if *signals.borrow_and_update() >= 2 {
            let abandoned = tasks.len();
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            if abandoned > 0 {
                progress.note(&format!(
                    "memex extract: abandoned {abandoned} in-flight requests (no output line; a \
                     re-run does them)"
                ));
            }
            return abandoned;
        }
        tokio::select! {
            done = tasks.join_next() => match done {
                None => return 0,
                Some(done) => report_panic(done),
            },
            _ = signals.changed() => {}
        }
    }
}

fn report_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!("an extraction task panicked: its line has no output line");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_non_blank_lines_with_or_without_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.jsonl");
        for (text, want) in [("a\n\n b\n", 2), ("a\nb", 2), ("", 0), ("\n \n", 0)] {
            std::fs::write(&path, text).unwrap();
            assert_eq!(
                count_lines(std::fs::File::open(&path).unwrap()).unwrap(),
                want,
                "{text:?}"
            );
        }
    }
}
