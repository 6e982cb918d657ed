//! Scoring: one dialogue's answer against its labels ([`score`]), and the figures over a set of
//! dialogues ([`Summary`]), per language group, as a table or JSON.
//!
//! Counts are pooled over dialogues (micro-averages): a dialogue with ten expected facts weighs
//! ten times one with a single fact. A failed request scores as an answer with nothing in it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::error::ApiError;
use crate::api::types::{ExtractData, ExtractionType};
use crate::eval::dataset::Dialogue;
use crate::eval::matching::match_lists;
use crate::pipeline::language;
use crate::pipeline::schema::OutputLimits;

/// One dialogue's result.
#[derive(Debug, Clone, Serialize)]
pub struct DialogueResult {
    pub id: String,
    pub language: String,
    pub tags: Vec<String>,
    /// The envelope code: 0, or the error's.
    pub code: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A success whose lists are exactly the requested ones, within the output bounds, with no
    /// empty string.
    pub schema_valid: bool,
    /// The language the memories were written in (lingua), when there were any.
    pub output_language: Option<&'static str>,
    pub facts: ListScore,
    pub preferences: ListScore,
    /// Recalled expected preferences whose best match has the expected type.
    pub preference_types_correct: usize,
    /// A success with nothing in any list.
    pub empty_output: bool,
    pub seconds: f64,
    /// What the model returned, for reading next to the labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<ExtractData>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ListScore {
    pub expected: usize,
    pub extracted: usize,
    /// Expected items matched by some extracted one.
    pub recalled: usize,
    /// Extracted items that match some expected one.
    pub supported: usize,
}

impl std::ops::AddAssign for ListScore {
    fn add_assign(&mut self, o: Self) {
        self.expected += o.expected;
        self.extracted += o.extracted;
        self.recalled += o.recalled;
        self.supported += o.supported;
    }
}

/// Score one answer against its dialogue's labels.
pub fn score(
    dialogue: &Dialogue,
    answer: Result<ExtractData, ApiError>,
    seconds: f64,
    limits: &OutputLimits,
    threshold: f64,
) -> DialogueResult {
    let expected_facts: Vec<&str> = dialogue.expected.facts.iter().map(String::as_str).collect();
    let expected_prefs: Vec<&str> = dialogue
        .expected
        .preferences
        .iter()
        .map(|p| p.text.as_str())
        .collect();
    let (code, error, data) = match answer {
        Ok(data) => (0, None, Some(data)),
        Err(e) => (e.status_and_code().1, Some(e.to_string()), None),
    };
    let empty = ExtractData {
        success: false,
        memory_detail_list: None,
        preference_detail_list: None,
    };
    let d = data.as_ref().unwrap_or(&empty);
    let facts: Vec<&str> = d
        .memory_detail_list
        .iter()
        .flatten()
        .map(|m| m.memory_value.as_str())
        .collect();
    let prefs = d.preference_detail_list.as_deref().unwrap_or_default();
    let pref_texts: Vec<&str> = prefs.iter().map(|p| p.preference.as_str()).collect();

    let fact_match = match_lists(&expected_facts, &facts, threshold);
    let pref_match = match_lists(&expected_prefs, &pref_texts, threshold);
    let preference_types_correct = pref_match
        .best
        .iter()
        .zip(&dialogue.expected.preferences)
        .filter(|(best, want)| best.is_some_and(|i| prefs[i].preference_type == want.kind))
        .count();
    let all_text: Vec<&str> = facts.iter().chain(&pref_texts).copied().collect();
    DialogueResult {
        id: dialogue.id.clone(),
        language: dialogue.language.clone(),
        tags: dialogue.tags.clone(),
        code,
        error,
        schema_valid: data
            .as_ref()
            .is_some_and(|d| schema_valid(d, requested(dialogue), limits)),
        output_language: (!all_text.is_empty())
            .then(|| language::iso_code_of(&all_text.join("\n")))
            .flatten(),
        facts: ListScore {
            expected: expected_facts.len(),
            extracted: facts.len(),
            recalled: fact_match.recalled,
            supported: fact_match.supported,
        },
        preferences: ListScore {
            expected: expected_prefs.len(),
            extracted: pref_texts.len(),
            recalled: pref_match.recalled,
            supported: pref_match.supported,
        },
        preference_types_correct,
        empty_output: data.is_some() && all_text.is_empty(),
        seconds,
        output: data,
    }
}

