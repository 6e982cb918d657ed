//! Per-key rate limits: requests per second (with a burst) and input tokens per minute.
//!
//! Every key owns its limiters, built once when the keys are loaded: keys are known up front, so
//! there is no keyed map to grow, lock or evict, and one key exhausting its quota cannot touch
//! another's. Both limits are GCRA ([`Gcra`]): one atomic "theoretical arrival time" per limit,
//! no timer task; a check is one compare-and-swap and, when it fails, says exactly when the next
//! cell conforms (our `Retry-After`).
//!
//! Only what the server serves is charged. The request cell is taken as soon as the key is known,
//! so a key that sends only invalid requests is limited like any other; the token quota is charged
//! once the input is counted. When the server then turns the request away for its own reasons
//! (not ready, draining, full: a 503), both are given back ([`KeyLimiter::refund_request`],
//! [`KeyLimiter::refund_tokens`]), so a client that retries on `Retry-After` during overload does
//! not lock itself out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// Slowest request rate a key may be given: one a day. Anything slower is a typo (and `1e-300`
/// has no representable period).
pub const MIN_RPS: f64 = 1.0 / 86_400.0;
/// Fastest: a million per second; above, the period is under a microsecond and the limit means
/// nothing.
pub const MAX_RPS: f64 = 1e6;

/// A request rate as written in the key file or `--rate-rps`: 0 (off), or a finite number
/// between [`MIN_RPS`] and [`MAX_RPS`]. `inf`, `NaN` and `1e-300` are errors, not "unlimited".
pub fn parse_rps(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v == 0.0 || (MIN_RPS..=MAX_RPS).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a request rate: 0 (no limit) or a number of requests per second \
             between {MIN_RPS:.6} (one a day) and {MAX_RPS}"
        )),
    }
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

/// Why a GCRA check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Denied {
    /// Conforms again after this long.
    Wait(Duration),
    /// More cells than the burst: never conforms.
    TooMany,
}

/// The request-rate GCRA of `limits`: one cell every `period`, `burst` back to back; `None`
/// when the limit is off. `--limits-redis` (`super::shared`) runs the same cells in Redis.
pub(super) fn request_cells(limits: &RateLimits) -> Option<(Duration, u32)> {
    let rps = limits.requests_per_second;
    (rps.is_finite() && rps > 0.0).then(|| {
        let period = Duration::from_secs_f64(1.0 / rps.clamp(MIN_RPS, MAX_RPS));
        (period, limits.burst.max(1))
    })
}

/// The token-quota GCRA of `limits`: a minute's worth of tokens at once, then one every
/// `60 s / tpm`; `None` when the quota is off.
pub(super) fn token_cells(limits: &RateLimits) -> Option<(Duration, u32)> {
    let per_minute = limits.tokens_per_minute;
    (per_minute > 0).then(|| (Duration::from_secs(60) / per_minute, per_minute))
}

/// The 429 of a denied request cell.
pub(super) fn request_denied(limits: &RateLimits, denied: Denied) -> RateError {
    RateError::Requests {
        per_second: limits.requests_per_second,
        burst: limits.burst.max(1),
        retry_after: match denied {
            Denied::Wait(d) => d,
            Denied::TooMany => Duration::from_secs(1),
        },
    }
}

/// The 429 of a denied token charge.
pub(super) fn tokens_denied(limits: &RateLimits, requested: usize, denied: Denied) -> RateError {
    let per_minute = limits.tokens_per_minute;
    match denied {
        Denied::Wait(retry_after) => RateError::Tokens {
            requested,
            per_minute,
            retry_after,
        },
        Denied::TooMany => RateError::OverWholeQuota {
            requested,
            per_minute,
        },
    }
}

/// The generic cell rate algorithm: `burst` cells back to back, then one every `period`. The
/// state is the theoretical arrival time (`tat`, nanoseconds since `epoch`) of the next cell.
struct Gcra {
    period_ns: u64,
    burst: u64,
    tat: AtomicU64,
    epoch: Instant,
}

