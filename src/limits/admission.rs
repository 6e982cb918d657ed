//! Admission: at most `max_concurrent` requests generate at once, at most `max_queue` wait for a
//! slot, and none waits longer than `queue_timeout`.
//!
//! Past the queue bound a request is turned away at once (503 with `Retry-After`) instead of
//! waiting: on a loaded server a fast "try elsewhere or later" beats an answer that arrives after
//! the client's own time-out. The slots are a FIFO semaphore, so waiters are served in arrival
//! order and a newcomer cannot overtake the queue.
//!
//! Everything is released by drop: a client that disconnects while queued or generating drops
//! its handler future, and with it its queue place or [`Permit`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Requests generating at once (each runs up to three branches in the engine).
    pub max_concurrent: usize,
    /// Requests waiting for a slot; 0 = no waiting.
    pub max_queue: usize,
    pub queue_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmissionError {
    #[error(
        "server is at capacity ({max_concurrent} generating, {max_queue} waiting); retry later"
    )]
    Full {
        max_concurrent: usize,
        max_queue: usize,
    },
    #[error("no generation slot became free within the queue timeout of {timeout:?}; retry later")]
    TimedOut { timeout: Duration },
}

/// The gauges admission keeps current (they live in the metrics registry).
#[derive(Clone)]
pub struct AdmissionGauges {
    pub in_flight: IntGauge,
    pub queued: IntGauge,
}

pub struct Admission {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    config: AdmissionConfig,
    gauges: AdmissionGauges,
}

/// A generation slot, held for the whole request. `queue_time` is how long it took to get.
pub struct Permit {
    _slot: OwnedSemaphorePermit,
    in_flight: IntGauge,
    pub queue_time: Duration,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.dec();
    }
}

/// A place in the queue; given back on drop, whether the wait ended in a slot, a time-out, or a
/// client that went away.
struct QueuePlace<'a> {
    admission: &'a Admission,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.admission.queued.fetch_sub(1, Ordering::AcqRel);
        self.admission.gauges.queued.dec();
    }
}

impl Admission {
    pub fn new(config: AdmissionConfig, gauges: AdmissionGauges) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(config.max_concurrent.max(1))),
            queued: AtomicUsize::new(0),
            config,
            gauges,
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    pub async fn admit(&self) -> Result<Permit, AdmissionError> {
        let started = Instant::now();
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(self.permit(slot, started));
        }
        let place = self.take_queue_place()?;
        let waited = tokio::time::timeout(
            self.config.queue_timeout,
            self.slots.clone().acquire_owned(),
        )
        .await;
        drop(place);
        match waited {
            Ok(Ok(slot)) => Ok(self.permit(slot, started)),
            // The semaphore is never closed; treat it like a time-out all the same.
            Ok(Err(_)) | Err(_) => Err(AdmissionError::TimedOut {
                timeout: self.config.queue_timeout,
            }),
        }
    }

    fn take_queue_place(&self) -> Result<QueuePlace<'_>, AdmissionError> {
        let max_queue = self.config.max_queue;
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max_queue).then_some(q + 1)
            });
        if taken.is_err() {
            return Err(AdmissionError::Full {
                max_concurrent: self.config.max_concurrent,
                max_queue,
            });
        }
        self.gauges.queued.inc();
        Ok(QueuePlace { admission: self })
    }

    fn permit(&self, slot: OwnedSemaphorePermit, started: Instant) -> Permit {
        self.gauges.in_flight.inc();
        Permit {
            _slot: slot,
            in_flight: self.gauges.in_flight.clone(),
            queue_time: started.elapsed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max_concurrent: usize, max_queue: usize, timeout_ms: u64) -> Admission {
        Admission::new(
            AdmissionConfig {
                max_concurrent,
                max_queue,
                queue_timeout: Duration::from_millis(timeout_ms),
            },
            AdmissionGauges {
                in_flight: IntGauge::new("in_flight", "h").unwrap(),
                queued: IntGauge::new("queued", "h").unwrap(),
            },
        )
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once_and_places_are_given_back() {
        let a = Arc::new(admission(1, 1, 60_000));
        let first = a.admit().await.unwrap();
        assert_eq!(a.gauges.in_flight.get(), 1);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit().await.map(|p| p.queue_time) })
        };
        while a.gauges.queued.get() == 0 {
            tokio::task::yield_now().await;
        }
        let refused_at = Instant::now();
        assert!(matches!(a.admit().await, Err(AdmissionError::Full { .. })));
        assert!(refused_at.elapsed() < Duration::from_secs(1));
        drop(first);
        let queued_for = waiter.await.unwrap().unwrap();
        assert!(queued_for > Duration::ZERO);
        assert_eq!((a.gauges.in_flight.get(), a.gauges.queued.get()), (0, 0));
    }

    #[tokio::test]
    async fn queued_requests_time_out() {
        let a = admission(1, 4, 50);
        let _busy = a.admit().await.unwrap();
        let started = Instant::now();
        let err = a.admit().await.err().unwrap();
        assert!(matches!(err, AdmissionError::TimedOut { .. }));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(a.gauges.queued.get(), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_gives_its_place_back() {
        let a = admission(1, 1, 60_000);
        let _busy = a.admit().await.unwrap();
        let gone = tokio::time::timeout(Duration::from_millis(20), a.admit()).await;
        assert!(gone.is_err());
        assert_eq!(a.gauges.queued.get(), 0);
        // The place is free again: this one queues (and times out) rather than being refused.
        let again = tokio::time::timeout(Duration::from_millis(20), a.admit()).await;
        assert!(again.is_err(), "queued, not refused");
    }
}
