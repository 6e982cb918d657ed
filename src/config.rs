//! Command line: every flag also reads a `MEMEX_*` environment variable. The effective
//! configuration is logged once at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::api::HttpConfig;
use crate::connections::ConnectionConfig;
use crate::engine::mistral::MistralOptions;
use crate::engine::native::{NativeDevice, NativeOptions, Quantize};
use crate::engine::EngineKind;
use crate::limits::admission::AdmissionConfig;
use crate::limits::auth::{AuthConfig, SecretKey};
use crate::limits::rate::RateLimits;
use crate::limits::shared::{FailPolicy, RedisUrl, SharedConfig};
use crate::pipeline::schema::{JsonLayout, OutputLimits};
use crate::pipeline::PipelineConfig;

#[derive(Debug, Parser)]
#[command(
    name = "memex",
    version,
    about = "Turns chat dialogue into structured memories"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start and moved out at once: the size of the serve variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve POST /extract/memory on a local model.
    Serve(ServeArgs),
    /// Extract memories from a JSONL file of requests, in-process, into a JSONL file of answers
    /// (resumable; README, "Offline extraction").
    Extract(crate::batch::ExtractArgs),
    /// Run a labelled dataset and report extraction quality (docs/eval.md).
    Eval(crate::eval::EvalArgs),
    /// Print, as JSON lines, the engine requests (chat messages, JSON schema, token bound) that
    /// an /extract/memory request body read from stdin turns into. Needs no model.
    Render {
        /// A folder of templates replacing the built-in ones by file name, as for `serve`.
        #[arg(long, env = "MEMEX_TEMPLATES")]
        templates: Option<PathBuf>,
    },
    /// Write a random-weight Qwen3 into a directory: the tiny one of tests and smoke runs, or
    /// one in the production extractor's shape for benchmarks.
    TinyModel {
        /// Directory to write into (created if missing).
        dir: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = crate::tiny_model::Preset::Tiny)]
        preset: crate::tiny_model::Preset,
        /// A directory with `tokenizer.json` and `tokenizer_config.json` to ship instead of the
        /// byte-level tokenizer (e.g. Qwen3's, for real token counts).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
}

/// What builds an [`crate::pipeline::Extractor`]: the model, the engine that runs it, and the
/// limits every request is held to. One struct, flattened into every command that extracts, so
/// `serve`, `extract` and `eval` take the same flags and hold requests to the same limits.
#[derive(Debug, Clone, Args)]
pub struct ExtractorArgs {
    /// Local safetensors model directory, or a local .gguf file. Never downloaded.
    #[arg(long, env = "MEMEX_MODEL")]
    pub model: PathBuf,

    /// For a .gguf model: a directory with tokenizer.json and tokenizer_config.json to use
    /// instead of the tokenizer in the GGUF metadata.
    #[arg(long, env = "MEMEX_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,

    /// Which engine runs the model: the dedicated continuous-batching engine (on the CPU, or the
    /// GPU with `--native-device cuda`), or mistralrs (the reference backend). Default: native,
    /// or mistralrs in a `cuda` build.
    #[arg(long, env = "MEMEX_ENGINE", value_enum, default_value_t = EngineKind::DEFAULT)]
    pub engine: EngineKind,

    /// Native engine: where the forward pass runs. `cpu`: our CPU kernels; `cuda`: candle's GPU
    /// kernels in bf16 (a `cuda` build); `cpu-tensors`: the GPU code path on the CPU, to check it
    /// without a GPU. Default: cpu, or cuda in a `cuda` build.
    #[arg(long, env = "MEMEX_NATIVE_DEVICE", value_enum, default_value_t = NativeDevice::DEFAULT)]
    pub native_device: NativeDevice,

    /// Native engine: what a safetensors checkpoint's linear layers become as they load: `q8_0`
    /// (a quarter of f32, logits within ~1%), `q4_0`, or `none` (dense). Default: q8_0 on the
    /// CPU, the checkpoint's precision on a GPU. GGUF files keep their own types.
    #[arg(long, env = "MEMEX_QUANTIZE", value_enum)]
    pub quantize: Option<Quantize>,

    /// Native engine: memory for the KV block pool, in MiB (pages are touched only when used).
    #[arg(long, env = "MEMEX_KV_CACHE_MB", default_value_t = NativeOptions::default().kv_cache_bytes >> 20, value_parser = megabytes)]
    pub kv_cache_mb: usize,

