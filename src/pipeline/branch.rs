//! Step 3: which extraction branches a request runs.
//!
//! `memory` runs the Memory Reader (facts); `preference` runs Explicit Preference and, when the
//! dialogue has more than one user turn, Implicit Preference. A single question-and-answer turn
//! cannot show a pattern of choices, so the implicit branch would only invent one: skipping it
//! saves a generation and a hallucination.

use std::fmt;

use crate::pipeline::clean::Dialogue;
use crate::pipeline::types::ExtractionType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Branch {
    Memory,
    ExplicitPreference,
    ImplicitPreference,
}

impl Branch {
    pub const ALL: [Branch; 3] = [
        Branch::Memory,
        Branch::ExplicitPreference,
        Branch::ImplicitPreference,
    ];

    /// Stable name: template file stem, log field and metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::ExplicitPreference => "explicit_preference",
            Self::ImplicitPreference => "implicit_preference",
        }
    }
}

impl fmt::Display for Branch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the client asked for: decides which response lists are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requested {
    pub memory: bool,
    pub preference: bool,
}

impl Requested {
    /// `None` (absent or null) means both.
    pub fn from_types(types: Option<&[ExtractionType]>) -> Self {
        match types {
            None => Self {
                memory: true,
                preference: true,
            },
            Some(t) => Self {
                memory: t.contains(&ExtractionType::Memory),
                preference: t.contains(&ExtractionType::Preference),
            },
        }
    }
}

pub fn choose(requested: Requested, dialogue: &Dialogue) -> Vec<Branch> {
    let mut branches = Vec::with_capacity(3);
    if requested.memory {
        branches.push(Branch::Memory);
    }
    if requested.preference {
        branches.push(Branch::ExplicitPreference);
        if dialogue.user_turns() > 1 {
            branches.push(Branch::ImplicitPreference);
        }
    }
    branches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::clean::Message;
    use crate::pipeline::types::Role;

    fn dialogue(user_turns: usize) -> Dialogue {
        let mut messages = vec![];
        for i in 0..user_turns {
            messages.push(Message {
                role: Role::User,
                content: format!("u{i}"),
                chat_time: None,
            });
            messages.push(Message {
                role: Role::Assistant,
                content: format!("a{i}"),
                chat_time: None,
            });
        }
        Dialogue { messages }
    }

    #[test]
    fn absent_types_mean_everything() {
        let r = Requested::from_types(None);
        assert_eq!(
            choose(r, &dialogue(2)),
            vec![
                Branch::Memory,
                Branch::ExplicitPreference,
                Branch::ImplicitPreference
            ]
        );
    }

    #[test]
    fn single_user_turn_skips_implicit() {
        let r = Requested::from_types(Some(&[ExtractionType::Preference]));
        assert_eq!(choose(r, &dialogue(1)), vec![Branch::ExplicitPreference]);
        assert_eq!(
            choose(r, &dialogue(3)),
            vec![Branch::ExplicitPreference, Branch::ImplicitPreference]
        );
    }

    #[test]
    fn memory_only() {
        let r = Requested::from_types(Some(&[ExtractionType::Memory, ExtractionType::Memory]));
        assert!(!r.preference);
        assert_eq!(choose(r, &dialogue(4)), vec![Branch::Memory]);
    }
}
