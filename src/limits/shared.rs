//! The per-key limits a request is held to ([`Limits`]): each key's own in-process limiters, or,
//! with `--limits-redis URL` (opt-in), one state per key shared by every replica through Redis.
//!
//! Without `--limits-redis` nothing here touches a network: [`Limits`] calls the key's own
//! [`super::rate::KeyLimiter`] exactly as before, and N replicas give a key N times its quota.
//! With it, each key's two GCRA states (request rate, token quota) live in Redis:
//!
//! - **The same arithmetic.** [`TAKE`] and [`GIVE_BACK`] are `rate::Gcra::take` and `give_back`
//!   line for line, with the cells of [`super::rate::request_cells`] and
//!   [`super::rate::token_cells`]: the same `rps`, `burst` and `tpm`, all-or-none takes, refunds
//!   of a 503 that never raise a bucket above full, the same 429s and `Retry-After`. A take larger
//!   than the whole bucket is refused before any round trip, as locally.
//! - **One round trip per check**, atomic in Redis: EVALSHA of the script (after a Redis restart
//!   forgot it, the NOSCRIPT answer makes the client load it and retry). A request makes at most
//!   two checks (its request cell, then its tokens) and, when the server turns it away, one
//!   refund of both. No other coordination: no locks, no leases, no background sync.
//! - **Redis's clock.** The scripts read `TIME`, so replicas whose clocks disagree share one
//!   timeline. Times are microseconds since 2023-11-14 (Unix 1.7·10⁹ s) in Lua's doubles: exact
//!   to 1/32 µs until 2032 and 1/16 µs until 2041, far below the shortest period a key can have
//!   for requests (1 µs at 10⁶ rps).
//! - **Keyed by the key's hash**, never the key: `memex:limits:{<key_hash>}:rps` and `:tpm`, the
//!   [`KeyHash`] logs use, an HMAC under `MEMEX_KEY_HASH_SECRET`. Every replica must therefore
//!   have the same secret (start-up refuses `--limits-redis` without one), and someone who reads
//!   Redis cannot test a guessed key without it. The braces put a key's two states in one Redis
//!   Cluster slot, so a refund of both stays one script.
//! - **Idle keys expire.** A state whose theoretical arrival time (TAT) has passed means exactly
//!   what a missing key means, so each write sets the key to expire at its TAT: Redis holds only
//!   the keys that are limiting someone now (at most `burst / rps` or a minute after last use).
//! - **A deadline of 10 ms** per check (`--limits-redis-timeout`). The script runs in a few
//!   microseconds; a round trip to a local Redis took 0.28 ms at the median and 2.9 ms at p99 on
//!   a 2-core machine busy with other work (`docs/performance.md`, "Limits shared through
//!   Redis"), and well under a millisecond within a zone is usual. 10 ms is several p99s there:
//!   it trips on a Redis that is down, stalled or overloaded (1 check in 1,200 on that loaded
//!   machine), and a request never waits more than three of them (rate, quota, refund), little
//!   next to a generation (hundreds of milliseconds to seconds). A lower deadline would fall
//!   back more often under CPU pressure; a higher one would make a stalled Redis slow every
//!   request.
//! - **When Redis does not answer**, `--limits-redis-fail` decides, each failure counted in
//!   `memex_limits_backend_errors_total{kind="timeout"|"error"}` and logged at most every
//!   [`LOG_EVERY`]. `open` (the default) serves with the replica's own limiters: a key then gets
//!   at most one quota per replica, as without Redis, while a Redis outage does not become a
//!   memex outage. `closed` answers 503/50004 with `Retry-After: 1`, for deployments where
//!   exceeding a quota costs more than refusing service.
//! - **Reconnection** is the redis crate's `ConnectionManager`: it connects lazily (start-up
//!   never waits for Redis; a background task connects and loads the scripts at once), and after
//!   a lost connection the next check starts a reconnect with a short back-off. A check waits for
//!   it no longer than its deadline; the ones after it find the new connection.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounterVec};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ScriptInvocation};

