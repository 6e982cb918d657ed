#!/usr/bin/env python3
"""Prompt tokens one request (three branches, or `--types`) makes the engine compute, per dialogue size.

Starts `memex serve` (BINARY) on SmolLM2 with scripts/serve-demo.sh's output limits, sends one
English corpus dialogue of each size class (tagged, so that no cache has seen it), and prints
x-prompt-tokens, x-cached-prompt-tokens and what the engine computed. The counts do not depend on
the machine; the seconds do. Standard library only.

    scripts/prefill-tokens.py [--binary PATH] [--port 9511] [--sizes 400,1000]
    scripts/prefill-tokens.py --model .cache/models/qwen2.5-0.5b/qwen2.5-0.5b.Q8_0.gguf \
        --max-input-tokens 8000 --sizes 150,1000,4000   # a longer-context model
"""
import argparse
import json
import os
import subprocess
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_limits(overrides):
    """scripts/demo-limits.env as `memex serve` flags (MEMEX_MAX_TEXT_CHARS=120 ->
    --max-text-chars 120), with `overrides` ({flag: value}) replacing their values."""
    flags = []
    with open(os.path.join(ROOT, "scripts", "demo-limits.env")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, value = line.split("=", 1)
                flag = "--" + name.removeprefix("MEMEX_").lower().replace("_", "-")
                flags += [flag, str(overrides.get(flag, value))]
    return flags


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="/var/tmp/memex-target/release/memex")
    ap.add_argument("--model", default=os.path.join(ROOT, ".cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--port", default="9511")
    ap.add_argument("--sizes", default="400,1000")
    ap.add_argument("--types", help="extraction_types, comma-separated (default: both, three branches)")
    ap.add_argument("--max-input-tokens", type=int,
                    help="instead of the demo's 4,000 (a model with a longer context than SmolLM2's)")
    ap.add_argument("--no-deadline-flag", dest="deadline_flag", action="store_false",
                    help="for a binary older than --request-timeout")
    args = ap.parse_args()
    server = subprocess.Popen(
        [args.binary, "serve", "--model", args.model, "--no-auth", "--port", args.port,
         *demo_limits({"--max-input-tokens": args.max_input_tokens} if args.max_input_tokens else {}), *(["--request-timeout", "900"] if args.deadline_flag else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(1200):
            try:
                if urllib.request.urlopen(base + "/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        corpus = json.load(open(os.path.join(ROOT, "loadtest/corpus/en.json")))["dialogues"]
        for size in (int(s) for s in args.sizes.split(",")):
            dialogue = next(d for d in corpus if d["size"] == size)
            messages = [dict(m) for m in dialogue["messages"]]
            messages[0]["content"] = f"[prefill-{time.time_ns()}] " + messages[0]["content"]
            body = {"messages": messages}
            if args.types:
                body["extraction_types"] = args.types.split(",")
            request = urllib.request.Request(
                base + "/extract/memory", data=json.dumps(body).encode(),
                headers={"content-type": "application/json"})
            started = time.time()
            h = urllib.request.urlopen(request, timeout=900).headers
            prompt, cached = int(h["x-prompt-tokens"]), int(h["x-cached-prompt-tokens"])
            print(f"{size}-token class: input {h['x-input-tokens']}, prompt {prompt}, cached {cached}, "
                  f"computed {prompt - cached}, generated {h['x-generated-tokens']}, "
                  f"{time.time() - started:.1f} s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
