//! Admission: which requests generate now, which wait for a slot, and which are refused at once.
//!
//! Every request has a deadline (`--request-timeout`, 30 s by default: the official SDK's own
//! time-out; a client may ask for less with `x-request-timeout`). Work finished after the client
//! has left is wasted cores, so admission answers in time or refuses at once:
//!
//! - **Predicted completion.** Each request's size is the prompt tokens the engine will compute
//!   plus its expected output (branches × the measured mean output per branch). The throughput
//!   is measured in the same unit from the engine's own counters (tokens per second spent in
//!   steps, an EWMA of one-second samples), so it follows the batch the engine actually runs
//!   and needs no request to finish; an engine without counters (mistralrs) is measured by
//!   finished requests per busy second instead. Completions are predicted by playing the engine
//!   forward: it batches every running request into each step, so the running ones share that
//!   throughput equally (processor sharing), and those waiting for a slot (see the adaptive limit
//!   below) take the slots that free, first come first served. Each request's remaining work is
//!   its size less its share of the step tokens computed while it held a slot. A newcomer is
//!   refused at once (503/50004, `Retry-After` of the excess) when it would finish past 90% of
//!   the time left to its deadline, push an accepted request past 90% of that one's, or wait for
//!   a slot longer than a fifth of its time left. A FIFO drain of the outstanding work, used
//!   before, missed that requests admitted later slow the earlier ones and that a request waits
//!   for a slot behind the adaptive limit: at 4x overload 2-14 admitted requests per run were
//!   cancelled at their deadline, most after 11-27 s waiting for a slot, which made the 503s'
//!   p99 29 s (`docs/performance.md`). An idle server (nothing outstanding) admits. The first
//!   estimate is the start-up warm-up generation's steps, seen at the first request; an engine
//!   without one (or without counters) admits until it has measured itself. A request that
//!   waited for a slot is checked again when it gets one: if its own work no longer fits the
//!   time it has left, it is refused then, before it uses the engine.
//!   Measured on SmolLM2 at 4× overload before this: 120 of 168 requests got no answer within
//!   the 30 s their clients waited, and not one 503 was sent (`docs/performance.md`).
//! - **Adaptive concurrency.** How many requests generate at once is an AIMD limit between 1 and
//!   `--max-concurrent` (now a cap, not the tuning knob). A request whose service time, scaled to
//!   the mean request size, stays under half the deadline, finished while the limit was in use,
//!   adds 1/limit; one over it multiplies the limit by 0.9. So the batch grows while the engine
//!   turns more concurrency into throughput within the deadline, and shrinks when concurrency
//!   only stretches every request's latency. Half the deadline is for generating, half for
//!   queueing.
//! - **The deadline itself.** A request still running at its deadline is dropped by the handler
//!   (its engine sequences and KV blocks with it) and answered 503/50004, saying so, a second
//!   before the deadline so that the client hears it before its own time-out. One that was
//!   generating halves the limit: the engine could not give that many requests their answers in
//!   time. (Measured on SmolLM2 at 4× overload: the first eight admitted shared two cores so
//!   thinly that none finished within 30 s, so without that signal nothing was ever measured.)
//!
//! The slots are a FIFO semaphore, so waiters are served in arrival order. Everything is
//! released by drop: a client that disconnects while queued or generating drops its handler
//! future, and with it its queue place, its outstanding work and its [`Permit`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::{Gauge, Histogram, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Most requests generating at once: the cap of the adaptive limit.
    pub max_concurrent: usize,
    /// Requests waiting for a slot; 0 = no waiting.
    pub max_queue: usize,
    pub queue_timeout: Duration,
    /// The longest a request may take from arrival to answer (a client may ask for less).
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdmissionError {
    #[error("server is at capacity ({limit} generating, {max_queue} waiting); retry later")]
    Full { limit: usize, max_queue: usize },
    #[error("no generation slot became free within the queue timeout of {timeout:?}; retry later")]
    TimedOut { timeout: Duration },
    #[error(
        "server is busy: this request would finish in about {:.1} s, past its deadline of {:.1} s; \
         retry later",
        predicted.as_secs_f64(),
        deadline.as_secs_f64()
    )]
    WouldMissDeadline {
        predicted: Duration,
        deadline: Duration,
        retry_after: Duration,
    },
    #[error(
        "the request was not answered within its deadline of {:.1} s and was cancelled; retry later",
        deadline.as_secs_f64()
    )]
    DeadlineExceeded { deadline: Duration },
    #[error(
        "server is busy: this request would push requests already accepted past their deadlines; \
         retry later"
    )]
    WouldDelayAccepted { retry_after: Duration },
    #[error(
        "server is busy: this request would wait about {:.1} s for a generation slot; retry later",
        wait.as_secs_f64()
    )]
    WouldWaitForSlot {
        wait: Duration,
        retry_after: Duration,
    },
}

