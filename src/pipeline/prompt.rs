//! Step 4: render a branch's prompt from `templates/`.
//!
//! Every branch's prompt is one system message and one user message, laid out so that what they
//! share comes first:
//! - the system message (`system.<lang>.j2`) holds the rules of all three tasks: the same bytes
//!   for every request of a language, so the prefix cache computes it once per process;
//! - the user message starts with the dialogue (`dialogue.<lang>.j2`, the same bytes for every
//!   branch of a request), then [`SEPARATOR`];
//! - then the branch's own task line (`<branch>.<lang>.j2`: which task, the language note and the
//!   answer format, about 60 tokens).
//!
//! So the engine's prefix cache and in-flight sharing compute a request's dialogue once instead
//! of once per branch: a 1,500-token dialogue costs about 1,700 prompt tokens of work, not 4,500
//! (`docs/performance.md`). The rules stay before the dialogue: with the full instructions after
//! it, Qwen2.5-0.5B's fact recall fell from 63% to 37% on 13 dialogues; with the rules before it
//! and a short task line after, the whole dataset gives 43% against 49% for per-branch prompts,
//! with language match 91% -> 98% (`docs/eval.md`).
//!
//! The templates are compiled in; `--templates DIR` replaces any of them by file name (the rest
//! stay built in), for an extractor fine-tuned on its own prompt format. At start every template
//! must parse and keep the structure above (the dialogue in the dialogue template only), or the
//! server refuses to start, naming the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use minijinja::{context, Environment};
use serde::Serialize;

use crate::engine::{PromptMessage, PromptRole};
use crate::pipeline::branch::Branch;
use crate::pipeline::clean::{Dialogue, Message};
use crate::pipeline::language::{DetectedLanguage, TemplateLang};
use crate::pipeline::types::Role;

