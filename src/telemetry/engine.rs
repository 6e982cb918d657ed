//! The engine seen through its metrics: a wrapper that counts failed engine calls by kind.
//!
//! A decorator rather than counters inside each engine, so every engine (mistralrs today, the
//! dedicated one tomorrow) is measured the same way without knowing about Prometheus. Dropping
//! the wrapper's future drops the inner one, so cancellation passes straight through.

use std::sync::Arc;

use async_trait::async_trait;

use crate::engine::{
    Engine, EngineError, EngineStats, GenerateRequest, Generation, ModelInfo, PromptMessage,
};
use crate::telemetry::metrics::Metrics;

pub struct MeteredEngine {
    inner: Arc<dyn Engine>,
    metrics: Arc<Metrics>,
}

impl MeteredEngine {
    pub fn wrap(inner: Arc<dyn Engine>, metrics: Arc<Metrics>) -> Arc<dyn Engine> {
        Arc::new(Self { inner, metrics })
    }

    fn count<T>(&self, result: Result<T, EngineError>) -> Result<T, EngineError> {
        if let Err(e) = &result {
            self.metrics
                .engine_errors
                .with_label_values(&[error_kind(e)])
                .inc();
        }
        result
    }
}

pub fn error_kind(e: &EngineError) -> &'static str {
    match e {
        EngineError::Rejected(_) => "rejected",
        EngineError::Generation(_) => "generation",
        EngineError::Unavailable(_) => "unavailable",
        EngineError::Tokenizer(_) => "tokenizer",
    }
}

#[async_trait]
impl Engine for MeteredEngine {
    async fn generate(&self, request: GenerateRequest) -> Result<Generation, EngineError> {
        let result = self.inner.generate(request).await;
        self.count(result)
    }

    async fn count_tokens(&self, text: String) -> Result<usize, EngineError> {
        let result = self.inner.count_tokens(text).await;
        self.count(result)
    }

    async fn count_prompt(&self, messages: Vec<PromptMessage>) -> Result<usize, EngineError> {
        let result = self.inner.count_prompt(messages).await;
        self.count(result)
    }

    fn failure(&self) -> Option<String> {
        self.inner.failure()
    }

    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }

    fn stats(&self) -> Option<EngineStats> {
        self.inner.stats()
    }
}
