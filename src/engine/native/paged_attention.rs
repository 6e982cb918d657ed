//! Decode attention that reads the KV pool in place through the block tables: the tensor path's
//! default for a step's single-row runs.
//!
//! The reference path (`TensorModel::decode_attention` with `DecodeAttention::Gather`) first
//! copies every decode row's keys and values out of the pool into a padded batch, per layer. At
//! 256 sequences of 1,000 positions on the Qwen3-0.6B shape (8 KV heads of 128) that is
//! 256 × 1,000 × 2 × 1,024 × 2 bytes ≈ 1 GB written and read again per layer per step in bf16,
//! more than the model's weights. This op reads each cached key and value once, where it lies,
//! and writes only the output rows.
//!
//! Layout (`kv_cache`): a layer's pool is `[slot, kv_heads * head_dim]`, `slot = block *
//! BLOCK_SIZE + offset`. The op takes `meta`, `[batch, 1 + blocks]` u32: each row's context length
//! (its cached positions plus the new one, whose key the step has already written), then its
//! block table, zero-padded. Heads `kv * group .. (kv + 1) * group` share KV head `kv`.
//!
//! Two implementations of the same contract: `cpu_fwd` (the `cpu-tensors` device, and how the
//! op is tested on machines without a GPU) and, in `native-cuda` builds, `cuda_fwd` with the
//! kernel of `paged_attention.cu` (built to PTX by build.rs). Both compute scores and softmax in
//! f32 whatever the pool's dtype. The tests compare each with the gather path.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kv_cache::BLOCK_SIZE;
use super::step::Run;

/// `paged_attention.cu`'s limits: the kernel keeps a lane's share of the query heads of one KV
/// head in registers.
const MAX_GROUP: usize = 8;
const MAX_HEAD_DIM: usize = 256;

/// Whether a model's head layout fits the paged kernel; others use the gather path.
pub(crate) fn supports(heads: usize, kv_heads: usize, head_dim: usize) -> bool {
    heads.is_multiple_of(kv_heads) && heads / kv_heads <= MAX_GROUP && head_dim <= MAX_HEAD_DIM
}

/// The `meta` tensor for the given single-row runs: context length, then the block table.
pub(crate) fn meta(runs: &[&Run], dev: &Device) -> Result<Tensor> {
    let width = 1 + runs
        .iter()
        .map(|r| (r.start + 1).div_ceil(BLOCK_SIZE))
        .max()
        .unwrap_or(0);
    let mut meta = Vec::with_capacity(runs.len() * width);
    for r in runs {
        let len = r.start + 1;
        let blocks = len.div_ceil(BLOCK_SIZE);
        meta.push(len as u32);
        meta.extend_from_slice(&r.table[..blocks]);
        meta.resize(meta.len() + width - 1 - blocks, 0);
    }
    Tensor::from_vec(meta, (runs.len(), width), dev)
}

/// `q`: `[batch, heads, head_dim]`; pools `[slots, kv_heads * head_dim]`; returns `[batch, heads
/// * head_dim]` in `q`'s dtype.
pub(crate) fn decode(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    meta: &Tensor,
    kv_heads: usize,
) -> Result<Tensor> {
    let (_, heads, head_dim) = q.dims3()?;
    if !supports(heads, kv_heads, head_dim) {
        candle_core::bail!("paged attention: {heads} heads over {kv_heads} of {head_dim}");
    }
    if meta.dtype() != DType::U32 || meta.dim(0)? != q.dim(0)? {
        candle_core::bail!("paged attention: meta must be [batch, 1 + blocks] u32");
    }
    let op = PagedDecode {
        meta: meta.clone(),
        heads,
        kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    q.contiguous()?.apply_op3_no_bwd(k_pool, v_pool, &op)
}

struct PagedDecode {
    meta: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

impl PagedDecode {
    fn out_shape(&self, batch: usize) -> Shape {
        (batch, self.heads * self.head_dim).into()
    }
}

/// Where a contiguous tensor's elements lie in its storage.
fn offsets(l: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("paged attention: {what} must be contiguous"),
    }
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    Ok(&s[offsets(l, what)?])
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (meta, lm) = self.meta.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::U32(meta)) = &*meta else {
            candle_core::bail!("paged attention: meta must be a CPU u32 tensor here");
        };
        let meta = contiguous(meta, lm, "meta")?;
        let batch = lq.dims()[0];
        let width = lm.dims()[1];
        let out = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.cpu(q, lq, k, lk, v, lv, meta, width)?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.cpu(q, lq, k, lk, v, lv, meta, width)?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.cpu(q, lq, k, lk, v, lv, meta, width)?)
            }
            _ => candle_core::bail!("paged attention: q, k and v must share a float dtype"),
        };
        Ok((out, self.out_shape(batch)))
    }

    #[cfg(feature = "native-cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        lq: &Layout,
        k: &candle_core::CudaStorage,
        lk: &Layout,
        v: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, q, lq, k, lk, v, lv)
    }
}

