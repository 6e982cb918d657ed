//! Admission: which requests generate now, which wait for a slot, and which are refused at once.
//!
//! Every request has a deadline (`--request-timeout`, 30 s by default: the official SDK's own
//! time-out; a client may ask for less with `x-request-timeout`). Work finished after the client
//! has left is wasted cores, so admission answers in time or refuses at once:
//!
//! - **Predicted completion.** Each request is, in the engine's terms, the prompt tokens it will
//!   compute and then one decode step per output token with one row per branch (the measured
//!   mean output per branch). The engine fits what a step costs, `fixed + per_token × tokens`,
//!   over its recent steps (`engine::StepCost`); completions are predicted by playing the
//!   engine's scheduler forward with that cost: at most `limit` requests hold slots (see the
//!   adaptive limit below) and the others take freed ones first come first served; each step
//!   runs a row per branch of every request past its prompt, then prompt tokens in arrival order
//!   in what is left of the step budget. What each running request has left is its job less the
//!   engine's steps and prompt tokens dealt to it since it got its slot. A newcomer is refused at
//!   once (503/50004, `Retry-After` of the excess) when it would finish past 90% of the time left
//!   to its deadline, push an accepted request past 90% of that one's, or wait for a slot longer
//!   than `--max-slot-wait` (0.25 s by default; raise it for clients that would rather wait
//!   than retry: a burst beyond the adaptive limit at an idle server is otherwise refused, with
//!   a `Retry-After` of the predicted wait). Why steps and not tokens per second: on two cores a SmolLM2
//!   decode step of a few sequences is mostly its fixed part (the weights are read once per
//!   step) and a 512-token prefill chunk mostly its per-token part, so one tokens-per-second
//!   figure was several times off whenever the engine moved between the two; requests admitted
//!   on a prefill-time figure were cancelled at their deadline while decoding, and their 503s
//!   came after 29 s (`docs/performance.md`). An idle server (nothing outstanding) admits. The
//!   first cost is the start-up warm-up generation's steps; an engine without counters
//!   (mistralrs) is measured by finished requests per busy second instead, as a cost per token.
//!   A request queued on a prediction waits for its slot at most `--max-slot-wait` and a quarter
//!   second more, and is refused then (so by default no refusal comes later than half a
//!   second); when it gets its slot it is checked again, and refused if it
//!   no longer fits the time it has left, before it uses the engine.
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

use crate::engine::{EngineStats, StepCost};

#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// Most requests generating at once: the cap of the adaptive limit.
    pub max_concurrent: usize,
    /// Requests waiting for a slot; 0 = no waiting.
    pub max_queue: usize,
    pub queue_timeout: Duration,
    /// The longest predicted wait for a slot a request is queued for (`--max-slot-wait`).
    pub max_slot_wait: Duration,
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
/// Busy time folded into one throughput sample (from finished requests, for an engine without
/// step counters).
const SAMPLE_BUSY: Duration = Duration::from_secs(2);
/// A request is refused when its predicted completion passes this share of its time left.
const ADMIT_SHARE: f64 = 0.9;
/// How much longer than `--max-slot-wait` a request waits for its slot before it is refused:
/// with the default 0.25 s of that flag, no refusal comes later than half a second after
/// arrival. (Queueing for seconds made refusals late: on tiny at 4x overload, 3 of 182 refusals,
/// queued in the first wave with their slots later than predicted, came after 2.6-2.8 s, and at
/// 1.6% of the refusals they were the p99.)
const SLOT_PATIENCE: Duration = Duration::from_millis(250);
/// Output tokens per branch assumed before the first request finishes.
const FIRST_OUTPUT_GUESS: f64 = 200.0;
/// The adaptive limit starts here (or at the cap, if lower).
const FIRST_LIMIT: f64 = 8.0;
/// Simulated steps before a prediction gives up (an unbounded drain): far more than any real
/// queue needs (64 queued requests of 8,000 prompt tokens take 1,000 prefill steps).
const MAX_SIMULATED_STEPS: usize = 100_000;

