//! Process lifecycle: resolve the model path and keys, bind, load and warm up the model in the
//! background while the port answers 503, serve, and on SIGINT/SIGTERM drain (see
//! [`crate::lifecycle`]) and stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState, MetricsRoute};
use crate::config::ServeArgs;
use crate::connections::{self, ConnectionConfig};
use crate::engine::ModelSource;
use crate::lifecycle::{Lifecycle, Phase};
use crate::limits::shared::SharedLimits;
use crate::limits::{KeyRing, Limits};
use crate::pipeline::Extractor;
use crate::telemetry::engine::MeteredEngine;
use crate::telemetry::Metrics;

/// A running server: its address, and a handle that ends with it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is, when `--metrics-port` put it on its own port.
    pub metrics_addr: Option<SocketAddr>,
    pub state: AppState,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Drain and stop, exactly as on SIGTERM.
    pub fn shutdown(&self) {
        self.state.lifecycle().request_shutdown();
    }
}

/// Check the model path and keys, bind, and start loading; returns once the port is bound.
pub async fn start(args: ServeArgs) -> anyhow::Result<Running> {
    // Before binding: a wrong path or key file must fail the start, not leave a server that never
    // gets ready or that nobody can use.
    let source = ModelSource::resolve(&args.extractor.model, args.extractor.tokenizer.as_deref())?;
    let keys = KeyRing::load(&args.auth())?;
    log_auth(&keys);
    let shared_limits = args.shared_limits().filter(|_| {
        if !keys.is_enabled() {
            tracing::warn!("--limits-redis ignored: with --no-auth there are no per-key limits");
        }
        keys.is_enabled()
    });
    if shared_limits.is_some() && args.key_hash_secret.is_none() {
        // Redis is keyed by the key's hash: with a random secret per process, no two replicas
        // would ever share a key's state.
        anyhow::bail!(
            "--limits-redis needs --key-hash-secret (MEMEX_KEY_HASH_SECRET), the same on every \
             replica: the shared limits are keyed by the key's hash under it"
        );
    }
    let listener = TcpListener::bind(args.addr()?).await?;
    let addr = listener.local_addr()?;
    let metrics_listener = match args.metrics_addr()? {
        Some(metrics_addr) => Some(TcpListener::bind(metrics_addr).await?),
        None => None,
    };
    let metrics_addr = metrics_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let metrics = Arc::new(Metrics::new());
    let limits = match shared_limits {
        Some(config) => {
            tracing::info!(redis = ?config.url, timeout = ?config.timeout, fail = ?config.fail,
                "per-key limits shared through Redis");
            Limits::shared(SharedLimits::connect(config, metrics.limits_backend())?)
        }
        None => Limits::local(),
    };
    let lifecycle = Lifecycle::new();
    let state = AppState::new(api::Parts {
        http: args.http(),
        keys,
        limits,
        admission: args.admission(),
        metrics: metrics.clone(),
        lifecycle: lifecycle.clone(),
    });
    tracing::info!(%addr, ?metrics_addr, "listening; loading model");

    let drain_timeout = args.drain_timeout();
    let connection_config = args.connections();
    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let loader_state = state.clone();
    tokio::spawn(async move {
        match load_and_warm_up(&source, &args, &loader_state).await {
            Ok(extractor) => {
                loader_state.set_ready(extractor);
                tracing::info!("ready");
            }
            Err(e) => {
                let _ = load_failed_tx.send(e);
            }
        }
    });

    let metrics_task = metrics_listener.map(|l| {
        let router = api::metrics_router(state.clone());
        let (config, metrics) = (connection_config.clone(), metrics.clone());
        tokio::spawn(connections::serve(
            l,
            router,
            config,
            metrics,
            std::future::pending(),
        ))
    });
    let metrics_route = match metrics_task {
        Some(_) => MetricsRoute::Separate,
        None => MetricsRoute::Included,
    };
    let router = api::router(state.clone(), metrics_route);
    let state_for_server = state.clone();
    let task = tokio::spawn(async move {
        let result = serve_until_drained(
            listener,
            router,
            Serving {
                state: state_for_server,
                connections: connection_config,
                metrics,
                lifecycle,
                drain_timeout,
            },
            load_failed_rx,
        )
        .await;
        if let Some(t) = metrics_task {
            t.abort();
        }
        result
    });
    Ok(Running {
        addr,
        metrics_addr,
        state,
        task,
    })
}

