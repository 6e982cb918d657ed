//! Who may use the engine, how much, and when: the checks a request passes between HTTP parsing
//! and the pipeline's generation stage.
//!
//! The order is fixed by cost and by what each check must not count:
//!
//! 1. [`auth`]: `Authorization: Token <key>` → the caller's [`auth::Caller`] (401 otherwise),
//!    from the request head alone, before the body is read.
//! 2. [`rate`]: the caller's request rate (429), at once: every request a key makes counts,
//!    invalid ones included, so a key cannot flood the server with cheap refusals.
//! 3. Content type, body and input checks in the pipeline (`Extractor::prepare`): validation and
//!    the input-token limit (400, 413). A request refused here keeps its request cell but never
//!    touches the token quota or a queue place.
//! 4. [`rate`]: the caller's input-token quota (429).
//! 5. [`admission`]: a generation slot, or a bounded, time-limited wait for one (503).
//!
//! A 503 (not ready, draining, full) is the server's refusal, not the client's fault: the request
//! cell and the tokens are given back, so that clients retrying on `Retry-After` during overload
//! are not locked out by their own retries.
//!
//! Steps 2 and 4 go through [`shared::Limits`]: each key's own [`rate`] limiters, or, with
//! `--limits-redis`, one state per key shared by all replicas through Redis ([`shared`]).

pub mod admission;
pub mod auth;
pub mod rate;
pub mod shared;

pub use admission::{Admission, AdmissionConfig, AdmissionError, Permit};
pub use auth::{AuthError, Caller, KeyHash, KeyRing};
pub use rate::{RateError, RateLimits};
pub use shared::{LimitError, Limits, Taken};
