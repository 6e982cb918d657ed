//! API keys: `Authorization: Token <key>`.
//!
//! Keys come from a key file (one per line, each with optional limits) and/or `MEMEX_API_KEY`.
//! Only their SHA-256 digests are kept. A presented key is hashed and compared with every known
//! digest in constant time, so neither the time taken nor an early exit tells an attacker how much
//! of a key was right, or which key was close.
//!
//! Logs name a caller by [`KeyHash`]: the first 12 hex digits of HMAC-SHA256 of the key under a
//! per-deployment secret (`--key-hash-secret` / `MEMEX_KEY_HASH_SECRET`), never by the key. An
//! unkeyed digest in a log would let anyone holding the log confirm a guessed weak key offline;
//! with the secret they cannot. Without a configured secret a random one is drawn at start: the
//! hashes are then stable only for the life of the process (set the secret to compare logs
//! across restarts and replicas). Metrics never name a caller.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use axum::http::HeaderValue;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::rate::{KeyLimiter, RateLimits};

/// A key as given on the command line or in the environment. Its `Debug` is redacted because the
/// effective configuration is logged at start.
#[derive(Clone)]
pub struct SecretKey(String);

impl SecretKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for SecretKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() || s.chars().any(char::is_whitespace) {
            return Err("an API key must be non-empty and hold no whitespace".into());
        }
        Ok(Self(s.to_string()))
    }
}

/// The first 12 hex digits of a key's HMAC-SHA256 under the deployment's secret: enough to tell
/// keys apart in logs, useless for recovering or confirming a key without the secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyHash(String);

impl KeyHash {
    /// The hash of `key` under `secret` (what a deployment with `MEMEX_KEY_HASH_SECRET=secret`
    /// logs for it).
    pub fn of(secret: &str, key: &str) -> Self {
        KeyHasher::new(Some(secret)).hash(key)
    }

    fn from_digest(d: &[u8; 32]) -> Self {
        Self(d[..6].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// The caller of a server run with `--no-auth`.
    pub fn anonymous() -> Self {
        Self("anonymous".into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Computes [`KeyHash`]es under one secret.
#[derive(Clone)]
pub struct KeyHasher {
    secret: Vec<u8>,
}

impl KeyHasher {
    /// Under `secret`, or under 32 random bytes drawn now when there is none.
    pub fn new(secret: Option<&str>) -> Self {
        let secret = match secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                // Two v4 UUIDs: 244 bits from the operating system's generator.
                let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
                [a.as_bytes().as_slice(), b.as_bytes().as_slice()].concat()
            }
        };
        Self { secret }
    }

    pub fn hash(&self, key: &str) -> KeyHash {
        KeyHash::from_digest(&hmac_sha256(&self.secret, key.as_bytes()))
    }
}

/// HMAC-SHA256 (RFC 2104): H((K ^ opad) || H((K ^ ipad) || message)), K padded to the block.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// An authenticated caller: who it is (for logs) and its own limiters.
#[derive(Debug)]
pub struct Caller {
    pub key_hash: KeyHash,
    pub limiter: KeyLimiter,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send the header `Authorization: Token <your key>`")]
    Missing,
    #[error("malformed Authorization header: expected `Token <your key>`")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
}

/// One key and its limits, as loaded.
pub struct KeySpec {
    key: SecretKey,
    limits: RateLimits,
}

impl KeySpec {
    pub fn new(key: SecretKey, limits: RateLimits) -> Self {
        Self { key, limits }
    }
}

struct KeyEntry {
    digest: [u8; 32],
    caller: Arc<Caller>,
}

/// Where keys come from; see [`KeyRing::load`].
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub no_auth: bool,
    pub key_file: Option<PathBuf>,
    pub keys: Vec<SecretKey>,
    /// Limits of keys that set none of their own.
    pub defaults: RateLimits,
    /// The secret key hashes in logs are computed under; random per process when `None`.
    pub hash_secret: Option<SecretKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeySetupError {
    #[error("reading the API key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API key file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("API key {hash} is given twice (a key has one set of limits)")]
    Duplicate { hash: KeyHash },
    #[error(
        "no API keys: give --api-keys FILE and/or MEMEX_API_KEY, or turn authentication off explicitly with --no-auth"
    )]
    NoKeys,
    #[error("--no-auth was given together with API keys; choose one")]
    Conflicting,
}

pub struct KeyRing {
    /// Empty when authentication is off.
    entries: Vec<KeyEntry>,
    /// The single caller every request is when authentication is off.
    anonymous: Option<Arc<Caller>>,
}

impl KeyRing {
    /// Authentication off: every request is the same anonymous caller, without rate limits (the
    /// limits are per key, and there are no keys). Admission still bounds the load.
    pub fn disabled() -> Self {
        Self {
            entries: Vec::new(),
            anonymous: Some(Arc::new(Caller {
                key_hash: KeyHash::anonymous(),
                limiter: KeyLimiter::new(RateLimits::UNLIMITED),
            })),
        }
    }