    /// Native engine: reuse the KV blocks of prompt prefixes already computed (the branch
    /// templates), so a request computes only what differs from earlier ones.
    #[arg(long, env = "MEMEX_PREFIX_CACHE", default_value_t = NativeOptions::default().prefix_cache, action = clap::ArgAction::Set)]
    pub prefix_cache: bool,

    /// Native engine: most tokens one step runs (decode tokens plus prefill chunks).
    #[arg(long, env = "MEMEX_STEP_TOKENS", default_value_t = NativeOptions::default().step_tokens)]
    pub step_tokens: usize,

    /// Most input tokens (all message contents, served model's tokenizer) a request may carry.
    #[arg(long, env = "MEMEX_MAX_INPUT_TOKENS", default_value_t = PipelineConfig::default().max_input_tokens)]
    pub max_input_tokens: usize,

    /// Largest request body accepted, in bytes.
    #[arg(long, env = "MEMEX_MAX_BODY_BYTES", default_value_t = HttpConfig::default().max_body_bytes)]
    pub max_body_bytes: usize,

    /// Most items one branch returns (memories, or preferences of one kind).
    #[arg(long, env = "MEMEX_MAX_ITEMS", default_value_t = OutputLimits::default().max_items)]
    pub max_items: usize,

    /// Longest memory value, preference or reasoning, in characters.
    #[arg(long, env = "MEMEX_MAX_TEXT_CHARS", default_value_t = OutputLimits::default().max_text_chars)]
    pub max_text_chars: usize,

    /// Longest memory key or tag, in characters.
    #[arg(long, env = "MEMEX_MAX_LABEL_CHARS", default_value_t = OutputLimits::default().max_label_chars)]
    pub max_label_chars: usize,

    /// Most tags per memory.
    #[arg(long, env = "MEMEX_MAX_TAGS", default_value_t = OutputLimits::default().max_tags)]
    pub max_tags: usize,

    /// Whitespace the grammar allows in the model's JSON: `spaced` (bounded, the model's own
    /// layout: what instruct models write) or `compact` (none: for an extractor fine-tuned on
    /// compact JSON).
    #[arg(long, env = "MEMEX_JSON_LAYOUT", value_enum, default_value_t = JsonLayout::Spaced)]
    pub json_layout: JsonLayout,

    /// A folder of prompt templates replacing the built-in ones by file name (see README); a
    /// template it lacks stays built in.
    #[arg(long, env = "MEMEX_TEMPLATES")]
    pub templates: Option<PathBuf>,

    /// Most sequences the engine runs at once.
    #[arg(long, env = "MEMEX_MAX_NUM_SEQS", default_value_t = NativeOptions::default().max_running)]
    pub max_num_seqs: usize,

    /// DRY repetition penalty multiplier applied inside JSON strings (0 turns it off).
    #[arg(long, env = "MEMEX_REPETITION_GUARD", default_value_t = NativeOptions::default().repetition_guard)]
    pub repetition_guard: f32,

    /// Fraction of GPU memory given to the PagedAttention KV cache (CUDA builds).
    #[arg(long, env = "MEMEX_GPU_MEMORY_FRACTION", default_value_t = MistralOptions::default().gpu_memory_fraction)]
    pub gpu_memory_fraction: f32,

    /// Fault injection for tests of a dying engine: the native engine's thread panics when it
    /// takes this many-th generation (the warm-up is the first). Never set it in production.
    #[arg(long, env = "MEMEX_FAULT_ENGINE_PANIC_AT", hide = true)]
    pub fault_engine_panic_at: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The model, the engine and the request limits: shared with `extract` and `eval`.
    #[command(flatten)]
    pub extractor: ExtractorArgs,

    #[arg(long, env = "MEMEX_HOST", default_value = "0.0.0.0")]
    pub host: String,

    #[arg(long, env = "MEMEX_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Log as JSON lines instead of text.
    #[arg(long, env = "MEMEX_LOG_JSON")]
    pub log_json: bool,

    /// API key file: one key per line, optionally followed by `rps=N burst=N tpm=N`.
    #[arg(long, env = "MEMEX_API_KEYS")]
    pub api_keys: Option<PathBuf>,

    /// API keys (comma-separated in MEMEX_API_KEY; prefer the variable, the flag shows in `ps`).
    #[arg(
        long,
        env = "MEMEX_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<SecretKey>,