/// What a request asks of the engine, in the engine's own terms: prompt tokens to compute,
/// then one decode step per output token, each running one row per branch.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Job {
    prefill: f64,
    steps: f64,
    rows: f64,
}

/// A request admitted or queued and not finished, as admission sees it.
struct Outstanding {
    id: u64,
    /// Predicted at admission.
    job: Job,
    /// What is left of it: the engine's prompt tokens and decode steps dealt to it while it
    /// held a slot.
    left: Job,
    deadline: Instant,
    /// Holds a slot (generating), rather than waiting for one.
    running: bool,
}

impl Outstanding {
    /// What it still needs. One that outlived its predicted output still needs something: a
    /// twentieth of it, say, rather than nothing.
    fn remaining(&self) -> Job {
        Job {
            prefill: self.left.prefill.max(0.0),
            steps: self.left.steps.max(self.job.steps / 20.0).max(1.0),
            rows: self.job.rows,
        }
    }
}

struct Estimate {
    /// Every request admitted or queued and not finished.
    work: Vec<Outstanding>,
    next_id: u64,
    /// The engine's fitted step cost, from its counters.
    engine_cost: Option<StepCost>,
    /// Most tokens in one engine step (prefill goes in chunks of what decoding leaves).
    step_budget: f64,
    /// Without engine counters: tokens of finished requests per busy second.
    throughput: Option<f64>,
    sample_tokens: f64,
    sample_busy: Duration,
    last_change: Instant,
    output_per_branch: f64,
    mean_size: Option<f64>,
    /// Prompt tokens computed over what admission expected: corrects the guess (the task
    /// lines' and the template's share differ per model and tokenizer).
    prefill_scale: f64,
    limit: f64,
    /// The engine's (steps, prefill tokens) already dealt out to the running requests.
    served_mark: Option<(u64, u64)>,
}

impl Estimate {
    /// Busy time runs while anything is outstanding.
    fn advance(&mut self, now: Instant) {
        if !self.work.is_empty() {
            self.sample_busy += now.saturating_duration_since(self.last_change);
        }
        self.last_change = now;
    }

    fn job(&self, work: Work) -> Job {
        Job {
            prefill: work.prompt_tokens as f64 * self.prefill_scale,
            steps: self.output_per_branch.max(1.0),
            rows: work.branches.max(1) as f64,
        }
    }

    /// The step cost to predict with: the engine's fit, or, for an engine without counters,
    /// the measured tokens per second as a cost per token (and prefill in one step).
    fn cost(&self) -> Option<(StepCost, f64)> {
        match (self.engine_cost, self.throughput) {
            (Some(c), _) => Some((c, self.step_budget)),
            (None, Some(t)) => Some((
                StepCost {
                    fixed: 0.0,
                    per_token: 1.0 / t,
                },
                f64::INFINITY,
            )),
            (None, None) => None,
        }
    }