    pub fn new(specs: Vec<KeySpec>, hasher: &KeyHasher) -> Result<Self, KeySetupError> {
        if specs.is_empty() {
            return Err(KeySetupError::NoKeys);
        }
        let mut entries: Vec<KeyEntry> = Vec::with_capacity(specs.len());
        for spec in specs {
            let d = digest(spec.key.expose());
            let key_hash = hasher.hash(spec.key.expose());
            if entries.iter().any(|e| e.digest == d) {
                return Err(KeySetupError::Duplicate { hash: key_hash });
            }
            entries.push(KeyEntry {
                digest: d,
                caller: Arc::new(Caller {
                    key_hash,
                    limiter: KeyLimiter::new(spec.limits),
                }),
            });
        }
        Ok(Self {
            entries,
            anonymous: None,
        })
    }

    /// Keys from the file, then from the environment; or none with `--no-auth`.
    pub fn load(config: &AuthConfig) -> Result<Self, KeySetupError> {
        if config.no_auth {
            if config.key_file.is_some() || !config.keys.is_empty() {
                return Err(KeySetupError::Conflicting);
            }
            return Ok(Self::disabled());
        }
        let hasher = KeyHasher::new(config.hash_secret.as_ref().map(SecretKey::expose));
        let mut specs = Vec::new();
        if let Some(path) = &config.key_file {
            let text = std::fs::read_to_string(path).map_err(|source| KeySetupError::Read {
                path: path.clone(),
                source,
            })?;
            specs.extend(parse_key_file(&text, path, &config.defaults)?);
        }
        specs.extend(
            config
                .keys
                .iter()
                .map(|k| KeySpec::new(k.clone(), config.defaults)),
        );
        Self::new(specs, &hasher)
    }

    pub fn is_enabled(&self) -> bool {
        self.anonymous.is_none()
    }

    /// Short hashes of the known keys with their limits, for the start-up log.
    pub fn describe(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|e| {
                let l = e.caller.limiter.limits();
                format!(
                    "{} rps={} burst={} tpm={}",
                    e.caller.key_hash, l.requests_per_second, l.burst, l.tokens_per_minute
                )
            })
            .collect()
    }

    pub fn authenticate(&self, header: Option<&HeaderValue>) -> Result<Arc<Caller>, AuthError> {
        if let Some(anonymous) = &self.anonymous {
            return Ok(anonymous.clone());
        }
        let key = token_from_header(header)?;
        let presented = digest(key);
        // Every entry is compared, and the match is selected without a branch on the bytes.
        let mut index = u32::MAX;
        for (i, entry) in self.entries.iter().enumerate() {
            let equal = entry.digest.ct_eq(&presented);
            index.conditional_assign(&(i as u32), equal);
        }
        self.entries
            .get(index as usize)
            .map(|e| e.caller.clone())
            .ok_or(AuthError::Unknown)
    }
}

/// `Token <key>`; the scheme is case-insensitive like every HTTP auth scheme.
fn token_from_header(header: Option<&HeaderValue>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?.trim();
    let (scheme, key) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("token")
        || key.is_empty()
        || key.chars().any(char::is_whitespace)
    {
        return Err(AuthError::Malformed);
    }
    Ok(key)
}

