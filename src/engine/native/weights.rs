//! Model configuration and weights for the decoder-only family we serve: Llama, Qwen2 and Qwen3,
//! one implementation with per-architecture switches (q/k norms for Qwen3, q/k/v biases for
//! Qwen2, interleaved RoPE for GGUF Llama).
//!
//! GGUF tensors stay quantized (`linear` runs them with our kernels); safetensors weights are
//! loaded as f32 and, for the CPU, quantized as they load (`--quantize`: a bf16 Qwen2.5-0.5B
//! directory served at 2.7 GB RSS with dense f32 weights, 1.15 GB with Q8_0 and f16 embeddings).
//! Norms are f32; the embedding table is f16 (a row is widened when a token is looked up): as
//! f32 it was 0.55 GB of a 0.5B model, more than its Q8_0 linear layers.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::linear::{Group, Linear};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) hidden: usize,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) vocab: usize,
    pub(crate) rope_theta: f32,
    pub(crate) rms_eps: f32,
    pub(crate) max_positions: usize,
    /// GGUF Llama stores q/k rotated in adjacent pairs; HF checkpoints in two halves.
    pub(crate) rope_interleaved: bool,
}

pub(crate) struct Layer {
    pub(crate) attn_norm: Vec<f32>,
    /// q, k and v projections.
    pub(crate) qkv: Group,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) ffn_norm: Vec<f32>,
    /// Gate and up projections.
    pub(crate) gate_up: Group,
    pub(crate) down: Linear,
}

pub(crate) struct Weights {
    pub(crate) config: Config,
    /// `[vocab, hidden]`, f16.
    pub(crate) embed: Vec<half::f16>,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    pub(crate) lm_head: Linear,
}

impl Weights {
    /// Bytes the weights hold in memory.
    pub(crate) fn resident_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let norms = l.attn_norm.len()
                    + l.ffn_norm.len()
                    + l.q_norm.as_ref().map_or(0, Vec::len)
                    + l.k_norm.as_ref().map_or(0, Vec::len);
                l.qkv.resident_bytes()
                    + l.o.resident_bytes()
                    + l.gate_up.resident_bytes()
                    + l.down.resident_bytes()
                    + norms * 4
            })
            .sum();
        layers + self.embed.len() * 2 + self.norm.len() * 4 + self.lm_head.resident_bytes()
    }

    /// Every linear layer quantized to `dtype`.
    #[cfg(test)]
    pub(crate) fn quantized(
        mut self,
        dtype: candle_core::quantized::GgmlDType,
    ) -> anyhow::Result<Self> {
        for l in &mut self.layers {
            l.qkv = l.qkv.quantized(dtype)?;
            l.o = l.o.quantized(dtype)?;
            l.gate_up = l.gate_up.quantized(dtype)?;
            l.down = l.down.quantized(dtype)?;
        }
        self.lm_head = self.lm_head.quantized(dtype)?;
        Ok(self)
    }
}

fn f16_vec(t: &Tensor) -> anyhow::Result<Vec<half::f16>> {
    Ok(t.to_dtype(DType::F16)?.flatten_all()?.to_vec1()?)
}

