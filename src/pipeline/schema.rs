//! Step 5's contract with the engine: one bounded JSON schema per branch.
//!
//! Every string has `maxLength`, every array `maxItems`, each run of whitespace is bounded and
//! `\u` escapes are off, so every output the grammar allows is finite. [`worst_case_tokens`]
//! walks the schema and bounds the longest allowed output in bytes (no token is shorter than one
//! byte), which becomes the engine's `max_tokens`: a generation that hits it is a failure, never
//! a silent truncation.
//!
//! Whitespace is the model's choice ([`JsonLayout::Spaced`]), within a bound: one space, or one
//! or two newlines and up to 20 spaces or tabs of indentation, between any two JSON tokens.
//! Instruct models write their JSON pretty-printed; forced into compact JSON they close the list
//! at once. Measured on eight dialogues with llama.cpp (issue 12): compact JSON gave 0 of 8
//! non-empty memory lists on Qwen2.5-Coder-0.5B, flexible whitespace 6 of 8; memex's own numbers
//! per model and branch are in `docs/eval.md`. The bound keeps every output finite (a small
//! model cannot loop on whitespace) at a cost of at most [`GAP_BYTES`] per gap in the worst case.

use serde_json::{json, Value};

use crate::pipeline::branch::Branch;

/// Where the grammar lets the model put whitespace between JSON tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JsonLayout {
    /// Bounded whitespace of the model's choosing (pretty-printed or not): what instruct models
    /// write when left alone.
    Spaced,
    /// No whitespace at all: for an extractor fine-tuned on compact JSON, where it saves the
    /// newline tokens.
    Compact,
}

/// One run of whitespace between JSON tokens in the spaced layout: a space, or a line break (or
/// a blank line) and an indentation of at most 20 columns, enough for the four levels our
/// schemas nest at in any customary indentation.
const SPACED_GAP: &str = r"(?: |\n{1,2}[ \t]{0,20})";

/// The longest gap [`SPACED_GAP`] allows, in bytes.
const GAP_BYTES: usize = 22;

/// Output bounds and layout; operators trade recall for worst-case latency here.
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
    /// Whitespace between JSON tokens.
    pub layout: JsonLayout,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_items: 6,
            max_text_chars: 200,
            max_label_chars: 32,
            max_tags: 4,
            layout: JsonLayout::Spaced,
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
    let mut guidance = json!({
        "whitespace_flexible": false,
        "item_separator": ",",
        "key_separator": ":",
        "json_allowed_escapes": ALLOWED_ESCAPES
    });
    if limits.layout == JsonLayout::Spaced {
        guidance["whitespace_pattern"] = json!(SPACED_GAP);
    }
    json!({
        "type": "object",
        "properties": {
            field: {"type": "array", "maxItems": limits.max_items, "items": list}
        },
        "required": [field],
        "additionalProperties": false,
        "x-guidance": guidance
    })
}

/// The longest whitespace run the schema's layout allows between two JSON tokens.
fn gap_bytes(schema: &Value) -> usize {
    match schema.pointer("/x-guidance/whitespace_pattern") {
        Some(_) => GAP_BYTES,
        None => 0,
    }
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
    let gap = gap_bytes(schema);
    // A gap may also come before the first token.
    gap + worst_case_bytes(schema, gap) + MAX_TOKENS_SLACK
}

/// The longest text `schema` allows, with a gap of `gap` bytes after every JSON token but a
/// value's last (its container counts the gap after it).
fn worst_case_bytes(schema: &Value, gap: usize) -> usize {
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
                        // "key" : value , -> quotes, colon and comma around each field, and a
                        // gap after the key, the colon, the value and the comma
                        .map(|(k, v)| k.len() + 4 + 4 * gap + worst_case_bytes(v, gap))
                        .sum()
                })
                .unwrap_or(0);
            2 + gap + fields
        }
        Some("array") => {
            let n = schema.get("maxItems").and_then(Value::as_u64).unwrap_or(0) as usize;
            let item = schema
                .get("items")
                .map(|i| worst_case_bytes(i, gap))
                .unwrap_or(0);
            // [ gap (item gap , gap)* ]
            2 + gap + n * (item + 1 + 2 * gap)
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

    /// `v` as JSON text with `gap` after every JSON token but the last.
    fn spaced(v: &Value, gap: &str) -> String {
        match v {
            Value::Object(m) => {
                let fields: Vec<String> = m
                    .iter()
                    .map(|(k, v)| format!("{}{gap}:{gap}{}", json!(k), spaced(v, gap)))
                    .collect();
                format!("{{{gap}{}{gap}}}", fields.join(&format!("{gap},{gap}")))
            }
            Value::Array(a) => {
                let items: Vec<String> = a.iter().map(|v| spaced(v, gap)).collect();
                format!("[{gap}{}{gap}]", items.join(&format!("{gap},{gap}")))
            }
            other => other.to_string(),
        }
    }

    #[test]
    fn worst_case_covers_a_maximal_output() {
        let small = OutputLimits {
            max_items: 2,
            max_text_chars: 5,
            max_label_chars: 3,
            max_tags: 2,
            layout: JsonLayout::Compact,
        };
        let item = json!({"key": "😀😀😀", "value": "😀😀😀😀😀", "memory_type": "LongTermMemory",
                          "tags": ["😀😀😀", "😀😀😀"]});
        let maximal = json!({"memories": [item.clone(), item]});
        let widest_gap = format!("\n\n{}", " ".repeat(20));
        assert_eq!(widest_gap.len(), GAP_BYTES);
        for (layout, gap) in [
            (JsonLayout::Compact, ""),
            (JsonLayout::Spaced, &*widest_gap),
        ] {
            let schema = schema_for(Branch::Memory, &OutputLimits { layout, ..small });
            let text = format!("{gap}{}", spaced(&maximal, gap));
            let bound = worst_case_tokens(&schema);
            assert!(bound >= text.len(), "{layout:?}: {bound} < {}", text.len());
            // ...and is not absurdly loose either.
            assert!(
                bound < text.len() * 2,
                "{layout:?}: {bound} vs {}",
                text.len()
            );
        }
    }

    #[test]
    fn the_spaced_layout_bounds_whitespace_and_compact_forbids_it() {
        let spaced = schema_for(Branch::Memory, &OutputLimits::default());
        assert_eq!(spaced["x-guidance"]["whitespace_pattern"], SPACED_GAP);
        let compact = schema_for(
            Branch::Memory,
            &OutputLimits {
                layout: JsonLayout::Compact,
                ..OutputLimits::default()
            },
        );
        assert!(compact["x-guidance"].get("whitespace_pattern").is_none());
        assert!(worst_case_tokens(&spaced) > worst_case_tokens(&compact));
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