impl Gcra {
    fn new(period: Duration, burst: u32) -> Self {
        Self {
            period_ns: u64::try_from(period.as_nanos()).unwrap_or(u64::MAX).max(1),
            burst: u64::from(burst.max(1)),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Take `n` cells, all or none.
    fn take(&self, n: u64) -> Result<(), Denied> {
        if n > self.burst {
            return Err(Denied::TooMany);
        }
        let increment = self.period_ns.saturating_mul(n);
        let tolerance = self.period_ns.saturating_mul(self.burst);
        let now = self.now();
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let next = current.max(now).saturating_add(increment);
            let allowed_at = next.saturating_sub(tolerance);
            if allowed_at > now {
                return Err(Denied::Wait(Duration::from_nanos(allowed_at - now)));
            }
            match self
                .tat
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// Give back `n` cells taken earlier; never more than a full bucket.
    fn give_back(&self, n: u64) {
        let decrement = self.period_ns.saturating_mul(n);
        let now = self.now();
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(decrement).max(now.min(tat)))
            });
    }
}

/// The limiters of one key.
pub struct KeyLimiter {
    limits: RateLimits,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
}

impl std::fmt::Debug for KeyLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyLimiter")
            .field("limits", &self.limits)
            .finish()
    }
}

impl KeyLimiter {
    /// `requests_per_second` must be 0 or within [`MIN_RPS`]..=[`MAX_RPS`] (see [`parse_rps`]);
    /// out-of-range rates are clamped into it rather than panicking.
    pub fn new(limits: RateLimits) -> Self {
        let requests = request_cells(&limits).map(|(period, burst)| Gcra::new(period, burst));
        let tokens = token_cells(&limits).map(|(period, burst)| Gcra::new(period, burst));
        Self {
            limits,
            requests,
            tokens,
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
        limiter
            .take(1)
            .map_err(|denied| request_denied(&self.limits, denied))
    }

    /// Give back the request cell of a request the server turned away (503).
    pub fn refund_request(&self) {
        if let Some(limiter) = &self.requests {
            limiter.give_back(1);
        }
    }

    /// Take `tokens` cells of the per-minute token quota, all or none.
    pub fn charge_tokens(&self, tokens: usize) -> Result<(), RateError> {
        let Some(limiter) = &self.tokens else {
            return Ok(());
        };
        if tokens == 0 {
            return Ok(());
        }
        limiter
            .take(tokens as u64)
            .map_err(|denied| tokens_denied(&self.limits, tokens, denied))
    }

    /// Give back the tokens charged for a request the server turned away (503).
    pub fn refund_tokens(&self, tokens: usize) {
        if let Some(limiter) = &self.tokens {
            limiter.give_back(tokens as u64);
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
    fn refunds_give_back_what_was_taken_and_no_more() {
        let l = KeyLimiter::new(RateLimits {
            requests_per_second: 0.001,
            burst: 2,
            tokens_per_minute: 100,
        });
        assert!(l.check_request().is_ok());
        assert!(l.check_request().is_ok());
        assert!(l.check_request().is_err());
        l.refund_request();
        assert!(
            l.check_request().is_ok(),
            "the refunded cell is usable again"
        );
        assert!(l.check_request().is_err());
        // Refunds beyond what was taken do not raise the burst.
        for _ in 0..10 {
            l.refund_request();
        }
        assert!(l.check_request().is_ok());
        assert!(l.check_request().is_ok());
        assert!(l.check_request().is_err());

        assert!(l.charge_tokens(100).is_ok());
        assert!(l.charge_tokens(1).is_err());
        l.refund_tokens(100);
        assert!(l.charge_tokens(100).is_ok());
    }

    #[test]
    fn rates_outside_the_sane_range_are_refused() {
        for bad in ["1e-300", "inf", "-inf", "NaN", "-1", "2e6", "fast", ""] {
            assert!(parse_rps(bad).is_err(), "{bad}");
        }
        for good in ["0", "0.5", "10", "1000000"] {
            assert!(parse_rps(good).is_ok(), "{good}");
        }
        // Built anyway (by code, not config): clamped, never a panic.
        let l = KeyLimiter::new(RateLimits {
            requests_per_second: 1e-300,
            burst: 1,
            tokens_per_minute: 0,
        });
        assert!(l.check_request().is_ok());
        assert!(l.check_request().is_err());
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