    /// Secret under which logs hash API keys (`key_hash`); random per process when unset, so
    /// the hashes then change on restart.
    #[arg(long, env = "MEMEX_KEY_HASH_SECRET", hide_env_values = true)]
    pub key_hash_secret: Option<SecretKey>,

    /// Serve without authentication (logged as a warning at start).
    #[arg(long, env = "MEMEX_NO_AUTH")]
    pub no_auth: bool,

    /// Requests per second per key, for keys that set no `rps=` (0 = unlimited).
    #[arg(long, env = "MEMEX_RATE_RPS", default_value_t = 10.0, value_parser = crate::limits::rate::parse_rps)]
    pub rate_rps: f64,

    /// Requests a key may send back to back before `--rate-rps` applies.
    #[arg(long, env = "MEMEX_RATE_BURST", default_value_t = 20)]
    pub rate_burst: u32,

    /// Input tokens per minute per key, for keys that set no `tpm=` (0 = unlimited).
    #[arg(long, env = "MEMEX_TOKENS_PER_MINUTE", default_value_t = 100_000)]
    pub tokens_per_minute: u32,

    /// Share every key's limits (`rps`, `burst`, `tpm`) across replicas through this Redis
    /// (`redis://[:password@]host:port[/db]`) instead of each replica keeping its own. Needs the
    /// same --key-hash-secret on every replica (Redis is keyed by the key's hash).
    #[arg(long, env = "MEMEX_LIMITS_REDIS", hide_env_values = true)]
    pub limits_redis: Option<RedisUrl>,

    /// When the shared limits do not answer within --limits-redis-timeout: `open` serves with
    /// this replica's own limits (logged and counted), `closed` answers 503/50004.
    #[arg(long, env = "MEMEX_LIMITS_REDIS_FAIL", value_enum, default_value_t = FailPolicy::Open)]
    pub limits_redis_fail: FailPolicy,

    /// Longest a request waits for each check of the shared limits, in seconds (default 10 ms:
    /// tens of typical round trips, so what trips it is a Redis that is down or stalled).
    #[arg(long, env = "MEMEX_LIMITS_REDIS_TIMEOUT", default_value_t = 0.01, value_parser = positive_seconds)]
    pub limits_redis_timeout: f64,

    /// Most requests generating at once: the cap of the adaptive limit, which admission moves
    /// between 1 and this from measured latency (README, "Admission").
    #[arg(long, env = "MEMEX_MAX_CONCURRENT", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent: u32,

    /// Longest a request may take from arrival to answer, in seconds; a request predicted to
    /// miss it is refused at once, one that reaches it is cancelled (503 either way). A client
    /// may ask for less with the `x-request-timeout` header.
    #[arg(long, env = "MEMEX_REQUEST_TIMEOUT", default_value_t = 30.0, value_parser = positive_seconds)]
    pub request_timeout: f64,

    /// Requests waiting for a generation slot; beyond it, 503 at once (0 = no queue).
    #[arg(long, env = "MEMEX_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Longest wait for a generation slot before a 503, in seconds.
    #[arg(long, env = "MEMEX_QUEUE_TIMEOUT", default_value_t = 30.0, value_parser = seconds)]
    pub queue_timeout: f64,

    /// Longest predicted wait for a generation slot a request is queued for, in seconds: a
    /// longer one is refused at once, and a queued request whose slot comes later than this
    /// (plus a quarter second) is refused then. The default keeps every refusal under half a
    /// second; raise it for clients that would rather wait than retry.
    #[arg(long, env = "MEMEX_MAX_SLOT_WAIT", default_value_t = 0.25, value_parser = seconds)]
    pub max_slot_wait: f64,

    /// On SIGTERM/SIGINT, longest wait for accepted requests before exiting, in seconds.
    #[arg(long, env = "MEMEX_DRAIN_TIMEOUT", default_value_t = 30.0, value_parser = seconds)]
    pub drain_timeout: f64,

    /// Longest a request head may take to arrive, from its first byte, in seconds; then the
    /// connection is closed.
    #[arg(long, env = "MEMEX_HEADER_READ_TIMEOUT", default_value_t = ConnectionConfig::default().header_read_timeout.as_secs_f64(), value_parser = positive_seconds)]
    pub header_read_timeout: f64,

