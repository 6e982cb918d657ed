//! Step 2: detect the dialogue's language.
//!
//! Templates exist in English and Chinese. A dialogue in another language gets the English
//! template plus an instruction to write in the dialogue's language, so lingua is built with a few
//! more languages than we have templates for: enough to name the language, not all 75 (each is a
//! crate of its own: build time and binary size).
//!
//! Detection reads the user and assistant turns only (a system message is often an English
//! instruction in front of a Chinese dialogue), and at most [`SAMPLE_CHARS`] characters of them:
//! the language of a dialogue is clear long before 8,000 tokens, and detection time grows with
//! the text (about 0.5 µs a character on this CPU: 2,000 characters cost 1 ms, half the per-request
//! CPU budget outside the model; 600 characters are several sentences, plenty for lingua).

use std::sync::OnceLock;

use lingua::{Language as L, LanguageDetector, LanguageDetectorBuilder};

use crate::pipeline::clean::Dialogue;
use crate::pipeline::types::Role;

pub const SAMPLE_CHARS: usize = 600;

const DETECTED: [L; 8] = [
    L::English,
    L::Chinese,
    L::Japanese,
    L::Korean,
    L::French,
    L::German,
    L::Spanish,
    L::Russian,
];

/// The language templates are chosen by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TemplateLang {
    En,
    Zh,
}

impl TemplateLang {
    pub fn code(self) -> &'static str {
        match self {
            Self::En => "en",
            Self::Zh => "zh",
        }
    }
}

/// What the pipeline knows about the dialogue's language.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetectedLanguage {
    pub template: TemplateLang,
    /// English name of the language the memories must be written in.
    pub name: &'static str,
}

fn detector() -> &'static LanguageDetector {
    static DETECTOR: OnceLock<LanguageDetector> = OnceLock::new();
    DETECTOR.get_or_init(|| {
        LanguageDetectorBuilder::from_languages(&DETECTED)
            .with_preloaded_language_models()
            .build()
    })
}

/// Build the detector (loads the language models) ahead of the first request.
pub fn warm_up() {
    let _ = detector();
}

pub fn detect(dialogue: &Dialogue) -> DetectedLanguage {
    let mut sample = String::new();
    for m in dialogue.messages.iter().filter(|m| m.role != Role::System) {
        if sample.chars().count() >= SAMPLE_CHARS {
            break;
        }
        sample.push_str(&m.content);
        sample.push('\n');
    }
    if sample.trim().is_empty() {
        sample = dialogue.joined_content();
    }
    let sample: String = sample.chars().take(SAMPLE_CHARS).collect();
    from_lingua(detector().detect_language_of(&sample))
}

/// The ISO 639-1 code of the language `text` is written in, among the detected ones: how
/// `memex eval` checks that memories came out in the dialogue's language.
pub fn iso_code_of(text: &str) -> Option<&'static str> {
    let sample: String = text.chars().take(SAMPLE_CHARS).collect();
    // lingua is built with only the languages of DETECTED: this match is exhaustive.
    Some(match detector().detect_language_of(&sample)? {
        L::English => "en",
        L::Chinese => "zh",
        L::Japanese => "ja",
        L::Korean => "ko",
        L::French => "fr",
        L::German => "de",
        L::Spanish => "es",
        L::Russian => "ru",
    })
}

fn from_lingua(lang: Option<L>) -> DetectedLanguage {
    let (template, name) = match lang {
        Some(L::Chinese) => (TemplateLang::Zh, "Chinese"),
        Some(L::Japanese) => (TemplateLang::En, "Japanese"),
        Some(L::Korean) => (TemplateLang::En, "Korean"),
        Some(L::French) => (TemplateLang::En, "French"),
        Some(L::German) => (TemplateLang::En, "German"),
        Some(L::Spanish) => (TemplateLang::En, "Spanish"),
        Some(L::Russian) => (TemplateLang::En, "Russian"),
        _ => (TemplateLang::En, "English"),
    };
    DetectedLanguage { template, name }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::clean::Message;

    fn dialogue(msgs: &[(Role, &str)]) -> Dialogue {
        Dialogue {
            messages: msgs
                .iter()
                .map(|(r, c)| Message {
                    role: *r,
                    content: c.to_string(),
                    chat_time: None,
                })
                .collect(),
        }
    }

    #[test]
    fn chinese_dialogue_gets_chinese_templates_despite_english_system_prompt() {
        let d = dialogue(&[
            (Role::System, "Extract key memories from the dialogue."),
            (
                Role::User,
                "我叫小明，今年二十八岁，在杭州做后端开发，周末喜欢打羽毛球。",
            ),
            (Role::Assistant, "你好小明！"),
        ]);
        assert_eq!(
            detect(&d),
            DetectedLanguage {
                template: TemplateLang::Zh,
                name: "Chinese"
            }
        );
    }

    #[test]
    fn english_dialogue() {
        let d = dialogue(&[(
            Role::User,
            "I'm Alex, 28, backend dev in Hangzhou, I play badminton.",
        )]);
        assert_eq!(detect(&d).template, TemplateLang::En);
        assert_eq!(detect(&d).name, "English");
    }

    #[test]
    fn other_languages_use_english_templates_but_keep_their_name() {
        let d = dialogue(&[(
            Role::User,
            "Je m'appelle Claire, j'habite à Lyon et je préfère les réponses courtes.",
        )]);
        assert_eq!(
            detect(&d),
            DetectedLanguage {
                template: TemplateLang::En,
                name: "French"
            }
        );
    }

    #[test]
    fn output_text_gets_its_iso_code() {
        assert_eq!(iso_code_of("用户喜欢打羽毛球，住在杭州。"), Some("zh"));
        assert_eq!(
            iso_code_of("The user plays badminton in Hangzhou."),
            Some("en")
        );
        assert_eq!(iso_code_of("L'utilisateur habite à Lyon."), Some("fr"));
        assert_eq!(iso_code_of(""), None);
    }

    #[test]
    fn system_only_dialogue_still_detects() {
        let d = dialogue(&[(Role::System, "记住用户喜欢喝绿茶。")]);
        assert_eq!(detect(&d).template, TemplateLang::Zh);
    }
}
