//! `GET /openapi.json`: the API as OpenAPI 3.1, generated (utoipa) from the handlers and the wire
//! types themselves, so the spec cannot drift from what the server sends. `tests/serving.rs`
//! checks live responses, errors included, against it.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::schema::{Object, ObjectBuilder, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::api::health::{HealthData, LiveData};
use crate::api::types::ExtractData;

/// Success envelope of `/extract/memory`.
#[derive(ToSchema)]
pub struct ExtractResponse {
    /// Always 0 on success.
    pub code: u32,
    /// `ok`.
    pub message: String,
    pub data: ExtractData,
}

/// Every error: the contract's code, a message a person can act on, and `data: null`.
#[derive(ToSchema)]
pub struct ErrorResponse {
    /// 40000, 40002, 40100, 40132, 40300, 40301, 40305, 50000 or 50004.
    pub code: u32,
    pub message: String,
    #[schema(schema_with = null_schema)]
    pub data: (),
}

/// `/health/ready` (and `/health`) when ready.
#[derive(ToSchema)]
pub struct ReadyResponse {
    pub code: u32,
    pub message: String,
    pub data: HealthData,
}

/// `/health/live`.
#[derive(ToSchema)]
pub struct LiveResponse {
    pub code: u32,
    pub message: String,
    pub data: LiveData,
}

fn null_schema() -> Object {
    ObjectBuilder::new().schema_type(Type::Null).build()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "memex",
        description = "Turns chat dialogue into structured memories: a drop-in replacement for the hosted /extract/memory API."
    ),
    paths(
        crate::api::extract::extract_memory,
        crate::api::health::live,
        crate::api::health::ready,
        crate::api::metrics_text,
        spec,
    ),
    components(schemas(ExtractResponse, ErrorResponse, ReadyResponse, LiveResponse)),
    modifiers(&Aliases, &ApiKeyAuth),
    tags((name = "extraction"), (name = "operations"))
)]
pub struct ApiDoc;

/// The same operations under their other paths: the hosted prefix, and `/health`.
struct Aliases;

impl Modify for Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let paths = &mut openapi.paths.paths;
        for (path, alias, operation_id) in [
            (
                "/extract/memory",
                "/api/openmem/v1/extract/memory",
                "extract_memory_hosted_path",
            ),
            ("/health/ready", "/health", "health"),
        ] {
            let Some(mut item) = paths.get(path).cloned() else {
                continue;
            };
            // Operation ids are unique within a spec.
            for op in [item.get.as_mut(), item.post.as_mut()]
                .into_iter()
                .flatten()
            {
                op.operation_id = Some(operation_id.into());
            }
            paths.insert(alias.into(), item);
        }
    }
}

struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                    "Authorization",
                    "`Token <your key>`",
                ))),
            );
    }
}

pub fn spec_json() -> &'static str {
    static SPEC: OnceLock<String> = OnceLock::new();
    SPEC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the generated spec serialises")
    })
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json"))
)]
pub async fn spec() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], spec_json())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_documents_every_route_and_error_status() {
        let spec: serde_json::Value = serde_json::from_str(spec_json()).unwrap();
        for path in [
            "/extract/memory",
            "/api/openmem/v1/extract/memory",
            "/health",
            "/health/live",
            "/health/ready",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(spec["paths"][path].is_object(), "{path} missing");
        }
        let responses = &spec["paths"]["/extract/memory"]["post"]["responses"];
        for status in ["200", "400", "401", "413", "429", "500", "503"] {
            assert!(responses[status].is_object(), "{status} missing");
        }
        assert!(spec["components"]["securitySchemes"]["api_key"].is_object());
    }
}