/// The templates memex renders, by file name (the names `--templates DIR` may override).
const TEMPLATES: &[(&str, &str)] = &[
    ("system.en.j2", include_str!("../../templates/system.en.j2")),
    ("system.zh.j2", include_str!("../../templates/system.zh.j2")),
    (
        "dialogue.en.j2",
        include_str!("../../templates/dialogue.en.j2"),
    ),
    (
        "dialogue.zh.j2",
        include_str!("../../templates/dialogue.zh.j2"),
    ),
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

/// Ends the part of the user message every branch shares. Both parts are trimmed, so the
/// instructions start with a visible character right after this line break: byte-level BPE
/// splits a run of line breaks off from the word after it (Qwen2's and GPT-2's rules alike), and
/// the shared part tokenizes identically in every branch.
pub const SEPARATOR: &str = "\n\n";

/// A template that failed to render for a request, by its file name: the dialogue and system
/// templates are shared by every branch, so the branch being rendered does not say which one.
#[derive(Debug, thiserror::Error)]
#[error("{template}: {error}")]
pub struct RenderError {
    pub template: String,
    error: minijinja::Error,
}

pub struct Prompts {
    env: Environment<'static>,
    /// Where each overridden template came from, for error messages.
    overridden: Vec<(&'static str, PathBuf)>,
}

#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'static str,
    content: &'a str,
    chat_time: Option<&'a str>,
}

impl Prompts {
    /// The built-in templates, each replaced by `overrides/<name>` where that file exists.
    pub fn new(overrides: Option<&Path>) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // Keep the text exactly as written: no trailing-newline games.
        env.set_keep_trailing_newline(false);
        // A variable a template does not get (`messages` in a branch template) is an error at
        // start, not silently empty text.
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let mut overridden = Vec::new();
        if let Some(dir) = overrides {
            check_names(dir)?;
        }
        for &(name, builtin) in TEMPLATES {
            let file = overrides.map(|d| d.join(name)).filter(|f| f.is_file());
            let source = match &file {
                Some(f) => std::fs::read_to_string(f)
                    .with_context(|| format!("template {}", f.display()))?,
                None => builtin.to_string(),
            };
            let origin = file
                .as_ref()
                .map_or(name.to_string(), |f| f.display().to_string());
            env.add_template_owned(name, source)
                .with_context(|| format!("template {origin} does not parse"))?;
            if let Some(f) = file {
                overridden.push((name, f));
            }
        }
        let prompts = Self { env, overridden };
        prompts.self_check()?;
        Ok(prompts)
    }

    /// The templates `--templates` replaced, with the files they came from.
    pub fn overridden(&self) -> &[(&'static str, PathBuf)] {
        &self.overridden
    }

    /// The system and user messages for one branch.
    pub fn render(
        &self,
        branch: Branch,
        language: &DetectedLanguage,
        dialogue: &Dialogue,
        max_items: usize,
    ) -> Result<Vec<PromptMessage>, RenderError> {
        let lang = language.template.code();
        let ctx = context! { language => language.name, max_items => max_items };
        let system = self.render_one(&format!("system.{lang}.j2"), &ctx)?;
        let shared = self.shared_part(language, dialogue)?;
        let instructions = self.render_one(&format!("{}.{lang}.j2", branch.name()), &ctx)?;
        Ok(vec![
            PromptMessage {
                role: PromptRole::System,
                content: system,
            },
            PromptMessage {
                role: PromptRole::User,
                content: format!("{shared}{instructions}"),
            },
        ])
    }

    /// The start of the user message that every branch of a request shares: the dialogue and
    /// [`SEPARATOR`].
    pub fn shared_part(
        &self,
        language: &DetectedLanguage,
        dialogue: &Dialogue,
    ) -> Result<String, RenderError> {
        let messages: Vec<TemplateMessage> = dialogue
            .messages
            .iter()
            .map(|m| TemplateMessage {
                role: m.role.as_str(),
                content: &m.content,
                chat_time: m.chat_time.as_deref(),
            })
            .collect();
        let ctx = context! { messages => messages, language => language.name };
        let lang = language.template.code();
        let text = self.render_one(&format!("dialogue.{lang}.j2"), &ctx)?;
        Ok(format!("{text}{SEPARATOR}"))
    }

    fn render_one(&self, name: &str, ctx: &minijinja::Value) -> Result<String, RenderError> {
        let text = self
            .env
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|error| RenderError {
                template: name.to_string(),
                error,
            })?;
        Ok(text.trim().to_string())
    }

    /// The file a template came from, for messages.
    fn origin(&self, name: &str) -> String {
        self.overridden
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(format!("built-in {name}"), |(_, f)| f.display().to_string())
    }

    /// Every template renders for every branch and language, the dialogue template shows every
    /// message, and no branch template depends on the dialogue (which would end the shared
    /// prefix early and prefill the dialogue once per branch again).
    fn self_check(&self) -> anyhow::Result<()> {
        let one = |content: &str| Dialogue {
            messages: vec![Message {
                role: Role::User,
                content: content.into(),
                chat_time: Some("2025-01-02 03:04".into()),
            }],
        };
        let (a, b) = (one("MARKER-A"), one("MARKER-B"));
        for lang in [TemplateLang::En, TemplateLang::Zh] {
            let language = DetectedLanguage {
                template: lang,
                name: "English",
            };
            let code = lang.code();
            let dialogue = format!("dialogue.{code}.j2");
            let shared = self
                .shared_part(&language, &a)
                .with_context(|| format!("template {} does not render", self.origin(&dialogue)))?;
            if !shared.contains("MARKER-A") {
                bail!(
                    "template {} does not show the messages' content",
                    self.origin(&dialogue)
                );
            }
            let shared_b = self.shared_part(&language, &b)?;
            for branch in Branch::ALL {
                let name = format!("{}.{code}.j2", branch.name());
                // The instructions of one branch, for a dialogue and its shared part.
                let instructions = |d: &Dialogue, shared: &str| -> anyhow::Result<String> {
                    let m = self.render(branch, &language, d, 3).with_context(|| {
                        format!(
                            "template {} does not render (a branch template gets `language` \
                             and `max_items`; the dialogue comes from {dialogue}, before it)",
                            self.origin(&name)
                        )
                    })?;
                    Ok(m[1].content.strip_prefix(shared).unwrap_or_default().into())
                };
                let with_a = instructions(&a, &shared)?;
                if with_a.is_empty() || with_a != instructions(&b, &shared_b)? {
                    bail!(
                        "template {} must hold only the {branch} branch's instructions: the \
                         dialogue comes from {dialogue}, before them, shared by every branch",
                        self.origin(&name)
                    );
                }
            }
        }
        Ok(())
    }
}

