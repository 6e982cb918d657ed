//! A tiny random-weight Qwen3, written to disk for tests, benchmarks and CI smoke runs.
//!
//! It is a real `Qwen3ForCausalLM` (q/k norms, GQA, tied embeddings) scaled down to 2 layers and
//! hidden size 64, with a byte-level BPE tokenizer (256 byte tokens, no merges) plus the ChatML
//! special tokens and a ChatML chat template. It loads through exactly the same path as the
//! production model. Its text is noise, but under a JSON-schema constraint every output must still
//! be valid, bounded JSON, which makes it a strong end-to-end check.
//!
//! Like SmolLM2, its chat EOS is `<|im_end|>` while the grammar's EOS is `<|endoftext|>`: the
//! mismatch that once made every constrained request run to `max_len` is reproduced on purpose.
//!
//! `--preset qwen3-0.6b` writes random bf16 weights in the production extractor's exact shape
//! (28 layers, hidden 1,024, 16 query / 8 KV heads of 128, 151,936 vocabulary, tied embeddings,
//! 1.2 GB): its outputs mean nothing, its cost is the real one, for benchmarks of attention and
//! the KV cache at the production shape.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The network's dimensions and the weights' storage type.
struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    /// `None`: as large as the tokenizer needs.
    vocab: Option<usize>,
    max_positions: usize,
    bf16: bool,
}

const TINY: Shape = Shape {
    hidden: 64,
    layers: 2,
    heads: 4,
    kv_heads: 2,
    head_dim: 16,
    intermediate: 128,
    vocab: None,
    max_positions: 32768,
    bf16: false,
};

/// Qwen3-0.6B's `config.json`.
const QWEN3_0_6B: Shape = Shape {
    hidden: 1024,
    layers: 28,
    heads: 16,
    kv_heads: 8,
    head_dim: 128,
    intermediate: 3072,
    vocab: Some(151_936),
    max_positions: 40960,
    bf16: true,
};

/// `memex tiny-model --preset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, hidden 64, f32: the tests' model.
    Tiny,
    /// Qwen3-0.6B's exact shape, random bf16 weights.
    #[value(name = "qwen3-0.6b")]
    Qwen3_0_6b,
}

const CHAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The vocabulary the weights are shaped for.
struct Vocab {
    size: usize,
    bos: usize,
    eos: usize,
    /// Bias byte tokens as described at [`embeddings`]; only meaningful for the byte tokenizer.
    byte_bias: bool,
}

/// Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
/// generation_config.json into `dir`. The same seed gives the same bytes.
pub fn write(dir: &Path, seed: u64) -> anyhow::Result<()> {
    write_preset(dir, seed, Preset::Tiny, None)
}

/// `write` in a preset's shape, with the tokenizer in `tokenizer_dir` when given (its vocabulary
/// then sizes the tiny preset's).
pub fn write_preset(
    dir: &Path,
    seed: u64,
    preset: Preset,
    tokenizer_dir: Option<&Path>,
) -> anyhow::Result<()> {
    let shape = match preset {
        Preset::Tiny => &TINY,
        Preset::Qwen3_0_6b => &QWEN3_0_6B,
    };
    match tokenizer_dir {
        Some(t) => write_with_shape(dir, seed, t, shape),
        None => write_byte_level(dir, seed, shape),
    }
}

fn write_byte_level(dir: &Path, seed: u64, shape: &Shape) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer_json())?,
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&tokenizer_config())?,
    )?;
    let vocab = Vocab {
        size: shape.vocab.unwrap_or(256 + SPECIAL_TOKENS.len()),
        bos: 256,
        eos: 258,
        // Only the tests' model is steered; a production-shape one is for timing.
        byte_bias: shape.vocab.is_none(),
    };
    write_model(dir, seed, &vocab, shape)
}

/// The same tiny network with a real tokenizer (a directory holding `tokenizer.json` and
/// `tokenizer_config.json`, e.g. Qwen3's): the vocabulary grows to the tokenizer's and the rest
/// stays tiny. For tests that need the production model's token counts and chat template.
pub fn write_with_tokenizer(dir: &Path, seed: u64, tokenizer_dir: &Path) -> anyhow::Result<()> {
    write_with_shape(dir, seed, tokenizer_dir, &TINY)
}

fn write_with_shape(
    dir: &Path,
    seed: u64,
    tokenizer_dir: &Path,
    shape: &Shape,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_dir.join(name), dir.join(name))?;
    }
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("reading the tokenizer: {e}"))?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .map(|i| i as usize)
            .ok_or_else(|| anyhow::anyhow!("the tokenizer has no {t}"))
    };
    let vocab = Vocab {
        // Padded to a multiple of 128 like real checkpoints.
        size: shape
            .vocab
            .unwrap_or(tok.get_vocab_size(true).div_ceil(128) * 128),
        bos: id("<|endoftext|>")?,
        eos: id("<|im_end|>")?,
        byte_bias: false,
    };
    if vocab.size < tok.get_vocab_size(true) {
        anyhow::bail!(
            "the tokenizer has more tokens than the preset's {}",
            vocab.size
        );
    }
    write_model(dir, seed, &vocab, shape)
}

