//! Progress of a run, on stderr: a bar with rate, tokens/s and ETA (indicatif) when stderr is a
//! terminal, a plain line every few seconds otherwise (logs, CI), and a summary at the end.
//!
//! Lines answered by an earlier run are taken off the total rather than counted as done, so the
//! rate and the ETA are this run's own.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Counts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    generated_tokens: AtomicU64,
}

/// The run's counters, shared by the tasks that answer lines.
#[derive(Clone)]
pub struct Progress {
    /// The command, at the start of each plain line.
    label: &'static str,
    counts: Arc<Counts>,
    started: Instant,
    total: Option<u64>,
    bar: Option<ProgressBar>,
}

/// The counts at the end of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Answered with a success in this run.
    pub succeeded: u64,
    /// Answered with an error line in this run.
    pub failed: u64,
    /// Already answered by an earlier run (or failed before, without `--retry-failed`).
    pub skipped: u64,
    pub generated_tokens: u64,
}

impl Progress {
    /// `total`: the input's line count when it is known (a file, not a pipe).
    pub fn new(label: &'static str, total: Option<u64>, show: bool) -> Self {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} {msg} ETA {eta}"
            } else {
                "{elapsed_precise} {spinner} {pos} done {per_sec} {msg}"
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            label,
            counts: Arc::default(),
            started: Instant::now(),
            total,
            bar,
        }
    }

    /// A plain line every few seconds, when there is no bar; ends with the returned task.
    pub fn spawn_plain_reporter(&self, show: bool) -> Option<tokio::task::JoinHandle<()>> {
        if !show || self.bar.is_some() {
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PLAIN_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                eprintln!("{}: {}", me.label, me.line());
            }
        }))
    }

    pub fn answered(&self, success: bool, generated_tokens: usize) {
        let c = &self.counts;
        if success {
            c.succeeded.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
        }
        c.generated_tokens
            .fetch_add(generated_tokens as u64, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(self.rates());
        }
    }

    pub fn skipped(&self) {
        self.counts.skipped.fetch_add(1, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.dec_length(1);
        }
    }

    /// Say something above the bar (or plainly).
    pub fn note(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }

    pub fn tally(&self) -> Tally {
        let c = &self.counts;
        Tally {
            succeeded: c.succeeded.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            skipped: c.skipped.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn rates(&self) -> String {
        let t = self.tally();
        let secs = self.elapsed().as_secs_f64().max(1e-3);
        format!(
            "{:.0} tok/s, {} failed",
            t.generated_tokens as f64 / secs,
            t.failed
        )
    }

    /// The plain progress line: counts, rates and, with a known total, the ETA.
    fn line(&self) -> String {
        let t = self.tally();
        let secs = self.elapsed().as_secs_f64().max(1e-3);
        let done = t.succeeded + t.failed;
        let per_sec = done as f64 / secs;
        let mut line = format!("{done} answered ({} failed)", t.failed);
        if let Some(total) = self.total {
            let todo = total.saturating_sub(t.skipped);
            line = format!("{done}/{todo} answered ({} failed)", t.failed);
            if per_sec > 0.0 {
                let eta = todo.saturating_sub(done) as f64 / per_sec;
                line.push_str(&format!(", ETA {}", clock(Duration::from_secs_f64(eta))));
            }
        }
        format!(
            "{line}, {per_sec:.2} lines/s, {:.0} tok/s, {} skipped",
            t.generated_tokens as f64 / secs,
            t.skipped
        )
    }
}

/// `1h02m03s`, `2m03s`, `3s`.
pub fn clock(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_counts_skipped_lines_out_of_the_total() {
        let p = Progress::new("test", Some(10), false);
        p.skipped();
        p.skipped();
        p.answered(true, 100);
        p.answered(false, 0);
        let line = p.line();
        assert!(line.starts_with("2/8 answered (1 failed), ETA"), "{line}");
        assert!(line.ends_with("2 skipped"), "{line}");
        assert_eq!(
            p.tally(),
            Tally {
                succeeded: 1,
                failed: 1,
                skipped: 2,
                generated_tokens: 100
            }
        );
        assert_eq!(clock(Duration::from_secs(3723)), "1h02m03s");
        assert_eq!(clock(Duration::from_secs(63)), "1m03s");
    }
}
