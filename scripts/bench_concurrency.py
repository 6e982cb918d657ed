#!/usr/bin/env python3
"""Generated tokens/s of a running memex at several concurrency levels.

Sends dialogues of different lengths at each concurrency level and reports the aggregate generated
tokens per second (from the `x-generated-tokens` header), request latency and errors. Every
dialogue opens with a session tag unique to its level and index (`dialogue(i, session)`): the
prefix cache makes a repeated dialogue nearly free, so a level that re-sent an earlier level's
dialogues would measure the cache, not the engine (the first version did, and reported 1.72x from
batching where there was 1.18x). Standard library only, so it runs on a fresh machine.

    python3 scripts/bench_concurrency.py --base http://127.0.0.1:8080 --levels 1,4,8 \
        --requests 8 --types memory
"""
import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TOPICS = [
    "I'm Alex, 28, backend dev in Hangzhou, I play badminton on weekends.",
    "Flying to Beijing next Wednesday, staying at Ji Hotel Chaoyang for the conference.",
    "Use Markdown for docs, code blocks should have syntax highlighting.",
    "My daughter starts primary school in September, so mornings are busy now.",
    "I switched from coffee to green tea last month because of my sleep.",
    "We are planning a family trip to Guangzhou this summer with my parents.",
    "I usually cook vegetarian dinners and avoid spicy food.",
    "I run 5 km every morning before work and track it on my watch.",
]


def dialogue(i: int, session: str = "") -> list:
    """Dialogue i % 8 has i % 8 + 1 user turns (lengths differ on purpose); `session` opens it,
    so that no two requests of a run share a dialogue."""
    i %= len(TOPICS)
    msgs = []
    for t in range(i + 1):
        msgs.append({"role": "user", "content": TOPICS[(i + t) % len(TOPICS)]})
        msgs.append({"role": "assistant", "content": "Noted, thanks for telling me."})
    if session:
        msgs[0]["content"] = f"[session {session}] " + msgs[0]["content"]
    return msgs


def post(base: str, key: str, body: dict, timeout: float):
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/extract/memory", data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Token {key}")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            gen = int(r.headers.get("x-generated-tokens", "0"))
            prompt = int(r.headers.get("x-prompt-tokens", "0"))
            cached = int(r.headers.get("x-cached-prompt-tokens", "0"))
            return r.status, gen, time.perf_counter() - t0, prompt, cached
    except urllib.error.HTTPError as e:
        return e.code, 0, time.perf_counter() - t0, 0, 0


def ttft_totals(base, key):
    """(sum, count) of memex_time_to_first_token_seconds over all branches, or None."""
    req = urllib.request.Request(base + "/metrics")
    if key:
        req.add_header("Authorization", f"Token {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
    except Exception:
        return None
    total = [0.0, 0.0]
    for line in text.splitlines():
        for i, name in enumerate(("memex_time_to_first_token_seconds_sum",
                                  "memex_time_to_first_token_seconds_count")):
            if line.startswith(name + "{"):
                total[i] += float(line.rsplit(" ", 1)[1])
    return total


def run_level(base, key, level, n, types, timeout):
    bodies = []
    for i in range(n):
        b = {"messages": dialogue(i, f"{level}-{i}")}
        if types != "both":
            b["extraction_types"] = [types]
        bodies.append(b)
    before = ttft_totals(base, key)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=level) as pool:
        results = list(pool.map(lambda b: post(base, key, b, timeout), bodies))
    wall = time.perf_counter() - t0
    after = ttft_totals(base, key)
    ttft = None
    if before and after and after[1] > before[1]:
        ttft = round((after[0] - before[0]) / (after[1] - before[1]), 3)
    ok = [r for r in results if r[0] == 200]
    gen = sum(r[1] for r in ok)
    lat = sorted(r[2] for r in ok)
    return {
        "concurrency": level,
        "requests": n,
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "wall_s": round(wall, 2),
        "generated_tokens": gen,
        "gen_tok_per_s": round(gen / wall, 1) if wall > 0 else 0,
        "p50_s": round(statistics.median(lat), 2) if lat else None,
        "max_s": round(lat[-1], 2) if lat else None,
        "mean_ttft_s": ttft,
        "prompt_tokens": sum(r[3] for r in ok),
        "cached_prompt_tokens": sum(r[4] for r in ok),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:8080")
    ap.add_argument("--key", default="")
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--types", default="memory", choices=["memory", "preference", "both"])
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    rows = []
    for level in [int(x) for x in args.levels.split(",")]:
        row = run_level(args.base, args.key, level, args.requests, args.types, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| concurrency | requests | ok | wall s | generated tokens | gen tok/s | p50 s | max s "
          "| mean TTFT s | prompt tokens | cached |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['wall_s']} | "
              f"{r['generated_tokens']} | {r['gen_tok_per_s']} | {r['p50_s']} | {r['max_s']} | "
              f"{r['mean_ttft_s']} | {r['prompt_tokens']} | {r['cached_prompt_tokens']} |")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
