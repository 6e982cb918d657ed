//! Wire types of `/extract/memory`: exactly the hosted API's shapes (shared/docs/api-contract.md).
//!
//! Requests are parsed by [`ExtractRequest::from_json`] rather than by an extractor, so that every
//! way a body can be wrong maps to the contract's codes with a message that names the field.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::error::ApiError;

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
#[derive(Debug, Clone, Deserialize, ToSchema)]
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
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::InvalidRequest(format!("body is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::InvalidRequest(
                "body must be a JSON object with a `messages` array".into(),
            ));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ApiError::InvalidRequest(format!("{path}: {}", e.into_inner()))
        })
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
            r#"{"messages":[{"role":"user","content":"hi"}"#,
        ] {
            assert!(
                matches!(parse(body), Err(ApiError::InvalidRequest(_))),
                "{body}"
            );
        }
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