impl AdmissionError {
    /// Whole seconds a client should wait before retrying.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::WouldMissDeadline { retry_after, .. }
            | Self::WouldDelayAccepted { retry_after }
            | Self::WouldWaitForSlot { retry_after, .. } => {
                retry_after.as_secs_f64().ceil().clamp(1.0, 600.0) as u64
            }
            // A slot frees when any generation ends: typically within seconds.
            _ => 1,
        }
    }
}

/// The metrics admission keeps current (they live in the metrics registry).
#[derive(Clone)]
pub struct AdmissionGauges {
    pub in_flight: IntGauge,
    pub queued: IntGauge,
    /// The adaptive concurrency limit.
    pub limit: Gauge,
    /// Predicted completion of each request admission had a measurement for.
    pub predicted: Histogram,
}

/// What a request will cost the engine, known before it generates.
#[derive(Debug, Clone, Copy)]
pub struct Work {
    /// Prompt tokens the engine is expected to compute (not served from its prefix cache).
    pub prompt_tokens: usize,
    pub branches: usize,
}

/// What a finished request cost the engine.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// Prompt tokens the engine computed (its prefix cache served the rest).
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub branches: usize,
}

/// Smoothing of the throughput, output-size and mean-size averages.
const EWMA: f64 = 0.3;
/// Busy time folded into one throughput sample (from finished requests).
const SAMPLE_BUSY: Duration = Duration::from_secs(2);
/// Engine step time folded into one throughput sample (from the engine's counters).
const ENGINE_SAMPLE_SECONDS: f64 = 1.0;
/// A request is refused when its predicted completion passes this share of its time left.
const ADMIT_SHARE: f64 = 0.9;
/// Step time before the first request (the warm-up) that makes a first throughput estimate.
const WARM_UP_SECONDS: f64 = 0.05;
/// A request is refused when it is predicted to wait for a slot longer than this share of its
/// time left.
const MAX_SLOT_WAIT_SHARE: f64 = 0.2;
/// Output tokens per branch assumed before the first request finishes.
const FIRST_OUTPUT_GUESS: f64 = 200.0;
/// The adaptive limit starts here (or at the cap, if lower).
const FIRST_LIMIT: f64 = 8.0;

/// A request admitted or queued and not finished, as admission sees it.
struct Outstanding {
    id: u64,
    /// Predicted size, tokens.
    size: f64,
    /// Tokens the engine is estimated to have computed for it: its share of the engine's step
    /// tokens while it held a slot.
    served: f64,
    deadline: Instant,
    /// Holds a slot (generating), rather than waiting for one.
    running: bool,
}

impl Outstanding {
    /// What it still needs. One that outlived its predicted size still needs something: a
    /// twentieth of it, say, rather than nothing.
    fn remaining(&self) -> f64 {
        (self.size - self.served).max(self.size / 20.0)
    }
}

struct Estimate {
    /// Every request admitted or queued and not finished.
    work: Vec<Outstanding>,
    next_id: u64,
    /// Tokens of finished requests per busy second; `None` until the first sample.
    throughput: Option<f64>,
    sample_tokens: f64,
    sample_busy: Duration,
    last_change: Instant,
    output_per_branch: f64,
    mean_size: Option<f64>,
    /// What finished requests cost over what their size predicted: corrects the prompt-token
    /// guess (the task lines' and the template's share differ per model and tokenizer).
    size_scale: f64,
    limit: f64,
    /// The engine's own counters at the last throughput sample: (tokens, busy seconds). Once
    /// the engine reports them, they are the throughput, not finished requests.
    engine_mark: Option<(u64, f64)>,
    /// The engine's step tokens already dealt out to the running requests as `served`.
    served_mark: Option<u64>,
}

impl Estimate {
    /// Busy time runs while anything is outstanding.
    fn advance(&mut self, now: Instant) {
        if !self.work.is_empty() {
            self.sample_busy += now.saturating_duration_since(self.last_change);
        }
        self.last_change = now;
    }

    fn size(&self, work: Work) -> f64 {
        (work.prompt_tokens as f64 + work.branches as f64 * self.output_per_branch)
            * self.size_scale
    }

    /// When each outstanding request, then a newcomer of `size` if given, is predicted to finish
    /// (seconds from now), by playing the engine forward: the engine batches every running
    /// request into each step, so the running ones share its throughput equally (processor
    /// sharing); at most `limit` run, and those waiting for a slot take the slots that free, first
    /// come first served. Unlike a FIFO drain of all the work, this sees both that a newcomer
    /// slows the requests already running and how long one waits for a slot.
    fn finishes(&self, throughput: f64, size: Option<f64>) -> Vec<f64> {
        self.schedule(throughput, size).1
    }

