//! Reading the input: one line at a time, never more than a bounded number of lines and never
//! more than one line's limit of bytes each, so memory does not grow with the file.
//!
//! The file is read on a thread of its own (a plain one: a read from a terminal or pipe can
//! block forever, and a process must be able to exit past it) into a channel the size of the
//! in-flight window; the runner takes a line only when it has a free slot for it.
//!
//! Two line shapes are accepted (README, "Offline extraction"):
//! - a request body of `POST /extract/memory`, with an optional `custom_id`;
//! - the batch-file shape of OpenAI's Batch API and `vllm run-batch`:
//!   `{"custom_id", "method": "POST", "url": "/extract/memory", "body": {...}}`.
//!
//! A line is the batch shape when it has a `body` field.

use std::io::{BufRead, BufReader, Read};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::api::error::ApiError;
use crate::api::types::ExtractRequest;

/// The paths a batch line's `url` may name: the server's two routes.
const URLS: [&str; 2] = ["/extract/memory", "/api/openmem/v1/extract/memory"];

/// Bytes a batch line may carry around its body (`custom_id`, `method`, `url`).
const WRAPPER_BYTES: usize = 4096;

/// One line as read: its 1-based number, and its bytes or, over the limit, only its length.
#[derive(Debug)]
pub enum RawLine {
    Text { number: u64, bytes: Vec<u8> },
    TooLong { number: u64, len: u64 },
}

/// A line ready to answer: the `custom_id` it is answered under (its own, or `line-N`), and
/// the request, or the reason it cannot be run (answered at once with that error).
#[derive(Debug)]
pub struct ParsedLine {
    pub number: u64,
    pub custom_id: String,
    pub request: Result<ExtractRequest, ApiError>,
}

/// The longest line kept in memory: a body at the server's byte limit, plus a batch wrapper.
pub fn max_line_bytes(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_add(WRAPPER_BYTES)
}

/// Read `source` on its own thread; lines arrive on the returned channel, which holds at most
/// `window` of them. Blank lines are skipped (they still count in line numbers). The thread ends
/// at the end of the input, on a read error (sent as the last item), or when the receiver is
/// dropped.
pub fn spawn_reader(
    source: Box<dyn Read + Send>,
    max_line: usize,
    window: usize,
) -> mpsc::Receiver<std::io::Result<RawLine>> {
    let (tx, rx) = mpsc::channel(window.max(1));
    std::thread::Builder::new()
        .name("memex-extract-input".into())
        .spawn(move || {
            let mut reader = BufReader::with_capacity(64 * 1024, source);
            let mut number = 0u64;
            loop {
                number += 1;
                let item = match read_line(&mut reader, max_line) {
                    Ok(None) => return,
                    Ok(Some(Line::Text(bytes))) if is_blank(&bytes) => continue,
                    Ok(Some(Line::Text(bytes))) => Ok(RawLine::Text { number, bytes }),
                    Ok(Some(Line::TooLong(len))) => Ok(RawLine::TooLong { number, len }),
                    Err(e) => Err(e),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        })
        .expect("spawn the input thread");
    rx
}

enum Line {
    Text(Vec<u8>),
    TooLong(u64),
}

/// One line without its end (`\n` or `\r\n`); a line longer than `max` is skipped through to its
/// end without being kept. `None` at the end of the input.
fn read_line(reader: &mut impl BufRead, max: usize) -> std::io::Result<Option<Line>> {
    let mut bytes = Vec::new();
    let mut len = 0u64;
    let mut seen_any = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            break;
        }
        seen_any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        len += chunk.len() as u64;
        if len <= max as u64 {
            bytes.extend_from_slice(chunk);
        } else {
            // Over the limit: stop keeping it, but read on to the line's end.
            bytes = Vec::new();
        }
        let consumed = done.unwrap_or(chunk.len());
        reader.consume(consumed);
        if done.is_some() {
            break;
        }
    }
    if !seen_any {
        return Ok(None);
    }
    if len > max as u64 {
        return Ok(Some(Line::TooLong(len)));
    }
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    Ok(Some(Line::Text(bytes)))
}

fn is_blank(bytes: &[u8]) -> bool {
    bytes.iter().all(u8::is_ascii_whitespace)
}

