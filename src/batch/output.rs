//! The output file: one JSON line per answered input line, in the shape OpenAI's Batch API and
//! `vllm run-batch` write, and what an earlier run already wrote (for resuming).
//!
//! Lines are written by one thread, each with a single `write_all` of the whole line and its
//! newline, as soon as its request finishes (completion order). A signal never interrupts a
//! write (signals are handled by the runner, which then stops feeding the writer), so an
//! interrupted run leaves whole lines only; a process killed outright (SIGKILL, power loss) can
//! leave a partial last line, which the next run cuts off before appending ([`Resume::scan`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::api::error::ApiError;
use crate::api::types::{Envelope, ExtractData};
use crate::pipeline::Extraction;

/// One output line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputLine {
    pub custom_id: String,
    /// The input line it answers (1-based).
    pub line: u64,
    /// What the server would have answered.
    pub response: Response,
    /// `null` on success; the envelope's code and message otherwise.
    pub error: Option<LineError>,
    /// On the error line of a repeated `custom_id`: the line that used it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub status_code: u16,
    pub request_id: String,
    pub body: Envelope<ExtractData>,
    /// On success: what the server sends as `x-*` headers, and the line's own time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub input_tokens: usize,
    pub prompt_tokens: usize,
    pub cached_prompt_tokens: usize,
    pub generated_tokens: usize,
    /// From taking the line to its answer: token count, language, all branches.
    pub seconds: f64,
    pub language: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineError {
    pub code: u32,
    pub message: String,
}

/// Codes worth another try (`--retry-failed`): a branch that failed for good (sampling may well
/// succeed next time) and an engine that could not take the request. Anything else is an answer
/// about the input and would come out the same.
pub const RETRYABLE_CODES: [u32; 2] = [50000, 50004];

impl OutputLine {
    pub fn answer(
        custom_id: String,
        line: u64,
        result: Result<Extraction, ApiError>,
        seconds: f64,
    ) -> Self {
        let request_id = uuid::Uuid::new_v4().to_string();
        match result {
            Ok(extraction) => {
                let sum = |f: fn(&crate::pipeline::BranchStats) -> usize| {
                    extraction.branches.iter().map(f).sum()
                };
                let stats = Stats {
                    input_tokens: extraction.input_tokens,
                    prompt_tokens: sum(|b| b.prompt_tokens),
                    cached_prompt_tokens: sum(|b| b.cached_prompt_tokens),
                    generated_tokens: sum(|b| b.generated_tokens),
                    seconds,
                    language: extraction.language.to_string(),
                };
                Self {
                    custom_id,
                    line,
                    response: Response {
                        status_code: 200,
                        request_id,
                        body: Envelope {
                            code: 0,
                            message: "ok".into(),
                            data: Some(extraction.items.into()),
                        },
                        stats: Some(stats),
                    },
                    error: None,
                    duplicate_of: None,
                }
            }
            Err(e) => {
                let (status, code) = e.status_and_code();
                let message = e.to_string();
                Self {
                    custom_id,
                    line,
                    response: Response {
                        status_code: status.as_u16(),
                        request_id,
                        body: Envelope {
                            code,
                            message: message.clone(),
                            data: None,
                        },
                        stats: None,
                    },
                    error: Some(LineError { code, message }),
                    duplicate_of: None,
                }
            }
        }
    }

    /// The error line of input line `line`, whose `custom_id` line `first` already used.
    pub fn duplicate(custom_id: String, line: u64, first: u64) -> Self {
        let error = ApiError::InvalidRequest(format!(
            "line {line}: custom_id `{custom_id}` was already used by line {first}"
        ));
        Self {
            duplicate_of: Some(first),
            ..Self::answer(custom_id, line, Err(error), 0.0)
        }
    }

    pub fn generated_tokens(&self) -> usize {
        self.response
            .stats
            .as_ref()
            .map_or(0, |s| s.generated_tokens)
    }

    fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("output lines serialize");
        s.push('\n');
        s
    }
}

/// What an earlier run wrote for one `custom_id`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answered {
    /// The latest answer to the id's first line: `Some(retryable)`, `None` if it has none.
    pub latest: Option<Retryable>,
    /// The input lines whose repeat of the id was answered with a duplicate error.
    pub duplicate_lines: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retryable {
    Yes,
    No,
}

/// The ids an earlier run answered.
#[derive(Debug, Default)]
pub struct Resume {
    pub answered: HashMap<String, Answered>,
    /// Bytes of a partial last line cut off (a run killed mid-write).
    pub cut_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} line {line} is not an output line of `memex extract` ({reason}); \
         refusing to append to it"
    )]
    Foreign {
        path: String,
        line: u64,
        reason: String,
    },
}

impl Resume {
    /// Read an existing output file: which ids it answered, and how. A last line without its
    /// newline (a run killed mid-write) is cut off so that the next line starts cleanly. Reads
    /// line by line: memory holds the ids, never the answers.
    pub fn scan(path: &Path) -> Result<Self, OutputError> {
        let io = |source| OutputError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io(e)),
        };
        let mut reader = BufReader::new(file);
        let mut resume = Self::default();
        let mut whole = 0u64;
        let mut buf = Vec::new();
        let mut number = 0;
        loop {
            buf.clear();
            let n = reader.read_until(b'\n', &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            if buf.last() != Some(&b'\n') {
                resume.cut_bytes = n as u64;
                break;
            }
            number += 1;
            whole += n as u64;
            #[derive(Deserialize)]
            struct Seen {
                custom_id: String,
                line: u64,
                error: Option<LineError>,
                #[serde(default)]
                duplicate_of: Option<u64>,
            }
            let seen: Seen = serde_json::from_slice(&buf).map_err(|e| OutputError::Foreign {
                path: path.display().to_string(),
                line: number,
                reason: e.to_string(),
            })?;
            let entry = resume.answered.entry(seen.custom_id).or_default();
            if seen.duplicate_of.is_some() {
                entry.duplicate_lines.push(seen.line);
            } else if seen
                .error
                .is_some_and(|e| RETRYABLE_CODES.contains(&e.code))
            {
                entry.latest = Some(Retryable::Yes);
            } else {
                entry.latest = Some(Retryable::No);
            }
        }
        if resume.cut_bytes > 0 {
            let file = OpenOptions::new().write(true).open(path).map_err(io)?;
            file.set_len(whole).map_err(io)?;
        }
        Ok(resume)
    }
}

/// Where lines go: a file (appended to) or stdout.
pub enum Sink {
    File(File),
    Stdout,
}

impl Sink {
    pub fn append(path: &Path) -> std::io::Result<Self> {
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        file.seek(SeekFrom::End(0))?;
        Ok(Self::File(file))
    }

    fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        match self {
            Self::File(f) => f.write_all(line.as_bytes()),
            Self::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())?;
                out.flush()
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Self::File(f) => f.sync_data(),
            Self::Stdout => std::io::stdout().flush(),
        }
    }
}

/// The writer thread's handle. Lines are sent from any task; [`Writer::finish`] waits until
/// every line sent has been written.
pub struct Writer {
    tx: Option<std::sync::mpsc::Sender<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<std::io::Error>>>,
    broken: Arc<AtomicBool>,
}

/// A clonable way to send lines to the writer.
#[derive(Clone)]
pub struct LineSender {
    tx: std::sync::mpsc::Sender<String>,
    broken: Arc<AtomicBool>,
}

