//! Step 1: format and clean the dialogue.
//!
//! Every message is normalised to `{role, content, chat_time}`: line endings unified, control
//! characters other than newline and tab removed, surrounding whitespace trimmed. Nothing is
//! dropped: a message that is empty after cleaning is an error naming its index, so a client never
//! gets memories extracted from less than it sent without being told.

use crate::api::types::{Role, WireMessage};
use crate::pipeline::PipelineError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    pub chat_time: Option<String>,
}

/// A cleaned, non-empty dialogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dialogue {
    pub messages: Vec<Message>,
}

impl Dialogue {
    pub fn user_turns(&self) -> usize {
        self.messages
            .iter()
            .filter(|m| m.role == Role::User)
            .count()
    }

    /// All message contents joined by newlines: what the input-token limit counts.
    pub fn joined_content(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&m.content);
        }
        out
    }
}

pub fn clean(messages: Option<Vec<WireMessage>>) -> Result<Dialogue, PipelineError> {
    let messages = match messages {
        Some(m) if !m.is_empty() => m,
        _ => return Err(PipelineError::NoMessages),
    };
    let mut out = Vec::with_capacity(messages.len());
    for (index, m) in messages.into_iter().enumerate() {
        let content = clean_text(m.content.as_deref().unwrap_or(""));
        if content.is_empty() {
            return Err(PipelineError::EmptyContent { index });
        }
        let chat_time = m
            .chat_time
            .map(|t| clean_text(&t))
            .filter(|t| !t.is_empty());
        out.push(Message {
            role: m.role,
            content,
            chat_time,
        });
    }
    Ok(Dialogue { messages: out })
}

/// Unify line endings, remove control characters (keeping `\n` and `\t`) and zero-width
/// formatting characters that carry no text, then trim.
pub fn clean_text(s: &str) -> String {
    let s = s.replace("\r\n", "\n").replace('\r', "\n");
    let cleaned: String = s
        .chars()
        .filter(|&c| {
            (!c.is_control() || c == '\n' || c == '\t')
                && !matches!(c, '\u{200b}' | '\u{feff}' | '\u{2060}')
        })
        .collect();
    cleaned.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(role: Role, content: Option<&str>) -> WireMessage {
        WireMessage {
            role,
            content: content.map(str::to_owned),
            chat_time: None,
        }
    }

    #[test]
    fn trims_and_normalises() {
        let d = clean(Some(vec![wire(
            Role::User,
            Some("  hi\r\nthere\u{0}\u{200b} \t"),
        )]))
        .unwrap();
        assert_eq!(d.messages[0].content, "hi\nthere");
    }

    #[test]
    fn missing_or_empty_messages() {
        assert!(matches!(clean(None), Err(PipelineError::NoMessages)));
        assert!(matches!(
            clean(Some(vec![])),
            Err(PipelineError::NoMessages)
        ));
    }

    #[test]
    fn empty_content_names_the_message_instead_of_dropping_it() {
        let err = clean(Some(vec![
            wire(Role::User, Some("hello")),
            wire(Role::Assistant, Some(" \n\t ")),
        ]))
        .unwrap_err();
        assert!(matches!(err, PipelineError::EmptyContent { index: 1 }));
        assert!(matches!(
            clean(Some(vec![wire(Role::User, None)])),
            Err(PipelineError::EmptyContent { index: 0 })
        ));
    }

    #[test]
    fn counts_user_turns_and_joins() {
        let d = clean(Some(vec![
            wire(Role::System, Some("sys")),
            wire(Role::User, Some("a")),
            wire(Role::Assistant, Some("b")),
            wire(Role::User, Some("c")),
        ]))
        .unwrap();
        assert_eq!(d.user_turns(), 2);
        assert_eq!(d.joined_content(), "sys\na\nb\nc");
    }

    proptest! {
        #[test]
        fn cleaning_is_idempotent_and_never_leaves_edges_or_controls(s in any::<String>()) {
            let once = clean_text(&s);
            prop_assert_eq!(clean_text(&once), once.clone());
            prop_assert_eq!(once.trim(), once.as_str());
            prop_assert!(once.chars().all(|c| !c.is_control() || c == '\n' || c == '\t'));
        }

        #[test]
        fn every_message_survives_or_is_named(contents in proptest::collection::vec(any::<String>(), 1..6)) {
            let msgs: Vec<WireMessage> = contents.iter().map(|c| wire(Role::User, Some(c))).collect();
            match clean(Some(msgs)) {
                Ok(d) => prop_assert_eq!(d.messages.len(), contents.len()),
                Err(PipelineError::EmptyContent { index }) => {
                    prop_assert!(clean_text(&contents[index]).is_empty())
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}
