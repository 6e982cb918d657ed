//! Process lifecycle: resolve the model path, bind, load the model in the background while the
//! port answers 503, then serve until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::ServeArgs;
use crate::engine::ModelSource;
use crate::pipeline::Extractor;

/// A running server: its address, and a handle that ends with it.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Check the model path, bind, and start loading; returns once the port is bound.
pub async fn start(args: ServeArgs) -> anyhow::Result<Running> {
    // Before binding: a wrong path must fail the start, not leave a server that never gets ready.
    let source = ModelSource::resolve(&args.model, args.tokenizer.as_deref())?;
    let listener = TcpListener::bind(args.addr()?).await?;
    let addr = listener.local_addr()?;
    let state = AppState::new(args.http());
    tracing::info!(%addr, "listening; loading model");

    let (load_failed_tx, load_failed_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    let loader_state = state.clone();
    tokio::spawn(async move {
        match load(&source, &args).await {
            Ok(extractor) => loader_state.set_ready(extractor),
            Err(e) => {
                let _ = load_failed_tx.send(e);
            }
        }
    });

    let router = api::router(state.clone());
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, router).with_graceful_shutdown(shutdown_signal());
        tokio::select! {
            served = server => Ok(served?),
            Ok(err) = load_failed_rx => Err(err.context("loading the model failed")),
        }
    });
    Ok(Running { addr, state, task })
}

async fn load(source: &ModelSource, args: &ServeArgs) -> anyhow::Result<Arc<Extractor>> {
    let engine = crate::engine::load(args.engine, source, &args.mistral(), &args.native()).await?;
    let extractor = Extractor::new(engine, args.pipeline())?;
    tracing::info!("ready");
    Ok(Arc::new(extractor))
}

async fn shutdown_signal() {
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
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