use super::auth::{Caller, KeyHash};
use super::rate::{self, Denied, RateError};

/// GCRA take, all or none (`rate::Gcra::take` on Redis's clock).
/// KEYS[1]: the limit's TAT (µs since the epoch below). ARGV: period (µs), cells, burst (cells).
/// Returns {1, 0} when taken, {0, µs until the take would conform} when not.
const TAKE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
local period, n, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local new = math.max(tat, now) + period * n
local allowed_at = new - period * burst
if allowed_at > now then
  return {0, math.ceil(allowed_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.17g', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
return {1, 0}
";

/// GCRA give-back (`rate::Gcra::give_back`): the TAT moves back, never below now (never more
/// than a full bucket). KEYS[i]: a limit's TAT; ARGV[2i-1], ARGV[2i]: its period (µs) and the
/// cells to give back.
const GIVE_BACK: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) * 1000000 + tonumber(t[2])
for i, key in ipairs(KEYS) do
  local tat = tonumber(redis.call('GET', key))
  if tat then
    local new = math.max(tat - tonumber(ARGV[2 * i - 1]) * tonumber(ARGV[2 * i]), math.min(now, tat))
    if new > now then
      redis.call('SET', key, string.format('%.17g', new), 'PX', math.max(1, math.ceil((new - now) / 1000)))
    else
      redis.call('DEL', key)
    end
  end
end
return 0
";

/// At most one warning this often while Redis fails; the ones in between are counted in it.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What a request meets when the shared limits do not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailPolicy {
    /// Serve with this replica's own limiters (logged and counted).
    Open,
    /// Refuse with 503/50004.
    Closed,
}

/// A Redis URL (`redis://[[user]:password@]host[:port][/db]`); its `Debug` hides the password,
/// since the effective configuration is logged.
#[derive(Clone)]
pub struct RedisUrl(String);

impl RedisUrl {
    fn redacted(url: &str) -> String {
        match url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}"),
                None => url.to_string(),
            },
            None => url.to_string(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Self::redacted(&self.0))
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        redis::Client::open(s)
            .map_err(|e| format!("`{}` is not a Redis URL: {e}", Self::redacted(s)))?;
        Ok(Self(s.to_string()))
    }
}

/// `--limits-redis*`.
#[derive(Debug, Clone)]
pub struct SharedConfig {
    pub url: RedisUrl,
    /// Longest a check waits for Redis.
    pub timeout: Duration,
    pub fail: FailPolicy,
}

/// The metrics of the shared limits (see `telemetry::Metrics::limits_backend`).
#[derive(Clone)]
pub struct BackendMetrics {
    /// `kind`: timeout or error.
    pub errors: IntCounterVec,
    /// Round trip of each answered check.
    pub round_trip: Histogram,
}

/// Why Redis gave no answer.
#[derive(Debug, thiserror::Error)]
enum BackendError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
}

impl BackendError {
    fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Redis(_) => "error",
        }
    }
}

/// A limit checked after the shared limits failed closed: the client should retry shortly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitError {
    #[error(transparent)]
    Rate(#[from] RateError),
    #[error(
        "this key's limits could not be checked: their shared store did not answer; retry shortly"
    )]
    Unavailable,
}

/// Where a request's cells were taken, so that a refund gives them back to the same place.
#[derive(Debug, Clone, Copy, Default)]
pub struct Taken {
    request: Option<Store>,
    tokens: Option<(Store, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Local,
    Shared,
}

/// One of a key's two limits.
#[derive(Debug, Clone, Copy)]
enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    fn redis_key(self, hash: &KeyHash) -> String {
        let suffix = match self {
            Self::Requests => "rps",
            Self::Tokens => "tpm",
        };
        format!("memex:limits:{{{hash}}}:{suffix}")
    }
}

fn micros(period: Duration) -> f64 {
    period.as_secs_f64() * 1e6
}

/// The per-key limits every request goes through (`api::extract`): local, or shared with a
/// local fallback.
pub struct Limits {
    shared: Option<SharedLimits>,
}

