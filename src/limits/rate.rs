//! Per-key rate limits: requests per second (with a burst) and input tokens per minute.
//!
//! Every key owns its limiters, built once when the keys are loaded: keys are known up front, so
//! there is no keyed map to grow, lock or evict, and one key exhausting its quota cannot touch
//! another's. Both limits are GCRA (governor), which needs no timer task: a check is one atomic
//! update and, when it fails, says exactly when the next cell conforms (our `Retry-After`).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Limits for one key. Zero turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub requests_per_second: f64,
    /// Requests allowed back to back before the per-second rate applies.
    pub burst: u32,
    pub tokens_per_minute: u32,
}

impl RateLimits {
    pub const UNLIMITED: Self = Self {
        requests_per_second: 0.0,
        burst: 0,
        tokens_per_minute: 0,
    };
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RateError {
    #[error("request rate over this key's limit of {per_second} per second (burst {burst})")]
    Requests {
        per_second: f64,
        burst: u32,
        retry_after: Duration,
    },
    #[error(
        "input-token quota of this key used up ({per_minute} tokens per minute; this request has {requested})"
    )]
    Tokens {
        requested: usize,
        per_minute: u32,
        retry_after: Duration,
    },
    /// A request larger than the whole per-minute quota: waiting does not help.
    #[error(
        "this request's {requested} input tokens exceed this key's whole quota of {per_minute} tokens per minute"
    )]
    OverWholeQuota { requested: usize, per_minute: u32 },
}

impl RateError {
    /// Whole seconds for `Retry-After`, rounded up so that a client that waits exactly this long
    /// is let through; at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Requests { retry_after, .. } | Self::Tokens { retry_after, .. } => {
                whole_seconds(*retry_after)
            }
            Self::OverWholeQuota { .. } => 60,
        }
    }
}

pub fn whole_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, DefaultClock>;

/// The limiters of one key.
pub struct KeyLimiter {
    limits: RateLimits,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    clock: DefaultClock,
}

impl std::fmt::Debug for KeyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("limits", &self.limits)
            .finish()
    }
}

impl KeyLimiter {
    pub fn new(limits: RateLimits) -> Self {
        let clock = DefaultClock::default();
        let requests = (limits.requests_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / limits.requests_per_second))
            .and_then(Quota::with_period)
            .map(|q| q.allow_burst(NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN)))
            .map(|q| RateLimiter::direct_with_clock(q, clock.clone()));
        let tokens = NonZeroU32::new(limits.tokens_per_minute)
            .map(|n| RateLimiter::direct_with_clock(Quota::per_minute(n), clock.clone()));
        Self {
            limits,
            requests,
            tokens,
            clock,
        }
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Take one request cell.
    pub fn check_request(&self) -> Result<(), RateError> {
        let Some(limiter) = &self.requests else {
            return Ok(());
        };
        limiter.check().map_err(|not_until| RateError::Requests {
            per_second: self.limits.requests_per_second,
            burst: self.limits.burst.max(1),
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Take `tokens` cells of the per-minute token quota, all or none.
    pub fn charge_tokens(&self, tokens: usize) -> Result<(), RateError> {
        let Some(limiter) = &self.tokens else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(u32::try_from(tokens).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        let per_minute = self.limits.tokens_per_minute;
        match limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(RateError::Tokens {
                requested: tokens,
                per_minute,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
            Err(_) => Err(RateError::OverWholeQuota {
                requested: tokens,
                per_minute,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_requests_are_limited_with_a_retry_time() {
        let l = KeyLimiter::new(RateLimits {
            requests_per_second: 0.5,
            burst: 2,
            tokens_per_minute: 0,
        });
        assert!(l.check_request().is_ok());
        assert!(l.check_request().is_ok());
        let err = l.check_request().unwrap_err();
        assert!(matches!(err, RateError::Requests { .. }), "{err:?}");
        // One cell every two seconds: the wait is at most 2 s, rounded up to whole seconds.
        assert!((1..=2).contains(&err.retry_after_secs()), "{err:?}");
    }

    #[test]
    fn token_quota_is_charged_all_or_nothing() {
        let l = KeyLimiter::new(RateLimits {
            tokens_per_minute: 100,
            ..RateLimits::UNLIMITED
        });
        assert!(l.charge_tokens(60).is_ok());
        let err = l.charge_tokens(60).unwrap_err();
        assert!(matches!(err, RateError::Tokens { .. }), "{err:?}");
        // 20 tokens are left and the failed charge took none of them.
        assert!(l.charge_tokens(40).is_ok());
        assert!(matches!(
            l.charge_tokens(101),
            Err(RateError::OverWholeQuota { .. })
        ));
        assert!(l.check_request().is_ok(), "request rate is off");
    }

    #[test]
    fn zero_means_unlimited() {
        let l = KeyLimiter::new(RateLimits::UNLIMITED);
        for _ in 0..1000 {
            assert!(l.check_request().is_ok());
            assert!(l.charge_tokens(1_000_000).is_ok());
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }
}