    /// When each outstanding request, then a newcomer if given, is predicted to finish (seconds
    /// from now), and when the last of them got its slot.
    ///
    /// It plays the engine forward as its scheduler runs it: at most `limit` requests hold
    /// slots, the others take freed ones first come first served; every step runs one row per
    /// branch of each request past its prompt, then prompt tokens in arrival order in what is
    /// left of the step budget; a step takes the fitted `fixed + per_token × tokens`. So it sees
    /// that a newcomer slows every running request (more rows per step), that a running set
    /// which has moved on from prefill to decoding drains at the decode steps' pace, and how
    /// long a newcomer waits for a slot.
    fn schedule(&self, cost: StepCost, budget: f64, newcomer: Option<Job>) -> (f64, Vec<f64>) {
        let mut jobs: Vec<Job> = self.work.iter().map(Outstanding::remaining).collect();
        jobs.extend(newcomer);
        let n = jobs.len();
        let is_running = |i: usize| self.work.get(i).is_some_and(|w| w.running);
        let mut running: Vec<usize> = (0..n).filter(|&i| is_running(i)).collect();
        let mut waiting: VecDeque<usize> = (0..n).filter(|&i| !is_running(i)).collect();
        let limit = (self.limit as usize).max(1);
        let mut out = vec![f64::INFINITY; n];
        let (mut now, mut last_start) = (0.0, 0.0);
        for _ in 0..MAX_SIMULATED_STEPS {
            let before = running.len();
            while running.len() < limit {
                let Some(i) = waiting.pop_front() else { break };
                if i + 1 == n {
                    last_start = now;
                }
                running.push(i);
            }
            if running.is_empty() {
                break;
            }
            // Running keeps arrival order, as the engine admits: its prefill order. It starts
            // sorted and `retain` keeps the order, so only a step that took in requests sorts.
            if running.len() > before {
                running.sort_unstable();
            }
            let decoding: Vec<usize> = (running.iter().copied())
                .filter(|&i| jobs[i].prefill <= 0.0)
                .collect();
            let rows: f64 = decoding.iter().map(|&i| jobs[i].rows).sum();
            let room = (budget - rows).max(0.0);
            let prompt: f64 = running.iter().map(|&i| jobs[i].prefill.max(0.0)).sum();
            let steps = if prompt > 0.0 && room >= 1.0 {
                // One step with a prefill chunk.
                let mut chunk = room.min(prompt);
                now += cost.step(rows + chunk);
                for &i in &running {
                    let take = chunk.min(jobs[i].prefill.max(0.0));
                    jobs[i].prefill -= take;
                    chunk -= take;
                }
                1.0
            } else {
                // Decode steps only, until the first running request finishes.
                let k = (decoding.iter().map(|&i| jobs[i].steps)).fold(f64::INFINITY, f64::min);
                now += k * cost.step(rows);
                k
            };
            for &i in &decoding {
                jobs[i].steps -= steps;
                if jobs[i].steps <= 1e-9 {
                    out[i] = now;
                }
            }
            running.retain(|&i| !(jobs[i].prefill <= 0.0 && jobs[i].steps <= 1e-9));
        }
        (last_start, out)
    }

