//! Step 6: map a branch's model output to the response items.
//!
//! The grammar guarantees the shape, so a parse failure here means the engine broke its promise
//! (truncated or unconstrained output) and is reported as the branch's failure, never papered
//! over with an empty list.

use serde::Deserialize;

use crate::pipeline::branch::Branch;
use crate::pipeline::types::{MemoryItem, MemoryType, PreferenceItem, PreferenceType};

#[derive(Debug, Clone, PartialEq)]
pub enum BranchOutput {
    Memories(Vec<MemoryItem>),
    Preferences(Vec<PreferenceItem>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryOut {
    memories: Vec<RawMemory>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    key: String,
    value: String,
    memory_type: MemoryType,
    tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferenceOut {
    preferences: Vec<RawPreference>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPreference {
    reasoning: String,
    preference: String,
}

pub fn parse(branch: Branch, text: &str) -> Result<BranchOutput, String> {
    let err = |e: serde_json::Error| format!("model output is not the branch's JSON: {e}");
    match branch {
        Branch::Memory => {
            let out: MemoryOut = serde_json::from_str(text).map_err(err)?;
            let items = out
                .memories
                .into_iter()
                .filter_map(|m| {
                    let value = m.value.trim().to_string();
                    (!value.is_empty()).then(|| MemoryItem {
                        key: m.key.trim().to_string(),
                        value,
                        memory_type: m.memory_type,
                        tags: m
                            .tags
                            .into_iter()
                            .map(|t| t.trim().to_string())
                            .filter(|t| !t.is_empty())
                            .collect(),
                    })
                })
                .collect();
            Ok(BranchOutput::Memories(items))
        }
        Branch::ExplicitPreference | Branch::ImplicitPreference => {
            let preference_type = if branch == Branch::ExplicitPreference {
                PreferenceType::Explicit
            } else {
                PreferenceType::Implicit
            };
            let out: PreferenceOut = serde_json::from_str(text).map_err(err)?;
            let items = out
                .preferences
                .into_iter()
                .filter_map(|p| {
                    let preference = p.preference.trim().to_string();
                    (!preference.is_empty()).then(|| PreferenceItem {
                        preference,
                        reasoning: p.reasoning.trim().to_string(),
                        preference_type,
                    })
                })
                .collect();
            Ok(BranchOutput::Preferences(items))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_memories() {
        let out = parse(
            Branch::Memory,
            r#"{"memories":[{"key":"Job ","value":" The user is a backend developer.","memory_type":"UserMemory","tags":["job"," "]}]}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            BranchOutput::Memories(vec![MemoryItem {
                key: "Job".into(),
                value: "The user is a backend developer.".into(),
                memory_type: MemoryType::UserMemory,
                tags: vec!["job".into()],
            }])
        );
    }

    #[test]
    fn maps_preference_type_from_branch() {
        let text = r#"{"preferences":[{"reasoning":"asked twice","preference":"Short replies"}]}"#;
        for (b, t) in [
            (Branch::ExplicitPreference, PreferenceType::Explicit),
            (Branch::ImplicitPreference, PreferenceType::Implicit),
        ] {
            let BranchOutput::Preferences(p) = parse(b, text).unwrap() else {
                panic!()
            };
            assert_eq!(p[0].preference_type, t);
            assert_eq!(p[0].preference, "Short replies");
        }
    }

    #[test]
    fn truncated_or_wrong_output_is_an_error() {
        assert!(parse(Branch::Memory, r#"{"memories":[{"key":"a""#).is_err());
        assert!(parse(Branch::Memory, r#"{"preferences":[]}"#).is_err());
        assert!(parse(
            Branch::Memory,
            r#"{"memories":[{"key":"a","value":"b","memory_type":"Other","tags":[]}]}"#
        )
        .is_err());
    }
}