async fn load_and_warm_up(
    source: &ModelSource,
    args: &ServeArgs,
    state: &AppState,
) -> anyhow::Result<Arc<Extractor>> {
    let extractor = load(source, args, state.metrics()).await?;
    let info = extractor.engine().info();
    state
        .metrics()
        .model_load_seconds
        .set(info.load_time.as_secs_f64());
    state.lifecycle().advance(Phase::WarmingUp);
    let took = extractor
        .warm_up()
        .await
        .map_err(|e| anyhow::anyhow!("warm-up generation failed: {e}"))?;
    tracing::info!(seconds = took.as_secs_f64(), "warm-up generation done");
    Ok(extractor)
}

fn log_auth(keys: &KeyRing) {
    if keys.is_enabled() {
        tracing::info!(keys = ?keys.describe(), "API keys loaded (shown by hash)");
    } else {
        tracing::warn!(
            "authentication is OFF (--no-auth): anyone who can reach this port can use the model"
        );
    }
}

struct Serving {
    state: AppState,
    connections: ConnectionConfig,
    metrics: Arc<Metrics>,
    lifecycle: Arc<Lifecycle>,
    drain_timeout: Duration,
}

/// Serve until a shutdown is asked for, drain, then stop. A drain that times out leaves its
/// connections open; they are closed after a short grace rather than waited for.
async fn serve_until_drained(
    listener: TcpListener,
    router: axum::Router,
    serving: Serving,
    load_failed: tokio::sync::oneshot::Receiver<anyhow::Error>,
) -> anyhow::Result<()> {
    const CLOSE_GRACE: Duration = Duration::from_secs(2);
    let Serving {
        state,
        connections: config,
        metrics,
        lifecycle,
        drain_timeout,
    } = serving;
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    // New connections are still accepted while draining, so that late clients get a 503 with
    // `Retry-After` instead of a refused connection; accepting stops once the drain is done.
    let graceful = async move {
        shutdown_signal(&lifecycle).await;
        lifecycle.drain(drain_timeout).await;
        let _ = drained_tx.send(());
    };
    let server = connections::serve(listener, router, config, metrics, graceful);
    let engine_failed = engine_failure(state);
    let closed_after_drain = async {
        match drained_rx.await {
            Ok(()) => tokio::time::sleep(CLOSE_GRACE).await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = server => Ok(()),
        () = closed_after_drain => {
            tracing::warn!("connections still open after the drain; closing them");
            Ok(())
        }
        Ok(err) = load_failed => Err(err.context("loading the model failed")),
        why = engine_failed => {
            // Requests already waiting on the engine have failed with 500s; give their
            // answers a moment to be written, then exit non-zero for a restart.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Err(anyhow::anyhow!("{why}; exiting so that the process is restarted"))
        }
    }
}

/// Resolves with the reason once the engine can no longer generate. Polled: it is a rare event
/// and a quarter second to notice it is nothing next to a restart.
async fn engine_failure(state: AppState) -> String {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        if let Some(why) = state.extractor().and_then(|e| e.engine().failure()) {
            tracing::error!(error = %why, "the inference engine stopped");
            return why;
        }
    }
}

async fn load(
    source: &ModelSource,
    args: &ServeArgs,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<Extractor>> {
    let engine = crate::engine::load(
        args.extractor.engine,
        source,
        &args.extractor.mistral(),
        &args.extractor.native(),
    )
    .await?;
    let engine = MeteredEngine::wrap(engine, metrics.clone());
    metrics.watch_engine(engine.clone());
    let mut extractor = Extractor::new(engine, args.extractor.pipeline())?;
    extractor.fit_to_context().await?;
    Ok(Arc::new(extractor))
}

async fn shutdown_signal(lifecycle: &Lifecycle) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
        _ = lifecycle.shutdown_requested() => {},
    }
    tracing::info!("shutdown requested");
}
