//! Step 4: render a branch's prompt from `templates/`.
//!
//! Templates are compiled into the binary (one file per branch and language, plus a system prompt
//! and the shared dialogue block), so a deployed server cannot drift from the templates it was
//! tested with. Each prompt puts the fixed instructions first and the dialogue last: everything
//! before the dialogue is a prefix shared by every request of that branch and language.

use minijinja::{context, Environment};
use serde::Serialize;

use crate::engine::{PromptMessage, PromptRole};
use crate::pipeline::branch::Branch;
use crate::pipeline::clean::Dialogue;
use crate::pipeline::language::{DetectedLanguage, TemplateLang};

const TEMPLATES: &[(&str, &str)] = &[
    ("dialogue.j2", include_str!("../../templates/dialogue.j2")),
    ("system.en.j2", include_str!("../../templates/system.en.j2")),
    ("system.zh.j2", include_str!("../../templates/system.zh.j2")),
    ("memory.en.j2", include_str!("../../templates/memory.en.j2")),
    ("memory.zh.j2", include_str!("../../templates/memory.zh.j2")),
    (
        "explicit_preference.en.j2",
        include_str!("../../templates/explicit_preference.en.j2"),
    ),
    (
        "explicit_preference.zh.j2",
        include_str!("../../templates/explicit_preference.zh.j2"),
    ),
    (
        "implicit_preference.en.j2",
        include_str!("../../templates/implicit_preference.en.j2"),
    ),
    (
        "implicit_preference.zh.j2",
        include_str!("../../templates/implicit_preference.zh.j2"),
    ),
];

pub struct Prompts {
    env: Environment<'static>,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
    chat_time: Option<&'a str>,
}

impl Prompts {
    pub fn new() -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // Keep the text exactly as written: no trailing-newline games across includes.
        env.set_keep_trailing_newline(false);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)?;
        }
        // Fail at start, not on the first request, if a template does not render.
        let prompts = Self { env };
        Ok(prompts)
    }

    /// The system and user messages for one branch.
    pub fn render(
        &self,
        branch: Branch,
        language: &DetectedLanguage,
        dialogue: &Dialogue,
        max_items: usize,
    ) -> Result<Vec<PromptMessage>, minijinja::Error> {
        let lang = language.template.code();
        let messages: Vec<TemplateMessage> = dialogue
            .messages
            .iter()
            .map(|m| TemplateMessage {
                role: match m.role {
                    crate::api::types::Role::User => "user",
                    crate::api::types::Role::Assistant => "assistant",
                    crate::api::types::Role::System => "system",
                },
                content: &m.content,
                chat_time: m.chat_time.as_deref(),
            })
            .collect();
        let ctx = context! {
            messages => messages,
            language => language.name,
            max_items => max_items,
        };
        let system = self
            .env
            .get_template(&format!("system.{lang}.j2"))?
            .render(&ctx)?;
        let user = self
            .env
            .get_template(&format!("{}.{lang}.j2", branch.name()))?
            .render(&ctx)?;
        Ok(vec![
            PromptMessage {
                role: PromptRole::System,
                content: system.trim().to_string(),
            },
            PromptMessage {
                role: PromptRole::User,
                content: user.trim().to_string(),
            },
        ])
    }

    /// Every template renders for every branch and language (checked at start-up).
    pub fn self_check(&self) -> Result<(), minijinja::Error> {
        let dialogue = Dialogue {
            messages: vec![crate::pipeline::clean::Message {
                role: crate::api::types::Role::User,
                content: "check".into(),
                chat_time: None,
            }],
        };
        for lang in [TemplateLang::En, TemplateLang::Zh] {
            let language = DetectedLanguage {
                template: lang,
                name: "English",
            };
            for b in Branch::ALL {
                self.render(b, &language, &dialogue, 1)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::Role;
    use crate::pipeline::clean::Message;

    fn dialogue() -> Dialogue {
        Dialogue {
            messages: vec![
                Message {
                    role: Role::User,
                    content: "我下周三飞北京".into(),
                    chat_time: Some("2025-06-02 10:00".into()),
                },
                Message {
                    role: Role::Assistant,
                    content: "好的".into(),
                    chat_time: None,
                },
            ],
        }
    }

    fn lang(template: TemplateLang, name: &'static str) -> DetectedLanguage {
        DetectedLanguage { template, name }
    }

    #[test]
    fn chinese_memory_prompt_is_chinese_and_ends_with_the_dialogue() {
        let p = Prompts::new().unwrap();
        let msgs = p
            .render(
                Branch::Memory,
                &lang(TemplateLang::Zh, "Chinese"),
                &dialogue(),
                7,
            )
            .unwrap();
        assert_eq!(msgs[0].role, PromptRole::System);
        assert!(msgs[0].content.contains("记忆提取引擎"));
        let user = &msgs[1].content;
        assert!(
            user.contains("提取事实记忆") && user.contains("最多 7 条"),
            "{user}"
        );
        assert!(user.ends_with("[assistant] 好的"), "{user}");
        assert!(user.contains("[user | 2025-06-02 10:00] 我下周三飞北京"));
    }

    #[test]
    fn english_prompts_ask_for_the_dialogue_language_when_not_english() {
        let p = Prompts::new().unwrap();
        for b in Branch::ALL {
            let fr = p
                .render(b, &lang(TemplateLang::En, "French"), &dialogue(), 3)
                .unwrap();
            assert!(fr[1].content.contains("in French"), "{b}");
            let en = p
                .render(b, &lang(TemplateLang::En, "English"), &dialogue(), 3)
                .unwrap();
            assert!(!en[1].content.contains("The dialogue is in"), "{b}");
            assert!(en[1]
                .content
                .contains(crate::pipeline::schema::list_field(b)));
        }
    }

    #[test]
    fn the_text_before_the_dialogue_is_shared_by_different_dialogues() {
        let p = Prompts::new().unwrap();
        let l = lang(TemplateLang::En, "English");
        let a = p.render(Branch::Memory, &l, &dialogue(), 5).unwrap();
        let mut other = dialogue();
        other.messages[0].content = "something else entirely".into();
        let b = p.render(Branch::Memory, &l, &other, 5).unwrap();
        let prefix = a[1].content.split("Dialogue:").next().unwrap();
        assert!(b[1].content.starts_with(prefix));
        assert_eq!(a[0], b[0]);
    }

    #[test]
    fn self_check_renders_everything() {
        Prompts::new().unwrap().self_check().unwrap();
    }
}
