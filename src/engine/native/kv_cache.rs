//! The KV cache: one pool of fixed-size blocks shared by all sequences, and the block manager
//! that hands them out.
//!
//! A sequence owns a block table (its logical positions → pool blocks). Blocks come from a free
//! list; a request is admitted only when the blocks its prompt needs are free, so memory is
//! bounded by the pool whatever the mix of lengths.
//!
//! Prefix sharing: every *full* block is registered under a hash of all tokens up to its end
//! (a chain: the parent block's hash and this block's tokens). A new sequence looks its prompt's
//! full blocks up in that table and reuses every leading block it finds, so the system prompt of
//! a branch is computed once and then shared by every request and branch that starts with it.
//! Blocks nobody holds stay cached (and findable) until the free list runs dry; then the least
//! recently released ones are reused first.

use std::collections::{HashMap, VecDeque};

/// Positions per block. Small enough that a prompt wastes little in its last block, large enough
/// that the tables and hashes stay cheap.
pub(crate) const BLOCK_SIZE: usize = 16;

/// The pool's memory, per layer. A block holds `BLOCK_SIZE` consecutive slots
/// (`slot = block * BLOCK_SIZE + offset`) and is one contiguous run of
/// `BLOCK_SIZE * slot_width` floats, so a block is copied or reused whole.
///
/// Values are laid out `[slot][kv_head][head_dim]`: attention adds up whole value rows, each
/// position's head one run of `head_dim` floats. Keys are transposed within their block,
/// `[block][kv_head][head_dim][offset]`: attention takes one key element of 16 positions at a
/// time (two 8-float registers) against a broadcast query element, so every score is one FMA
/// chain with no horizontal sums, and a block's keys for one head (4 KiB at head_dim 64) are
/// read once for all the query heads of a step that attend to it. Scattering a new key into
/// that layout costs `slot_width` stores per token, once.
pub(crate) struct KvPool {
    k: Vec<Aligned>,
    v: Vec<Aligned>,
    /// Floats per slot: `kv_heads * head_dim`.
    pub(crate) slot_width: usize,
}

impl KvPool {
    pub(crate) fn new(layers: usize, kv_heads: usize, head_dim: usize, blocks: usize) -> Self {
        let slot_width = kv_heads * head_dim;
        let len = blocks * BLOCK_SIZE * slot_width;
        Self {
            k: (0..layers).map(|_| Aligned::zeros(len)).collect(),
            v: (0..layers).map(|_| Aligned::zeros(len)).collect(),
            slot_width,
        }
    }

    /// The keys and the values of `layer`.
    pub(crate) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (self.k[layer].get(), self.v[layer].get())
    }

    /// Store one token's keys and values (`slot_width` floats each, `[kv_head][head_dim]`) at
    /// `slot` of `layer`.
    pub(crate) fn write(&mut self, layer: usize, slot: usize, k: &[f32], v: &[f32]) {
        let sw = self.slot_width;
        self.v[layer].get_mut()[slot * sw..(slot + 1) * sw].copy_from_slice(v);
        let keys = self.k[layer].get_mut();
        let block = &mut keys[slot / BLOCK_SIZE * BLOCK_SIZE * sw..][..BLOCK_SIZE * sw];
        for (e, &x) in k.iter().enumerate() {
            block[key_index(slot % BLOCK_SIZE, e)] = x;
        }
    }
}

/// Zeroed floats whose first one starts a cache line. A block, and so every 16-position key row,
/// then starts one too: an unaligned row straddled two lines, and half the key loads were split.
/// The buffer comes zeroed from the allocator, so the pages of blocks never used stay unmapped.
struct Aligned {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    const LINE_FLOATS: usize = 64 / std::mem::size_of::<f32>();

    fn zeros(len: usize) -> Self {
        let buf = vec![0f32; len + Self::LINE_FLOATS - 1];
        let start = buf.as_ptr().align_offset(64);
        assert!(start < Self::LINE_FLOATS);
        Self { buf, start, len }
    }