impl LineSender {
    /// Queue one line; it is written whole, after the lines queued before it.
    pub fn send(&self, line: &OutputLine) {
        if self.tx.send(line.to_line()).is_err() {
            // The writer thread ended: it could not write.
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the writer has stopped on an error: nothing sent now would be written, so the
    /// runner stops taking lines ([`Writer::finish`] has the error).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

impl Writer {
    pub fn spawn(mut sink: Sink) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let failed = Arc::new(Mutex::new(None));
        let failed_in = failed.clone();
        let broken = Arc::new(AtomicBool::new(false));
        let broken_in = broken.clone();
        let thread = std::thread::Builder::new()
            .name("memex-extract-output".into())
            .spawn(move || {
                let result = rx
                    .iter()
                    .try_for_each(|line| sink.write_line(&line))
                    .and_then(|()| sink.finish());
                if let Err(e) = result {
                    *failed_in.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    broken_in.store(true, Ordering::Relaxed);
                }
            })
            .expect("spawn the output thread");
        Self {
            tx: Some(tx),
            thread: Some(thread),
            failed,
            broken,
        }
    }

    pub fn sender(&self) -> LineSender {
        LineSender {
            tx: self.tx.clone().expect("writer not finished"),
            broken: self.broken.clone(),
        }
    }

    /// Write everything queued, then stop. Every [`LineSender`] must have been dropped.
    pub fn finish(mut self) -> std::io::Result<()> {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_line(id: &str, line: u64, code: u32) -> OutputLine {
        let err = match code {
            50000 => ApiError::Internal("x".into()),
            _ => ApiError::InvalidRequest("x".into()),
        };
        OutputLine::answer(id.into(), line, Err(err), 0.0)
    }

    #[test]
    fn error_lines_carry_the_contract_code_in_both_places() {
        let l = error_line("a", 3, 40000);
        let v = serde_json::to_value(&l).unwrap();
        assert_eq!(v["response"]["status_code"], 400);
        assert_eq!(v["response"]["body"]["code"], 40000);
        assert_eq!(v["response"]["body"]["data"], serde_json::Value::Null);
        assert_eq!(v["error"]["code"], 40000);
        assert_eq!(v["line"], 3);
        assert!(v["response"].get("stats").is_none());
    }

    #[test]
    fn resume_keeps_the_latest_state_per_id_and_cuts_a_partial_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut text = String::new();
        for l in [
            error_line("a", 1, 50000),
            error_line("b", 2, 50000),
            error_line("a", 1, 40000),
            OutputLine::duplicate("b".into(), 3, 2),
            OutputLine::duplicate("d".into(), 5, 4),
        ] {
            text.push_str(&l.to_line());
        }
        let whole = text.len() as u64;
        text.push_str(r#"{"custom_id":"c","li"#);
        std::fs::write(&path, &text).unwrap();
        let r = Resume::scan(&path).unwrap();
        assert_eq!(r.cut_bytes, 20);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        // A later answer wins: "a" failed for good after a retryable failure.
        assert_eq!(r.answered["a"].latest, Some(Retryable::No));
        assert_eq!(
            r.answered["b"],
            Answered {
                latest: Some(Retryable::Yes),
                duplicate_lines: vec![3]
            }
        );
        // "d"'s first line was never answered (in flight when the run was abandoned).
        assert_eq!(r.answered["d"].latest, None);
        assert!(!r.answered.contains_key("c"));

        std::fs::write(&path, "{\"not\": \"ours\"}\n").unwrap();
        assert!(matches!(
            Resume::scan(&path),
            Err(OutputError::Foreign { line: 1, .. })
        ));
        assert!(Resume::scan(&dir.path().join("absent"))
            .unwrap()
            .answered
            .is_empty());
    }

    #[test]
    fn the_writer_writes_whole_lines_in_send_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, error_line("old", 1, 40000).to_line()).unwrap();
        let writer = Writer::spawn(Sink::append(&path).unwrap());
        let tx = writer.sender();
        for i in 0..100 {
            tx.send(&error_line(&format!("id{i}"), i + 2, 40000));
        }
        drop(tx);
        writer.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<OutputLine>(l).unwrap().custom_id)
            .collect();
        assert_eq!(ids.len(), 101);
        assert_eq!(ids[0], "old");
        assert_eq!(ids[100], "id99");
    }
}
