//! Who may use the engine, how much, and when: the checks a request passes between HTTP parsing
//! and the pipeline's generation stage.
//!
//! The order is fixed by cost and by what each check must not count:
//!
//! 1. [`auth`]: `Authorization: Token <key>` → the caller's [`auth::Caller`] (401 otherwise).
//! 2. Input checks in the pipeline (`Extractor::prepare`): validation and the input-token limit.
//!    They come before any limit below, so a request that is too long is never rate-counted,
//!    charged against a token quota, or queued.
//! 3. [`rate`]: the caller's request rate, then its input-token quota (429).
//! 4. [`admission`]: a generation slot, or a bounded, time-limited wait for one (503).

pub mod admission;
pub mod auth;
pub mod rate;

pub use admission::{Admission, AdmissionConfig, AdmissionError, Permit};
pub use auth::{AuthError, Caller, KeyHash, KeyRing};
pub use rate::{RateError, RateLimits};