/// Which lists the dialogue's request asks for: (memory, preference).
fn requested(dialogue: &Dialogue) -> (bool, bool) {
    let types = dialogue
        .parsed_request()
        .ok()
        .and_then(|r| r.extraction_types);
    match types {
        None => (true, true),
        Some(t) => (
            t.contains(&ExtractionType::Memory),
            t.contains(&ExtractionType::Preference),
        ),
    }
}

/// The contract's shape, checked on what the pipeline returned: exactly the requested lists,
/// every string non-empty and within its bound, every list within its bound.
fn schema_valid(data: &ExtractData, (memory, preference): (bool, bool), l: &OutputLimits) -> bool {
    let text_ok = |s: &str, max: usize| !s.trim().is_empty() && s.chars().count() <= max;
    let memories_ok = match &data.memory_detail_list {
        None => !memory,
        Some(list) => {
            memory
                && list.len() <= l.max_items
                && list.iter().all(|m| {
                    text_ok(&m.memory_key, l.max_label_chars)
                        && text_ok(&m.memory_value, l.max_text_chars)
                        && m.tags.len() <= l.max_tags
                        && m.tags.iter().all(|t| text_ok(t, l.max_label_chars))
                })
        }
    };
    let preferences_ok = match &data.preference_detail_list {
        None => !preference,
        // Two branches (explicit, implicit) of at most max_items each.
        Some(list) => {
            preference
                && list.len() <= 2 * l.max_items
                && list.iter().all(|p| {
                    text_ok(&p.preference, l.max_text_chars)
                        && text_ok(&p.reasoning, l.max_text_chars)
                })
        }
    };
    data.success && memories_ok && preferences_ok
}

/// The figures over a group of dialogues. Rates are `None` where nothing was there to count.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub dialogues: usize,
    pub failed: usize,
    pub schema_validity: Option<f64>,
    /// Over dialogues with some output.
    pub language_match: Option<f64>,
    pub language_checked: usize,
    pub facts: ListScore,
    pub fact_recall: Option<f64>,
    pub fact_precision: Option<f64>,
    pub preferences: ListScore,
    pub preference_recall: Option<f64>,
    pub preference_precision: Option<f64>,
    /// Over recalled expected preferences.
    pub preference_type_accuracy: Option<f64>,
    /// Over dialogues tagged `nothing`: the share answered with empty lists.
    pub empty_output_rate: Option<f64>,
    pub nothing_dialogues: usize,
    pub latency_mean_s: Option<f64>,
    pub latency_p50_s: Option<f64>,
    pub latency_p95_s: Option<f64>,
    pub latency_max_s: Option<f64>,
}

fn rate(num: usize, den: usize) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// The `q` quantile by the nearest-rank rule, on sorted values.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

impl Summary {
    pub fn of<'a>(results: impl IntoIterator<Item = &'a DialogueResult>) -> Self {
        let results: Vec<&DialogueResult> = results.into_iter().collect();
        let n = results.len();
        let count = |f: &dyn Fn(&DialogueResult) -> bool| results.iter().filter(|r| f(r)).count();
        let mut facts = ListScore::default();
        let mut preferences = ListScore::default();
        for r in &results {
            facts += r.facts;
            preferences += r.preferences;
        }
        let types_correct: usize = results.iter().map(|r| r.preference_types_correct).sum();
        let language_checked = count(&|r| r.code == 0 && !r.empty_output);
        let language_matched =
            count(&|r| r.code == 0 && !r.empty_output && r.output_language == Some(&r.language));
        let nothing = count(&|r| r.tags.iter().any(|t| t == "nothing"));
        let nothing_empty = count(&|r| r.tags.iter().any(|t| t == "nothing") && r.empty_output);
        let mut latencies: Vec<f64> = results.iter().map(|r| r.seconds).collect();
        latencies.sort_by(f64::total_cmp);
        Self {
            dialogues: n,
            failed: count(&|r| r.code != 0),
            schema_validity: rate(count(&|r| r.schema_valid), n),
            language_match: rate(language_matched, language_checked),
            language_checked,
            facts,
            fact_recall: rate(facts.recalled, facts.expected),
            fact_precision: rate(facts.supported, facts.extracted),
            preferences,
            preference_recall: rate(preferences.recalled, preferences.expected),
            preference_precision: rate(preferences.supported, preferences.extracted),
            preference_type_accuracy: rate(types_correct, preferences.recalled),
            empty_output_rate: rate(nothing_empty, nothing),
            nothing_dialogues: nothing,
            latency_mean_s: (n > 0).then(|| latencies.iter().sum::<f64>() / n as f64),
            latency_p50_s: quantile(&latencies, 0.5),
            latency_p95_s: quantile(&latencies, 0.95),
            latency_max_s: latencies.last().copied(),
        }
    }
}