impl Limits {
    /// Each key's own in-process limiters: the behaviour without `--limits-redis`.
    pub fn local() -> Self {
        Self { shared: None }
    }

    pub fn shared(shared: SharedLimits) -> Self {
        Self {
            shared: Some(shared),
        }
    }

    /// Take the caller's request cell.
    pub async fn check_request(&self, caller: &Caller) -> Result<Taken, LimitError> {
        let local = || -> Result<Taken, LimitError> {
            caller.limiter.check_request()?;
            Ok(Taken {
                request: Some(Store::Local),
                tokens: None,
            })
        };
        let Some(shared) = &self.shared else {
            return local();
        };
        let limits = caller.limiter.limits();
        let Some((period, burst)) = rate::request_cells(&limits) else {
            return Ok(Taken::default());
        };
        match shared
            .take(&caller.key_hash, Limit::Requests, 1, period, burst)
            .await
        {
            Ok(Ok(())) => Ok(Taken {
                request: Some(Store::Shared),
                tokens: None,
            }),
            Ok(Err(denied)) => Err(rate::request_denied(&limits, denied).into()),
            Err(e) => {
                shared.failed(&e);
                match shared.fail {
                    FailPolicy::Open => local(),
                    FailPolicy::Closed => Err(LimitError::Unavailable),
                }
            }
        }
    }

    /// Charge `tokens` to the caller's quota, all or none; recorded in `taken` for a refund.
    pub async fn charge_tokens(
        &self,
        caller: &Caller,
        taken: &mut Taken,
        tokens: usize,
    ) -> Result<(), LimitError> {
        let mut local = || -> Result<(), LimitError> {
            caller.limiter.charge_tokens(tokens)?;
            taken.tokens = Some((Store::Local, tokens));
            Ok(())
        };
        let Some(shared) = &self.shared else {
            return local();
        };
        let limits = caller.limiter.limits();
        let Some((period, burst)) = rate::token_cells(&limits) else {
            return Ok(());
        };
        if tokens == 0 {
            return Ok(());
        }
        match shared
            .take(
                &caller.key_hash,
                Limit::Tokens,
                tokens as u64,
                period,
                burst,
            )
            .await
        {
            Ok(Ok(())) => {
                taken.tokens = Some((Store::Shared, tokens));
                Ok(())
            }
            Ok(Err(denied)) => Err(rate::tokens_denied(&limits, tokens, denied).into()),
            Err(e) => {
                shared.failed(&e);
                match shared.fail {
                    FailPolicy::Open => local(),
                    FailPolicy::Closed => Err(LimitError::Unavailable),
                }
            }
        }
    }

    /// Give back what `taken` holds: the server, not the client, turned the request away (503).
    pub async fn refund(&self, caller: &Caller, taken: &Taken) {
        if taken.request == Some(Store::Local) {
            caller.limiter.refund_request();
        }
        if let Some((Store::Local, tokens)) = taken.tokens {
            caller.limiter.refund_tokens(tokens);
        }
        let Some(shared) = &self.shared else {
            return;
        };
        let limits = caller.limiter.limits();
        let mut back = Vec::with_capacity(2);
        if taken.request == Some(Store::Shared) {
            if let Some((period, _)) = rate::request_cells(&limits) {
                back.push((Limit::Requests, period, 1));
            }
        }
        if let Some((Store::Shared, tokens)) = taken.tokens {
            if let Some((period, _)) = rate::token_cells(&limits) {
                back.push((Limit::Tokens, period, tokens as u64));
            }
        }
        if back.is_empty() {
            return;
        }
        // A refund that does not arrive costs the key at most these cells, which come back by
        // themselves at the key's rate.
        if let Err(e) = shared.give_back(&caller.key_hash, &back).await {
            shared.failed(&e);
        }
    }
}

/// The connection to Redis and the two scripts.
pub struct SharedLimits {
    redis: ConnectionManager,
    timeout: Duration,
    fail: FailPolicy,
    take: Script,
    give_back: Script,
    metrics: BackendMetrics,
    log: FailureLog,
}

