#!/usr/bin/env python3
"""Closed-loop HTTP load on a running memex, Python standard library only (the GPU machine has no
k6 and no network): `concurrency` clients each POST /extract/memory, one after the other, until
`duration` seconds have passed; every request carries its own dialogue (a corpus dialogue of the
chosen size class behind a unique tag, so the prefix cache cannot serve one from another).

    scripts/gpu_load.py --url http://127.0.0.1:8080 --concurrency 64 --duration 60 --out http.json

Writes a JSON summary: requests by status, 200s per second over the window, latency percentiles of
the 200s, and the first few failures verbatim. Used by scripts/gpu-check.sh.
"""

import argparse
import http.client
import json
import os
import threading
import time
import urllib.parse


def corpus(root, size):
    out = []
    for lang in ("en", "zh"):
        with open(os.path.join(root, "loadtest", "corpus", f"{lang}.json")) as f:
            for d in json.load(f)["dialogues"]:
                if d["size"] == size:
                    out.append(d)
    if not out:
        raise SystemExit(f"gpu_load: no corpus dialogue of size class {size}")
    return out


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60)
    ap.add_argument("--size", type=int, default=1000, help="corpus size class (tokens)")
    ap.add_argument("--timeout", type=float, default=60, help="client timeout per request (s)")
    ap.add_argument("--token", default=None, help="API key, if the server wants one")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), ".."))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    dialogues = corpus(args.root, args.size)
    url = urllib.parse.urlparse(args.url)
    lock = threading.Lock()
    counter = [0]
    results = []  # (status or error string, latency s, finished at s)
    failures = []
    start = time.monotonic()
    deadline = start + args.duration

    def client(worker):
        conn = None
        while time.monotonic() < deadline:
            with lock:
                n = counter[0]
                counter[0] += 1
            d = dialogues[n % len(dialogues)]
            messages = [dict(m) for m in d["messages"]]
            messages[0]["content"] = f"[gpu-check {n:07d}] " + messages[0]["content"]
            body = json.dumps({"messages": messages}).encode()
            headers = {"Content-Type": "application/json"}
            if args.token:
                headers["Authorization"] = f"Token {args.token}"
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=args.timeout)
                conn.request("POST", "/extract/memory", body, headers)
                resp = conn.getresponse()
                payload = resp.read()
                status = resp.status
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # a timeout or a dropped connection: recorded, not hidden
                status = f"error: {type(e).__name__}: {e}"
                payload = b""
                if conn is not None:
                    conn.close()
                conn = None
            t1 = time.monotonic()
            with lock:
                results.append((status, t1 - t0, t1 - start))
                if status != 200 and len(failures) < 5:
                    failures.append({"status": status, "body": payload[:300].decode("utf-8", "replace")})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start

    by_status = {}
    for status, _, _ in results:
        by_status[str(status)] = by_status.get(str(status), 0) + 1
    ok = [lat for status, lat, _ in results if status == 200]
    ok_in_window = sum(1 for status, _, end in results if status == 200 and end <= args.duration)
    summary = {
        "concurrency": args.concurrency,
        "window_s": args.duration,
        "wall_s": round(wall, 2),
        "size_class": args.size,
        "requests": len(results),
        "by_status": by_status,
        "ok_per_s": round(ok_in_window / args.duration, 3),
        "ok_latency_s": {
            "p50": percentile(ok, 50),
            "p95": percentile(ok, 95),
            "p99": percentile(ok, 99),
            "max": max(ok) if ok else None,
        },
        "failures": failures,
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
