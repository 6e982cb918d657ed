//! Checks live responses against the server's own `/openapi.json`: the status must be documented
//! for the route, every documented header must be present, and the JSON body must validate
//! against the documented schema. Objects are checked closed (no property the spec does not
//! name), so a field added to a response without the spec fails here.
//!
//! A small JSON-schema subset is enough: what utoipa emits for our types ($ref, type and type
//! arrays, enum, properties, required, items, oneOf/anyOf/allOf, minimum, maximum).

use serde_json::Value;

pub struct Spec(Value);

impl Spec {
    pub async fn fetch(base: &str) -> Spec {
        let (status, headers, text) = super::get(&format!("{base}/openapi.json")).await;
        assert_eq!(status, 200);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        Spec(serde_json::from_str(&text).expect("spec is JSON"))
    }

    pub fn raw(&self) -> &Value {
        &self.0
    }

    /// Panics with every mismatch when a live response does not match the spec.
    pub fn check(
        &self,
        path: &str,
        method: &str,
        status: u16,
        headers: &reqwest::header::HeaderMap,
        body: &Value,
    ) {
        let operation = &self.0["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is not in the spec");
        let response = &operation["responses"][status.to_string()];
        assert!(
            response.is_object(),
            "{method} {path}: status {status} is not documented (body {body})"
        );
        if let Some(documented) = response["headers"].as_object() {
            for name in documented.keys() {
                assert!(
                    headers.contains_key(name.as_str()),
                    "{method} {path} {status}: documented header {name} missing"
                );
            }
        }
        let schema = &response["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {path} {status}: no JSON schema documented"
        );
        let mut errors = Vec::new();
        self.validate(body, schema, "$", &mut errors);
        assert!(
            errors.is_empty(),
            "{method} {path} {status}: response does not match the spec:\n{}\nbody: {body}",
            errors.join("\n")
        );
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => {
                let name = r
                    .strip_prefix("#/components/schemas/")
                    .unwrap_or_else(|| panic!("unsupported $ref {r}"));
                let target = &self.0["components"]["schemas"][name];
                assert!(target.is_object(), "dangling $ref {r}");
                self.resolve(target)
            }
            None => schema,
        }
    }

    fn validate(&self, value: &Value, schema: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(all) = schema["allOf"].as_array() {
            for s in all {
                self.validate(value, s, at, errors);
            }
        }
        for (key, need_exactly_one) in [("anyOf", false), ("oneOf", true)] {
            if let Some(options) = schema[key].as_array() {
                let passing = options
                    .iter()
                    .filter(|s| {
                        let mut e = Vec::new();
                        self.validate(value, s, at, &mut e);
                        e.is_empty()
                    })
                    .count();
                if passing == 0 || (need_exactly_one && passing > 1) {
                    errors.push(format!(
                        "{at}: {passing} of the {key} options match {value}"
                    ));
                }
            }
        }
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            if !types.iter().any(|t| type_matches(t, value)) {
                errors.push(format!("{at}: {value} is not of type {types:?}"));
                return;
            }
        }
        if let Some(options) = schema["enum"].as_array() {
            if !options.contains(value) {
                errors.push(format!("{at}: {value} is not one of {options:?}"));
            }
        }
        if let Some(n) = value.as_f64() {
            if schema["minimum"].as_f64().is_some_and(|min| n < min) {
                errors.push(format!("{at}: {n} below the minimum"));
            }
            if schema["maximum"].as_f64().is_some_and(|max| n > max) {
                errors.push(format!("{at}: {n} above the maximum"));
            }
        }
        if let Some(obj) = value.as_object() {
            let properties = schema["properties"].as_object();
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap();
                if !obj.contains_key(name) {
                    errors.push(format!("{at}: required property {name} missing"));
                }
            }
            if let Some(properties) = properties {
                for (name, v) in obj {
                    match properties.get(name) {
                        Some(s) => self.validate(v, s, &format!("{at}.{name}"), errors),
                        None => errors.push(format!("{at}: property {name} is not in the spec")),
                    }
                }
            }
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, v) in array.iter().enumerate() {
                self.validate(v, items, &format!("{at}[{i}]"), errors);
            }
        }
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64(),
        _ => false,
    }
}

#[test]
fn the_validator_catches_what_it_should() {
    let spec = Spec(serde_json::json!({"components": {"schemas": {
        "Item": {"type": "object", "required": ["k"], "properties": {
            "k": {"type": "string", "enum": ["a", "b"]},
            "n": {"type": ["integer", "null"], "minimum": 0}}}}}}));
    let item = serde_json::json!({"$ref": "#/components/schemas/Item"});
    let errors_of = |v: Value| {
        let mut e = Vec::new();
        spec.validate(&v, &item, "$", &mut e);
        e
    };
    assert!(errors_of(serde_json::json!({"k": "a", "n": null})).is_empty());
    assert!(errors_of(serde_json::json!({"k": "a", "n": 3})).is_empty());
    for bad in [
        serde_json::json!({"n": 1}),
        serde_json::json!({"k": "c"}),
        serde_json::json!({"k": "a", "n": -1}),
        serde_json::json!({"k": "a", "n": 1.5}),
        serde_json::json!({"k": "a", "extra": 1}),
        serde_json::json!([]),
    ] {
        assert!(!errors_of(bad.clone()).is_empty(), "{bad} should fail");
    }
}
