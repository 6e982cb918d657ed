//! Choosing the next token: greedy under the grammar's mask, after a DRY repetition penalty.
//!
//! Small models loop on a phrase inside a JSON string until its `maxLength` (SmolLM2 generated
//! 3,461 tokens for one dialogue before this guard, 311 after, on the reference engine). DRY
//! ("don't repeat yourself") lowers the logit of a token that would extend a sequence already
//! seen in the context, by `multiplier * base^(match_len - allowed_len)`. Matches never span a
//! sequence breaker (JSON punctuation), so the structure every item repeats is left alone. The
//! parameters match what the reference backend runs with, so both engines generate alike.

use std::collections::{HashMap, HashSet};

use llguidance::toktrie::SimpleVob;

/// Longest match considered, so that an adversarial repetitive prompt costs bounded time.
const MAX_MATCH: usize = 50;

#[derive(Debug, Clone)]
pub(crate) struct Dry {
    pub(crate) multiplier: f32,
    pub(crate) base: f32,
    pub(crate) allowed_length: usize,
    pub(crate) breakers: HashSet<u32>,
}

impl Dry {
    /// `breakers` are strings; each becomes the token a tokenizer produces for it at the end of
    /// a word (the same approximation the reference engine makes).
    pub(crate) fn new(
        multiplier: f32,
        breakers: &[&str],
        tokenizer: &tokenizers::Tokenizer,
    ) -> Self {
        let breakers = breakers
            .iter()
            .filter_map(|b| {
                let enc = tokenizer.encode_fast(format!("a{b}"), false).ok()?;
                enc.get_ids().last().copied()
            })
            .collect();
        Self {
            multiplier,
            base: 1.75,
            allowed_length: 3,
            breakers,
        }
    }

    /// Penalise, in `logits`, every token that would extend a repeat of the end of `context`.
    pub(crate) fn apply(&self, logits: &mut [f32], context: &[u32]) {
        let Some(&last) = context.last() else {
            return;
        };
        if self.multiplier == 0.0 {
            return;
        }
        let n = context.len();
        let mut longest: HashMap<u32, usize> = HashMap::new();
        for i in (0..n - 1).filter(|&i| context[i] == last) {
            let next = context[i + 1];
            if self.breakers.contains(&next) {
                continue;
            }
            // How far back the text before `next` equals the text before the end.
            let mut len = 1;
            while len < MAX_MATCH && len <= i {
                let prev = context[n - 1 - len];
                if context[i - len] != prev || self.breakers.contains(&prev) {
                    break;
                }
                len += 1;
            }
            let e = longest.entry(next).or_insert(0);
            *e = (*e).max(len);
        }
        for (tok, len) in longest {
            if len >= self.allowed_length {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l -= self.multiplier * self.base.powf((len - self.allowed_length) as f32);
                }
            }
        }
    }
}

/// The highest-logit token the mask allows, if any.
pub(crate) fn greedy(logits: &[f32], mask: &SimpleVob) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    mask.iter_set_entries(|i| {
        if let Some(&v) = logits.get(i) {
            if best.is_none_or(|(_, b)| v > b) {
                best = Some((i as u32, v));
            }
        }
    });
    best.map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dry(breakers: &[u32]) -> Dry {
        Dry {
            multiplier: 1.0,
            base: 2.0,
            allowed_length: 2,
            breakers: breakers.iter().copied().collect(),
        }
    }

    #[test]
    fn penalises_the_token_that_continues_a_repeat() {
        // "1 2 3 4 ... 1 2 3": continuing with 4 repeats a 3-token run.
        let ctx = [1, 2, 3, 4, 9, 1, 2, 3];
        let mut logits = vec![0.0; 10];
        dry(&[]).apply(&mut logits, &ctx);
        assert_eq!(logits[4], -2.0, "match of 3 over allowed 2: 1 * 2^1");
        assert!(logits.iter().enumerate().all(|(i, &l)| i == 4 || l == 0.0));
    }

    #[test]
    fn breakers_stop_matches() {
        let ctx = [1, 2, 3, 4, 9, 1, 2, 3];
        let mut logits = vec![0.0; 10];
        // With 2 a breaker the match before 4 is only "3" (length 1 < allowed).
        dry(&[2]).apply(&mut logits, &ctx);
        assert!(logits.iter().all(|&l| l == 0.0));
    }

    #[test]
    fn greedy_respects_the_mask() {
        let mut mask = SimpleVob::alloc(4);
        mask.allow_token(1);
        mask.allow_token(3);
        assert_eq!(greedy(&[9.0, 1.0, 8.0, 2.0], &mask), Some(3));
        assert_eq!(greedy(&[9.0, 1.0, 8.0, 2.0], &SimpleVob::alloc(4)), None);
    }
}
