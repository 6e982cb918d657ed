//! Step 5's contract with the engine: one bounded JSON schema per branch.
//!
//! Every string has `maxLength`, every array `maxItems`, whitespace is fixed and `\u` escapes are
//! off, so every output the grammar allows is finite. [`worst_case_tokens`] walks the schema and
//! bounds the longest allowed output in bytes (no token is shorter than one byte), which becomes
//! the engine's `max_tokens`: a generation that hits it is a failure, never a silent truncation.

use serde_json::{json, Value};

use crate::pipeline::branch::Branch;

/// Output bounds; operators trade recall for worst-case latency here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Most items one branch may return.
    pub max_items: usize,
    /// Longest memory value, preference or reasoning, in characters.
    pub max_text_chars: usize,
    /// Longest memory key or tag, in characters.
    pub max_label_chars: usize,
    /// Most tags per memory.
    pub max_tags: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_items: 6,
            max_text_chars: 200,
            max_label_chars: 32,
            max_tags: 4,
        }
    }
}

/// Escapes the grammar allows after a backslash: quote, backslash, newline. `\uXXXX` would let
/// a small model spend six tokens per character on escapes.
const ALLOWED_ESCAPES: &str = "\"\\n";

/// Extra tokens above the byte bound: the end token and a margin for the engine's own counting.
const MAX_TOKENS_SLACK: usize = 8;

pub fn schema_for(branch: Branch, limits: &OutputLimits) -> Value {
    let text = |max: usize| json!({"type": "string", "minLength": 1, "maxLength": max});
    let list = match branch {
        Branch::Memory => json!({
            "type": "object",
            "properties": {
                "key": text(limits.max_label_chars),
                "value": text(limits.max_text_chars),
                "memory_type": {"enum": ["UserMemory", "LongTermMemory"]},
                "tags": {
                    "type": "array",
                    "maxItems": limits.max_tags,
                    "items": text(limits.max_label_chars)
                }
            },
            "required": ["key", "value", "memory_type", "tags"],
            "additionalProperties": false
        }),
        // Reasoning first: the model commits to evidence before it states the preference.
        Branch::ExplicitPreference | Branch::ImplicitPreference => json!({
            "type": "object",
            "properties": {
                "reasoning": text(limits.max_text_chars),
                "preference": text(limits.max_text_chars)
            },
            "required": ["reasoning", "preference"],
            "additionalProperties": false
        }),
    };
    let field = list_field(branch);
    json!({
        "type": "object",
        "properties": {
            field: {"type": "array", "maxItems": limits.max_items, "items": list}
        },
        "required": [field],
        "additionalProperties": false,
        "x-guidance": {
            "whitespace_flexible": false,
            "item_separator": ",",
            "key_separator": ":",
            "json_allowed_escapes": ALLOWED_ESCAPES
        }
    })
}

/// The top-level array the model fills for a branch.
pub fn list_field(branch: Branch) -> &'static str {
    match branch {
        Branch::Memory => "memories",
        Branch::ExplicitPreference | Branch::ImplicitPreference => "preferences",
    }
}

/// Upper bound on generated tokens for any output the schema allows.
pub fn worst_case_tokens(schema: &Value) -> usize {
    worst_case_bytes(schema) + MAX_TOKENS_SLACK
}

fn worst_case_bytes(schema: &Value) -> usize {
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        return options
            .iter()
            .map(|o| o.to_string().len())
            .max()
            .unwrap_or(0);
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let props = schema.get("properties").and_then(Value::as_object);
            let fields: usize = props
                .map(|p| {
                    p.iter()
                        // "key": value, -> quotes, colon and comma around each field
                        .map(|(k, v)| k.len() + 4 + worst_case_bytes(v))
                        .sum()
                })
                .unwrap_or(0);
            2 + fields
        }
        Some("array") => {
            let n = schema.get("maxItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let item = schema.get("items").map(worst_case_bytes).unwrap_or(0);
            2 + n * (item + 1)
        }
        // Four UTF-8 bytes per character at most; an allowed escape is two.
        Some("string") => {
            let n = schema.get("maxLength").and_then(Value::as_u64).unwrap_or(0) as usize;
            2 + 4 * n
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every string and array reachable in the schema is bounded.
    fn assert_bounded(v: &Value) {
        match v.get("type").and_then(Value::as_str) {
            Some("string") => assert!(v.get("maxLength").is_some(), "unbounded string {v}"),
            Some("array") => {
                assert!(v.get("maxItems").is_some(), "unbounded array {v}");
                assert_bounded(&v["items"]);
            }
            Some("object") => {
                assert_eq!(v["additionalProperties"], false);
                for p in v["properties"].as_object().unwrap().values() {
                    assert_bounded(p);
                }
            }
            _ => assert!(v.get("enum").is_some(), "untyped schema {v}"),
        }
    }

    #[test]
    fn every_branch_schema_is_bounded_and_strict() {
        for b in Branch::ALL {
            let s = schema_for(b, &OutputLimits::default());
            assert_bounded(&s);
            assert_eq!(s["x-guidance"]["whitespace_flexible"], false);
        }
    }

    #[test]
    fn worst_case_covers_a_maximal_output() {
        let limits = OutputLimits {
            max_items: 2,
            max_text_chars: 5,
            max_label_chars: 3,
            max_tags: 2,
        };
        let schema = schema_for(Branch::Memory, &limits);
        let item = json!({"key": "😀😀😀", "value": "😀😀😀😀😀", "memory_type": "LongTermMemory",
                          "tags": ["😀😀😀", "😀😀😀"]});
        let maximal = json!({"memories": [item.clone(), item]});
        let compact = serde_json::to_string(&maximal).unwrap();
        assert!(
            worst_case_tokens(&schema) >= compact.len(),
            "{} < {}",
            worst_case_tokens(&schema),
            compact.len()
        );
        // ...and is not absurdly loose either.
        assert!(worst_case_tokens(&schema) < compact.len() * 2);
    }

    #[test]
    fn bound_grows_with_limits() {
        let small = worst_case_tokens(&schema_for(
            Branch::ExplicitPreference,
            &OutputLimits::default(),
        ));
        let big = worst_case_tokens(&schema_for(
            Branch::ExplicitPreference,
            &OutputLimits {
                max_items: 20,
                ..OutputLimits::default()
            },
        ));
        assert!(big > small);
    }
}