/// A `.j2` file in the override folder that memex would never read is most likely a misspelt
/// name: refuse it rather than silently serve the built-in template.
fn check_names(dir: &Path) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("templates folder {}", dir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".j2") && !TEMPLATES.iter().any(|(n, _)| *n == name) {
            let known: Vec<&str> = TEMPLATES.iter().map(|(n, _)| *n).collect();
            bail!(
                "{}: not a template memex uses (known: {})",
                dir.join(&*name).display(),
                known.join(", ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn builtin() -> Prompts {
        Prompts::new(None).unwrap()
    }

    #[test]
    fn chinese_memory_prompt_is_chinese_dialogue_first() {
        let msgs = builtin()
            .render(
                Branch::Memory,
                &lang(TemplateLang::Zh, "Chinese"),
                &dialogue(),
                7,
            )
            .unwrap();
        assert_eq!(msgs[0].role, PromptRole::System);
        // Every task's rules are in the system message, shared by all requests of a language.
        let system = &msgs[0].content;
        assert!(
            system.contains("记忆提取引擎") && system.contains("最多 7 条"),
            "{system}"
        );
        assert!(system.contains("显式偏好") && system.contains("隐式偏好"));
        let user = &msgs[1].content;
        assert!(
            user.starts_with(
                "对话：\n[user | 2025-06-02 10:00] 我下周三飞北京\n[assistant] 好的\n\n任务“事实记忆”"
            ),
            "{user}"
        );
        assert!(user.ends_with("字段。"), "{user}");
    }

    #[test]
    fn english_prompts_ask_for_the_dialogue_language_when_not_english() {
        let p = builtin();
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

    /// The three branches' user messages start with the same dialogue text, and only the
    /// instructions after it differ.
    #[test]
    fn every_branch_starts_with_the_same_dialogue() {
        let p = builtin();
        for l in [
            lang(TemplateLang::En, "English"),
            lang(TemplateLang::Zh, "Chinese"),
        ] {
            let shared = p.shared_part(&l, &dialogue()).unwrap();
            assert!(shared.ends_with("好的\n\n"), "{shared}");
            let users: Vec<String> = Branch::ALL
                .iter()
                .map(|&b| p.render(b, &l, &dialogue(), 4).unwrap()[1].content.clone())
                .collect();
            for u in &users {
                assert!(u.starts_with(&shared), "{u}");
                assert!(u.len() > shared.len() + 50, "{u}");
            }
            assert_ne!(users[0], users[1]);
            assert_ne!(users[1], users[2]);
        }
    }

    /// What the engine's prefix cache needs: the token ids of the shared part, in the chat
    /// template, are a prefix of every branch prompt's token ids, so that its KV blocks are the
    /// same blocks in all three. Checked with the real Qwen3 tokenizer and chat template, on
    /// dialogues whose last characters could merge with what follows.
    #[test]
    fn the_branch_prompts_share_the_dialogue_tokens_exactly() {
        let Some(tokenizer) = crate::test_files::cached(
            "models/qwen3-tokenizer/tokenizer.json",
            "the_branch_prompts_share_the_dialogue_tokens_exactly",
            "--qwen3-tokenizer",
        ) else {
            return;
        };
        let (tok, chat) =
            crate::engine::native::tokenizer::from_hf_dir(tokenizer.parent().unwrap()).unwrap();
        let p = builtin();
        let endings = [
            "好的",
            "Sure!",
            "see you at 10:00 ",
            "ok。\t",
            "done:)",
            "IT'S",
        ];
        for (l, ending) in [
            lang(TemplateLang::En, "English"),
            lang(TemplateLang::Zh, "Chinese"),
        ]
        .into_iter()
        .flat_map(|l| endings.map(move |e| (l.clone(), e)))
        {
            let mut d = dialogue();
            d.messages[1].content = ending.trim().to_string();
            let shared = p.shared_part(&l, &d).unwrap();
            let encode = |text: &str| tok.encode_fast(text, false).unwrap().get_ids().to_vec();
            let mut lens = Vec::new();
            for b in Branch::ALL {
                let text = chat.render(&p.render(b, &l, &d, 4).unwrap()).unwrap();
                let end = text.find(&shared).unwrap() + shared.len();
                let (prefix, all) = (encode(&text[..end]), encode(&text));
                assert_eq!(
                    all[..prefix.len()],
                    prefix[..],
                    "{b} {ending:?}: the shared part tokenizes differently in this prompt"
                );
                lens.push(prefix.len());
            }
            assert!(lens.windows(2).all(|w| w[0] == w[1]), "{lens:?}");
        }
    }

    fn folder(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn refusal(files: &[(&str, &str)]) -> String {
        let dir = folder(files);
        match Prompts::new(Some(dir.path())) {
            Ok(_) => panic!("{files:?} accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_templates_folder_overrides_by_name_and_falls_back_for_the_rest() {
        let dir = folder(&[(
            "memory.en.j2",
            "Only facts, at most {{ max_items }}, please. Reply in JSON.",
        )]);
        let p = Prompts::new(Some(dir.path())).unwrap();
        assert_eq!(p.overridden().len(), 1);
        let l = lang(TemplateLang::En, "English");
        let memory = p.render(Branch::Memory, &l, &dialogue(), 5).unwrap();
        assert!(
            memory[1]
                .content
                .ends_with("\n\nOnly facts, at most 5, please. Reply in JSON."),
            "{}",
            memory[1].content
        );
        let builtin = builtin();
        for b in [Branch::ExplicitPreference, Branch::ImplicitPreference] {
            assert_eq!(
                p.render(b, &l, &dialogue(), 5).unwrap(),
                builtin.render(b, &l, &dialogue(), 5).unwrap()
            );
        }
        assert_eq!(
            memory[0],
            builtin.render(Branch::Memory, &l, &dialogue(), 5).unwrap()[0]
        );
    }

    /// A template that passes the start-up check can still fail on a request's dialogue: the
    /// error names the template that failed, not the branch being rendered.
    #[test]
    fn a_render_failure_names_the_template() {
        let dir = folder(&[(
            "dialogue.en.j2",
            "{% for m in messages %}{{ m.content }}\n{% endfor %}\
             {% if messages|length > 1 %}{{ not_given }}{% endif %}",
        )]);
        let p = Prompts::new(Some(dir.path())).unwrap();
        let l = lang(TemplateLang::En, "English");
        let e = p.render(Branch::Memory, &l, &dialogue(), 3).unwrap_err();
        assert_eq!(e.template, "dialogue.en.j2");
        assert!(e.to_string().starts_with("dialogue.en.j2: "), "{e}");
    }

    #[test]
    fn broken_or_misplaced_templates_are_refused_naming_the_file() {
        let e = refusal(&[("system.zh.j2", "{% if %}")]);
        assert!(
            e.contains("system.zh.j2") && e.contains("does not parse"),
            "{e}"
        );

        let e = refusal(&[("memory.zh.j2", "{{ undefined_filter | nope }}")]);
        assert!(e.contains("memory.zh.j2"), "{e}");

        // A branch template that shows the dialogue would end the shared prefix early.
        let e = refusal(&[(
            "explicit_preference.en.j2",
            "{% for m in messages %}{{ m.content }}{% endfor %} Extract preferences.",
        )]);
        assert!(
            e.contains("explicit_preference.en.j2") && e.contains("dialogue.en.j2"),
            "{e}"
        );

        let e = refusal(&[("dialogue.zh.j2", "对话如下。")]);
        assert!(e.contains("dialogue.zh.j2") && e.contains("content"), "{e}");

        let e = refusal(&[("memory.english.j2", "typo")]);
        assert!(
            e.contains("memory.english.j2") && e.contains("memory.en.j2"),
            "{e}"
        );
    }
}
