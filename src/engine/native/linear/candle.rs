//! The candle bridge: a layer's weight in candle's types for the tensor path (`CandleWeight`),
//! and the GGUF types without a kernel of ours (Q2_K, Q3_K, Q8_K), run through candle's block dot
//! products with the same row reuse (`GgmlWeight`).

use anyhow::bail;
use candle_core::quantized::{GgmlDType, GgmlType, QTensor};
use candle_core::{Device, Tensor};

use super::blocks::block_bytes;
use super::matmul::by_weight_rows;
use super::{Linear, Weight};

/// A linear layer's weight as candle holds it, for the tensor path (`tensor_model`): GGUF blocks
/// keep their bytes and type, dense weights stay a tensor.
pub(crate) enum CandleWeight {
    Quantized(QTensor),
    Dense(Tensor),
}

impl Linear {
    /// The weight and bias in candle's types on `dev` (the same bytes, so the same model).
    pub(crate) fn to_candle(&self, dev: &Device) -> anyhow::Result<(CandleWeight, Option<&[f32]>)> {
        let q = |dtype: GgmlDType, bytes: &[u8]| -> anyhow::Result<CandleWeight> {
            Ok(CandleWeight::Quantized(
                candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    bytes,
                    vec![self.n, self.k],
                    dev,
                )?,
            ))
        };
        let weight = match &self.weight {
            Weight::Ggml(w) => {
                let (dtype, bytes) = w.raw();
                q(dtype, bytes)?
            }
            Weight::Dense(w) => CandleWeight::Dense(w.to_device(dev)?),
            w => {
                let (dtype, bytes) = w.native_bytes().expect("one of our block types");
                q(dtype, bytes)?
            }
        };
        Ok((weight, self.bias.as_deref()))
    }
}

// ---------------------------------------------------------------------------------------------
// Other GGUF types: candle's block dot products, with the same row reuse.

pub(super) trait GgmlRows: Send + Sync {
    fn forward(&self, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32>;
    /// The block type and the blocks' GGUF bytes.
    fn raw(&self) -> (GgmlDType, &[u8]);
}

struct GgmlWeight<T: GgmlType> {
    blocks: Vec<T>,
}

pub(super) fn ggml<T: GgmlType + 'static>(
    bytes: &[u8],
    n: usize,
    k: usize,
) -> anyhow::Result<Weight> {
    if !k.is_multiple_of(T::BLCK_SIZE) {
        bail!("{k} inputs are not whole blocks of {}", T::BLCK_SIZE);
    }
    let size = std::mem::size_of::<T>();
    let count = n * (k / T::BLCK_SIZE);
    if bytes.len() != count * size {
        bail!("{} bytes for {count} blocks of {size}", bytes.len());
    }
    let mut blocks = vec![T::zeros(); count];
    // SAFETY: candle's block types are `repr(C)` mirrors of the GGUF layout made of integers
    // and f16s, valid for any bits; exactly `count * size` bytes are written.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len());
    }
    Ok(Weight::Ggml(Box::new(GgmlWeight { blocks })))
}

impl<T: GgmlType> GgmlRows for GgmlWeight<T> {
    fn raw(&self) -> (GgmlDType, &[u8]) {
        // SAFETY: candle's block types are `repr(C)` mirrors of the GGUF layout (see `ggml`).
        (T::DTYPE, unsafe { block_bytes(&self.blocks) })
    }

    fn forward(&self, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let kb = k / T::VecDotType::BLCK_SIZE;
        let mut act = vec![T::VecDotType::zeros(); m * kb];
        for (a, x) in act.chunks_mut(kb).zip(x.chunks(k)) {
            T::VecDotType::from_float(x, a);
        }
        let wb = k / T::BLCK_SIZE;
        by_weight_rows(m, n, |cols, out| {
            for j in cols {
                let wrow = &self.blocks[j * wb..(j + 1) * wb];
                for r in 0..m {
                    out.put(r, j, &[T::vec_dot(k, wrow, &act[r * kb..(r + 1) * kb])]);
                }
            }
        })
    }
}
