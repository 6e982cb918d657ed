//! Where the process is in its life, and the requests it still owes an answer.
//!
//! `Loading → WarmingUp → Ready → Draining`. The port is bound before `Loading`, so probes and
//! clients get a 503 (not a refused connection) until `Ready`. `Ready` needs one finished warm-up
//! generation, not just a loaded model: the first generation pays one-off costs (grammar
//! compilation, allocator growth) that would otherwise land on a real client. On SIGTERM/SIGINT
//! the server turns `Draining`: readiness answers 503 so load balancers stop sending, new
//! extraction requests get 503, and requests already accepted run to completion for up to the
//! drain timeout.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Loading = 0,
    WarmingUp = 1,
    Ready = 2,
    Draining = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Loading,
            1 => Self::WarmingUp,
            2 => Self::Ready,
            _ => Self::Draining,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Loading => "loading",
            Self::WarmingUp => "warming_up",
            Self::Ready => "ready",
            Self::Draining => "draining",
        }
    }
}

pub struct Lifecycle {
    phase: AtomicU8,
    active: AtomicUsize,
    idle: Notify,
    shutdown: watch::Sender<bool>,
}

/// One accepted extraction request; the drain waits until none are left.
pub struct ActiveRequest {
    lifecycle: Arc<Lifecycle>,
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.lifecycle.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.lifecycle.idle.notify_waiters();
        }
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Loading as u8),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            shutdown: watch::channel(false).0,
        }
    }
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Moves forward only: a late "ready" from the loader cannot undo a drain.
    pub fn advance(&self, to: Phase) {
        self.phase.fetch_max(to as u8, Ordering::AcqRel);
    }

    pub fn track(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveRequest {
            lifecycle: self.clone(),
        }
    }

    pub fn active_requests(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves once no tracked request is left.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a request ending in between still wakes us.
            notified.as_mut().enable();
            if self.active_requests() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ask the server to drain and stop, as SIGTERM does (tests and embedders use this).
    pub fn request_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub async fn shutdown_requested(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|requested| *requested).await;
    }

    /// Turn `Draining`, then wait for the accepted requests, at most `timeout`. Returns how many
    /// were still running when it gave up.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.advance(Phase::Draining);
        let active = self.active_requests();
        tracing::info!(
            active,
            timeout_seconds = timeout.as_secs_f64(),
            "draining: finishing accepted requests"
        );
        match tokio::time::timeout(timeout, self.idle()).await {
            Ok(()) => {
                tracing::info!("drained");
                0
            }
            Err(_) => {
                let left = self.active_requests();
                tracing::warn!(left, "drain timeout reached; abandoning the rest");
                left
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let l = Lifecycle::new();
        assert_eq!(l.phase(), Phase::Loading);
        l.advance(Phase::WarmingUp);
        l.advance(Phase::Draining);
        l.advance(Phase::Ready);
        assert_eq!(l.phase(), Phase::Draining);
    }

    #[tokio::test]
    async fn drain_waits_for_accepted_requests_up_to_the_timeout() {
        let l = Lifecycle::new();
        let r = l.track();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.drain(Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(r);
        assert_eq!(waiter.await.unwrap(), 0);

        let _stuck = l.track();
        assert_eq!(l.drain(Duration::from_millis(10)).await, 1);
    }

    #[tokio::test]
    async fn shutdown_request_is_remembered() {
        let l = Lifecycle::new();
        l.request_shutdown();
        tokio::time::timeout(Duration::from_secs(1), l.shutdown_requested())
            .await
            .unwrap();
    }
}