/// The language groups the report is split by: all, English, Chinese, the others together.
pub fn groups(results: &[DialogueResult]) -> BTreeMap<&'static str, Summary> {
    let group = |name: &str, r: &DialogueResult| match name {
        "all" => true,
        "en" | "zh" => r.language == name,
        _ => r.language != "en" && r.language != "zh",
    };
    ["all", "en", "zh", "other"]
        .into_iter()
        .map(|name| (name, Summary::of(results.iter().filter(|r| group(name, r)))))
        .filter(|(name, s)| *name == "all" || s.dialogues > 0)
        .collect()
}

/// The report for people: one row per figure, one column per language group.
pub fn table(groups: &BTreeMap<&'static str, Summary>, threshold: f64) -> String {
    let order: Vec<(&str, &Summary)> = ["all", "en", "zh", "other"]
        .iter()
        .filter_map(|g| groups.get(g).map(|s| (*g, s)))
        .collect();
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}s"));
    let of = |v: Option<f64>, num: usize, den: usize| match v {
        Some(_) => format!("{} ({num}/{den})", pct(v)),
        None => "-".to_string(),
    };
    type Row<'a> = (&'a str, Box<dyn Fn(&Summary) -> String + 'a>);
    let rows: Vec<Row> = vec![
        ("dialogues", Box::new(|s| s.dialogues.to_string())),
        ("failed requests", Box::new(|s| s.failed.to_string())),
        ("schema validity", Box::new(move |s| pct(s.schema_validity))),
        (
            "language match",
            Box::new(move |s| {
                of(
                    s.language_match,
                    (s.language_match.unwrap_or(0.0) * s.language_checked as f64).round() as usize,
                    s.language_checked,
                )
            }),
        ),
        (
            "fact recall",
            Box::new(move |s| of(s.fact_recall, s.facts.recalled, s.facts.expected)),
        ),
        (
            "fact precision",
            Box::new(move |s| of(s.fact_precision, s.facts.supported, s.facts.extracted)),
        ),
        (
            "preference recall",
            Box::new(move |s| {
                of(
                    s.preference_recall,
                    s.preferences.recalled,
                    s.preferences.expected,
                )
            }),
        ),
        (
            "preference precision",
            Box::new(move |s| {
                of(
                    s.preference_precision,
                    s.preferences.supported,
                    s.preferences.extracted,
                )
            }),
        ),
        (
            "preference type accuracy",
            Box::new(move |s| pct(s.preference_type_accuracy)),
        ),
        (
            "empty output on `nothing`",
            Box::new(move |s| {
                of(
                    s.empty_output_rate,
                    (s.empty_output_rate.unwrap_or(0.0) * s.nothing_dialogues as f64).round()
                        as usize,
                    s.nothing_dialogues,
                )
            }),
        ),
        ("latency mean", Box::new(move |s| secs(s.latency_mean_s))),
        ("latency p50", Box::new(move |s| secs(s.latency_p50_s))),
        ("latency p95", Box::new(move |s| secs(s.latency_p95_s))),
        ("latency max", Box::new(move |s| secs(s.latency_max_s))),
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(_, f)| order.iter().map(|(_, s)| f(s)).collect())
        .collect();
    let label_width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..order.len())
        .map(|c| {
            cells
                .iter()
                .map(|r| r[c].chars().count())
                .chain([order[c].0.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = format!("{:label_width$}", "");
    for ((name, _), w) in order.iter().zip(&widths) {
        out.push_str(&format!("  {name:>w$}"));
    }
    out.push('\n');
    for ((label, _), row) in rows.iter().zip(&cells) {
        out.push_str(&format!("{label:label_width$}"));
        for (cell, w) in row.iter().zip(&widths) {
            out.push_str(&format!("  {cell:>w$}"));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "matching: normalized token overlap >= {threshold} (docs/eval.md)\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{MemoryItem, MemoryType, PreferenceItem, PreferenceType};
    use crate::eval::matching::DEFAULT_THRESHOLD;

    fn dialogue(line: &str) -> Dialogue {
        serde_json::from_str(line).unwrap()
    }

    fn memory(value: &str) -> MemoryItem {
        MemoryItem {
            memory_key: "k".into(),
            memory_value: value.into(),
            memory_type: MemoryType::UserMemory,
            tags: vec![],
        }
    }

    fn preference(text: &str, kind: PreferenceType) -> PreferenceItem {
        PreferenceItem {
            preference: text.into(),
            reasoning: "r".into(),
            preference_type: kind,
        }
    }

    const ALEX: &str = r#"{"id":"a","language":"en","tags":["facts","explicit"],
        "request":{"messages":[{"role":"user","content":"x"}]},
        "expected":{"facts":["The user is a backend developer in Hangzhou.","The user plays badminton."],
                    "preferences":[{"text":"The user wants short replies.","type":"explicit_preference"},
                                   {"text":"The user prefers budget hotels.","type":"implicit_preference"}]}}"#;
    const QUIET: &str = r#"{"id":"q","language":"zh","tags":["nothing"],
        "request":{"messages":[{"role":"user","content":"x"}],"extraction_types":["memory"]},
        "expected":{"facts":[],"preferences":[]}}"#;

    #[test]
    fn one_dialogue_is_scored_list_by_list() {
        let data = ExtractData {
            success: true,
            memory_detail_list: Some(vec![
                memory("User is a backend developer based in Hangzhou."),
                memory("The user owns a red bicycle."),
            ]),
            preference_detail_list: Some(vec![
                preference("Wants short replies", PreferenceType::ImplicitPreference),
                preference("Prefers budget hotels", PreferenceType::ImplicitPreference),
            ]),
        };
        let r = score(
            &dialogue(ALEX),
            Ok(data),
            1.5,
            &OutputLimits::default(),
            DEFAULT_THRESHOLD,
        );
        assert!(r.schema_valid);
        assert_eq!(
            r.facts,
            ListScore {
                expected: 2,
                extracted: 2,
                recalled: 1,
                supported: 1
            }
        );
        assert_eq!((r.preferences.recalled, r.preferences.supported), (2, 2));
        // The explicit one came out as implicit.
        assert_eq!(r.preference_types_correct, 1);
        assert_eq!(r.output_language, Some("en"));
        assert!(!r.empty_output);
    }

    #[test]
    fn lists_that_were_not_asked_for_or_over_bounds_are_schema_errors() {
        let quiet = dialogue(QUIET);
        let with_prefs = ExtractData {
            success: true,
            memory_detail_list: Some(vec![]),
            preference_detail_list: Some(vec![]),
        };
        let limits = OutputLimits::default();
        let r = score(&quiet, Ok(with_prefs), 0.1, &limits, DEFAULT_THRESHOLD);
        assert!(!r.schema_valid);
        let too_long = ExtractData {
            success: true,
            memory_detail_list: Some(vec![memory(&"x".repeat(limits.max_text_chars + 1))]),
            preference_detail_list: None,
        };
        assert!(!score(&quiet, Ok(too_long), 0.1, &limits, DEFAULT_THRESHOLD).schema_valid);
    }

    #[test]
    fn the_summary_pools_counts_and_splits_by_language() {
        let alex = dialogue(ALEX);
        let quiet = dialogue(QUIET);
        let limits = OutputLimits::default();
        let results = vec![
            score(
                &alex,
                Err(ApiError::ExtractionFailed {
                    branch: "memory".into(),
                    reason: "x".into(),
                }),
                4.0,
                &limits,
                DEFAULT_THRESHOLD,
            ),
            score(
                &quiet,
                Ok(ExtractData {
                    success: true,
                    memory_detail_list: Some(vec![]),
                    preference_detail_list: None,
                }),
                1.0,
                &limits,
                DEFAULT_THRESHOLD,
            ),
        ];
        assert_eq!(results[0].code, 50000);
        let groups = groups(&results);
        let all = &groups["all"];
        assert_eq!((all.dialogues, all.failed), (2, 1));
        assert_eq!(all.schema_validity, Some(0.5));
        assert_eq!(all.fact_recall, Some(0.0));
        assert_eq!(all.fact_precision, None);
        assert_eq!(all.empty_output_rate, Some(1.0));
        assert_eq!(all.language_match, None);
        assert_eq!(all.latency_p50_s, Some(1.0));
        assert_eq!(all.latency_max_s, Some(4.0));
        assert_eq!(groups["zh"].dialogues, 1);
        assert!(!groups.contains_key("other"));
        let table = table(&groups, DEFAULT_THRESHOLD);
        assert!(table.contains("fact recall"), "{table}");
        assert!(table.lines().next().unwrap().contains("all"), "{table}");
    }
}