    /// `finishes`, and when the last request (the newcomer, if given) gets its slot.
    fn schedule(&self, throughput: f64, size: Option<f64>) -> (f64, Vec<f64>) {
        let mut remaining: Vec<f64> = self.work.iter().map(Outstanding::remaining).collect();
        remaining.extend(size);
        let n = remaining.len();
        let (mut running, mut waiting): (Vec<usize>, VecDeque<usize>) =
            (Vec::new(), VecDeque::new());
        for i in 0..n {
            match self.work.get(i) {
                Some(w) if w.running => running.push(i),
                _ => waiting.push_back(i),
            }
        }
        let limit = (self.limit as usize).max(1);
        let mut out = vec![0.0; n];
        let mut now = 0.0;
        let mut last_start = 0.0;
        loop {
            while running.len() < limit {
                let Some(i) = waiting.pop_front() else { break };
                if i + 1 == n {
                    last_start = now;
                }
                running.push(i);
            }
            let Some((at, &first)) = running
                .iter()
                .enumerate()
                .min_by(|a, b| remaining[*a.1].total_cmp(&remaining[*b.1]))
            else {
                break;
            };
            let done = remaining[first];
            now += done * running.len() as f64 / throughput;
            for &i in &running {
                remaining[i] -= done;
            }
            out[first] = now;
            running.swap_remove(at);
        }
        (last_start, out)
    }

    /// Deal the engine's step tokens since the last call out to the running requests, equally,
    /// none past its remaining work (what one cannot take goes to the others).
    fn serve(&mut self, step_tokens: u64) {
        let Some(mark) = self.served_mark.replace(step_tokens) else {
            return;
        };
        let mut left = step_tokens.saturating_sub(mark) as f64;
        let mut running: Vec<&mut Outstanding> =
            self.work.iter_mut().filter(|w| w.running).collect();
        running.sort_by(|a, b| (a.size - a.served).total_cmp(&(b.size - b.served)));
        let n = running.len();
        for (k, w) in running.into_iter().enumerate() {
            let take = (left / (n - k) as f64).min((w.size - w.served).max(0.0));
            w.served += take;
            left -= take;
        }
    }
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| o + EWMA * (new - o))
}

pub struct Admission {
    slots: Arc<Semaphore>,
    /// Permits to retire as they come back, when the limit fell below the permits handed out.
    debt: Arc<AtomicUsize>,
    /// Permits the semaphore was given in all (the current whole limit, plus `debt`).
    permits: AtomicUsize,
    queued: AtomicUsize,
    estimate: Mutex<Estimate>,
    config: AdmissionConfig,
    gauges: AdmissionGauges,
}

/// A generation slot, held for the whole request. `queue_time` is how long it took to get.
pub struct Permit {
    slot: Option<OwnedSemaphorePermit>,
    debt: Arc<AtomicUsize>,
    in_flight: IntGauge,
    pub queue_time: Duration,
    started: Instant,
    /// The request stays in the outstanding work until this drops; its predicted size.
    ticket: Ticket,
    /// The limit was in use when this request started: its latency says something about it.
    at_limit: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.dec();
        let Some(slot) = self.slot.take() else {
            return;
        };
        // A lowered limit retires permits as they come back.
        let retire = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if retire {
            slot.forget();
        }
    }
}