    /// Longest the whole request body may take to arrive, in seconds; then 408.
    #[arg(long, env = "MEMEX_BODY_READ_TIMEOUT", default_value_t = HttpConfig::default().body_read_timeout.as_secs_f64(), value_parser = positive_seconds)]
    pub body_read_timeout: f64,

    /// Longest a keep-alive connection may wait for its next request, in seconds.
    #[arg(long, env = "MEMEX_IDLE_TIMEOUT", default_value_t = ConnectionConfig::default().idle_timeout.as_secs_f64(), value_parser = positive_seconds)]
    pub idle_timeout: f64,

    /// Most connections open at once (API and metrics port each); beyond, a 503 and a close.
    #[arg(long, env = "MEMEX_MAX_CONNECTIONS", default_value_t = ConnectionConfig::default().max_connections as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Serve /metrics on this port instead of the API port (0 = any free port).
    #[arg(long, env = "MEMEX_METRICS_PORT")]
    pub metrics_port: Option<u16>,
}

/// A KV pool size whose byte count fits a `usize`.
fn megabytes(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|mb| *mb >= 1 && mb.checked_mul(1 << 20).is_some())
        .ok_or_else(|| {
            format!(
                "`{s}` is not a size in MiB between 1 and {}",
                usize::MAX >> 20
            )
        })
}

/// A timeout: more than zero (zero would close every connection at once), at most a day.
fn positive_seconds(s: &str) -> Result<f64, String> {
    seconds(s)
        .ok()
        .filter(|v| *v > 0.0)
        .ok_or_else(|| format!("`{s}` is not a number of seconds above 0 and at most 86400"))
}

fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds between 0 and 86400"
        )),
    }
}

impl ExtractorArgs {
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            max_input_tokens: self.max_input_tokens,
            limits: OutputLimits {
                max_items: self.max_items,
                max_text_chars: self.max_text_chars,
                max_label_chars: self.max_label_chars,
                max_tags: self.max_tags,
                layout: self.json_layout,
            },
            templates: self.templates.clone(),
        }
    }

    pub fn native(&self) -> NativeOptions {
        NativeOptions {
            max_running: self.max_num_seqs,
            step_tokens: self.step_tokens,
            // Checked when parsed (`megabytes`).
            kv_cache_bytes: self.kv_cache_mb.saturating_mul(1 << 20),
            repetition_guard: self.repetition_guard,
            prefix_cache: self.prefix_cache,
            device: self.native_device,
            quantize: self.quantize,
            panic_at_submission: self.fault_engine_panic_at,
            ..NativeOptions::default()
        }
    }

    pub fn mistral(&self) -> MistralOptions {
        MistralOptions {
            repetition_guard: self.repetition_guard,
            max_num_seqs: self.max_num_seqs,
            gpu_memory_fraction: self.gpu_memory_fraction,
        }
    }
}