impl SharedLimits {
    /// Never waits for Redis: connects in the background (and loads the scripts), so that the
    /// first requests find a connection; until then, checks fail by the policy. Must run inside
    /// the tokio runtime.
    pub fn connect(config: SharedConfig, metrics: BackendMetrics) -> anyhow::Result<Self> {
        let client = redis::Client::open(config.url.0.as_str())?;
        // A reconnection attempt gives up after ~1 s and is retried by the next check; the
        // back-off keeps a dead Redis from being hammered by every request.
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client, manager)?;
        let shared = Self {
            redis,
            timeout: config.timeout,
            fail: config.fail,
            take: Script::new(TAKE),
            give_back: Script::new(GIVE_BACK),
            metrics,
            log: FailureLog::default(),
        };
        let (mut redis, url) = (shared.redis.clone(), config.url.clone());
        let scripts = [shared.take.clone(), shared.give_back.clone()];
        tokio::spawn(async move {
            for script in &scripts {
                if let Err(e) = script.prepare_invoke().load_async(&mut redis).await {
                    tracing::warn!(redis = ?url, error = %e, policy = ?config.fail,
                        "shared limits: Redis not reachable yet; retrying on each request");
                    return;
                }
            }
            tracing::info!(redis = ?url, "shared limits: connected to Redis, scripts loaded");
        });
        Ok(shared)
    }

    /// Take `n` cells of one limit of a key, all or none.
    async fn take(
        &self,
        hash: &KeyHash,
        limit: Limit,
        n: u64,
        period: Duration,
        burst: u32,
    ) -> Result<Result<(), Denied>, BackendError> {
        if n > u64::from(burst) {
            return Ok(Err(Denied::TooMany));
        }
        let mut call = self.take.prepare_invoke();
        call.key(limit.redis_key(hash))
            .arg(micros(period))
            .arg(n)
            .arg(burst);
        let (taken, wait_us): (i64, i64) = self.call(&call).await?;
        Ok(if taken == 1 {
            Ok(())
        } else {
            Err(Denied::Wait(Duration::from_micros(wait_us.max(1) as u64)))
        })
    }

    /// Give back cells of a key's limits in one round trip: (limit, its period, cells).
    async fn give_back(
        &self,
        hash: &KeyHash,
        back: &[(Limit, Duration, u64)],
    ) -> Result<(), BackendError> {
        let mut call = self.give_back.prepare_invoke();
        for (limit, period, n) in back {
            call.key(limit.redis_key(hash)).arg(micros(*period)).arg(*n);
        }
        self.call::<i64>(&call).await.map(|_| ())
    }

    /// One script call within the deadline; a late answer is dropped.
    async fn call<T: FromRedisValue>(
        &self,
        call: &ScriptInvocation<'_>,
    ) -> Result<T, BackendError> {
        let started = Instant::now();
        let mut redis = self.redis.clone();
        let answer = tokio::time::timeout(self.timeout, call.invoke_async(&mut redis))
            .await
            .map_err(|_| BackendError::Timeout(self.timeout))??;
        self.metrics
            .round_trip
            .observe(started.elapsed().as_secs_f64());
        if self.log.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("shared limits: Redis answers again");
        }
        Ok(answer)
    }

    /// Count a failure, and log it unless one was logged within [`LOG_EVERY`].
    fn failed(&self, e: &BackendError) {
        self.metrics.errors.with_label_values(&[e.kind()]).inc();
        self.log.failing.store(true, Ordering::Relaxed);
        if let Some(suppressed) = self.log.due() {
            let serving = match self.fail {
                FailPolicy::Open => "serving with this replica's own limits",
                FailPolicy::Closed => "answering 503",
            };
            tracing::warn!(error = %e, suppressed, "shared limits: Redis failed; {serving}");
        }
    }
}

