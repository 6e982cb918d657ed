#!/usr/bin/env python3
"""memex and llama.cpp's server side by side, in one run: same GGUF file, same prompts, same
JSON schema, same repetition guard, at several concurrency levels; generated tokens/s.

The prompts and schemas are exactly what memex's pipeline makes of each dialogue (`memex render`
prints them); llama-server gets them on its chat endpoint with `response_format` (its own
GBNF conversion of the schema) and applies the GGUF's chat template, as memex does. Servers run
one after the other, never together, on the same threads.

    scripts/build-llama-cpp.sh                       # once: .cache/llama.cpp/bin/llama-server
    python3 scripts/bench_side_by_side.py \\
        --model .cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --levels 1,8

Standard library only.
"""
import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRY = {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 3,
       "dry_sequence_breakers": ["\"", ",", ":", "{", "}", "[", "]", "\n"]}


def bodies(n, level):
    """The dialogues of bench_concurrency.py (different lengths on purpose), memory branch, each
    opened by a session tag of its level: no level re-sends another's dialogues (both servers
    cache prompt prefixes; a repeat would measure the cache)."""
    spec = importlib.util.spec_from_file_location(
        "bench_concurrency", os.path.join(ROOT, "scripts", "bench_concurrency.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [{"messages": mod.dialogue(i, f"{level}-{i}"), "extraction_types": ["memory"]}
            for i in range(n)]


def render(memex, body):
    out = subprocess.run([memex, "render"], input=json.dumps(body).encode(),
                         capture_output=True, check=True).stdout
    return [json.loads(line) for line in out.decode().splitlines()][0]


def post(url, payload, headers=None, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read(), time.perf_counter() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read(), time.perf_counter() - t0


def wait_ready(url, proc, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def stop(proc):
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_level(level, jobs):
    """jobs: callables returning (ok, generated tokens, latency)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=level) as pool:
        results = list(pool.map(lambda j: j(), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0]]
    gen = sum(r[1] for r in ok)
    lat = sorted(r[2] for r in ok)
    return {"concurrency": level, "requests": len(jobs), "errors": len(jobs) - len(ok),
            "wall_s": round(wall, 2), "generated_tokens": gen,
            "gen_tok_per_s": round(gen / wall, 1) if wall else 0,
            "p50_s": round(statistics.median(lat), 2) if lat else None}


def bench_memex(args, reqs, engine, port):
    log = open(os.path.join(args.out, f"memex-{engine}.log"), "w")
    proc = subprocess.Popen(
        [args.memex, "serve", "--model", args.model, "--engine", engine, "--no-auth",
         "--port", str(port), "--max-concurrent", str(max(args.levels))],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/health/ready", proc)

        def job(body):
            def go():
                status, headers, _, dt = post(base + "/extract/memory", body)
                return status == 200, int(headers.get("x-generated-tokens", "0") or 0), dt
            return go
        return [run_level(level, [job(b) for b, _ in reqs[level]]) for level in args.levels]
    finally:
        stop(proc)


def bench_llama(args, reqs, port):
    log = open(os.path.join(args.out, "llama-server.log"), "w")
    slots = max(args.levels)
    proc = subprocess.Popen(
        [args.llama, "-m", args.model, "--port", str(port), "--host", "127.0.0.1",
         "-t", str(args.threads), "-np", str(slots), "-c", str(slots * args.slot_ctx),
         "--no-webui"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base + "/health", proc)

        def job(r):
            payload = {
                "messages": r["messages"],
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": "memory", "schema": r["schema"]}},
                "temperature": 0, "max_tokens": r["max_tokens"], "cache_prompt": True, **DRY,
            }

            def go():
                status, _, body, dt = post(base + "/v1/chat/completions", payload)
                if status != 200:
                    sys.stderr.write(f"llama-server {status}: {body[:300]!r}\n")
                    return False, 0, dt
                usage = json.loads(body).get("usage", {})
                return True, int(usage.get("completion_tokens", 0)), dt
            return go
        return [run_level(level, [job(r) for _, r in reqs[level]]) for level in args.levels]
    finally:
        stop(proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="GGUF file both servers load")
    ap.add_argument("--memex", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "memex"))
    ap.add_argument("--llama", default=os.path.join(ROOT, ".cache/llama.cpp/bin/llama-server"))
    ap.add_argument("--engines", default="native", help="memex engines, comma-separated")
    ap.add_argument("--levels", default="1,8")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--slot-ctx", type=int, default=4096, help="llama-server context per slot")
    ap.add_argument("--out", default="/tmp/side-by-side")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    os.makedirs(args.out, exist_ok=True)

    # Both servers get the same dialogues at a level; no two levels share one.
    reqs = {level: [(b, render(args.memex, b)) for b in bodies(args.requests, level)]
            for level in args.levels}
    rows = []
    for i, engine in enumerate(args.engines.split(",")):
        for r in bench_memex(args, reqs, engine, 9201 + i):
            rows.append({"server": f"memex {engine}", **r})
            print(json.dumps(rows[-1]), flush=True)
    for r in bench_llama(args, reqs, 9301):
        rows.append({"server": "llama.cpp", **r})
        print(json.dumps(rows[-1]), flush=True)

    print("\n| server | concurrency | requests | errors | wall s | generated tokens | gen tok/s | p50 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
              f"{r['wall_s']} | {r['generated_tokens']} | {r['gen_tok_per_s']} | {r['p50_s']} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
