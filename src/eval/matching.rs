//! The matching rule of `memex eval`: when an extracted memory counts as an expected one.
//!
//! Deterministic and language-aware, no model involved (docs/eval.md, "The matching rule"):
//!
//! 1. Normalise: Unicode NFKC (full-width forms to their plain ones), lower case.
//! 2. Tokenise: each Han, kana or Hangul character is a token; elsewhere a token is a run of
//!    letters and digits (anything else separates). English-like words get a light suffix fold
//!    (`plays`, `played`, `playing` → `play`), so tense and number do not decide a match.
//! 3. Drop what every memory says: the subject ("user", 用户, ユーザー, 사용자, "utilisateur",
//!    ...), articles, forms of "be", and a few particles; one-letter Latin tokens (the `s` of
//!    "user's", the `l` of "l'utilisateur").
//! 4. Compare token *sets* by the overlap coefficient, |A ∩ B| / min(|A|, |B|): 1 when one
//!    side's tokens all appear in the other. An extracted memory that merges several expected
//!    facts ("Alex, 28, backend dev in Hangzhou") covers each of them, and a short extracted
//!    memory that states part of an expected one counts as that one.
//! 5. A pair matches when the coefficient is at least the threshold (default 0.5).
//!
//! Recall is the share of expected items matched by some extracted item; precision the share
//! of extracted items that match some expected item. The best match of an expected item (for
//! the preference-type check) is the extracted item with the highest coefficient, the first one
//! on a tie.

use std::collections::BTreeSet;

use unicode_normalization_alignments::UnicodeNormalization;

pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// Words that say nothing about which fact it is: the subject every memory has, articles,
/// forms of "be", and connectives. A word is dropped when it, or its folded form, is here.
const STOP_WORDS: &[&str] = &[
    // English
    "a",
    "an",
    "the",
    "user",
    "users",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "am",
    "and",
    "or",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "by",
    "as",
    "that",
    "this",
    "it",
    "its",
    "their",
    "they",
    "them",
    "he",
    "she",
    "his",
    "her",
    "has",
    "have",
    "had",
    // French, German, Spanish, Russian: the subject and the most common articles
    "utilisateur",
    "utilisatrice",
    "le",
    "la",
    "les",
    "de",
    "du",
    "des",
    "un",
    "une",
    "et",
    "nutzer",
    "benutzer",
    "der",
    "die",
    "das",
    "ist",
    "und",
    "usuario",
    "el",
    "los",
    "las",
    "es",
    "y",
    "пользователь",
    "пользователя",
    "пользователю",
];

/// Subjects written in scripts tokenised by character: removed as whole words before that.
const STOP_PHRASES: &[&str] = &["用户", "ユーザー", "사용자"];

/// Characters of the same scripts that are grammar, not content.
const STOP_CHARS: &[char] = &['的', '了', '是', '在', '和', 'の', 'は', 'が', 'を', 'に'];

/// Han, kana and Hangul: scripts compared character by character.
fn by_character(c: char) -> bool {
    matches!(c,
        '\u{3040}'..='\u{30ff}'     // hiragana, katakana
        | '\u{3400}'..='\u{4dbf}'   // CJK extension A
        | '\u{4e00}'..='\u{9fff}'   // CJK unified ideographs
        | '\u{f900}'..='\u{faff}'   // CJK compatibility ideographs
        | '\u{ac00}'..='\u{d7af}'   // Hangul syllables
        | '\u{20000}'..='\u{2ebef}' // CJK extensions B-F
    )
}

/// The normalised token set of one memory.
pub fn tokens(text: &str) -> BTreeSet<String> {
    let mut normal: String = text
        .nfkc()
        .map(|(c, _)| c)
        .collect::<String>()
        .to_lowercase();
    for phrase in STOP_PHRASES {
        normal = normal.replace(phrase, " ");
    }
    let mut out = BTreeSet::new();
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut BTreeSet<String>| {
        if !word.is_empty() {
            let w = fold(word);
            let one_letter = w.chars().count() == 1 && w.chars().all(char::is_alphabetic);
            let stop = STOP_WORDS.contains(&word.as_str()) || STOP_WORDS.contains(&w.as_str());
            if !one_letter && !stop {
                out.insert(w);
            }
            word.clear();
        }
    };
    for c in normal.chars() {
        if by_character(c) {
            flush(&mut word, &mut out);
            if !STOP_CHARS.contains(&c) {
                out.insert(c.to_string());
            }
        } else if c.is_alphanumeric() {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
        }
    }
    flush(&mut word, &mut out);
    out
}

/// Light suffix folding for words in Latin script: `-ies` → `-y`, then `-ing`, `-ed`, `-es`,
/// `-s` (not `-ss`, `-us`, `-is`), then a final `-e`; only while at least three letters remain.
/// Crude, but the same on both sides of every comparison, which is all a match needs.
fn fold(word: &str) -> String {
    if !word.chars().all(|c| c.is_ascii_alphabetic()) || word.len() < 4 {
        return word.to_string();
    }
    let mut w = word.to_string();
    if let Some(stem) = w.strip_suffix("ies") {
        w = format!("{stem}y");
    } else if let Some(stem) = ["ing", "ed", "es"]
        .iter()
        .find_map(|s| w.strip_suffix(s).filter(|stem| stem.len() >= 3))
    {
        w = stem.to_string();
    } else if w.ends_with('s') && !["ss", "us", "is"].iter().any(|s| w.ends_with(s)) {
        w.pop();
    }
    if w.len() > 3 && w.ends_with('e') {
        w.pop();
    }
    w
}