    /// Deal the engine's steps and prompt tokens since the last call out to the running
    /// requests: every step to each one past its prompt, prompt tokens first come first served.
    fn serve(&mut self, steps: u64, prefill: u64) {
        let Some((s0, p0)) = self.served_mark.replace((steps, prefill)) else {
            return;
        };
        let steps = steps.saturating_sub(s0) as f64;
        let mut prefill = prefill.saturating_sub(p0) as f64;
        for w in self.work.iter_mut().filter(|w| w.running) {
            if w.left.prefill <= 0.0 {
                w.left.steps -= steps;
            } else {
                let take = prefill.min(w.left.prefill);
                w.left.prefill -= take;
                prefill -= take;
            }
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
    /// The prompt tokens the request was expected to compute.
    expected_prompt: usize,
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
                engine_cost: None,
                step_budget: f64::INFINITY,
                throughput: None,
                sample_tokens: 0.0,
                sample_busy: Duration::ZERO,
                last_change: Instant::now(),
                output_per_branch: FIRST_OUTPUT_GUESS,
                mean_size: None,
                prefill_scale: 1.0,
                limit,
                served_mark: None,
            }),
            config,
            gauges,
        }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    /// The engine's counters: its fitted step cost (the start-up warm-up's steps give the first
    /// one, so the first requests are not admitted blind), and the steps and prompt tokens it
    /// ran since the last look, dealt out to the running requests.
    pub fn observe_engine(&self, stats: &EngineStats) {
        let mut e = self.estimate.lock().unwrap();
        e.serve(stats.steps, stats.prefill_tokens);
        if let Some(cost) = stats.step_cost() {
            e.engine_cost = Some(cost);
            if stats.step_budget > 0 {
                e.step_budget = stats.step_budget as f64;
            }
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
        let (ticket, allowed_wait) = self.check(work, started, deadline)?;
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(self.permit(slot, started, ticket));
        }
        let place = self.take_queue_place()?;
        // A request queued on a prediction waits for its slot about as long as it may be
        // predicted to, not until its deadline: one whose slot is late is refused while the
        // refusal is still quick, where it used to be cancelled at its deadline after it
        // finally got one.
        let patience = allowed_wait.map(|w| w + SLOT_PATIENCE);
        let latest = (started + self.config.queue_timeout).min(deadline);
        let impatient = patience.filter(|&p| started + p < latest);
        let wait_until = impatient.map_or(latest, |p| started + p);
        let waited =
            tokio::time::timeout_at(wait_until.into(), self.slots.clone().acquire_owned()).await;
        drop(place);
        match waited {
            Ok(Ok(slot)) => {
                // It waited: it may no longer have the time its own work takes. Better refused
                // now than cancelled at its deadline after using the engine.
                let now = Instant::now();
                let predicted = {
                    let mut e = self.estimate.lock().unwrap();
                    let at = e.work.iter().position(|w| w.id == ticket.id);
                    if let Some(at) = at {
                        e.work[at].running = true;
                    }
                    match (e.cost(), at) {
                        (Some((cost, budget)), Some(at)) => {
                            Some(e.schedule(cost, budget, None).1[at])
                        }
                        _ => None,
                    }
                };
                let left = deadline.saturating_duration_since(now);
                let budget = left.as_secs_f64() * ADMIT_SHARE;
                if let Some(own) = predicted.filter(|&own| own > budget) {
                    return Err(AdmissionError::WouldMissDeadline {
                        predicted: Duration::from_secs_f64(own.min(1e6)),
                        deadline: left,
                        retry_after: Duration::from_secs_f64((own - budget).min(1e6)),
                    });
                }
                Ok(self.permit(slot, started, ticket))
            }
            // The semaphore is never closed; treat it like a time-out all the same.
            Ok(Err(_)) | Err(_) if impatient.is_some() => Err(AdmissionError::WouldWaitForSlot {
                wait: started.elapsed(),
                retry_after: SLOT_PATIENCE,
            }),
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
    ) -> Result<(Ticket, Option<Duration>), AdmissionError> {
        let mut e = self.estimate.lock().unwrap();
        let job = e.job(work);
        let mut allowed_wait = None;
        if let (Some((cost, step_budget)), false) = (e.cost(), e.work.is_empty()) {
            let (start, with) = e.schedule(cost, step_budget, Some(job));
            let predicted = with[with.len() - 1].min(1e6);
            self.gauges.predicted.observe(predicted);
            let predicted = Duration::from_secs_f64(predicted);
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
            // most requests cancelled at their deadline had waited 11-27 s for a slot. (Allowing
            // waits in proportion to the slack a prediction leaves, so that a burst at an idle
            // server queues, made late refusals again at the start of an overload: SmolLM2 4x,
            // 1 of 55 after 2.9 s.)
            let wait = self.config.max_slot_wait;
            if start > wait.as_secs_f64() {
                return Err(AdmissionError::WouldWaitForSlot {
                    wait: Duration::from_secs_f64(start),
                    retry_after: Duration::from_secs_f64(start) - wait,
                });
            }
            allowed_wait = Some(wait);
            // Nor may it push an accepted request past its deadline (one already predicted past
            // it is lost either way and does not block the rest).
            let without = e.schedule(cost, step_budget, None).1;
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
            job,
            left: job,
            deadline,
            running: false,
        });
        let ticket = Ticket {
            admission: self.clone(),
            id,
            expected_prompt: work.prompt_tokens,
        };
        Ok((ticket, allowed_wait))
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
            if e.engine_cost.is_none() && e.sample_busy >= SAMPLE_BUSY {
                let rate = e.sample_tokens / e.sample_busy.as_secs_f64();
                e.throughput = Some(ewma(e.throughput, rate));
                e.sample_tokens = 0.0;
                e.sample_busy = Duration::ZERO;
            }
            if done.branches > 0 {
                let per_branch = done.generated_tokens as f64 / done.branches as f64;
                e.output_per_branch = ewma(Some(e.output_per_branch), per_branch);
            }
            let expected = permit.ticket.expected_prompt as f64;
            if expected > 0.0 {
                let ratio = (done.prompt_tokens as f64 / expected).clamp(0.25, 4.0);
                e.prefill_scale = ewma(Some(e.prefill_scale), ratio);
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
            max_slot_wait: Duration::from_millis(250),
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
                let (ticket, _) = a.check(WORK, Instant::now(), far()).unwrap();
                let slot = a.slots.clone().try_acquire_owned().unwrap();
                a.permit(slot, Instant::now(), ticket)
            })
            .collect()
    }

    /// Finish one request of `DONE`'s size that took `service` of `busy` time, as if measured.
    fn measure(a: &Arc<Admission>, busy: Duration, service: Duration) {
        let now = Instant::now();
        let (ticket, _) = a.check(WORK, now, far()).unwrap();
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

    /// The engine's counters: `steps` and `prefill` tokens run so far, and a fitted step cost.
    fn engine(steps: u64, prefill: u64, fixed: f64, per_token: f64) -> EngineStats {
        EngineStats {
            steps,
            prefill_tokens: prefill,
            step_budget: 100_000,
            step_fixed_nanos: (fixed * 1e9).round() as u64,
            step_token_nanos: (per_token * 1e9).round() as u64,
            ..EngineStats::default()
        }
    }

    #[tokio::test]
    async fn a_newcomer_that_would_push_an_accepted_request_past_its_deadline_is_refused() {
        let a = admission(8, 8, 60_000);
        // 700 tokens/s, no fixed cost; each request is 1,000 prompt tokens and 200 decode steps
        // of 2 rows: 2 s alone, 4 s sharing with another.
        a.observe_engine(&engine(0, 0, 0.0, 1.0 / 700.0));
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
        // The engine computes the running request's 1,000 prompt tokens: with the newcomer's
        // prompt in one step beside it (1,002 tokens, 1.43 s) and 199 decode steps of 4 rows
        // after (1.14 s), it ends at 2.6 s, well within its time.
        a.observe_engine(&engine(1, 1_000, 0.0, 1.0 / 700.0));
        assert_eq!(a.estimate.lock().unwrap().work[0].left.prefill, 0.0);
        let second = a.admit(WORK, far()).await.unwrap();
        // Every step goes to each running request past its prompt; prompt tokens first come
        // first served.
        a.observe_engine(&engine(51, 1_900, 0.0, 1.0 / 700.0));
        let e = a.estimate.lock().unwrap();
        let left: Vec<(f64, f64)> = e
            .work
            .iter()
            .map(|w| (w.left.prefill, w.left.steps))
            .collect();
        assert_eq!(left, [(0.0, 150.0), (100.0, 200.0)]);
        drop(e);
        drop(second);
    }

    /// A step costs a fixed part whatever its size: requests that decode drain at the decode
    /// steps' pace, not at the tokens per second a prefill chunk reaches. One tokens-per-second
    /// figure measured while the engine prefilled admitted work that was then cancelled.
    #[tokio::test]
    async fn decoding_is_predicted_at_the_pace_of_its_steps() {
        let a = admission(8, 8, 60_000);
        // 40 ms a step plus 0.5 ms a token: a 512-token chunk runs 10,000 tokens/s, a decode
        // step of two rows 49 tokens/s.
        a.observe_engine(&engine(0, 0, 0.04, 0.0005));
        let deadline = Instant::now() + Duration::from_secs(20);
        let _first = a.admit(WORK, deadline).await.unwrap();
        // The first alone: 1,000 prompt tokens (0.54 s) then 200 steps of 2 rows (8.2 s). With a
        // second beside it, 200 steps of 4 rows: 8.4 s. A third still fits 18 s.
        let _second = a.admit(WORK, deadline).await.unwrap();
        let (cost, budget) = a.estimate.lock().unwrap().cost().unwrap();
        let at = a.estimate.lock().unwrap().schedule(cost, budget, None).1;
        assert!((at[1] - (0.04 + 2_000.0 * 0.0005 + 200.0 * (0.04 + 4.0 * 0.0005))).abs() < 1e-9);
        // Batching is nearly free while the step's fixed cost dominates: four requests end at
        // 10.8 s, not at twice the 9.4 s of two.
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(a.admit(WORK, deadline).await.unwrap());
        }
        let at = {
            let e = a.estimate.lock().unwrap();
            e.schedule(cost, budget, None).1
        };
        assert!(at.iter().all(|&t| t < 11.0), "{at:?}");
        // A deadline of 5 s: refused, whatever the prompt's speed.
        let refused = a.admit(WORK, Instant::now() + Duration::from_secs(5)).await;
        assert!(
            matches!(refused, Err(AdmissionError::WouldMissDeadline { .. })),
            "{:?}",
            refused.err()
        );
        drop(held);
    }

    /// A request waits for its slot about as long as it may be predicted to; when the slot is
    /// late it is refused then, not cancelled at its deadline.
    #[tokio::test]
    async fn a_request_whose_slot_is_late_is_refused_soon() {
        let a = admission(1, 8, 60_000);
        // A running request predicted to be done at once.
        a.observe_engine(&engine(0, 0, 0.0, 1e-9));
        let _running = a.admit(WORK, far()).await.unwrap();
        let started = Instant::now();
        // It may wait `--max-slot-wait` (0.25 s here), and a quarter second more.
        let refused = a.admit(WORK, far()).await.err();
        let waited = started.elapsed();
        assert!(
            matches!(refused, Some(AdmissionError::WouldWaitForSlot { .. })),
            "{refused:?}"
        );
        let patience = a.config.max_slot_wait + SLOT_PATIENCE;
        assert!(
            waited >= patience && waited < patience + Duration::from_millis(250),
            "{waited:?}"
        );
        assert_eq!(a.gauges.queued.get(), 0);
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
            let (cost, budget) = e.cost().unwrap();
            let at = e.schedule(cost, budget, Some(e.job(WORK))).1;
            assert!(
                (at[0] - 2.0).abs() < 1e-9 && (at[1] - 4.0).abs() < 1e-9,
                "{at:?}"
            );
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
        // than a request may wait.
        let refused = a
            .admit(WORK, Instant::now() + Duration::from_secs(8))
            .await
            .err();
        let Some(AdmissionError::WouldWaitForSlot { wait, .. }) = refused else {
            panic!("{refused:?}")
        };
        assert!((wait.as_secs_f64() - 2.0).abs() < 0.01, "{wait:?}");
        assert_eq!(refused.unwrap().retry_after_secs(), 2);
    }

    /// A client that would rather wait: `--max-slot-wait` raised, the same newcomer queues.
    #[tokio::test]
    async fn a_raised_slot_wait_queues_instead() {
        let a = admission_with(AdmissionConfig {
            max_slot_wait: Duration::from_secs(3),
            ..config(1, 8, 60_000)
        });
        measure(&a, Duration::from_secs(2), Duration::from_secs(1));
        let _running = a.admit(WORK, far()).await.unwrap();
        let queued = tokio::time::timeout(
            Duration::from_millis(20),
            a.admit(WORK, Instant::now() + Duration::from_secs(8)),
        )
        .await;
        assert!(queued.is_err(), "queued, not refused");
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

    /// The engine's fitted step cost (the start-up warm-up's steps give the first one, seen
    /// at the first request) predicts before any request finishes, and finished requests do
    /// not override it.
    #[tokio::test]
    async fn the_engine_step_cost_predicts_without_any_request_finishing() {
        let a = admission(8, 8, 60_000);
        // An engine that has run no step yet: no estimate.
        a.observe_engine(&EngineStats::default());
        assert!(a.estimate.lock().unwrap().cost().is_none());
        a.observe_engine(&engine(10, 100, 0.0, 1.0 / 700.0));
        let deadline = Instant::now() + Duration::from_secs(3);
        let first = a.admit(WORK, deadline).await.unwrap();
        // 2 s each alone at 700 tokens/s: the second would end both at 4 s, past 2.7 s.
        assert!(a.admit(WORK, deadline).await.is_err());
        assert_eq!(a.gauges.predicted.get_sample_count(), 1);
        drop(first);
        measure(&a, Duration::from_secs(100), Duration::from_secs(1));
        let (cost, _) = a.estimate.lock().unwrap().cost().unwrap();
        assert!((cost.per_token - 1.0 / 700.0).abs() < 1e-9, "{cost:?}");
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