/// A request's share of the outstanding work, from the admission check until it finishes or is
/// dropped.
struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    size: f64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut e = self.admission.estimate.lock().unwrap();
        e.advance(Instant::now());
        e.work.retain(|w| w.id != self.id);
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
        let cap = config.max_concurrent.max(1);
        let limit = FIRST_LIMIT.min(cap as f64);
        gauges.limit.set(limit);
        Self {
            slots: Arc::new(Semaphore::new(limit as usize)),
            debt: Arc::new(AtomicUsize::new(0)),
            permits: AtomicUsize::new(limit as usize),
            queued: AtomicUsize::new(0),
            estimate: Mutex::new(Estimate {
                work: Vec::new(),
                next_id: 0,
                throughput: None,
                sample_tokens: 0.0,
                sample_busy: Duration::ZERO,
                last_change: Instant::now(),
                output_per_branch: FIRST_OUTPUT_GUESS,
                mean_size: None,
                size_scale: 1.0,
                limit,
                engine_mark: None,
                served_mark: None,
            }),
            config,
            gauges,
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// The engine's cumulative step counters (tokens computed, seconds spent in steps): its
    /// throughput while busy, measured whether or not requests finish. A sample is taken once a
    /// second of steps has passed since the last one.
    pub fn observe_engine(&self, step_tokens: u64, step_seconds: f64) {
        let mut e = self.estimate.lock().unwrap();
        e.serve(step_tokens);
        let Some((tokens, seconds)) = e.engine_mark else {
            // The first look: what the engine did before (the start-up warm-up generation) is
            // the first estimate, so that the first requests are not admitted blind. Without
            // it, at 4x overload the first wave was admitted unpredicted, shared the engine too
            // thinly, and was cancelled at its deadline.
            if step_seconds >= WARM_UP_SECONDS && step_tokens > 0 {
                e.throughput = Some(step_tokens as f64 / step_seconds);
            }
            e.engine_mark = Some((step_tokens, step_seconds));
            return;
        };
        let busy = step_seconds - seconds;
        if busy >= ENGINE_SAMPLE_SECONDS {
            let rate = step_tokens.saturating_sub(tokens) as f64 / busy;
            e.throughput = Some(ewma(e.throughput, rate));
            e.engine_mark = Some((step_tokens, step_seconds));
        }
    }

    /// The adaptive concurrency limit now.
    pub fn limit(&self) -> f64 {
        self.estimate.lock().unwrap().limit
    }

    /// A slot for `work`, or a refusal: at once when its predicted completion passes its
    /// `deadline`, after a wait when no slot frees in time.
    pub async fn admit(
        self: &Arc<Self>,
        work: Work,
        deadline: Instant,
    ) -> Result<Permit, AdmissionError> {
        let started = Instant::now();
        let ticket = self.check(work, started, deadline)?;
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(self.permit(slot, started, ticket));
        }
        let place = self.take_queue_place()?;
        let wait_until = (started + self.config.queue_timeout).min(deadline);
        let waited =
            tokio::time::timeout_at(wait_until.into(), self.slots.clone().acquire_owned()).await;
        drop(place);
        match waited {
            Ok(Ok(slot)) => {
                // It waited: it may no longer have the time its own work takes. Better refused
                // now than cancelled at its deadline after using the engine.
                let now = Instant::now();
                let own = {
                    let e = self.estimate.lock().unwrap();
                    e.throughput
                        .map(|t| Duration::from_secs_f64(ticket.size / t))
                };
                let left = deadline.saturating_duration_since(now);
                if let Some(own) = own.filter(|own| *own > left.mul_f64(ADMIT_SHARE)) {
                    return Err(AdmissionError::WouldMissDeadline {
                        predicted: own,
                        deadline: left,
                        retry_after: own.saturating_sub(left.mul_f64(ADMIT_SHARE)),
                    });
                }
                Ok(self.permit(slot, started, ticket))
            }
            // The semaphore is never closed; treat it like a time-out all the same.
            Ok(Err(_)) | Err(_) if wait_until >= deadline => {
                Err(AdmissionError::DeadlineExceeded {
                    deadline: deadline.saturating_duration_since(started),
                })
            }
            Ok(Err(_)) | Err(_) => Err(AdmissionError::TimedOut {
                timeout: self.config.queue_timeout,
            }),
        }
    }

    /// Predict, refuse or count the request in.
    fn check(
        self: &Arc<Self>,
        work: Work,
        now: Instant,
        deadline: Instant,
    ) -> Result<Ticket, AdmissionError> {
        let mut e = self.estimate.lock().unwrap();
        let size = e.size(work);
        if let (Some(throughput), false) = (e.throughput, e.work.is_empty()) {
            let (start, with) = e.schedule(throughput, Some(size));
            let predicted = Duration::from_secs_f64(with[with.len() - 1]);
            self.gauges.predicted.observe(predicted.as_secs_f64());
            let left = deadline.saturating_duration_since(now);
            let budget = left.mul_f64(ADMIT_SHARE);
            if predicted > budget {
                return Err(AdmissionError::WouldMissDeadline {
                    predicted,
                    deadline: left,
                    retry_after: predicted - budget,
                });
            }
            // Nor wait long for a slot: the adaptive limit moves after it is admitted (it halves
            // when a request misses its deadline), and a long wait is where predictions failed:
            // most requests cancelled at their deadline had waited 11-27 s for a slot.
            let wait = left.mul_f64(MAX_SLOT_WAIT_SHARE);
            if start > wait.as_secs_f64() {
                return Err(AdmissionError::WouldWaitForSlot {
                    wait: Duration::from_secs_f64(start),
                    retry_after: Duration::from_secs_f64(start) - wait,
                });
            }
            // Nor may it push an accepted request past its deadline (one already predicted past
            // it is lost either way and does not block the rest).
            let without = e.finishes(throughput, None);
            let pushed = e
                .work
                .iter()
                .zip(with.iter().zip(&without))
                .filter_map(|(w, (&with, &without))| {
                    let budget =
                        w.deadline.saturating_duration_since(now).as_secs_f64() * ADMIT_SHARE;
                    (with > budget && without <= budget).then_some(with - budget)
                })
                .fold(None, |worst: Option<f64>, over| {
                    Some(worst.map_or(over, |w| w.max(over)))
                });
            if let Some(over) = pushed {
                return Err(AdmissionError::WouldDelayAccepted {
                    retry_after: Duration::from_secs_f64(over),
                });
            }
        }
        e.advance(now);
        let id = e.next_id;
        e.next_id += 1;
        e.work.push(Outstanding {
            id,
            size,
            served: 0.0,
            deadline,
            running: false,
        });
        Ok(Ticket {
            admission: self.clone(),
            id,
            size,
        })
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
                limit: self.limit() as usize,
                max_queue,
            });
        }
        self.gauges.queued.inc();
        Ok(QueuePlace { admission: self })
    }

    fn permit(&self, slot: OwnedSemaphorePermit, started: Instant, ticket: Ticket) -> Permit {
        if let Some(w) = (self.estimate.lock().unwrap().work.iter_mut()).find(|w| w.id == ticket.id)
        {
            w.running = true;
        }
        self.gauges.in_flight.inc();
        let in_use = self.gauges.in_flight.get() as f64;
        Permit {
            slot: Some(slot),
            debt: self.debt.clone(),
            in_flight: self.gauges.in_flight.clone(),
            queue_time: started.elapsed(),
            started: Instant::now(),
            ticket,
            at_limit: in_use + 1.0 >= self.limit(),
        }
    }

    /// A request answered: feed what it cost into the throughput, the expected output, and the
    /// limit, then release its slot.
    pub fn finish(&self, permit: Permit, done: Done) {
        self.finish_at(permit, done, Instant::now());
    }

    fn finish_at(&self, permit: Permit, done: Done, now: Instant) {
        let service = now.saturating_duration_since(permit.started);
        let size = (done.prompt_tokens + done.generated_tokens) as f64;
        let new_limit = {
            let mut e = self.estimate.lock().unwrap();
            e.advance(now);
            e.sample_tokens += size;
            if e.engine_mark.is_none() && e.sample_busy >= SAMPLE_BUSY {
                let rate = e.sample_tokens / e.sample_busy.as_secs_f64();
                e.throughput = Some(ewma(e.throughput, rate));
                e.sample_tokens = 0.0;
                e.sample_busy = Duration::ZERO;
            }
            if done.branches > 0 {
                let per_branch = done.generated_tokens as f64 / done.branches as f64;
                e.output_per_branch = ewma(Some(e.output_per_branch), per_branch);
            }
            let predicted = permit.ticket.size / e.size_scale;
            if predicted > 0.0 {
                let ratio = (size / predicted).clamp(0.25, 4.0);
                e.size_scale = ewma(Some(e.size_scale), ratio);
            }
            let mean = ewma(e.mean_size, size);
            e.mean_size = Some(mean);
            // Service time as if the request had been of mean size.
            let scaled = service.as_secs_f64() * mean / size.max(1.0);
            let target = self.config.request_timeout.as_secs_f64() / 2.0;
            let cap = self.config.max_concurrent.max(1) as f64;
            if scaled > target {
                e.limit = (e.limit * 0.9).max(1.0);
            } else if permit.at_limit {
                e.limit = (e.limit + 1.0 / e.limit).min(cap);
            }
            e.limit
        };
        self.gauges.limit.set(new_limit);
        self.resize(new_limit as usize);
        drop(permit);
    }

    /// A request that was generating reached its deadline: the engine is slower than the limit
    /// assumes, so halve it (the loss signal of AIMD). Its busy time produced no finished tokens;
    /// the throughput sample restarts rather than count that time against the engine's speed.
    pub fn deadline_missed(&self) {
        let new_limit = {
            let mut e = self.estimate.lock().unwrap();
            e.advance(Instant::now());
            e.sample_tokens = 0.0;
            e.sample_busy = Duration::ZERO;
            e.limit = (e.limit * 0.5).max(1.0);
            e.limit
        };
        self.gauges.limit.set(new_limit);
        self.resize(new_limit as usize);
    }

    /// Bring the semaphore's permits to `limit`: new ones at once, fewer by retiring permits as
    /// they come back.
    fn resize(&self, limit: usize) {
        let limit = limit.max(1);
        let given = self.permits.swap(limit, Ordering::AcqRel);
        if limit > given {
            let mut more = limit - given;
            // Cancel retirements still owed before adding permits.
            while more > 0
                && self
                    .debt
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
                    .is_ok()
            {
                more -= 1;
            }
            self.slots.add_permits(more);
        } else if limit < given {
            // Idle permits go now; the rest as they come back.
            let fewer = given - limit;
            let forgotten = self.slots.forget_permits(fewer);
            self.debt.fetch_add(fewer - forgotten, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::HistogramOpts;

    use super::*;

    fn config(max_concurrent: usize, max_queue: usize, timeout_ms: u64) -> AdmissionConfig {
        AdmissionConfig {
            max_concurrent,
            max_queue,
            queue_timeout: Duration::from_millis(timeout_ms),
            request_timeout: Duration::from_secs(30),
        }
    }

    fn admission_with(config: AdmissionConfig) -> Arc<Admission> {
        Arc::new(Admission::new(
            config,
            AdmissionGauges {
                in_flight: IntGauge::new("in_flight", "h").unwrap(),
                queued: IntGauge::new("queued", "h").unwrap(),
                limit: Gauge::new("limit", "h").unwrap(),
                predicted: Histogram::with_opts(HistogramOpts::new("predicted", "h")).unwrap(),
            },
        ))
    }

    fn admission(max_concurrent: usize, max_queue: usize, timeout_ms: u64) -> Arc<Admission> {
        admission_with(config(max_concurrent, max_queue, timeout_ms))
    }

    const WORK: Work = Work {
        prompt_tokens: 1000,
        branches: 2,
    };
    const DONE: Done = Done {
        prompt_tokens: 1000,
        generated_tokens: 400,
        branches: 2,
    };

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// `n` slots taken at once, as if `n` requests were generating.
    fn hold(a: &Arc<Admission>, n: usize) -> Vec<Permit> {
        (0..n)
            .map(|_| {
                let ticket = a.check(WORK, Instant::now(), far()).unwrap();
                let slot = a.slots.clone().try_acquire_owned().unwrap();
                a.permit(slot, Instant::now(), ticket)
            })
            .collect()
    }

    /// Finish one request of `DONE`'s size that took `service` of `busy` time, as if measured.
    fn measure(a: &Arc<Admission>, busy: Duration, service: Duration) {
        let now = Instant::now();
        let ticket = a.check(WORK, now, far()).unwrap();
        {
            let mut e = a.estimate.lock().unwrap();
            e.last_change = now - busy;
        }
        let slot = a.slots.clone().try_acquire_owned().unwrap();
        let mut permit = a.permit(slot, now, ticket);
        permit.started = now - service;
        a.finish_at(permit, DONE, now);
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once_and_places_are_given_back() {
        let a = admission(1, 1, 60_000);
        let first = a.admit(WORK, far()).await.unwrap();
        assert_eq!(a.gauges.in_flight.get(), 1);
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(WORK, far()).await.map(|p| p.queue_time) })
        };
        while a.gauges.queued.get() == 0 {
            tokio::task::yield_now().await;
        }
        let refused_at = Instant::now();
        assert!(matches!(
            a.admit(WORK, far()).await,
            Err(AdmissionError::Full { .. })
        ));
        assert!(refused_at.elapsed() < Duration::from_secs(1));
        drop(first);
        let queued_for = waiter.await.unwrap().unwrap();
        assert!(queued_for > Duration::ZERO);
        assert_eq!((a.gauges.in_flight.get(), a.gauges.queued.get()), (0, 0));
        assert_eq!(a.estimate.lock().unwrap().work.len(), 0);
    }

    #[tokio::test]
    async fn queued_requests_time_out() {
        let a = admission(1, 4, 50);
        let _busy = a.admit(WORK, far()).await.unwrap();
        let started = Instant::now();
        let err = a.admit(WORK, far()).await.err().unwrap();
        assert!(matches!(err, AdmissionError::TimedOut { .. }));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(a.gauges.queued.get(), 0);
    }

    #[tokio::test]
    async fn a_queued_request_ends_at_its_deadline() {
        let a = admission(1, 4, 60_000);
        let _busy = a.admit(WORK, far()).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(50);
        let err = a.admit(WORK, deadline).await.err().unwrap();
        assert!(
            matches!(err, AdmissionError::DeadlineExceeded { .. }),
            "{err:?}"
        );
        assert!(Instant::now() >= deadline);
        assert_eq!(a.estimate.lock().unwrap().work.len(), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_goes_away_gives_its_place_back() {
        let a = admission(1, 1, 60_000);
        let _busy = a.admit(WORK, far()).await.unwrap();
        let gone = tokio::time::timeout(Duration::from_millis(20), a.admit(WORK, far())).await;
        assert!(gone.is_err());
        assert_eq!(a.gauges.queued.get(), 0);
        // The place is free again: this one queues (and times out) rather than being refused.
        let again = tokio::time::timeout(Duration::from_millis(20), a.admit(WORK, far())).await;
        assert!(again.is_err(), "queued, not refused");
    }

    #[tokio::test]
    async fn an_idle_server_admits_even_a_request_it_predicts_late() {
        let a = admission(8, 8, 60_000);
        // 1,400 tokens per 100 s busy: 14 tokens/s, so one request alone predicts 100 s.
        measure(&a, Duration::from_secs(100), Duration::from_secs(1));
        assert!(a.estimate.lock().unwrap().throughput.unwrap() < 15.0);
        let soon = Instant::now() + Duration::from_secs(5);
        assert!(a.admit(WORK, soon).await.is_ok(), "nothing outstanding");
    }

    #[tokio::test]
    async fn a_request_predicted_past_its_deadline_is_refused_at_once() {
        let a = admission(8, 8, 60_000);
        // 1,400 tokens in 2 s: 700 tokens/s. Each request predicts 1,400 tokens = 2 s.
        measure(&a, Duration::from_secs(2), Duration::from_secs(1));
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut held = Vec::new();
        let refused = loop {
            match a.admit(WORK, deadline).await {
                Ok(p) => held.push(p),
                Err(e) => break e,
            }
            assert!(held.len() < 8, "never refused");
        };
        // 4 requests outstanding make 8 s; the fifth would end at 10 s, past 90% of 10 s.
        assert_eq!(held.len(), 4);
        let AdmissionError::WouldMissDeadline {
            predicted,
            retry_after,
            ..
        } = refused
        else {
            panic!("{refused:?}")
        };
        assert!(
            (predicted.as_secs_f64() - 10.0).abs() < 0.1,
            "{predicted:?}"
        );
        assert!(retry_after > Duration::from_millis(900), "{retry_after:?}");
        assert!((1..=2).contains(&refused.retry_after_secs()));
        // One finishes: there is room again.
        drop(held.pop());
        assert!(a.admit(WORK, deadline).await.is_ok());
    }

    #[tokio::test]
    async fn a_newcomer_that_would_push_an_accepted_request_past_its_deadline_is_refused() {
        let a = admission(8, 8, 60_000);
        // 700 tokens/s; each request predicts 1,400 tokens: 2 s alone, 4 s sharing with another.
        measure(&a, Duration::from_secs(2), Duration::from_secs(1));
        a.observe_engine(0, 0.0);
        let soon = Instant::now() + Duration::from_secs(4);
        let _accepted = a.admit(WORK, soon).await.unwrap();
        // Alone the newcomer fits its own (far) deadline, but sharing the engine it would end the
        // accepted request at 4 s, past 90% of the 4 s that one has.
        let refused = a.admit(WORK, far()).await.err().unwrap();
        let AdmissionError::WouldDelayAccepted { retry_after } = refused else {
            panic!("{refused:?}")
        };
        assert!(
            (retry_after.as_secs_f64() - 0.4).abs() < 0.05,
            "{retry_after:?}"
        );
        assert_eq!(a.estimate.lock().unwrap().work.len(), 1);
        // The engine computes 1,000 tokens, all for the one running request: 400 left, so
        // sharing with the newcomer it ends in 800 / 700 s, well within its time.
        a.observe_engine(1_000, 0.5);
        {
            let e = a.estimate.lock().unwrap();
            assert_eq!(e.work[0].served, 1_000.0);
            assert_eq!(
                e.throughput,
                Some(700.0),
                "half a second is no throughput sample"
            );
        }
        let second = a.admit(WORK, far()).await.unwrap();
        // Served tokens are shared between the running requests, none beyond its size: of the
        // next 1,000, the first takes the 400 it lacks and the second the rest.
        a.observe_engine(2_000, 0.9);
        let e = a.estimate.lock().unwrap();
        let served: Vec<f64> = e.work.iter().map(|w| w.served).collect();
        assert_eq!(served, [1_400.0, 600.0]);
        drop(e);
        drop(second);
    }

    /// With every slot taken, a newcomer's prediction includes its wait for one: the running
    /// request's whole remaining work, then its own alone.
    #[tokio::test]
    async fn a_newcomer_waits_for_a_slot_in_its_prediction() {
        let a = admission(1, 8, 60_000);
        measure(&a, Duration::from_secs(2), Duration::from_secs(1));
        let _running = a.admit(WORK, far()).await.unwrap();
        {
            let e = a.estimate.lock().unwrap();
            let at = e.finishes(700.0, Some(1_400.0));
            assert_eq!(at, [2.0, 4.0]);
        }
        // The running request keeps its slot to itself (2 s, not the 4 s of sharing the engine
        // with the newcomer); the newcomer's 2 s of waiting plus 2 s of work pass 90% of 4 s.
        let refused = a
            .admit(WORK, Instant::now() + Duration::from_secs(4))
            .await
            .err();
        assert!(
            matches!(refused, Some(AdmissionError::WouldMissDeadline { .. })),
            "{refused:?}"
        );
        // 8 s: it would finish in time (4 s), but only after 2 s of waiting for the slot, more
        // than the fifth of its time a request may wait.
        let refused = a
            .admit(WORK, Instant::now() + Duration::from_secs(8))
            .await
            .err();
        let Some(AdmissionError::WouldWaitForSlot { wait, .. }) = refused else {
            panic!("{refused:?}")
        };
        assert!((wait.as_secs_f64() - 2.0).abs() < 0.01, "{wait:?}");
        // 20 s: 2 s of waiting is within its fifth: it queues.
        let queued =
            tokio::time::timeout(Duration::from_millis(20), a.admit(WORK, far_from_now(20))).await;
        assert!(queued.is_err(), "queued, not refused");
    }

    fn far_from_now(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[tokio::test]
    async fn the_limit_rises_while_latency_fits_and_falls_when_it_does_not() {
        let a = admission(16, 8, 60_000);
        assert_eq!(a.limit(), 8.0);
        // Fast answers at the limit: the limit climbs, and the semaphore with it.
        for _ in 0..40 {
            let held = hold(&a, a.limit() as usize - 1);
            measure(&a, Duration::from_millis(100), Duration::from_secs(1));
            drop(held);
        }
        let high = a.limit();
        assert!(high > 11.0, "{high}");
        assert_eq!(a.slots.available_permits(), high as usize);
        // The engine slows down (a 20 s service time is past half the 30 s deadline).
        for _ in 0..10 {
            measure(&a, Duration::from_secs(1), Duration::from_secs(20));
        }
        let low = a.limit();
        assert!(low < high * 0.5, "{high} -> {low}");
        assert_eq!(a.slots.available_permits(), low as usize);
        assert_eq!(a.gauges.limit.get(), low);
        // Never above the cap.
        for _ in 0..400 {
            let held = hold(&a, a.limit() as usize - 1);
            measure(&a, Duration::from_millis(100), Duration::from_millis(10));
            drop(held);
        }
        assert_eq!(a.limit(), 16.0);
    }

    #[tokio::test]
    async fn the_engine_counters_give_the_throughput_without_any_request_finishing() {
        let a = admission(8, 8, 60_000);
        // An engine that has run no step yet: no estimate.
        a.observe_engine(0, 0.0);
        assert!(a.estimate.lock().unwrap().throughput.is_none());
        // Half a second of steps: too little for a sample.
        a.observe_engine(500, 0.5);
        assert!(a.estimate.lock().unwrap().throughput.is_none());
        a.observe_engine(2_800, 2.0);
        assert_eq!(a.estimate.lock().unwrap().throughput, Some(1_400.0));
        // Busy: one request of 1,400 tokens outstanding, the next predicts 2 s and fits 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        let _first = a.admit(WORK, deadline).await.unwrap();
        assert!(a.admit(WORK, deadline).await.is_ok());
        assert_eq!(a.gauges.predicted.get_sample_count(), 1);
        // Finished requests no longer move it.
        measure(&a, Duration::from_secs(100), Duration::from_secs(1));
        assert_eq!(a.estimate.lock().unwrap().throughput, Some(1_400.0));
    }

    /// The warm-up generation's steps, seen at the first request, are the first estimate: the
    /// requests that arrive before a full sample are predicted, not admitted blind.
    #[tokio::test]
    async fn the_warm_up_gives_the_first_estimate() {
        let a = admission(8, 8, 60_000);
        a.observe_engine(700, 1.0);
        assert_eq!(a.estimate.lock().unwrap().throughput, Some(700.0));
        let deadline = Instant::now() + Duration::from_secs(3);
        let _first = a.admit(WORK, deadline).await.unwrap();
        // 1,400 tokens each at 700 tokens/s: the second would end both at 4 s, past 2.7 s.
        assert!(a.admit(WORK, deadline).await.is_err());
        // A fresh engine (no steps before the first request) gives none.
        let fresh = admission(8, 8, 60_000);
        fresh.observe_engine(0, 0.0);
        assert!(fresh.estimate.lock().unwrap().throughput.is_none());
    }

    #[tokio::test]
    async fn a_missed_deadline_halves_the_limit() {
        let a = admission(64, 8, 60_000);
        assert_eq!(a.limit(), 8.0);
        a.deadline_missed();
        assert_eq!((a.limit(), a.slots.available_permits()), (4.0, 4));
        for _ in 0..5 {
            a.deadline_missed();
        }
        assert_eq!((a.limit(), a.slots.available_permits()), (1.0, 1));
    }

    #[tokio::test]
    async fn a_lowered_limit_retires_permits_held_when_it_fell() {
        let a = admission(8, 8, 60_000);
        let held = hold(&a, 8);
        a.resize(3);
        drop(held);
        assert_eq!(a.slots.available_permits(), 3);
        a.resize(5);
        assert_eq!(a.slots.available_permits(), 5);
    }
}