/// Rate-limited logging of failures: a Redis outage must not flood the log with a line per
/// request.
#[derive(Default)]
struct FailureLog {
    last: Mutex<Option<Instant>>,
    /// Failures since the last line.
    suppressed: AtomicU64,
    /// A failure was seen and no success since (to log the recovery once).
    failing: AtomicBool,
}

impl FailureLog {
    /// `Some(failures not logged since the last line)` when a line is due now.
    fn due(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < LOG_EVERY) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(Instant::now());
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::rate::{KeyLimiter, RateLimits};
    use crate::telemetry::Metrics;
    use crate::test_redis::RedisServer;

    fn caller(name: &str, limits: RateLimits) -> Caller {
        Caller {
            key_hash: KeyHash::of("test-secret", name),
            limiter: KeyLimiter::new(limits),
        }
    }

    fn limits(redis: &RedisServer, fail: FailPolicy, timeout: Duration) -> (Limits, Metrics) {
        let metrics = Metrics::new();
        let shared = SharedLimits::connect(
            SharedConfig {
                url: redis.url().parse().unwrap(),
                timeout,
                fail,
            },
            metrics.limits_backend(),
        )
        .unwrap();
        (Limits::shared(shared), metrics)
    }

    /// Generous: these tests are about semantics, not speed (CI has two busy cores).
    const TIMEOUT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn the_script_limits_like_the_local_gcra() {
        let Some(redis) = RedisServer::start("the_script_limits_like_the_local_gcra") else {
            return;
        };
        let (shared, metrics) = limits(&redis, FailPolicy::Closed, TIMEOUT);
        let local = Limits::local();
        let l = RateLimits {
            requests_per_second: 0.5,
            burst: 2,
            tokens_per_minute: 100,
        };
        let (a, b) = (caller("a", l), caller("b", l));
        for limits in [&shared, &local] {
            assert!(limits.check_request(&a).await.is_ok());
            assert!(limits.check_request(&a).await.is_ok());
            let err = limits.check_request(&a).await.unwrap_err();
            let LimitError::Rate(err @ RateError::Requests { .. }) = err else {
                panic!("{err:?}")
            };
            // One cell every two seconds: the wait is at most 2 s, rounded up to whole seconds.
            assert!((1..=2).contains(&err.retry_after_secs()), "{err:?}");

            // Tokens: all or none; a charge over the whole quota never conforms.
            let mut taken = Taken::default();
            assert!(limits.charge_tokens(&b, &mut taken, 60).await.is_ok());
            let err = limits.charge_tokens(&b, &mut taken, 60).await.unwrap_err();
            assert!(
                matches!(err, LimitError::Rate(RateError::Tokens { .. })),
                "{err:?}"
            );
            assert!(limits.charge_tokens(&b, &mut taken, 40).await.is_ok());
            let err = limits.charge_tokens(&b, &mut taken, 101).await.unwrap_err();
            assert!(
                matches!(err, LimitError::Rate(RateError::OverWholeQuota { .. })),
                "{err:?}"
            );
        }
        // The local limiters were not touched by the shared checks: each key had exactly one
        // burst per store.
        assert_eq!(
            metrics
                .limits_backend_errors
                .with_label_values(&["error"])
                .get()
                + metrics
                    .limits_backend_errors
                    .with_label_values(&["timeout"])
                    .get(),
            0
        );
    }

