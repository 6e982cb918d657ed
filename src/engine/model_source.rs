//! Where the model comes from, checked before any loader sees it.
//!
//! mistralrs treats a path that does not exist as a model-hub id and tries the network (about 30 s
//! of time-out on these machines). So every path is resolved and checked here first, and a bad one
//! fails at start with the name of what is missing.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A Hugging Face style directory: config.json, *.safetensors, tokenizer.json,
    /// tokenizer_config.json.
    Safetensors { dir: PathBuf },
    /// A single GGUF file; the tokenizer and chat template come from `tokenizer_dir` when given,
    /// otherwise from the GGUF metadata.
    Gguf {
        file: PathBuf,
        tokenizer_dir: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelSourceError {
    #[error("model path {0} does not exist (memex loads only local files and never downloads)")]
    Missing(PathBuf),
    #[error("model directory {dir} lacks {what}")]
    Incomplete { dir: PathBuf, what: String },
    #[error("model path {0} is neither a directory nor a .gguf file")]
    Unsupported(PathBuf),
    #[error(
        "--tokenizer is only used with a .gguf model; {0} is a directory with its own tokenizer"
    )]
    TokenizerWithDir(PathBuf),
}

const TOKENIZER_FILES: [&str; 2] = ["tokenizer.json", "tokenizer_config.json"];

impl ModelSource {
    pub fn resolve(model: &Path, tokenizer: Option<&Path>) -> Result<Self, ModelSourceError> {
        if !model.exists() {
            return Err(ModelSourceError::Missing(model.to_path_buf()));
        }
        if model.is_dir() {
            if tokenizer.is_some() {
                return Err(ModelSourceError::TokenizerWithDir(model.to_path_buf()));
            }
            require_files(model, &["config.json"])?;
            require_files(model, &TOKENIZER_FILES)?;
            let has_weights = std::fs::read_dir(model)
                .map_err(|_| ModelSourceError::Missing(model.to_path_buf()))?
                .filter_map(Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
            if !has_weights {
                return Err(ModelSourceError::Incomplete {
                    dir: model.to_path_buf(),
                    what: "any *.safetensors weights file".into(),
                });
            }
            return Ok(Self::Safetensors {
                dir: model.to_path_buf(),
            });
        }
        if model.extension().is_some_and(|x| x == "gguf") {
            let tokenizer_dir = match tokenizer {
                Some(dir) => {
                    if !dir.is_dir() {
                        return Err(ModelSourceError::Missing(dir.to_path_buf()));
                    }
                    require_files(dir, &TOKENIZER_FILES)?;
                    Some(dir.to_path_buf())
                }
                None => None,
            };
            return Ok(Self::Gguf {
                file: model.to_path_buf(),
                tokenizer_dir,
            });
        }
        Err(ModelSourceError::Unsupported(model.to_path_buf()))
    }

    /// The HF tokenizer file, when the model comes with one; `None` means the tokenizer lives in
    /// GGUF metadata and only the engine can use it.
    pub fn tokenizer_json(&self) -> Option<PathBuf> {
        match self {
            Self::Safetensors { dir } => Some(dir.join("tokenizer.json")),
            Self::Gguf { tokenizer_dir, .. } => {
                tokenizer_dir.as_ref().map(|d| d.join("tokenizer.json"))
            }
        }
    }

    /// Name to serve the model under: its directory or file stem.
    pub fn name(&self) -> String {
        let path = match self {
            Self::Safetensors { dir } => dir.as_path(),
            Self::Gguf { file, .. } => file.as_path(),
        };
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }
}

fn require_files(dir: &Path, names: &[&str]) -> Result<(), ModelSourceError> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !dir.join(n).is_file())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(ModelSourceError::Incomplete {
            dir: dir.to_path_buf(),
            what: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(dir: &Path, name: &str) {
        std::fs::write(dir.join(name), b"{}").unwrap();
    }

    #[test]
    fn missing_path_is_named() {
        let err = ModelSource::resolve(Path::new("/nonexistent/model"), None).unwrap_err();
        assert_eq!(err, ModelSourceError::Missing("/nonexistent/model".into()));
        assert!(err.to_string().contains("/nonexistent/model"));
    }

    #[test]
    fn directory_without_tokenizer_names_the_files() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "config.json");
        touch(dir.path(), "model.safetensors");
        let err = ModelSource::resolve(dir.path(), None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tokenizer.json") && msg.contains("tokenizer_config.json"),
            "{msg}"
        );
    }

    #[test]
    fn directory_without_weights_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            touch(dir.path(), f);
        }
        let err = ModelSource::resolve(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("safetensors"));
        touch(dir.path(), "model.safetensors");
        let ok = ModelSource::resolve(dir.path(), None).unwrap();
        assert_eq!(ok.tokenizer_json(), Some(dir.path().join("tokenizer.json")));
    }

    #[test]
    fn gguf_with_and_without_tokenizer_dir() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let src = ModelSource::resolve(&file, None).unwrap();
        assert_eq!(src.tokenizer_json(), None);
        assert_eq!(src.name(), "m");
        let tok = tempfile::tempdir().unwrap();
        assert!(ModelSource::resolve(&file, Some(tok.path())).is_err());
        touch(tok.path(), "tokenizer.json");
        touch(tok.path(), "tokenizer_config.json");
        let src = ModelSource::resolve(&file, Some(tok.path())).unwrap();
        assert_eq!(
            src.tokenizer_json(),
            Some(tok.path().join("tokenizer.json"))
        );
    }

    #[test]
    fn other_files_are_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weights.bin");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            ModelSource::resolve(&file, None).unwrap_err(),
            ModelSourceError::Unsupported(file)
        );
    }
}
