//! Wire types of `/extract/memory`: exactly the hosted API's shapes (shared/docs/api-contract.md).
//!
//! Requests are parsed by [`ExtractRequest::from_json`] rather than by an extractor, so that every
//! way a body can be wrong maps to the contract's codes with a message that names the field.
//!
//! Parsing goes straight from the bytes into the typed request (no `serde_json::Value` tree,
//! which costs about 20 times the body), and is strict where leniency would let two readers see
//! two different requests: a key given twice is an error (a proxy that keeps the first and memex
//! keeping the last would disagree), and the request and every message must be JSON objects
//! (serde would otherwise take `["user","hi"]` as a message, field by position).

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::api::error::ApiError;
use crate::pipeline::types as domain;
use crate::pipeline::ExtractInput;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
    System,
}

/// One dialogue message as sent. Text only: any other field is rejected, not dropped.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WireMessage {
    pub role: Role,
    /// `None` when absent or null; checked for emptiness with the other content rules.
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub chat_time: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExtractionType {
    Memory,
    Preference,
}

/// The request body. Unknown top-level fields are ignored (clients add fields over time); `null`
/// means the same as absent (the official SDK sends `"model": null`).
#[derive(Debug, Clone, ToSchema)]
pub struct ExtractRequest {
    #[serde(default)]
    pub messages: Option<Vec<WireMessage>>,
    #[serde(default)]
    pub extraction_types: Option<Vec<ExtractionType>>,
    #[serde(default)]
    pub model: Option<String>,
}

impl ExtractRequest {
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let not_json =
            |e: serde_json::Error| ApiError::InvalidRequest(format!("body is not valid JSON: {e}"));
        let mut de = serde_json::Deserializer::from_slice(body);
        let request: Self = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                not_json(inner)
            } else if path == "." {
                ApiError::InvalidRequest(format!("body: {inner}"))
            } else {
                ApiError::InvalidRequest(format!("{path}: {inner}"))
            }
        })?;
        de.end().map_err(not_json)?;
        Ok(request)
    }
}

impl<'de> Deserialize<'de> for ExtractRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = ExtractRequest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object with a `messages` array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ExtractRequest, A::Error> {
        let mut request = ExtractRequest {
            messages: None,
            extraction_types: None,
            model: None,
        };
        // Every key, the ignored ones too: their count is bounded by the body limit.
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format_args!(
                    "the key {key:?} is given twice"
                )));
            }
            match key.as_str() {
                "messages" => {
                    request.messages = map
                        .next_value::<Option<Vec<MessageObject>>>()?
                        .map(|m| m.into_iter().map(|m| m.0).collect())
                }
                "extraction_types" => request.extraction_types = map.next_value()?,
                "model" => request.model = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(request)
    }
}

/// A [`WireMessage`] that must be written as a JSON object. Its fields are then read by the
/// derived (strict: unknown fields and repeated fields are errors) deserializer.
struct MessageObject(WireMessage);

impl<'de> Deserialize<'de> for MessageObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectOnly;
        impl<'de> Visitor<'de> for ObjectOnly {
            type Value = MessageObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object with `role` and `content`")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MessageObject, A::Error> {
                WireMessage::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(MessageObject)
            }
        }
        d.deserialize_map(ObjectOnly)
    }
}