/// The id a line without a `custom_id` is answered under.
pub fn line_id(number: u64) -> String {
    format!("line-{number}")
}

/// Parse one line into its `custom_id` and request, with the server's checks and error codes:
/// the same body parser, and the same byte limit on the body.
pub fn parse(line: RawLine, max_body_bytes: usize) -> ParsedLine {
    let (number, bytes) = match line {
        // Answered as the server answers a body over the limit; its custom_id was never read.
        RawLine::TooLong { number, .. } => {
            return ParsedLine {
                number,
                custom_id: line_id(number),
                request: Err(ApiError::BodyTooLarge {
                    limit: max_body_bytes,
                }),
            }
        }
        RawLine::Text { number, bytes } => (number, bytes),
    };
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let fail = |custom_id: String, message: String| ParsedLine {
        number,
        custom_id,
        request: Err(ApiError::InvalidRequest(message)),
    };
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                line_id(number),
                format!("line {number} is not valid JSON: {e}"),
            )
        }
    };
    let Value::Object(object) = &value else {
        return fail(
            line_id(number),
            format!("line {number} must be a JSON object"),
        );
    };
    let custom_id = match object.get("custom_id") {
        None | Some(Value::Null) => line_id(number),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return fail(
                line_id(number),
                format!("line {number}: `custom_id` must be a non-empty string"),
            )
        }
    };
    let request = match object.get("body") {
        None => body_request(bytes, max_body_bytes),
        Some(body) => {
            batch_request(object, body, max_body_bytes).map_err(|e| prefix_line(e, number))
        }
    };
    ParsedLine {
        number,
        custom_id,
        request,
    }
}

/// A line that is the request body itself (its `custom_id`, an unknown top-level field to the
/// body parser, is ignored like any other).
fn body_request(bytes: &[u8], max_body_bytes: usize) -> Result<ExtractRequest, ApiError> {
    if bytes.len() > max_body_bytes {
        return Err(ApiError::BodyTooLarge {
            limit: max_body_bytes,
        });
    }
    ExtractRequest::from_json(bytes)
}

/// A batch-file line: `method` and `url`, when given, must be what the server answers; the
/// body is checked as the server checks a body (its size as compact JSON).
fn batch_request(
    object: &serde_json::Map<String, Value>,
    body: &Value,
    max_body_bytes: usize,
) -> Result<ExtractRequest, ApiError> {
    match object.get("method") {
        None | Some(Value::Null) => {}
        Some(Value::String(m)) if m.eq_ignore_ascii_case("POST") => {}
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "`method` is {other}; only POST is served"
            )))
        }
    }
    match object.get("url") {
        None | Some(Value::Null) => {}
        Some(Value::String(u)) if URLS.contains(&u.as_str()) => {}
        Some(other) => {
            return Err(ApiError::InvalidRequest(format!(
                "`url` is {other}; the served paths are {}",
                URLS.join(" and ")
            )))
        }
    }
    if !body.is_object() {
        return Err(ApiError::InvalidRequest(
            "`body` must be a JSON object with a `messages` array".into(),
        ));
    }
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    body_request(&bytes, max_body_bytes)
}

