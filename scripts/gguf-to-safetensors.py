#!/usr/bin/env python3
"""A Hugging Face bf16 safetensors directory from a Qwen2/Qwen3/Llama GGUF (F32, F16 or Q8_0
tensors), for benchmarking memex's safetensors path (`--quantize`) on a real model's shape and
values where no bf16 checkpoint can be fetched. The values are the GGUF's, dequantized: a Q8_0
file gives a checkpoint whose weights are exactly representable in Q8_0 again.

    .cache/py/bin/python scripts/gguf-to-safetensors.py \\
        .cache/models/qwen2.5-0.5b/qwen2.5-0.5b.Q8_0.gguf .cache/models/qwen2.5-0.5b/tokenizer \\
        .cache/models/qwen2.5-0.5b/bf16

Needs numpy (`python3 -m venv .cache/py && .cache/py/bin/pip install numpy`).
"""
import json
import os
import shutil
import struct
import sys

import numpy as np

F32, F16, Q8_0 = 0, 1, 8
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}


class Reader:
    def __init__(self, f):
        self.f = f

    def take(self, fmt):
        return struct.unpack(fmt, self.f.read(struct.calcsize(fmt)))[0]

    def string(self):
        return self.f.read(self.take("<Q")).decode("utf-8", "replace")

    def value(self, kind):
        if kind in SCALARS:
            return self.take(SCALARS[kind])
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.take("<I"), self.take("<Q")
            return [self.value(item) for _ in range(n)]
        raise ValueError(f"GGUF value type {kind}")


def read_gguf(path):
    f = open(path, "rb")
    r = Reader(f)
    if f.read(4) != b"GGUF":
        raise SystemExit(f"{path} is not a GGUF file")
    r.take("<I")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        tensors.append((name, dims, r.take("<I"), r.take("<Q")))
    align = meta.get("general.alignment", 32)
    start = (f.tell() + align - 1) // align * align
    return f, meta, tensors, start


def dequantize(f, start, dims, kind, offset):
    count = int(np.prod(dims))
    f.seek(start + offset)
    if kind == F32:
        x = np.frombuffer(f.read(4 * count), dtype="<f4")
    elif kind == F16:
        x = np.frombuffer(f.read(2 * count), dtype="<f2").astype(np.float32)
    elif kind == Q8_0:
        blocks = np.frombuffer(f.read(34 * count // 32), dtype=np.dtype([("d", "<f2"), ("q", "i1", 32)]))
        x = (blocks["d"].astype(np.float32)[:, None] * blocks["q"].astype(np.float32)).reshape(-1)
    else:
        raise SystemExit(f"tensor type {kind} is not converted (F32, F16 and Q8_0 are)")
    return x.reshape(list(reversed(dims)))


def bf16_bytes(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).tobytes()


def hf_name(name):
    if not name.startswith("blk."):
        return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}[name]
    _, layer, rest = name.split(".", 2)
    part, kind = rest.rsplit(".", 1)
    mapped = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}[part]
    return f"model.layers.{layer}.{mapped}.{kind}"


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    gguf, tokenizer, out = sys.argv[1:]
    f, meta, tensors, start = read_gguf(gguf)
    arch = meta["general.architecture"]
    if arch not in ("qwen2", "qwen3", "llama"):
        raise SystemExit(f"architecture {arch} is not converted")
    if arch == "llama":
        raise SystemExit("GGUF llama q/k are permuted for interleaved RoPE; not converted")
    os.makedirs(out, exist_ok=True)
    header, blobs, at = {"__metadata__": {"format": "pt"}}, [], 0
    names = {t[0] for t in tensors}
    vocab = None
    for name, dims, kind, offset in tensors:
        x = dequantize(f, start, dims, kind, offset)
        if name == "token_embd.weight":
            vocab = x.shape[0]
        b = bf16_bytes(x)
        header[hf_name(name)] = {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as w:
        w.write(struct.pack("<Q", len(head)))
        w.write(head)
        for b in blobs:
            w.write(b)
    g = lambda k: meta[f"{arch}.{k}"]
    config = {
        "architectures": [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch, "hidden_size": g("embedding_length"),
        "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
        "num_attention_heads": g("attention.head_count"),
        "num_key_value_heads": g("attention.head_count_kv"),
        "max_position_embeddings": g("context_length"),
        "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0), "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names, "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }
    if f"{arch}.attention.key_length" in meta:
        config["head_dim"] = g("attention.key_length")
    with open(os.path.join(out, "config.json"), "w") as w:
        json.dump(config, w, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer, name), os.path.join(out, name))
    print(f"wrote {out}: {len(tensors)} tensors, {at / 2**20:.0f} MiB bf16")


if __name__ == "__main__":
    main()