/// The envelope every response has, errors included.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub code: u32,
    pub message: String,
    pub data: Option<T>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ExtractData {
    pub success: bool,
    /// Absent (not empty) when `memory` was not requested.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory_detail_list: Option<Vec<MemoryItem>>,
    /// Absent (not empty) when `preference` was not requested.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub preference_detail_list: Option<Vec<PreferenceItem>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum MemoryType {
    UserMemory,
    LongTermMemory,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MemoryItem {
    pub memory_key: String,
    pub memory_value: String,
    pub memory_type: MemoryType,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceType {
    ExplicitPreference,
    ImplicitPreference,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PreferenceItem {
    pub preference: String,
    pub reasoning: String,
    pub preference_type: PreferenceType,
}

// Wire to domain, for requests, and domain to wire, for answers: the pipeline sees only its own
// types. Every conversion moves the strings; none copies one.

impl From<Role> for domain::Role {
    fn from(role: Role) -> Self {
        match role {
            Role::User => Self::User,
            Role::Assistant => Self::Assistant,
            Role::System => Self::System,
        }
    }
}

impl From<WireMessage> for domain::InputMessage {
    fn from(m: WireMessage) -> Self {
        Self {
            role: m.role.into(),
            content: m.content,
            chat_time: m.chat_time,
        }
    }
}

impl From<ExtractionType> for domain::ExtractionType {
    fn from(t: ExtractionType) -> Self {
        match t {
            ExtractionType::Memory => Self::Memory,
            ExtractionType::Preference => Self::Preference,
        }
    }
}

impl ExtractRequest {
    /// The pipeline's input. `model` is not part of it: a server serves the one model it loaded.
    pub fn into_input(self) -> ExtractInput {
        ExtractInput {
            messages: self
                .messages
                .map(|m| m.into_iter().map(Into::into).collect()),
            extraction_types: self
                .extraction_types
                .map(|t| t.into_iter().map(Into::into).collect()),
        }
    }
}

impl From<domain::MemoryType> for MemoryType {
    fn from(t: domain::MemoryType) -> Self {
        match t {
            domain::MemoryType::UserMemory => Self::UserMemory,
            domain::MemoryType::LongTermMemory => Self::LongTermMemory,
        }
    }
}

impl From<domain::MemoryItem> for MemoryItem {
    fn from(m: domain::MemoryItem) -> Self {
        Self {
            memory_key: m.key,
            memory_value: m.value,
            memory_type: m.memory_type.into(),
            tags: m.tags,
        }
    }
}

impl From<domain::PreferenceType> for PreferenceType {
    fn from(t: domain::PreferenceType) -> Self {
        match t {
            domain::PreferenceType::Explicit => Self::ExplicitPreference,
            domain::PreferenceType::Implicit => Self::ImplicitPreference,
        }
    }
}

impl From<domain::PreferenceItem> for PreferenceItem {
    fn from(p: domain::PreferenceItem) -> Self {
        Self {
            preference: p.preference,
            reasoning: p.reasoning,
            preference_type: p.preference_type.into(),
        }
    }
}

impl From<domain::ExtractedItems> for ExtractData {
    fn from(items: domain::ExtractedItems) -> Self {
        Self {
            success: true,
            memory_detail_list: items
                .memories
                .map(|m| m.into_iter().map(Into::into).collect()),
            preference_detail_list: items
                .preferences
                .map(|p| p.into_iter().map(Into::into).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ExtractRequest, ApiError> {
        ExtractRequest::from_json(s.as_bytes())
    }

    #[test]
    fn sdk_nulls_mean_absent_and_unknown_top_level_fields_are_ignored() {
        let r = parse(
            r#"{"messages":[{"role":"user","content":"hi"}],"extraction_types":null,
                "model":null,"user_id":"u1"}"#,
        )
        .unwrap();
        assert!(r.extraction_types.is_none());
        assert_eq!(r.messages.unwrap().len(), 1);
    }

    #[test]
    fn unknown_message_field_is_rejected_with_its_path() {
        let err =
            parse(r#"{"messages":[{"role":"user","content":"hi","image_url":"x"}]}"#).unwrap_err();
        let ApiError::InvalidRequest(msg) = err else {
            panic!("wrong error {err:?}")
        };
        assert!(
            msg.contains("messages[0]") && msg.contains("image_url"),
            "{msg}"
        );
    }

    #[test]
    fn non_text_content_and_bad_enums_are_invalid() {
        for body in [
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}]}"#,
            r#"{"messages":[{"role":"robot","content":"hi"}]}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"extraction_types":["skills"]}"#,
            r#"{"messages":"hello"}"#,
            r#"[1,2]"#,
            r#"[[{"role":"user","content":"hi"}]]"#,
            r#"{"messages":[{"role":"user","content":"hi"}"#,
            r#"{"messages":[{"role":"user","content":"hi"}]} trailing"#,
            // Positional arrays are not messages.
            r#"{"messages":[["user","hi","2025-01-01"]]}"#,
            r#"{"messages":[["user","hi"]]}"#,
            // A key given twice: the last would win in a lenient parser, the first in another.
            r#"{"messages":[{"role":"user","content":"hi"}],"messages":[]}"#,
            r#"{"messages":[{"role":"user","content":"hi","content":"bye"}]}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"user_id":"a","user_id":"b"}"#,
            r#"{"messages":[{"role":"user","role":"system","content":"hi"}]}"#,
            "",
            "null",
            r#""messages""#,
        ] {
            assert!(
                matches!(parse(body), Err(ApiError::InvalidRequest(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn errors_name_the_field_and_what_was_wrong() {
        let msg = |body: &str| match parse(body) {
            Err(ApiError::InvalidRequest(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = msg(r#"{"messages":[["user","hi"]]}"#);
        assert!(
            m.contains("messages[0]") && m.contains("message object"),
            "{m}"
        );
        let m = msg(r#"{"messages":[{"role":"user","content":"a"}],"messages":null}"#);
        assert!(m.contains("\"messages\"") && m.contains("twice"), "{m}");
        let m = msg("[1]");
        assert!(m.starts_with("body:") && m.contains("JSON object"), "{m}");
        assert!(msg("{").contains("not valid JSON"));
    }

    #[test]
    fn domain_answers_map_to_the_contracts_names() {
        let data = ExtractData::from(domain::ExtractedItems {
            memories: Some(vec![domain::MemoryItem {
                key: "Job".into(),
                value: "The user is a developer.".into(),
                memory_type: domain::MemoryType::LongTermMemory,
                tags: vec!["work".into()],
            }]),
            preferences: Some(vec![domain::PreferenceItem {
                preference: "Short replies".into(),
                reasoning: "asked twice".into(),
                preference_type: domain::PreferenceType::Implicit,
            }]),
        });
        assert_eq!(
            serde_json::to_value(&data).unwrap(),
            serde_json::json!({
                "success": true,
                "memory_detail_list": [{"memory_key": "Job",
                    "memory_value": "The user is a developer.",
                    "memory_type": "LongTermMemory", "tags": ["work"]}],
                "preference_detail_list": [{"preference": "Short replies",
                    "reasoning": "asked twice", "preference_type": "implicit_preference"}],
            })
        );
        let input = parse(
            r#"{"messages":[{"role":"assistant","content":"hi","chat_time":"t"}],
                "extraction_types":["preference"]}"#,
        )
        .unwrap()
        .into_input();
        assert_eq!(
            input.messages.unwrap(),
            vec![domain::InputMessage {
                role: domain::Role::Assistant,
                content: Some("hi".into()),
                chat_time: Some("t".into()),
            }]
        );
        assert_eq!(
            input.extraction_types.unwrap(),
            vec![domain::ExtractionType::Preference]
        );
    }

    #[test]
    fn absent_lists_are_not_serialized() {
        let data = ExtractData {
            success: true,
            memory_detail_list: Some(vec![]),
            preference_detail_list: None,
        };
        let v = serde_json::to_value(&data).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"success": true, "memory_detail_list": []})
        );
        let env: Envelope<ExtractData> = Envelope {
            code: 1,
            message: "x".into(),
            data: None,
        };
        assert_eq!(
            serde_json::to_value(&env).unwrap()["data"],
            serde_json::Value::Null
        );
    }
}