fn f32_vec(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// What a checkpoint format calls the tensors of a layer: layer `i`'s tensors are
/// `{prefix}.{i}.{part}.weight` (and `.bias`).
struct LayerNames {
    prefix: &'static str,
    attn_norm: &'static str,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    o: &'static str,
    /// Qwen3 only.
    q_norm: &'static str,
    /// Qwen3 only.
    k_norm: &'static str,
    ffn_norm: &'static str,
    gate: &'static str,
    up: &'static str,
    down: &'static str,
}

/// GGUF (`blk.N.attn_q.weight`).
const GGUF_NAMES: LayerNames = LayerNames {
    prefix: "blk",
    attn_norm: "attn_norm",
    q: "attn_q",
    k: "attn_k",
    v: "attn_v",
    o: "attn_output",
    q_norm: "attn_q_norm",
    k_norm: "attn_k_norm",
    ffn_norm: "ffn_norm",
    gate: "ffn_gate",
    up: "ffn_up",
    down: "ffn_down",
};

/// Hugging Face safetensors (`model.layers.N.self_attn.q_proj.weight`).
const HF_NAMES: LayerNames = LayerNames {
    prefix: "model.layers",
    attn_norm: "input_layernorm",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.o_proj",
    q_norm: "self_attn.q_norm",
    k_norm: "self_attn.k_norm",
    ffn_norm: "post_attention_layernorm",
    gate: "mlp.gate_proj",
    up: "mlp.up_proj",
    down: "mlp.down_proj",
};

/// A checkpoint's tensors, fetched by name as what a layer is built from.
trait LayerSource {
    const NAMES: LayerNames;
    /// `{name}.weight`, with `{name}.bias` when `bias`, as a linear layer.
    fn linear(&mut self, name: &str, bias: bool) -> anyhow::Result<Linear>;
    /// `{name}.weight` as f32 values (a norm's scales).
    fn vector(&mut self, name: &str) -> anyhow::Result<Vec<f32>>;
}

/// Layer `i` of any format: the one place the layer's structure is written down.
fn load_layer<S: LayerSource>(src: &mut S, arch: Arch, i: usize) -> anyhow::Result<Layer> {
    let names = &S::NAMES;
    let p = format!("{}.{i}", names.prefix);
    let name = |part: &str| format!("{p}.{part}");
    let qkv_bias = arch == Arch::Qwen2;
    let q = src.linear(&name(names.q), qkv_bias)?;
    let k = src.linear(&name(names.k), qkv_bias)?;
    let v = src.linear(&name(names.v), qkv_bias)?;
    let o = src.linear(&name(names.o), false)?;
    let gate = src.linear(&name(names.gate), false)?;
    let up = src.linear(&name(names.up), false)?;
    let down = src.linear(&name(names.down), false)?;
    let (q_norm, k_norm) = if arch == Arch::Qwen3 {
        (
            Some(src.vector(&name(names.q_norm))?),
            Some(src.vector(&name(names.k_norm))?),
        )
    } else {
        (None, None)
    };
    Ok(Layer {
        attn_norm: src.vector(&name(names.attn_norm))?,
        ffn_norm: src.vector(&name(names.ffn_norm))?,
        qkv: Group::new(vec![q, k, v]),
        o,
        q_norm,
        k_norm,
        gate_up: Group::new(vec![gate, up]),
        down,
    })
}

/// A GGUF file's tensors: block types stay quantized, norms and biases are dequantized.
struct Gguf<'a> {
    content: &'a gguf_file::Content,
    file: File,
    dev: Device,
}

impl Gguf<'_> {
    fn tensor(&mut self, name: &str) -> anyhow::Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, &self.dev)
            .map_err(|e| anyhow!("GGUF tensor {name}: {e}"))
    }

    /// `name` dequantized to f32 values.
    fn f32s(&mut self, name: &str) -> anyhow::Result<Vec<f32>> {
        f32_vec(&self.tensor(name)?.dequantize(&self.dev)?)
    }
}

impl LayerSource for Gguf<'_> {
    const NAMES: LayerNames = GGUF_NAMES;

    fn linear(&mut self, name: &str, bias: bool) -> anyhow::Result<Linear> {
        let b = if bias {
            Some(self.f32s(&format!("{name}.bias"))?)
        } else {
            None
        };
        Linear::from_qtensor(&self.tensor(&format!("{name}.weight"))?, b)
    }

    fn vector(&mut self, name: &str) -> anyhow::Result<Vec<f32>> {
        self.f32s(&format!("{name}.weight"))
    }
}

/// A safetensors checkpoint's tensors, as f32; with `quantize`, each linear layer is quantized
/// as it is taken.
struct Safetensors {
    tensors: HashMap<String, Tensor>,
    quantize: Option<GgmlDType>,
}

impl Safetensors {
    fn take(&mut self, name: &str) -> anyhow::Result<Tensor> {
        Ok(self
            .tensors
            .remove(name)
            .ok_or_else(|| anyhow!("weights lack {name}"))?
            .to_dtype(DType::F32)?)
    }

    /// Block types need whole blocks per row; a layer whose width is not (a test model's) stays
    /// dense.
    fn quantized(&self, l: Linear) -> anyhow::Result<Linear> {
        match self.quantize {
            Some(t) if l.k.is_multiple_of(t.block_size()) => l.quantized(t),
            _ => Ok(l),
        }
    }
}

impl LayerSource for Safetensors {
    const NAMES: LayerNames = HF_NAMES;

    fn linear(&mut self, name: &str, bias: bool) -> anyhow::Result<Linear> {
        let b = if bias {
            Some(f32_vec(&self.take(&format!("{name}.bias"))?)?)
        } else {
            None
        };
        let l = Linear::dense(self.take(&format!("{name}.weight"))?, b)?;
        self.quantized(l)
    }