fn write_model(dir: &Path, seed: u64, vocab: &Vocab, shape: &Shape) -> anyhow::Result<()> {
    let config = json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab.size,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": true,
        "attention_bias": false,
        "sliding_window": null,
        "use_sliding_window": false,
        "max_window_layers": shape.layers,
        "torch_dtype": if shape.bf16 { "bfloat16" } else { "float32" },
        "bos_token_id": 0,
        "eos_token_id": vocab.eos
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    std::fs::write(
        dir.join("generation_config.json"),
        serde_json::to_vec_pretty(&json!({"eos_token_id": vocab.eos, "bos_token_id": vocab.bos}))?,
    )?;
    write_weights(&dir.join("model.safetensors"), seed, vocab, shape)?;
    Ok(())
}

/// GPT-2's byte → printable-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = ('!' as u32..='~' as u32).collect();
    printable.extend('¡' as u32..='¬' as u32);
    printable.extend('®' as u32..='ÿ' as u32);
    let mut map = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map[b as usize] = char::from_u32(c).expect("valid char");
    }
    map
}

fn added_token(id: usize, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

fn tokenizer_json() -> serde_json::Value {
    let vocab: BTreeMap<String, usize> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), i))
        .collect();
    let added: Vec<_> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| added_token(256 + i, t))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

fn tokenizer_config() -> serde_json::Value {
    let decoder: serde_json::Map<String, serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| ((256 + i).to_string(), added_token(256 + i, t)))
        .collect();
    json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "model_max_length": 32768,
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": CHAT_TEMPLATE
    })
}

/// SplitMix64: a fixed, dependency-free generator so the weights are the same on every machine.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-scale, scale].
    fn tensor(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (self.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    }
}

/// Token embeddings with a dominant dimension 0. The embeddings are tied to the output layer,
/// and dimension 0 stays large through the residual stream, so `E[t][0]` acts as a per-token
/// logit bias: `]` is pushed down (arrays fill to `maxItems`, strings to `maxLength`) and ASCII
/// letters slightly up (text stays mostly one byte per character). Outputs then hit the schema
/// bounds instead of the trivial `{"memories":[]}`, which is what the tests need to exercise.
fn embeddings(rng: &mut Rng, scale: f32, vocab: &Vocab, hidden: usize) -> Vec<f32> {
    let mut e = rng.tensor(vocab.size * hidden, scale);
    if !vocab.byte_bias {
        return e;
    }
    for t in 0..vocab.size {
        let bias = match u8::try_from(t) {
            Ok(b']') => -0.4,
            Ok(b) if b.is_ascii_alphabetic() || b == b' ' => 0.05,
            _ => 0.0,
        };
        e[t * hidden] = 1.0 + bias;
    }
    e
}

fn write_weights(path: &Path, seed: u64, vocab: &Vocab, shape: &Shape) -> anyhow::Result<()> {
    use safetensors::tensor::{Dtype, TensorView};

    let mut rng = Rng(seed);
    // Each tensor is stored as bytes as soon as it is drawn: the 0.6B preset is 2.4 GB as f32.
    let dtype = if shape.bf16 { Dtype::BF16 } else { Dtype::F32 };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, dims: Vec<usize>, data: Vec<f32>| {
        let bytes = if shape.bf16 {
            data.iter()
                .flat_map(|f| half::bf16::from_f32(*f).to_le_bytes())
                .collect()
        } else {
            data.iter().flat_map(|f| f.to_le_bytes()).collect()
        };
        tensors.push((name, dims, bytes));
    };
    let (hidden, heads, kv_heads, head_dim, inter) = (
        shape.hidden,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.intermediate,
    );
    let w = 0.08;
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab.size, hidden],
        embeddings(&mut rng, w, vocab, hidden),
    );
    add("model.norm.weight".into(), vec![hidden], vec![1.0; hidden]);
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        let lin = |rng: &mut Rng, out: usize, inp: usize| rng.tensor(out * inp, w);
        add(
            format!("{p}.input_layernorm.weight"),
            vec![hidden],
            vec![1.0; hidden],
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            vec![1.0; hidden],
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * head_dim, hidden],
            lin(&mut rng, heads * head_dim, hidden),
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_heads * head_dim, hidden],
            lin(&mut rng, kv_heads * head_dim, hidden),
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_heads * head_dim, hidden],
            lin(&mut rng, kv_heads * head_dim, hidden),
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, heads * head_dim],
            lin(&mut rng, hidden, heads * head_dim),
        );
        add(
            format!("{p}.self_attn.q_norm.weight"),
            vec![head_dim],
            vec![1.0; head_dim],
        );
        add(
            format!("{p}.self_attn.k_norm.weight"),
            vec![head_dim],
            vec![1.0; head_dim],
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            lin(&mut rng, inter, hidden),
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            lin(&mut rng, inter, hidden),
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            lin(&mut rng, hidden, inter),
        );
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(dtype, s.clone(), b)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_round_trips_bytes_and_knows_the_special_tokens() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 7).unwrap();
        let tok = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let text = "Alex, 28 — 杭州 😀";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids().len(), text.len(), "one token per byte");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(258));
        let special = tok.encode("<|endoftext|>", false).unwrap();
        assert_eq!(special.get_ids(), &[256]);
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        write(a.path(), 1).unwrap();
        write(b.path(), 1).unwrap();
        write(c.path(), 2).unwrap();
        let read =
            |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
        assert_eq!(read(&a), read(&b));
        assert_ne!(read(&a), read(&c));
    }
}