    fn get(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [f32] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Index, within its block, of element `e` (`kv_head * head_dim + i`) of the key at `offset`
/// of the block.
pub(crate) fn key_index(offset: usize, e: usize) -> usize {
    e * BLOCK_SIZE + offset
}

/// Where logical position `pos` of a sequence lives in the pool.
pub(crate) fn slot(table: &[u32], pos: usize) -> usize {
    table[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
}

pub(crate) type BlockHash = u64;

/// Hash of a full block, chained on its parent so equal blocks at different prefixes differ.
pub(crate) fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // FNV-1a over the parent hash and the tokens: deterministic across runs, no allocation.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |x: u64| {
        for b in x.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(parent.unwrap_or(0x9e37_79b9_7f4a_7c15));
    for &t in tokens {
        feed(t as u64);
    }
    h
}

pub(crate) struct BlockManager {
    total: usize,
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Hash of the content of each registered block.
    hash_of: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
    /// Registered blocks nobody holds, oldest release first: reused only when `free` is empty.
    evictable: VecDeque<u32>,
    /// Off: no block is registered or matched (every prompt is computed in full).
    prefix_cache: bool,
}

impl BlockManager {
    pub(crate) fn new(blocks: usize, prefix_cache: bool) -> Self {
        Self {
            total: blocks,
            free: (0..blocks as u32).rev().collect(),
            refs: vec![0; blocks],
            hash_of: vec![None; blocks],
            cached: HashMap::new(),
            evictable: VecDeque::new(),
            prefix_cache,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Blocks that can be handed out now (free, or cached but unheld).
    pub(crate) fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub(crate) fn used(&self) -> usize {
        self.total - self.available()
    }

    /// Blocks needed to hold `positions` positions.
    pub(crate) fn blocks_for(positions: usize) -> usize {
        positions.div_ceil(BLOCK_SIZE)
    }

    /// The leading full blocks of `tokens` already in the cache, held for the caller. At most
    /// `limit` tokens' worth are matched (the caller keeps at least one token to compute).
    pub(crate) fn match_prefix(
        &mut self,
        tokens: &[u32],
        limit: usize,
    ) -> (Vec<u32>, Vec<BlockHash>) {
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = None;
        let limit = if self.prefix_cache { limit } else { 0 };
        for chunk in tokens[..limit.min(tokens.len())].chunks_exact(BLOCK_SIZE) {
            let h = block_hash(parent, chunk);
            let Some(&b) = self.cached.get(&h) else {
                break;
            };
            self.hold(b);
            blocks.push(b);
            hashes.push(h);
            parent = Some(h);
        }
        (blocks, hashes)
    }

    /// How many leading full blocks of `tokens` [`Self::match_prefix`] would find, holding none.
    pub(crate) fn peek_prefix(&self, tokens: &[u32], limit: usize) -> usize {
        let limit = if self.prefix_cache { limit } else { 0 };
        let mut parent = None;
        tokens[..limit.min(tokens.len())]
            .chunks_exact(BLOCK_SIZE)
            .take_while(|chunk| {
                let h = block_hash(parent, chunk);
                parent = Some(h);
                self.cached.contains_key(&h)
            })
            .count()
    }

    pub(crate) fn prefix_cache(&self) -> bool {
        self.prefix_cache
    }

    fn hold(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.evictable.retain(|&x| x != b);
        }
        self.refs[b as usize] += 1;
    }

    /// One fresh block, or `None` when the pool is exhausted.
    pub(crate) fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                let b = self.evictable.pop_front()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    if self.cached.get(&h) == Some(&b) {
                        self.cached.remove(&h);
                    }
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Record that block `b` is full with content hashed `h`, so later prompts can reuse it.
    pub(crate) fn register(&mut self, b: u32, h: BlockHash) {
        if !self.prefix_cache || self.hash_of[b as usize].is_some() {
            return;
        }
        // An equal block already cached keeps its place; this one simply is not findable.
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(h) {
            e.insert(b);
            self.hash_of[b as usize] = Some(h);
        }
    }

    /// Give back a sequence's blocks. Registered ones stay findable until reused.
    pub(crate) fn release(&mut self, table: &[u32]) {
        for &b in table {
            let r = &mut self.refs[b as usize];
            debug_assert!(*r > 0, "block {b} released twice");
            *r = r.saturating_sub(1);
            if *r == 0 {
                if self.hash_of[b as usize].is_some() {
                    self.evictable.push_back(b);
                } else {
                    self.free.push(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(m: &mut BlockManager, tokens: &[u32]) -> Vec<u32> {
        let mut table = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks(BLOCK_SIZE) {
            let b = m.allocate().expect("pool has room");
            if chunk.len() == BLOCK_SIZE {
                let h = block_hash(parent, chunk);
                m.register(b, h);
                parent = Some(h);
            }
            table.push(b);
        }
        table
    }

    #[test]
    fn shared_prefix_is_found_and_held() {
        let mut m = BlockManager::new(8, true);
        let prompt: Vec<u32> = (0..40).collect();
        let t1 = fill(&mut m, &prompt);
        assert_eq!(t1.len(), 3);
        assert_eq!(m.available(), 5);
        // Same first 32 tokens, different tail: both full blocks are reused.
        let mut other: Vec<u32> = (0..32).collect();
        other.extend([900, 901, 902]);
        let (blocks, _) = m.match_prefix(&other, other.len() - 1);
        assert_eq!(blocks, t1[..2].to_vec());
        // A different first block shares nothing (the hash chains on the parent).
        let mut shifted: Vec<u32> = (1..41).collect();
        shifted[0] = 7;
        assert!(m.match_prefix(&shifted, 39).0.is_empty());
        m.release(&t1);
        m.release(&blocks);
        assert_eq!(m.available(), 8, "everything is reusable once released");
        // Released but registered blocks stay findable until the pool needs them.
        assert_eq!(m.match_prefix(&prompt, 39).0.len(), 2);
    }

    #[test]
    fn exhausted_pool_reuses_cached_blocks_oldest_first_and_then_refuses() {
        let mut m = BlockManager::new(2, true);
        let t = fill(&mut m, &(0..32).collect::<Vec<u32>>());
        assert!(m.allocate().is_none(), "both blocks are held");
        m.release(&t);
        let a = m.allocate().unwrap();
        assert_eq!(a, t[0], "oldest released block is reused first");
        // Its registration is gone with its content: only the second block could still match,
        // and it cannot, because its parent is gone.
        assert!(m
            .match_prefix(&(0..32).collect::<Vec<u32>>(), 32)
            .0
            .is_empty());
        assert!(m.allocate().is_some());
        assert!(m.allocate().is_none());
    }

    #[test]
    fn match_respects_limit() {
        let mut m = BlockManager::new(4, true);
        let p: Vec<u32> = (0..32).collect();
        let t = fill(&mut m, &p);
        // The whole prompt is cached, but one token must still be computed: only one block.
        let (blocks, _) = m.match_prefix(&p, p.len() - 1);
        assert_eq!(blocks.len(), 1);
        m.release(&blocks);
        m.release(&t);
    }

    #[test]
    fn without_prefix_cache_nothing_is_shared() {
        let mut m = BlockManager::new(8, false);
        let toks: Vec<u32> = (0..40).collect();
        let (shared, _) = m.match_prefix(&toks, 39);
        assert!(shared.is_empty());
        let a = m.allocate().unwrap();
        m.register(a, block_hash(None, &toks[..BLOCK_SIZE]));
        m.release(&[a]);
        let (shared, _) = m.match_prefix(&toks, 39);
        assert!(
            shared.is_empty(),
            "a registered block was found with the cache off"
        );
    }
}