    fn vector(&mut self, name: &str) -> anyhow::Result<Vec<f32>> {
        f32_vec(&self.take(&format!("{name}.weight"))?)
    }
}

impl Weights {
    pub(crate) fn from_gguf(path: &Path) -> anyhow::Result<(Self, gguf_file::Content)> {
        let dev = Device::Cpu;
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| anyhow!("reading GGUF {}: {e}", path.display()))?;
        let md = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| anyhow!("GGUF lacks {key}"))
        };
        let arch_name = md("general.architecture")?.to_string()?.clone();
        let arch = match arch_name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => bail!("GGUF architecture {other:?} is not served by the native engine"),
        };
        let get = |k: &str| md(&format!("{arch_name}.{k}"));
        let hidden = get("embedding_length")?.to_u32()? as usize;
        let heads = get("attention.head_count")?.to_u32()? as usize;
        let kv_heads = get("attention.head_count_kv")?.to_u32()? as usize;
        let head_dim = get("attention.key_length")
            .and_then(|v| Ok(v.to_u32()? as usize))
            .unwrap_or(hidden / heads);
        let mut src = Gguf {
            content: &content,
            file,
            dev: dev.clone(),
        };
        let embed_q = src.tensor("token_embd.weight")?;
        let vocab = embed_q.shape().dims()[0];
        let embed = f16_vec(&embed_q.dequantize(&dev)?)?;
        let lm_head = match src.tensor("output.weight") {
            Ok(t) => Linear::from_qtensor(&t, None)?,
            Err(_) => Linear::from_qtensor(&embed_q, None)?,
        };
        let config = Config {
            hidden,
            layers: get("block_count")?.to_u32()? as usize,
            heads,
            kv_heads,
            head_dim,
            vocab,
            rope_theta: get("rope.freq_base")
                .and_then(|v| Ok(v.to_f32()?))
                .unwrap_or(10_000.0),
            rms_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()?,
            max_positions: get("context_length")?.to_u32()? as usize,
            rope_interleaved: arch == Arch::Llama,
        };
        let layers = (0..config.layers)
            .map(|i| load_layer(&mut src, arch, i))
            .collect::<anyhow::Result<_>>()?;
        let norm = src.vector("output_norm")?;
        Ok((
            Self {
                config,
                embed,
                layers,
                norm,
                lm_head,
            },
            content,
        ))
    }

    /// A Hugging Face directory: config.json and one or more *.safetensors shards. With
    /// `quantize`, each linear layer is quantized as it loads, so the f32 copies of all layers
    /// never exist at once.
    pub(crate) fn from_safetensors_dir(
        dir: &Path,
        quantize: Option<GgmlDType>,
    ) -> anyhow::Result<Self> {
        let dev = Device::Cpu;
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
        let arch = match cfg["architectures"][0].as_str().unwrap_or_default() {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => bail!("architecture {other:?} is not served by the native engine"),
        };
        let num = |k: &str| {
            cfg[k]
                .as_f64()
                .ok_or_else(|| anyhow!("config.json lacks {k}"))
        };
        let hidden = num("hidden_size")? as usize;
        let heads = num("num_attention_heads")? as usize;
        let config = Config {
            hidden,
            layers: num("num_hidden_layers")? as usize,
            heads,
            kv_heads: num("num_key_value_heads").unwrap_or(heads as f64) as usize,
            head_dim: num("head_dim")
                .map(|h| h as usize)
                .unwrap_or(hidden / heads),
            vocab: num("vocab_size")? as usize,
            rope_theta: num("rope_theta").unwrap_or(10_000.0) as f32,
            rms_eps: num("rms_norm_eps")? as f32,
            max_positions: num("max_position_embeddings")? as usize,
            rope_interleaved: false,
        };
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                tensors.extend(candle_core::safetensors::load(&path, &dev)?);
            }
        }
        let mut src = Safetensors { tensors, quantize };
        let embed = src.take("model.embed_tokens.weight")?;
        let layers = (0..config.layers)
            .map(|i| load_layer(&mut src, arch, i))
            .collect::<anyhow::Result<_>>()?;
        let norm = src.vector("model.norm")?;
        let lm_head = match src.take("lm_head.weight") {
            Ok(w) => Linear::dense(w, None)?,
            Err(_) => Linear::dense(embed.clone(), None)?,
        };
        let lm_head = src.quantized(lm_head)?;
        Ok(Self {
            config,
            embed: f16_vec(&embed)?,
            layers,
            norm,
            lm_head,
        })
    }
}