impl PagedDecode {
    #[allow(clippy::too_many_arguments)]
    fn cpu<T: candle_core::WithDType>(
        &self,
        q: &[T],
        lq: &Layout,
        k: &[T],
        lk: &Layout,
        v: &[T],
        lv: &Layout,
        meta: &[u32],
        width: usize,
    ) -> Result<Vec<T>> {
        let (q, k, v) = (
            contiguous(q, lq, "q")?,
            contiguous(k, lk, "the key pool")?,
            contiguous(v, lv, "the value pool")?,
        );
        let (heads, kv_heads, d) = (self.heads, self.kv_heads, self.head_dim);
        let group = heads / kv_heads;
        let row = kv_heads * d;
        let batch = lq.dims()[0];
        let mut out = vec![T::zero(); batch * heads * d];
        // Output rows of one (sequence, KV head) are its group's heads: one contiguous chunk.
        out.par_chunks_mut(group * d)
            .enumerate()
            .for_each(|(i, out)| {
                let (seq, kvh) = (i / kv_heads, i % kv_heads);
                let m = &meta[seq * width..(seq + 1) * width];
                let (len, table) = (m[0] as usize, &m[1..]);
                let slots: Vec<usize> = (0..len)
                    .map(|p| table[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE)
                    .collect();
                let mut scores = vec![0f32; len];
                let mut acc = vec![0f32; d];
                for g in 0..group {
                    let head = kvh * group + g;
                    let qh = &q[(seq * heads + head) * d..][..d];
                    for (s, &slot) in scores.iter_mut().zip(&slots) {
                        let kr = &k[slot * row + kvh * d..][..d];
                        let dot: f32 = qh
                            .iter()
                            .zip(kr)
                            .map(|(a, b)| a.to_f64() as f32 * b.to_f64() as f32)
                            .sum();
                        *s = dot * self.scale;
                    }
                    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                    let mut sum = 0f32;
                    for s in &mut scores {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    acc.fill(0.0);
                    for (&p, &slot) in scores.iter().zip(&slots) {
                        let vr = &v[slot * row + kvh * d..][..d];
                        for (a, x) in acc.iter_mut().zip(vr) {
                            *a += p * x.to_f64() as f32;
                        }
                    }
                    for (o, a) in out[g * d..(g + 1) * d].iter_mut().zip(&acc) {
                        *o = T::from_f64((a / sum) as f64);
                    }
                }
            });
        Ok(out)
    }
}

#[cfg(feature = "native-cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
    use candle_core::{CudaDevice, CudaStorage, Layout, Result, Shape};

    use super::{offsets, PagedDecode};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
    /// `paged_attention.cu`'s WARPS: threads per block = 32 * WARPS.
    const WARPS: u32 = 4;

    pub(super) fn forward(
        op: &PagedDecode,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device.clone();
        let (meta, lm) = op.meta.storage_and_layout();
        let candle_core::Storage::Cuda(meta) = &*meta else {
            candle_core::bail!("paged attention: meta must be on the GPU");
        };
        let meta = meta.as_cuda_slice::<u32>()?.slice(offsets(lm, "meta")?);
        let batch = lq.dims()[0];
        let width = lm.dims()[1] as u32;
        // One kernel per dtype (`paged_attention.cu`'s PAGED_DECODE instances).
        macro_rules! by_dtype {
            ($($dtype:ident => $kernel:literal),*) => {
                match (&q.slice, &k.slice, &v.slice) {
                    $((
                        CudaStorageSlice::$dtype(q),
                        CudaStorageSlice::$dtype(k),
                        CudaStorageSlice::$dtype(v),
                    ) => CudaStorageSlice::$dtype(launch(
                        op,
                        $kernel,
                        &dev,
                        [(q, lq, "q"), (k, lk, "the key pool"), (v, lv, "the value pool")],
                        &meta,
                        width,
                    )?),)*
                    _ => candle_core::bail!("paged attention: q, k and v must share a float dtype"),
                }
            };
        }
        let slice = by_dtype!(
            F32 => "paged_decode_f32",
            F16 => "paged_decode_f16",
            BF16 => "paged_decode_bf16"
        );
        Ok((CudaStorage { slice, device: dev }, op.out_shape(batch)))
    }

    /// `inputs`: q, the key pool and the value pool, each with its layout and its name for errors.
    fn launch<T: DeviceRepr>(
        op: &PagedDecode,
        kernel: &str,
        dev: &CudaDevice,
        inputs: [(&CudaSlice<T>, &Layout, &str); 3],
        meta: &CudaView<u32>,
        width: u32,
    ) -> Result<CudaSlice<T>> {
        let batch = inputs[0].1.dims()[0];
        let [q, k, v] = inputs.map(|(s, l, what)| offsets(l, what).map(|r| s.slice(r)));
        let (q, k, v) = (q?, k?, v?);
        let group = op.heads / op.kv_heads;
        let func = dev.get_or_load_custom_func(kernel, "memex_paged_attention", PTX)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(batch * op.heads * op.head_dim)? };
        let cfg = LaunchConfig {
            grid_dim: (op.kv_heads as u32, batch as u32, 1),
            block_dim: (32 * WARPS, 1, 1),
            // The warps' accumulators: [WARPS][group][head_dim] f32.
            shared_mem_bytes: WARPS * (group * op.head_dim * 4) as u32,
        };
        let (heads, kv_heads, head_dim) = (op.heads as u32, op.kv_heads as u32, op.head_dim as u32);
        let mut b = func.builder();
        b.arg(&q);
        b.arg(&k);
        b.arg(&v);
        b.arg(meta);
        b.arg(&out);
        b.arg(&heads);
        b.arg(&kv_heads);
        b.arg(&head_dim);
        b.arg(&width);
        b.arg(&op.scale);
        // SAFETY: the kernel reads q [batch, heads, head_dim], the pools at the slots the block
        // tables name (allocated by the block manager inside the pool), meta [batch, width], and
        // writes out [batch, heads * head_dim], all sized above.
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

/// The CPU device, or the GPU with `MEMEX_TEST_TENSOR_DEVICE=cuda` (a `native-cuda` build): the
/// tensor path's tests run on either.
#[cfg(test)]
pub(crate) fn test_device() -> Device {
    match std::env::var("MEMEX_TEST_TENSOR_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("MEMEX_TEST_TENSOR_DEVICE=cuda: no CUDA device"),
        _ => Device::Cpu,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Attention of one query row over the given slots, in f64, straight from the definition.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        slots: &[usize],
        heads: usize,
        kv_heads: usize,
        d: usize,
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let mut out = vec![0f32; heads * d];
        for h in 0..heads {
            let kvh = h / group;
            let at = |pool: &[f32], s: usize, j: usize| pool[s * kv_heads * d + kvh * d + j] as f64;
            let scores: Vec<f64> = slots
                .iter()
                .map(|&s| {
                    (0..d)
                        .map(|j| q[h * d + j] as f64 * at(k, s, j))
                        .sum::<f64>()
                })
                .map(|x| x / (d as f64).sqrt())
                .collect();
            let max = scores.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for j in 0..d {
                let x: f64 = e.iter().zip(slots).map(|(p, &s)| p * at(v, s, j)).sum();
                out[h * d + j] = (x / sum) as f32;
            }
        }
        out
    }

    /// Sequences of several lengths (one position; a block exactly; one past it; many blocks)
    /// over scattered, non-increasing blocks, for each head layout the kernel supports at its
    /// limits, in each dtype: the op matches the definition.
    #[test]
    fn reads_the_pool_through_the_block_tables() {
        let dev = test_device();
        let blocks = 40;
        for (heads, kv_heads, d) in [
            (4, 2, 16),
            (16, 8, 128),
            (8, 1, 256),
            (9, 3, 64),
            (6, 2, 80),
        ] {
            assert!(supports(heads, kv_heads, d));
            let width = kv_heads * d;
            let k = values(1, blocks * BLOCK_SIZE * width);
            let v = values(2, blocks * BLOCK_SIZE * width);
            let lens = [1usize, 16, 17, 100, 5];
            // Each sequence's blocks, from the end of the pool backwards and interleaved.
            let tables: Vec<Vec<u32>> = (0..lens.len())
                .map(|i| (0..7).map(|b| (blocks - 1 - (b * 5 + i)) as u32).collect())
                .collect();
            let q = values(3, lens.len() * heads * d);
            let want: Vec<f32> = lens
                .iter()
                .zip(&tables)
                .enumerate()
                .flat_map(|(i, (&len, t))| {
                    let slots: Vec<usize> = (0..len)
                        .map(|p| t[p / BLOCK_SIZE] as usize * BLOCK_SIZE + p % BLOCK_SIZE)
                        .collect();
                    naive(
                        &q[i * heads * d..][..heads * d],
                        &k,
                        &v,
                        &slots,
                        heads,
                        kv_heads,
                        d,
                    )
                })
                .collect();
            let runs: Vec<Run> = lens
                .iter()
                .zip(&tables)
                .map(|(&len, t)| Run {
                    tokens: &[0],
                    start: len - 1,
                    table: t,
                    wants_logits: true,
                })
                .collect();
            let refs: Vec<&Run> = runs.iter().collect();
            let meta = meta(&refs, &dev).unwrap();
            for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F16, 1e-2), (DType::BF16, 3e-2)]
            {
                let t = |x: &[f32], shape: (usize, usize)| {
                    Tensor::from_slice(x, shape, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let pool_shape = (blocks * BLOCK_SIZE, width);
                let got = decode(
                    &t(&q, (lens.len(), heads * d))
                        .reshape((lens.len(), heads, d))
                        .unwrap(),
                    &t(&k, pool_shape),
                    &t(&v, pool_shape),
                    &meta,
                    kv_heads,
                )
                .unwrap();
                assert_eq!(got.dims(), [lens.len(), heads * d]);
                let got = got
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff < tolerance,
                    "{heads}/{kv_heads}x{d} {dtype:?}: off by {diff}"
                );
            }
        }
    }

    #[test]
    fn layouts_the_kernel_cannot_hold_are_refused() {
        assert!(!supports(32, 2, 128), "a group of 16");
        assert!(!supports(8, 8, 512), "head_dim over 256");
        assert!(!supports(8, 3, 64), "heads not a multiple of KV heads");
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 8, 512), DType::F32, &dev).unwrap();
        let pool = Tensor::zeros((16, 8 * 512), DType::F32, &dev).unwrap();
        let meta = Tensor::from_vec(vec![1u32, 0], (1, 2), &dev).unwrap();
        assert!(decode(&q, &pool, &pool, &meta, 8).is_err());
    }
}
