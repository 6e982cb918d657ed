//! The labelled dataset `memex eval` reads: one dialogue per line (docs/eval.md, "The dataset
//! format"). Read whole: a dataset is a few hundred lines at most, and a bad line must fail the
//! run before the model loads, not half-way through it.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use crate::api::types::{ExtractRequest, PreferenceType};

#[derive(Debug, Clone, Deserialize)]
pub struct Dialogue {
    pub id: String,
    /// ISO 639-1 code of the dialogue's language, which the memories must be written in.
    pub language: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// A body of `POST /extract/memory`, sent as is.
    pub request: serde_json::Value,
    pub expected: Expected,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Expected {
    #[serde(default)]
    pub facts: Vec<String>,
    #[serde(default)]
    pub preferences: Vec<ExpectedPreference>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ExpectedPreference {
    pub text: String,
    #[serde(rename = "type")]
    pub kind: PreferenceType,
}

impl Dialogue {
    /// The request as the server parses it.
    pub fn parsed_request(&self) -> Result<ExtractRequest, crate::api::error::ApiError> {
        let body = serde_json::to_vec(&self.request)
            .map_err(|e| crate::api::error::ApiError::InvalidRequest(e.to_string()))?;
        ExtractRequest::from_json(&body)
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path} has no dialogues")]
    Empty { path: String },
}

/// Every dialogue of the file, checked: each line parses, ids are unique, and each request is
/// one the server would accept as a body (it may still fail the pipeline's checks: then that is
/// what gets measured).
pub fn load(path: &Path) -> Result<Vec<Dialogue>, DatasetError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError::Io {
        path: shown.clone(),
        source,
    })?;
    let line_error = |line: usize, reason: String| DatasetError::Line {
        path: shown.clone(),
        line,
        reason,
    };
    let mut ids = HashSet::new();
    let mut dialogues = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let dialogue: Dialogue =
            serde_json::from_str(line).map_err(|e| line_error(i + 1, e.to_string()))?;
        if !ids.insert(dialogue.id.clone()) {
            return Err(line_error(
                i + 1,
                format!("id `{}` is used twice", dialogue.id),
            ));
        }
        dialogue
            .parsed_request()
            .map_err(|e| line_error(i + 1, format!("`request`: {e}")))?;
        dialogues.push(dialogue);
    }
    if dialogues.is_empty() {
        return Err(DatasetError::Empty { path: shown });
    }
    Ok(dialogues)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"id":"en-1","language":"en","tags":["single-turn","facts"],"request":{"messages":[{"role":"user","content":"I live in Leeds."}]},"expected":{"facts":["The user lives in Leeds."],"preferences":[{"text":"Short replies.","type":"explicit_preference"}]}}"#;

    fn load_text(text: &str) -> Result<Vec<Dialogue>, DatasetError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, text).unwrap();
        load(&path)
    }

    #[test]
    fn loads_and_checks_lines() {
        let d = load_text(&format!("{LINE}\n\n")).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].expected.preferences[0].kind,
            PreferenceType::ExplicitPreference
        );
        assert!(d[0].has_tag("facts"));

        let twice = load_text(&format!("{LINE}\n{LINE}\n")).unwrap_err();
        assert!(twice.to_string().contains("line 2") && twice.to_string().contains("twice"));
        let bad_request = LINE.replace("\"user\"", "\"robot\"");
        assert!(load_text(&bad_request)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        let bad_type = LINE.replace("explicit_preference", "strong_preference");
        assert!(load_text(&bad_type).is_err());
        assert!(matches!(load_text("\n"), Err(DatasetError::Empty { .. })));
    }
}