    #[tokio::test]
    async fn refunds_give_back_what_was_taken_and_no_more() {
        let Some(redis) = RedisServer::start("refunds_give_back_what_was_taken_and_no_more") else {
            return;
        };
        let (shared, _metrics) = limits(&redis, FailPolicy::Closed, TIMEOUT);
        let c = caller(
            "refunds",
            RateLimits {
                requests_per_second: 0.001,
                burst: 2,
                tokens_per_minute: 100,
            },
        );
        let first = shared.check_request(&c).await.unwrap();
        assert!(shared.check_request(&c).await.is_ok());
        assert!(shared.check_request(&c).await.is_err());
        shared.refund(&c, &first).await;
        assert!(shared.check_request(&c).await.is_ok(), "refunded cell");
        assert!(shared.check_request(&c).await.is_err());
        // Refunds beyond what was taken do not raise the burst.
        for _ in 0..10 {
            shared.refund(&c, &first).await;
        }
        assert!(shared.check_request(&c).await.is_ok());
        assert!(shared.check_request(&c).await.is_ok());
        assert!(shared.check_request(&c).await.is_err());

        let mut taken = Taken::default();
        shared.charge_tokens(&c, &mut taken, 100).await.unwrap();
        assert!(shared
            .charge_tokens(&c, &mut Taken::default(), 1)
            .await
            .is_err());
        shared.refund(&c, &taken).await;
        assert!(shared
            .charge_tokens(&c, &mut Taken::default(), 100)
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn redis_holds_hashes_with_a_ttl_and_never_the_key() {
        let Some(redis) = RedisServer::start("redis_holds_hashes_with_a_ttl_and_never_the_key")
        else {
            return;
        };
        let (shared, _metrics) = limits(&redis, FailPolicy::Closed, TIMEOUT);
        let c = caller(
            "secret-key-material",
            RateLimits {
                requests_per_second: 10.0,
                burst: 5,
                tokens_per_minute: 600,
            },
        );
        shared.check_request(&c).await.unwrap();
        shared
            .charge_tokens(&c, &mut Taken::default(), 60)
            .await
            .unwrap();
        let keys = redis.command("KEYS *");
        assert!(!keys.contains("secret-key-material"), "{keys}");
        for limit in [Limit::Requests, Limit::Tokens] {
            let key = limit.redis_key(&c.key_hash);
            assert!(keys.contains(&key), "{key} not in {keys}");
            // One cell of 100 ms, 60 tokens of 100 ms: the state expires when it stops
            // mattering, 100 ms or 6 s from now.
            let ttl: i64 = redis
                .command(&format!("PTTL {key}"))
                .trim()
                .trim_start_matches(':')
                .parse()
                .unwrap();
            assert!((1..=6000).contains(&ttl), "{key}: PTTL {ttl}");
        }
    }

    #[tokio::test]
    async fn a_dead_or_stalled_redis_fails_open_or_closed_within_the_deadline() {
        let Some(mut redis) = RedisServer::start("a_dead_or_stalled_redis_fails_open_or_closed")
        else {
            return;
        };
        let deadline = Duration::from_millis(50);
        let (open, open_metrics) = limits(&redis, FailPolicy::Open, deadline);
        let (closed, closed_metrics) = limits(&redis, FailPolicy::Closed, deadline);
        let l = RateLimits {
            requests_per_second: 0.001,
            burst: 1,
            tokens_per_minute: 0,
        };
        let (a, b) = (caller("open", l), caller("closed", l));
        assert!(open.check_request(&a).await.is_ok());
        assert!(open.check_request(&a).await.is_err(), "shared burst spent");
        assert!(closed.check_request(&b).await.is_ok());

        // Stalled: up, but no answer.
        redis.pause(true);
        let started = Instant::now();
        // Open: the local limiter, whose burst is untouched, lets one through, then limits.
        assert!(open.check_request(&a).await.is_ok());
        assert!(matches!(
            open.check_request(&a).await,
            Err(LimitError::Rate(_))
        ));
        assert_eq!(
            closed.check_request(&b).await.unwrap_err(),
            LimitError::Unavailable
        );
        // Three checks, each bounded by the deadline (the margin is for a busy machine).
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let timeouts = |m: &Metrics| {
            m.limits_backend_errors
                .with_label_values(&["timeout"])
                .get()
        };
        assert_eq!((timeouts(&open_metrics), timeouts(&closed_metrics)), (2, 1));

        // Dead.
        redis.kill();
        let c = caller("closed-2", l);
        assert_eq!(
            closed.check_request(&c).await.unwrap_err(),
            LimitError::Unavailable
        );
        let errors = closed_metrics
            .limits_backend_errors
            .with_label_values(&["error"])
            .get()
            + timeouts(&closed_metrics);
        assert!(errors >= 2, "{errors}");
    }
}
