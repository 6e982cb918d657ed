//! The pipeline's own view of a request and its answer. The HTTP layer (`api::types`)
//! maps its wire shapes to and from these at the edge, so the pipeline does not depend on how
//! a client spells a request, and the wire types may change (a field renamed, a version added)
//! without touching the pipeline.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    User,
    Assistant,
    System,
}

impl Role {
    /// The name prompts show in the dialogue block, the same as the wire's.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::System => "system",
        }
    }
}

/// One dialogue message as the client gave it, before cleaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputMessage {
    pub role: Role,
    /// `None` when the client gave no content: refused with the other empty contents, naming
    /// the message.
    pub content: Option<String>,
    pub chat_time: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtractionType {
    Memory,
    Preference,
}

// Deserialize: the model's answer names the type with these spellings (`schema.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MemoryType {
    UserMemory,
    LongTermMemory,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryItem {
    pub key: String,
    pub value: String,
    pub memory_type: MemoryType,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreferenceType {
    Explicit,
    Implicit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreferenceItem {
    pub preference: String,
    pub reasoning: String,
    pub preference_type: PreferenceType,
}

/// What a request extracted. A list is `None` when its extraction type was not asked for, and
/// empty when it was asked for and nothing was found: the response shows the two differently.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedItems {
    pub memories: Option<Vec<MemoryItem>>,
    pub preferences: Option<Vec<PreferenceItem>>,
}