/// The key file: one key per line, then optional `rps=N burst=N tpm=N` (unset ones take the
/// defaults). Blank lines and lines starting with `#` are skipped. Errors name the line, never the
/// key.
pub fn parse_key_file(
    text: &str,
    path: &Path,
    defaults: &RateLimits,
) -> Result<Vec<KeySpec>, KeySetupError> {
    let mut specs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: String| KeySetupError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let mut fields = line.split_whitespace();
        let key = fields.next().unwrap_or_default();
        if key.contains('=') {
            return Err(bad("a line starts with the key, then its settings".into()));
        }
        let mut limits = *defaults;
        for field in fields {
            let (name, value) = field
                .split_once('=')
                .ok_or_else(|| bad(format!("`{field}` is not name=value")))?;
            let invalid = || bad(format!("`{field}`: not a valid number"));
            match name {
                "rps" => {
                    limits.requests_per_second = super::rate::parse_rps(value)
                        .map_err(|why| bad(format!("`{field}`: {why}")))?
                }
                "burst" => limits.burst = value.parse().map_err(|_| invalid())?,
                "tpm" => limits.tokens_per_minute = value.parse().map_err(|_| invalid())?,
                other => {
                    return Err(bad(format!(
                        "unknown setting `{other}` (known: rps, burst, tpm)"
                    )))
                }
            }
        }
        specs.push(KeySpec::new(SecretKey(key.to_string()), limits));
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: RateLimits = RateLimits {
        requests_per_second: 5.0,
        burst: 10,
        tokens_per_minute: 1000,
    };

    const SECRET: &str = "deployment-secret";

    fn hasher() -> KeyHasher {
        KeyHasher::new(Some(SECRET))
    }

    fn ring(text: &str) -> KeyRing {
        KeyRing::new(
            parse_key_file(text, Path::new("keys"), &DEFAULTS).unwrap(),
            &hasher(),
        )
        .unwrap()
    }

    fn header(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn known_keys_authenticate_with_their_own_limits() {
        let r = ring("# team A\nalpha-key rps=1 burst=2\n\n  beta-key tpm=50  \n");
        let a = r.authenticate(Some(&header("Token alpha-key"))).unwrap();
        assert_eq!(a.key_hash, KeyHash::of(SECRET, "alpha-key"));
        assert_eq!(
            a.limiter.limits(),
            RateLimits {
                requests_per_second: 1.0,
                burst: 2,
                tokens_per_minute: 1000
            }
        );
        let b = r.authenticate(Some(&header("token beta-key"))).unwrap();
        assert_eq!(b.limiter.limits().tokens_per_minute, 50);
        assert_eq!(b.limiter.limits().requests_per_second, 5.0);
    }

    #[test]
    fn missing_malformed_and_unknown_are_told_apart() {
        let r = ring("alpha-key");
        assert_eq!(r.authenticate(None).unwrap_err(), AuthError::Missing);
        for bad in [
            "alpha-key",
            "Bearer alpha-key",
            "Token",
            "Token ",
            "Token a b",
        ] {
            assert_eq!(
                r.authenticate(Some(&header(bad))).unwrap_err(),
                AuthError::Malformed,
                "{bad}"
            );
        }
        for unknown in ["Token alpha-ke", "Token alpha-key2", "Token ALPHA-KEY"] {
            assert_eq!(
                r.authenticate(Some(&header(unknown))).unwrap_err(),
                AuthError::Unknown
            );
        }
    }

    #[test]
    fn key_file_errors_name_the_line_not_the_key() {
        let err = parse_key_file("ok-key\nsecret-key rps=fast", Path::new("k"), &DEFAULTS)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("line 2") && !err.contains("secret-key"),
            "{err}"
        );
        let err = parse_key_file("secret-key colour=red", Path::new("k"), &DEFAULTS)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("colour") && !err.contains("secret-key"),
            "{err}"
        );
        let dup = KeyRing::new(
            parse_key_file("k1\nk1", Path::new("k"), &DEFAULTS).unwrap(),
            &hasher(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(!dup.contains("k1 ") && dup.contains(KeyHash::of(SECRET, "k1").as_str()));
        for bad in ["rps=1e-300", "rps=inf", "rps=NaN", "rps=-1"] {
            let err = parse_key_file(&format!("secret-key {bad}"), Path::new("k"), &DEFAULTS)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"))
                .to_string();
            assert!(
                err.contains("line 1") && !err.contains("secret-key"),
                "{err}"
            );
        }
    }

    #[test]
    fn auth_is_off_only_explicitly() {
        let base = AuthConfig {
            no_auth: false,
            key_file: None,
            keys: vec![],
            defaults: DEFAULTS,
            hash_secret: None,
        };
        assert!(matches!(KeyRing::load(&base), Err(KeySetupError::NoKeys)));
        let off = KeyRing::load(&AuthConfig {
            no_auth: true,
            ..base.clone()
        })
        .unwrap();
        assert!(!off.is_enabled());
        assert_eq!(
            off.authenticate(None).unwrap().key_hash,
            KeyHash::anonymous()
        );
        let both = AuthConfig {
            no_auth: true,
            keys: vec!["k".parse().unwrap()],
            ..base.clone()
        };
        assert!(matches!(
            KeyRing::load(&both),
            Err(KeySetupError::Conflicting)
        ));
        let env = KeyRing::load(&AuthConfig {
            keys: vec!["env-key".parse().unwrap()],
            ..base
        })
        .unwrap();
        assert!(env.authenticate(Some(&header("Token env-key"))).is_ok());
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let k: SecretKey = "super-secret".parse().unwrap();
        let shown = format!("{k:?}");
        assert!(!shown.contains("super-secret"), "{shown}");
    }

    #[test]
    fn key_hashes_are_keyed() {
        // RFC 4231, test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Not the unkeyed digest prefix, which would confirm a guessed key offline.
        let unkeyed = KeyHash::from_digest(&digest("weak-key"));
        assert_ne!(KeyHash::of(SECRET, "weak-key"), unkeyed);
        assert_ne!(
            KeyHash::of("other", "weak-key"),
            KeyHash::of(SECRET, "weak-key")
        );
        // Stable under one secret; a random secret per process otherwise.
        assert_eq!(hasher().hash("k"), hasher().hash("k"));
        assert_ne!(
            KeyHasher::new(None).hash("k"),
            KeyHasher::new(None).hash("k")
        );
        assert_eq!(KeyHash::of(SECRET, "k").as_str().len(), 12);
    }
}