/// Say which line an error is about, for the errors whose message would not.
fn prefix_line(e: ApiError, number: u64) -> ApiError {
    match e {
        ApiError::InvalidRequest(m) => ApiError::InvalidRequest(format!("line {number}: {m}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &str, max: usize) -> Vec<RawLine> {
        let mut rx = spawn_reader(Box::new(std::io::Cursor::new(input.to_string())), max, 2);
        let mut out = Vec::new();
        while let Some(item) = rx.blocking_recv() {
            out.push(item.unwrap());
        }
        out
    }

    #[test]
    fn lines_are_numbered_blank_ones_skipped_and_long_ones_not_kept() {
        let long = "x".repeat(100);
        let input = format!("{{\"a\":1}}\r\n\n  \n{long}\nlast-without-newline");
        let got = lines(&input, 50);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[0], RawLine::Text { number: 1, bytes } if bytes == b"{\"a\":1}"));
        assert!(matches!(
            got[1],
            RawLine::TooLong {
                number: 4,
                len: 100
            }
        ));
        assert!(
            matches!(&got[2], RawLine::Text { number: 5, bytes } if bytes == b"last-without-newline")
        );
    }

    #[test]
    fn a_long_line_is_skipped_across_buffer_refills() {
        let long = "y".repeat(200_000);
        let input = format!("{long}\n{{}}\n");
        let got = lines(&input, 1000);
        assert!(matches!(
            got[0],
            RawLine::TooLong {
                number: 1,
                len: 200_000
            }
        ));
        assert!(matches!(&got[1], RawLine::Text { number: 2, bytes } if bytes == b"{}"));
    }

    /// An endless input of short lines that counts what was read from it.
    struct Endless(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Read for Endless {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let line = b"{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}\n";
            let n = buf.len().min(4096) / line.len() * line.len();
            for chunk in buf[..n].chunks_mut(line.len()) {
                chunk.copy_from_slice(line);
            }
            self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            Ok(n)
        }
    }

    #[test]
    fn the_reader_stays_a_window_ahead_of_its_consumer() {
        let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut rx = spawn_reader(Box::new(Endless(read.clone())), 1000, 4);
        for _ in 0..10 {
            assert!(matches!(rx.blocking_recv(), Some(Ok(RawLine::Text { .. }))));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Its buffer (64 KiB) and the window of lines, however long the input: here endless.
        let ahead = read.load(std::sync::atomic::Ordering::Relaxed);
        assert!(ahead <= 64 * 1024 + 4096, "read {ahead} bytes ahead");
        drop(rx);
    }

    fn parse_str(s: &str) -> ParsedLine {
        parse(
            RawLine::Text {
                number: 7,
                bytes: s.as_bytes().to_vec(),
            },
            200,
        )
    }

    fn code(p: &ParsedLine) -> u32 {
        p.request.as_ref().unwrap_err().status_and_code().1
    }

    #[test]
    fn both_shapes_parse_with_or_without_custom_id() {
        let plain = parse_str(r#"{"custom_id":"a","messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(plain.custom_id, "a");
        assert_eq!(plain.request.unwrap().messages.unwrap().len(), 1);
        let batch = parse_str(
            r#"{"custom_id":"b","method":"POST","url":"/api/openmem/v1/extract/memory",
                "body":{"messages":[{"role":"user","content":"hi"}],"extraction_types":["memory"]}}"#,
        );
        assert_eq!(batch.custom_id, "b");
        assert!(batch.request.unwrap().extraction_types.is_some());
        let anonymous = parse_str(r#"{"body":{"messages":[{"role":"user","content":"hi"}]}}"#);
        assert_eq!(anonymous.custom_id, "line-7");
        assert!(anonymous.request.is_ok());
    }

    #[test]
    fn bad_lines_get_the_servers_codes_and_name_their_line() {
        for (line, want) in [
            ("not json", 40000),
            ("[1]", 40000),
            (r#"{"custom_id":5,"messages":[]}"#, 40000),
            (r#"{"messages":[{"role":"robot","content":"x"}]}"#, 40000),
            (
                r#"{"url":"/v1/chat/completions","body":{"messages":[]}}"#,
                40000,
            ),
            (r#"{"method":"GET","body":{}}"#, 40000),
            (r#"{"body":"text"}"#, 40000),
        ] {
            let p = parse_str(line);
            assert_eq!(code(&p), want, "{line}");
            let msg = p.request.unwrap_err().to_string();
            assert!(
                msg.contains("line 7") || msg.contains("role"),
                "{line}: {msg}"
            );
            if !line.contains("\"custom_id\":\"") {
                assert_eq!(p.custom_id, "line-7");
            }
        }
        // Emptiness is the pipeline's check (40002), as on the server: the line parses.
        assert!(parse_str(r#"{"messages":[]}"#).request.is_ok());
    }

    #[test]
    fn the_body_byte_limit_is_the_servers() {
        let big = format!(
            r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(300)
        );
        let p = parse_str(&big);
        assert_eq!(p.request.unwrap_err().status_and_code().0.as_u16(), 413);
        let p = parse_str(&format!(r#"{{"custom_id":"c","body":{big}}}"#));
        assert_eq!(p.custom_id, "c");
        assert_eq!(
            p.request.unwrap_err().status_and_code(),
            (axum::http::StatusCode::PAYLOAD_TOO_LARGE, 40000)
        );
    }
}