impl ServeArgs {
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(format!("{}:{}", self.host, self.port).parse()?)
    }

    pub fn http(&self) -> HttpConfig {
        HttpConfig {
            max_body_bytes: self.extractor.max_body_bytes,
            body_read_timeout: Duration::from_secs_f64(self.body_read_timeout),
        }
    }

    pub fn connections(&self) -> ConnectionConfig {
        ConnectionConfig {
            header_read_timeout: Duration::from_secs_f64(self.header_read_timeout),
            idle_timeout: Duration::from_secs_f64(self.idle_timeout),
            max_connections: self.max_connections as usize,
        }
    }

    pub fn auth(&self) -> AuthConfig {
        AuthConfig {
            no_auth: self.no_auth,
            key_file: self.api_keys.clone(),
            keys: self.api_key.clone(),
            defaults: RateLimits {
                requests_per_second: self.rate_rps,
                burst: self.rate_burst,
                tokens_per_minute: self.tokens_per_minute,
            },
            hash_secret: self.key_hash_secret.clone(),
        }
    }

    /// `--limits-redis*`, when the limits are shared.
    pub fn shared_limits(&self) -> Option<SharedConfig> {
        self.limits_redis.as_ref().map(|url| SharedConfig {
            url: url.clone(),
            timeout: Duration::from_secs_f64(self.limits_redis_timeout),
            fail: self.limits_redis_fail,
        })
    }

    pub fn admission(&self) -> AdmissionConfig {
        AdmissionConfig {
            max_concurrent: self.max_concurrent as usize,
            max_queue: self.max_queue,
            queue_timeout: Duration::from_secs_f64(self.queue_timeout),
            max_slot_wait: Duration::from_secs_f64(self.max_slot_wait),
            request_timeout: Duration::from_secs_f64(self.request_timeout),
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout)
    }

    /// Where `/metrics` is served, when not on the API port.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        self.metrics_port
            .map(|port| Ok(format!("{}:{port}", self.host).parse()?))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `memex serve --model /m` with `extra` flags.
    fn serve(extra: &[&str]) -> ServeArgs {
        let argv = ["memex", "serve", "--model", "/m"].iter().chain(extra);
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not the serve command")
        };
        args
    }

    #[test]
    fn flags_parse_with_defaults() {
        let args = serve(&["--max-items", "3"]);
        assert_eq!(args.port, 8080);
        assert_eq!(args.extractor.max_input_tokens, 8000);
        assert_eq!(args.extractor.pipeline().limits.max_items, 3);
        assert_eq!(args.addr().unwrap().to_string(), "0.0.0.0:8080");
        let admission = args.admission();
        assert_eq!((admission.max_concurrent, admission.max_queue), (64, 64));
        assert_eq!(admission.queue_timeout, Duration::from_secs(30));
        assert_eq!(admission.request_timeout, Duration::from_secs(30));
        assert_eq!(args.drain_timeout(), Duration::from_secs(30));
        assert!(args.metrics_addr().unwrap().is_none());
        let c = args.connections();
        assert_eq!(
            (c.header_read_timeout, c.idle_timeout, c.max_connections),
            (Duration::from_secs(10), Duration::from_secs(75), 512)
        );
        assert_eq!(args.http().body_read_timeout, Duration::from_secs(30));
        let auth = args.auth();
        assert!(!auth.no_auth && auth.key_file.is_none());
        assert_eq!(auth.defaults.tokens_per_minute, 100_000);
        assert!(
            args.shared_limits().is_none(),
            "limits are per replica by default"
        );
    }

    #[test]
    fn shared_limits_flags_parse_and_hide_the_password() {
        let args = serve(&["--limits-redis", "redis://:hunter2@redis.example:6379/0"]);
        let shared = args.shared_limits().unwrap();
        assert_eq!(shared.fail, FailPolicy::Open);
        assert_eq!(shared.timeout, Duration::from_millis(10));
        let shown = format!("{args:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis.example:6379"), "{shown}");

        let args = serve(&[
            "--limits-redis",
            "redis://127.0.0.1:6379",
            "--limits-redis-fail",
            "closed",
            "--limits-redis-timeout",
            "0.25",
        ]);
        let shared = args.shared_limits().unwrap();
        assert_eq!(shared.fail, FailPolicy::Closed);
        assert_eq!(shared.timeout, Duration::from_millis(250));
        for bad in [
            ["--limits-redis", "http://not-redis"],
            ["--limits-redis-fail", "maybe"],
            ["--limits-redis-timeout", "0"],
        ] {
            let mut argv = vec!["memex", "serve", "--model", "/m"];
            argv.extend(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serving_flags_parse() {
        let args = serve(&[
            "--api-key",
            "sekrit1,sekrit2",
            "--queue-timeout",
            "0.5",
            "--max-concurrent",
            "2",
            "--metrics-port",
            "9100",
        ]);
        assert_eq!(args.api_key.len(), 2);
        assert_eq!(args.admission().queue_timeout, Duration::from_millis(500));
        assert_eq!(args.admission().max_concurrent, 2);
        assert_eq!(args.metrics_addr().unwrap().unwrap().port(), 9100);
        // The effective configuration is logged at start: no key in it.
        let shown = format!("{args:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
        for bad in [
            ["--max-concurrent", "0"],
            ["--queue-timeout", "-1"],
            ["--drain-timeout", "soon"],
            ["--header-read-timeout", "0"],
            ["--idle-timeout", "inf"],
            ["--max-connections", "0"],
            ["--rate-rps", "1e-300"],
            ["--rate-rps", "inf"],
            ["--rate-rps", "NaN"],
            ["--kv-cache-mb", "18446744073709551615"],
            ["--kv-cache-mb", "17592186044416"],
        ] {
            let mut argv = vec!["memex", "serve", "--model", "/m"];
            argv.extend(bad);
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn model_is_required() {
        assert!(
            Cli::try_parse_from(["memex", "serve"]).is_err()
                || std::env::var("MEMEX_MODEL").is_ok()
        );
    }
}