/// |A ∩ B| / min(|A|, |B|); 0 when either side has no tokens.
pub fn overlap(a: &BTreeSet<String>, b: &BTreeSet<String>) -> f64 {
    let smaller = a.len().min(b.len());
    if smaller == 0 {
        return 0.0;
    }
    a.intersection(b).count() as f64 / smaller as f64
}

/// How two lists of one kind matched.
#[derive(Debug, Clone, PartialEq)]
pub struct Matching {
    /// Expected items matched by some extracted item.
    pub recalled: usize,
    /// Extracted items that match some expected item.
    pub supported: usize,
    /// For each expected item, its best match among the extracted items, if it matched.
    pub best: Vec<Option<usize>>,
}

pub fn match_lists(expected: &[&str], extracted: &[&str], threshold: f64) -> Matching {
    let expected: Vec<_> = expected.iter().map(|t| tokens(t)).collect();
    let extracted: Vec<_> = extracted.iter().map(|t| tokens(t)).collect();
    let score = |e: &BTreeSet<String>, x: &BTreeSet<String>| overlap(e, x);
    let best: Vec<Option<usize>> = expected
        .iter()
        .map(|e| {
            let mut best: Option<(usize, f64)> = None;
            for (i, x) in extracted.iter().enumerate() {
                let s = score(e, x);
                if s >= threshold && best.is_none_or(|(_, b)| s > b) {
                    best = Some((i, s));
                }
            }
            best.map(|(i, _)| i)
        })
        .collect();
    let supported = extracted
        .iter()
        .filter(|x| expected.iter().any(|e| score(e, x) >= threshold))
        .count();
    Matching {
        recalled: best.iter().flatten().count(),
        supported,
        best,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(words: &[&str]) -> BTreeSet<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn english_words_are_folded_and_the_subject_dropped() {
        assert_eq!(
            tokens("The user's hobbies: plays Badminton, likes hiking."),
            set(&["badminton", "hik", "hobby", "lik", "play"])
        );
        assert_eq!(
            tokens("User played badminton"),
            tokens("the user plays badminton")
        );
        // Numbers and dates are tokens like words.
        assert_eq!(
            tokens("Moved on 2025-03-10"),
            set(&["03", "10", "2025", "mov"])
        );
    }

    #[test]
    fn chinese_is_compared_by_character_and_full_width_forms_are_plain() {
        assert_eq!(
            tokens("用户喜欢打羽毛球。"),
            set(&["喜", "欢", "打", "羽", "毛", "球"])
        );
        // NFKC: full-width digits and letters are the plain ones.
        assert_eq!(
            tokens("用户２８岁，ＡＩ工程师"),
            set(&["28", "ai", "岁", "工", "程", "师"])
        );
        // Mixed text: words and characters side by side.
        assert_eq!(tokens("用户在Hangzhou工作"), set(&["hangzhou", "工", "作"]));
    }

    #[test]
    fn overlap_is_symmetric_and_bounded() {
        let a = tokens("The user plays badminton.");
        let b = tokens("User Alex, 28, backend developer in Hangzhou, plays badminton.");
        assert_eq!(overlap(&a, &b), 1.0);
        assert_eq!(overlap(&b, &a), 1.0);
        assert_eq!(overlap(&a, &BTreeSet::new()), 0.0);
        let c = tokens("The user lives in Shanghai.");
        assert_eq!(overlap(&a, &c), 0.0);
    }

    #[test]
    fn a_merged_memory_recalls_each_fact_it_states() {
        let expected = [
            "The user is named Alex.",
            "The user is a backend developer in Hangzhou.",
            "The user plays badminton.",
            "The user has a cat named Miso.",
        ];
        let extracted = [
            "User Alex, backend developer in Hangzhou, plays badminton.",
            "The user owns a motorbike.",
        ];
        let m = match_lists(&expected, &extracted, DEFAULT_THRESHOLD);
        assert_eq!(m.recalled, 3);
        assert_eq!(m.supported, 1);
        assert_eq!(m.best, vec![Some(0), Some(0), Some(0), None]);
    }

    #[test]
    fn the_threshold_decides_and_ties_go_to_the_first() {
        // {will, visit, beij, next, wednesday} against {fly, beij, next, week}: 2 of
        // min(5, 4) = 0.5; the second extracted item scores 0.5 too.
        let expected = ["The user will visit Beijing next Wednesday."];
        let extracted = [
            "User flies to Beijing next week.",
            "Beijing trip next month.",
        ];
        let at = |t| match_lists(&expected, &extracted, t);
        assert_eq!(at(0.5).best, vec![Some(0)]);
        assert_eq!(at(0.51).recalled, 0);
        assert_eq!(at(0.51).supported, 0);
    }

    #[test]
    fn chinese_facts_match_across_wording() {
        let m = match_lists(
            &["用户在杭州做后端开发。", "用户喜欢打羽毛球。"],
            &[
                "用户是杭州的后端工程师",
                "用户周末打羽毛球",
                "用户养了一只猫",
            ],
            DEFAULT_THRESHOLD,
        );
        assert_eq!(m.best, vec![Some(0), Some(1)]);
        assert_eq!((m.recalled, m.supported), (2, 2));
    }

    #[test]
    fn matching_is_deterministic() {
        let expected = ["The user prefers short replies.", "用户不喜欢表情符号。"];
        let extracted = [
            "Wants concise replies",
            "不要用表情",
            "Prefers short answers",
        ];
        let first = match_lists(&expected, &extracted, 0.5);
        for _ in 0..10 {
            assert_eq!(match_lists(&expected, &extracted, 0.5), first);
        }
    }
}
