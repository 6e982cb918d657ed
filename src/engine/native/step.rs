//! One engine step's inputs, planned once for whichever forward pass runs them.
//!
//! A step is the scheduled sequences' runs of tokens flattened into one batch of rows. Both
//! forward passes need the same plan: each row's token, sequence position and KV slot, and which
//! rows' logits go back to which run. [`Step`] builds it; [`ForwardPass`] is what each pass
//! implements:
//! - `host_model::HostPass`: our CPU kernels over a KV pool in host memory (`--native-device cpu`);
//! - `tensor_model::TensorModel`: candle tensor ops over a pool of device tensors (`cuda`, or
//!   `cpu-tensors` to check that path on a machine without a GPU).

use candle_core::Result;

use super::kv_cache::slot;
use super::weights::Config;

/// One sequence's part of a step.
pub(crate) struct Run<'a> {
    /// The tokens to run now.
    pub(crate) tokens: &'a [u32],
    /// Positions already in the cache (the first token of the run sits at this position).
    pub(crate) start: usize,
    /// The sequence's block table; it covers `start + tokens.len()` positions.
    pub(crate) table: &'a [u32],
    /// Whether the logits after the run's last token are needed (false mid-prefill).
    pub(crate) wants_logits: bool,
}

/// The runs flattened into rows, in run order.
pub(crate) struct Step<'a> {
    pub(crate) runs: &'a [Run<'a>],
    /// Every row's token.
    pub(crate) ids: Vec<u32>,
    /// Per row: its run and its position in that run's sequence.
    pub(crate) rows: Vec<(usize, usize)>,
    /// Per row: the pool slot its key and value are written to.
    pub(crate) slots: Vec<usize>,
    /// The rows whose logits are wanted (each wanting run's last row), in run order.
    pub(crate) logit_rows: Vec<usize>,
}

/// For each run that wants them, the logits after its last token; `None` for the others.
pub(crate) type StepLogits = Vec<Option<Vec<f32>>>;

impl<'a> Step<'a> {
    pub(crate) fn new(runs: &'a [Run<'a>]) -> Self {
        let mut step = Step {
            runs,
            ids: Vec::new(),
            rows: Vec::new(),
            slots: Vec::new(),
            logit_rows: Vec::new(),
        };
        for (ri, r) in runs.iter().enumerate() {
            step.ids.extend_from_slice(r.tokens);
            for pos in r.start..r.start + r.tokens.len() {
                step.rows.push((ri, pos));
                step.slots.push(slot(r.table, pos));
            }
            if r.wants_logits && !r.tokens.is_empty() {
                step.logit_rows.push(step.rows.len() - 1);
            }
        }
        step
    }

    /// Refuse a step the model cannot run: a token outside its vocabulary or a position past
    /// its rotary tables would otherwise index out of bounds (host) or fail deep in a kernel.
    pub(crate) fn check(&self, config: &Config, positions: usize) -> Result<()> {
        if let Some(&id) = self.ids.iter().find(|&&id| id as usize >= config.vocab) {
            candle_core::bail!("token {id} is outside the vocabulary of {}", config.vocab);
        }
        if let Some(&(_, pos)) = self.rows.iter().find(|&&(_, pos)| pos >= positions) {
            candle_core::bail!("position {pos} is beyond the {positions} the model covers");
        }
        Ok(())
    }

    /// Deal the logits of `logit_rows`, given in that order, back to their runs.
    pub(crate) fn per_run(&self, mut logits: impl Iterator<Item = Vec<f32>>) -> StepLogits {
        self.runs
            .iter()
            .map(|r| {
                (r.wants_logits && !r.tokens.is_empty())
                    .then(|| logits.next())
                    .flatten()
            })
            .collect()
    }
}

/// A forward pass: runs a step, writing its keys and values into the pass's KV pool.
pub(crate) trait ForwardPass: Send {
    fn config(&self) -> &Config;

    /// Positions the pass covers (its rotary tables); longer prompts are refused at admission.
    fn max_positions(&self) -> usize;

    fn forward(&mut self, step: &Step) -> Result<StepLogits>;

    /// Plan `runs`, check them and run them.
    fn run(&mut self, runs: &[Run]) -> Result<StepLogits> {
        let step = Step::new(runs);
        step.check(self.config(), self.max_positions())?;
        self.forward(&step)
    }
}
