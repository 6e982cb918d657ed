#!/usr/bin/env python3
"""Extraction quality of memex (and llama.cpp's server as a reference) on a labelled dataset.

Each dataset line (eval/dialogues.jsonl) holds a POST /extract/memory body and what it should
yield:

    {"id": "en-job-01", "language": "en", "tags": ["multi-turn", "facts", "explicit"],
     "request": {...}, "expected": {"facts": ["The user ..."],
     "preferences": [{"text": "...", "type": "explicit_preference"}]}}

Servers run one after the other, never together, one request at a time (so a latency is one
request's). `memex render` is run once per dialogue: it says which branches (memory,
explicit_preference, implicit_preference) the pipeline runs for it and gives llama-server the
exact prompts, JSON schemas and token bounds memex uses (default output limits: a variant that
changes --max-items etc. changes memex's schema, not llama's).

    python3 scripts/quality.py --model M.gguf --servers memex,llama
    python3 scripts/quality.py --model M.gguf [--tokenizer DIR] \\
        --servers memex:compact,memex:spaced,llama \\
        --variant compact=--json-layout=compact \\
        --variant spaced=--json-layout=spaced \\
        [--dataset eval/dialogues.jsonl] [--limit N] [--ids a,b] [--out /tmp/quality]
    python3 scripts/quality.py --self-test

--servers   comma-separated KIND[:LABEL], KIND is memex or llama. LABEL names the row in the
            tables (default: KIND; labels must be unique) and selects the --variant args.
--variant   LABEL=ARGS, repeatable (repeats append): extra server arguments, split like a shell
            line, for the server(s) with that label.
--memex-arg / --llama-arg   ARG, repeatable: extra arguments for every memex / llama server,
            e.g. --memex-arg=--engine=native (use the = form for values that start with --).
--threads (llama-server -t, default all CPUs), --ready-timeout (seconds for a model to load,
default 600), --heuristic-language (skip lingua even when installed).

memex: `memex serve --model M [--tokenizer DIR] --no-auth --host 127.0.0.1 --port P
--max-concurrent 1 <args>`, ready on /health/ready; each body goes to /extract/memory as is.
llama: `llama-server -m M -np 1 -c 8192 -t THREADS --no-webui <args>`, ready on /health; each
rendered branch goes to /v1/chat/completions with the schema as response_format, temperature 0,
the rendered max_tokens, cache_prompt and the DRY repetition guard of bench_side_by_side.py.

Metrics, per server and branch (only dialogues where the branch ran, per `memex render`):
- valid: memex: HTTP 200 with the branch's list present (any other status or a transport error
  makes every branch of that request invalid); llama: HTTP 200 and the content parses as JSON and
  conforms to the rendered schema. An invalid output counts as an empty one below.
- non-empty: share of outputs with at least one item, over dialogues that expect something from
  the branch (memory: expected facts; explicit/implicit: an expected preference of that type).
- empty on `nothing`: share of valid, empty outputs over dialogues tagged `nothing`.
- language: share of non-empty outputs whose text (memory values, or preferences and reasoning,
  joined) is in the dialogue's `language`; detector: lingua (pip install
  lingua-language-detector) limited to en/zh/ja/ko/fr/de/es/ru when importable, else a
  Unicode-script heuristic (see detect_language). The detector used is reported.
- items: mean items per valid output.
- recall: share of expected facts (memory) / expected preferences of the branch's type matched by
  some extracted value / preference, per match_expected.
Per request (all branches): generated tokens (memex: x-generated-tokens; llama: sum of
usage.completion_tokens) and wall seconds (llama: its branch requests, one after another),
mean and p50 over requests that got an HTTP response.

Output: one progress line per request, then Markdown tables; results.json (raw outputs,
per-dialogue records, metrics) and summary.md under --out. Standard library, plus lingua if
installed.
"""
import argparse
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import unicodedata
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
# The benchmark's repetition guard and readiness wait, so both scripts drive servers alike.
from bench_side_by_side import DRY, wait_ready  # noqa: E402

BRANCHES = ("memory", "explicit_preference", "implicit_preference")
LANGS = ("en", "zh", "ja", "ko", "fr", "de", "es", "ru")
REQUEST_TIMEOUT = 600


# ---------------------------------------------------------------- schema validation

def validate(value, schema, path="$"):
    """Errors (list of strings, empty = conforms) of `value` against the JSON-schema subset our
    branch schemas use: type object/array/string, enum, properties, required,
    additionalProperties false, items, maxItems, minLength/maxLength (in characters). Other
    keywords (x-guidance, ...) are ignored."""
    errs = []
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in enum")
    t = schema.get("type")
    if t == "object":
        if not isinstance(value, dict):
            return errs + [f"{path}: not an object"]
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in value:
                errs.append(f"{path}: missing {k!r}")
        for k, v in value.items():
            if k in props:
                errs += validate(v, props[k], f"{path}.{k}")
            elif schema.get("additionalProperties", True) is False:
                errs.append(f"{path}: unexpected property {k!r}")
    elif t == "array":
        if not isinstance(value, list):
            return errs + [f"{path}: not an array"]
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errs.append(f"{path}: {len(value)} items > maxItems {schema['maxItems']}")
        if "minItems" in schema and len(value) < schema["minItems"]:
            errs.append(f"{path}: {len(value)} items < minItems {schema['minItems']}")
        for i, v in enumerate(value):
            errs += validate(v, schema.get("items", {}), f"{path}[{i}]")
    elif t == "string":
        if not isinstance(value, str):
            return errs + [f"{path}: not a string"]
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errs.append(f"{path}: {len(value)} chars > maxLength {schema['maxLength']}")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errs.append(f"{path}: {len(value)} chars < minLength {schema['minLength']}")
    elif t is not None:
        errs.append(f"{path}: schema type {t!r} not supported by this validator")
    return errs


# ---------------------------------------------------------------- language detection

STOPWORDS = {
    "en": "the a an and of to in is are was user with for on at his her likes has have it that",
    "fr": "le la les un une et de des du est utilisateur il elle aime avec pour dans que au en",
    "de": "der die das und ist ein eine nutzer benutzer mit für von zu den nicht sich auf im er",
    "es": "el la los las un una y de del es usuario con para en que le por su prefiere al",
}
STOPWORDS = {k: set(v.split()) for k, v in STOPWORDS.items()}


def script_counts(text):
    c = {"han": 0, "kana": 0, "hangul": 0, "cyrillic": 0, "latin": 0}
    for ch in text:
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
            c["kana"] += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
            c["han"] += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            c["hangul"] += 1
        elif 0x0400 <= o <= 0x04FF:
            c["cyrillic"] += 1
        elif ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
            c["latin"] += 1
    return c


def heuristic_language(text):
    """Unicode-script heuristic: the dominant script decides; Han+Kana text is ja when at least
    5% of it is Kana, else zh; Hangul -> ko; Cyrillic -> ru; Latin -> the language among
    en/fr/de/es whose short stopword list matches most words (en on a tie or no match)."""
    c = script_counts(text)
    cjk = c["han"] + c["kana"]
    best = max(("cjk", cjk), ("hangul", c["hangul"]), ("cyrillic", c["cyrillic"]),
               ("latin", c["latin"]), key=lambda kv: kv[1])
    if best[1] == 0:
        return None
    if best[0] == "cjk":
        return "ja" if c["kana"] >= 0.05 * cjk else "zh"
    if best[0] == "hangul":
        return "ko"
    if best[0] == "cyrillic":
        return "ru"
    words = re.findall(r"[^\W\d_]+", text.lower())
    scores = {lang: sum(w in sw for w in words) for lang, sw in STOPWORDS.items()}
    top = max(scores.values())
    return "en" if top == 0 or scores["en"] == top else max(scores, key=scores.get)


class Detector:
    """lingua limited to LANGS when importable, else heuristic_language."""

    def __init__(self, force_heuristic=False):
        self.lingua = None
        self.name = "heuristic (Unicode scripts + stopwords)"
        if force_heuristic:
            return
        try:
            from lingua import Language, LanguageDetectorBuilder
        except ImportError:
            return
        langs = [Language.ENGLISH, Language.CHINESE, Language.JAPANESE, Language.KOREAN,
                 Language.FRENCH, Language.GERMAN, Language.SPANISH, Language.RUSSIAN]
        self.lingua = LanguageDetectorBuilder.from_languages(*langs).build()
        self.name = "lingua (" + ",".join(LANGS) + ")"

    def detect(self, text):
        if not text.strip():
            return None
        if self.lingua is None:
            return heuristic_language(text)
        lang = self.lingua.detect_language_of(text)
        return lang.iso_code_639_1.name.lower() if lang else None


def norm_lang(code):
    return (code or "").lower().replace("_", "-").split("-")[0] or None


# ---------------------------------------------------------------- recall rule

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Words every fact shares ("The user is ...", "用户…的", "L'utilisateur ..."): left out so they
# cannot make a match on their own.
RECALL_STOP = set("the a an user users is are was were has have had of to in on at and or for "
                  "with as s l le la les de du des et est utilisateur der die das ist und nutzer "
                  "benutzer el los las es y usuario пользователь".split()) | set("用户的是了在ユーザ")


def tokens(text):
    """Lowercased tokens, punctuation dropped: each Han/Kana character is a token, any other run
    of letters/digits is a word."""
    return re.findall(f"[{CJK}]|[^\\W_{CJK}]+", text.lower())


def match_expected(expected, extracted):
    """True when some extracted text covers the expected one: with E the set of tokens (see
    `tokens`) of the expected text minus RECALL_STOP (all its tokens if that leaves none), and X
    those of one extracted text, |E & X| / |E| >= 0.5 for at least one extracted text."""
    e = set(tokens(expected))
    e = (e - RECALL_STOP) or e
    if not e:
        return False
    return any(len(e & set(tokens(x))) / len(e) >= 0.5 for x in extracted)


# ---------------------------------------------------------------- branch mapping

def item_texts(branch, items):
    """The text of a branch's items that language detection reads."""
    if branch == "memory":
        return [it.get("value", "") for it in items]
    return [t for it in items for t in (it.get("preference", ""), it.get("reasoning", ""))]


def match_texts(branch, items):
    """The texts recall matches expected ones against."""
    key = "value" if branch == "memory" else "preference"
    return [it.get(key, "") for it in items]


def map_memex(status, body, branches_run):
    """memex response -> {branch: {"valid", "items", "error"}} for the branches that ran; items
    in the model's shape ({key, value, memory_type, tags} / {reasoning, preference})."""
    out = {}
    data = body.get("data") if status == 200 and isinstance(body, dict) else None
    for b in branches_run:
        if not isinstance(data, dict):
            out[b] = {"valid": False, "items": [], "error": f"HTTP {status}"}
            continue
        if b == "memory":
            lst = data.get("memory_detail_list")
            items = None if not isinstance(lst, list) else [
                {"key": m.get("memory_key"), "value": m.get("memory_value") or "",
                 "memory_type": m.get("memory_type"), "tags": m.get("tags")} for m in lst]
        else:
            lst = data.get("preference_detail_list")
            items = None if not isinstance(lst, list) else [
                {"reasoning": p.get("reasoning") or "", "preference": p.get("preference") or ""}
                for p in lst if p.get("preference_type") == b]
        if items is None:
            out[b] = {"valid": False, "items": [], "error": "list missing from the response"}
        else:
            out[b] = {"valid": True, "items": items, "error": None}
    return out


def map_llama(branch, rendered, status, body):
    """One llama-server chat completion -> {"valid", "items", "error", "content", "tokens"}."""
    res = {"valid": False, "items": [], "error": None, "content": None, "tokens": 0}
    if status != 200:
        res["error"] = f"HTTP {status}: {str(body)[:300]}"
        return res
    try:
        res["tokens"] = int((body.get("usage") or {}).get("completion_tokens") or 0)
        choice = body["choices"][0]
        res["content"] = choice["message"]["content"]
        res["finish_reason"] = choice.get("finish_reason")
        parsed = json.loads(res["content"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        res["error"] = f"unparseable: {e}"
        return res
    errs = validate(parsed, rendered["schema"])
    if errs:
        res["error"] = "; ".join(errs[:5])
        return res
    field = "memories" if branch == "memory" else "preferences"
    res["valid"], res["items"] = True, parsed[field]
    return res


# ---------------------------------------------------------------- processes and HTTP

def post(url, payload, timeout=REQUEST_TIMEOUT):
    """(status or None, headers, parsed JSON body or text, seconds, transport error)."""
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, headers, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read()
    except Exception as e:  # connection refused, timeout, reset
        return None, {}, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}"
    dt = time.perf_counter() - t0
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return status, headers, body, dt, None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc):
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:  # a second Ctrl-C while it drains
        proc.kill()
        proc.wait()
        raise


def render(memex, body):
    """memex render -> (list of rendered branch requests, error)."""
    try:
        p = subprocess.run([memex, "render"], input=json.dumps(body).encode(),
                           capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{type(e).__name__}: {e}"
    if p.returncode != 0:
        return None, p.stderr.decode(errors="replace").strip()[-500:]
    return [json.loads(line) for line in p.stdout.decode().splitlines() if line.strip()], None


def fallback_branches(body):
    """The branches memex would run, from the request alone (branch.rs), when render fails."""
    types = body.get("extraction_types") or ["memory", "preference"]
    user_turns = sum(1 for m in body.get("messages") or [] if m.get("role") == "user")
    out = ["memory"] if "memory" in types else []
    if "preference" in types:
        out.append("explicit_preference")
        if user_turns > 1:
            out.append("implicit_preference")
    return out


# ---------------------------------------------------------------- running servers

def run_server(args, spec, dialogues, results):
    """Start one server, send every dialogue, stop it; append a record per dialogue to
    results[label]["records"]. Never raises except KeyboardInterrupt."""
    kind, label, extra = spec["kind"], spec["label"], spec["args"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if kind == "memex":
        cmd = [args.memex, "serve", "--model", args.model]
        if args.tokenizer:
            cmd += ["--tokenizer", args.tokenizer]
        cmd += ["--no-auth", "--host", "127.0.0.1", "--port", str(port),
                "--max-concurrent", "1"] + args.memex_arg + extra
        ready = base + "/health/ready"
    else:
        cmd = [args.llama, "-m", args.model, "--host", "127.0.0.1", "--port", str(port),
               "-t", str(args.threads), "-np", "1", "-c", "8192", "--no-webui"] + \
            args.llama_arg + extra
        ready = base + "/health"
    run = results[label] = {"kind": kind, "command": cmd, "start_error": None, "records": []}
    log_path = os.path.join(args.out, f"{label}.log")
    proc = None
    try:
        with open(log_path, "w") as log:
            try:
                # own session: a terminal Ctrl-C reaches only this script, which stops the
                # server; SIGINT restored in case this script was started with it ignored (&)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, preexec_fn=lambda: signal.signal(
                                            signal.SIGINT, signal.SIG_DFL))
                wait_ready(ready, proc, args.ready_timeout)
            except Exception as e:
                run["start_error"] = f"{type(e).__name__}: {e} (log: {log_path})"
                print(f"{label}: failed to start: {run['start_error']}", flush=True)
            for d in dialogues:
                if run["start_error"]:
                    rec = {"id": d["id"], "status": None, "error": "server did not start",
                           "seconds": None, "generated_tokens": None,
                           "branches": {b: {"valid": False, "items": [], "error": "no server"}
                                        for b in d["branches_run"]}}
                elif kind == "memex":
                    rec = memex_request(base, d)
                else:
                    rec = llama_request(base, d)
                run["records"].append(rec)
                if not run["start_error"]:
                    secs = f"{rec['seconds']:.2f}s" if rec["seconds"] is not None else "-"
                    print(f"{label} {d['id']} {rec['status']} {secs}"
                          + (f" ({rec['error'][:120]})" if rec.get("error") else ""), flush=True)
    finally:
        if proc is not None:
            stop(proc)


def memex_request(base, d):
    status, headers, body, dt, err = post(base + "/extract/memory", d["request"])
    h = {k: headers.get(k) for k in ("x-generated-tokens", "x-inference-time", "x-prompt-tokens")}
    gen = h["x-generated-tokens"]
    rec = {"id": d["id"], "status": status, "error": err, "seconds": None if err else dt,
           "generated_tokens": int(gen) if gen and gen.isdigit() else None,
           "headers": h, "body": body}
    if status is not None and status != 200:
        rec["error"] = (body.get("message") if isinstance(body, dict) else str(body)[:300])
    rec["branches"] = map_memex(status, body, d["branches_run"])
    return rec


def llama_request(base, d):
    if d["rendered"] is None:
        return {"id": d["id"], "status": None, "error": f"render failed: {d['render_error']}",
                "seconds": None, "generated_tokens": None,
                "branches": {b: {"valid": False, "items": [], "error": "render failed"}
                             for b in d["branches_run"]}}
    rec = {"id": d["id"], "status": 200, "error": None, "seconds": 0.0, "generated_tokens": 0,
           "branches": {}}
    for r in d["rendered"]:
        payload = {
            "messages": r["messages"],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": r["branch"], "schema": r["schema"]}},
            "temperature": 0, "max_tokens": r["max_tokens"], "cache_prompt": True, **DRY,
        }
        status, _, body, dt, err = post(base + "/v1/chat/completions", payload)
        if err:
            b = {"valid": False, "items": [], "error": err, "content": None, "tokens": 0}
            rec["status"], rec["error"] = None, err
        else:
            b = map_llama(r["branch"], r, status, body)
            rec["seconds"] += dt
            if status != 200 and rec["status"] == 200:
                rec["status"], rec["error"] = status, b["error"]
        b["seconds"] = dt
        rec["generated_tokens"] += b["tokens"]
        rec["branches"][r["branch"]] = b
    if rec["status"] is None:
        rec["seconds"] = None
    return rec


# ---------------------------------------------------------------- metrics

def rate(num, den):
    return {"rate": num / den if den else None, "n": num, "of": den}


def branch_metrics(branch, dialogues, records, detector):
    by_id = {r["id"]: r for r in records}
    valid = nonempty = nonempty_of = empty = empty_of = lang = lang_of = 0
    rec_hit = rec_of = 0
    counts = []
    ran = 0
    for d in dialogues:
        if branch not in d["branches_run"] or d["id"] not in by_id:
            continue
        ran += 1
        out = by_id[d["id"]]["branches"].get(branch) or {"valid": False, "items": []}
        items = out["items"] if out["valid"] else []
        valid += out["valid"]
        if out["valid"]:
            counts.append(len(items))
        if branch == "memory":
            expected = d["expected"].get("facts") or []
        else:
            expected = [p["text"] for p in d["expected"].get("preferences") or []
                        if p.get("type") == branch]
        if expected:
            nonempty_of += 1
            nonempty += bool(items)
            got = match_texts(branch, items)
            rec_of += len(expected)
            rec_hit += sum(match_expected(e, got) for e in expected)
        if "nothing" in d["tags"]:
            empty_of += 1
            empty += out["valid"] and not items
        if items:
            lang_of += 1
            found = detector.detect(" ".join(item_texts(branch, items)))
            out["detected_language"] = found
            lang += found is not None and found == norm_lang(d.get("language"))
    return {"ran": ran, "valid": rate(valid, ran), "non_empty": rate(nonempty, nonempty_of),
            "empty_on_nothing": rate(empty, empty_of), "language_match": rate(lang, lang_of),
            "items_mean": statistics.mean(counts) if counts else None,
            "recall": rate(rec_hit, rec_of)}


def request_metrics(records):
    done = [r for r in records if r["seconds"] is not None]
    secs = [r["seconds"] for r in done]
    toks = [r["generated_tokens"] for r in done if r["generated_tokens"] is not None]
    stat = lambda xs, f: f(xs) if xs else None  # noqa: E731
    return {"requests": len(records), "responses": len(done),
            "http_200": sum(r["status"] == 200 for r in records),
            "errors": sum(r["status"] != 200 for r in records),
            "tokens_mean": stat(toks, statistics.mean), "tokens_p50": stat(toks, statistics.median),
            "seconds_mean": stat(secs, statistics.mean), "seconds_p50": stat(secs, statistics.median)}


def fmt_rate(r):
    if not r["of"]:
        return "-"
    return f"{100 * r['rate']:.0f}% ({r['n']}/{r['of']})"


def fmt_num(x, nd=2):
    return "-" if x is None else f"{x:.{nd}f}"


def tables(metrics, detector_name):
    lines = [f"Language detector: {detector_name}", ""]
    for b in BRANCHES:
        lines += [f"### {b}", "",
                  "| server | ran | valid | non-empty | empty on `nothing` | language | "
                  "items/dialogue | recall |", "|---|---|---|---|---|---|---|---|"]
        for label, m in metrics.items():
            bm = m["branches"][b]
            lines.append(f"| {label} | {bm['ran']} | {fmt_rate(bm['valid'])} | "
                         f"{fmt_rate(bm['non_empty'])} | {fmt_rate(bm['empty_on_nothing'])} | "
                         f"{fmt_rate(bm['language_match'])} | {fmt_num(bm['items_mean'])} | "
                         f"{fmt_rate(bm['recall'])} |")
        lines.append("")
    lines += ["### per request (all branches)", "",
              "| server | requests | HTTP 200 | gen tokens mean | gen tokens p50 | "
              "seconds mean | seconds p50 |", "|---|---|---|---|---|---|---|"]
    for label, m in metrics.items():
        r = m["requests"]
        start = " (did not start)" if m["start_error"] else ""
        lines.append(f"| {label}{start} | {r['requests']} | {r['http_200']} | "
                     f"{fmt_num(r['tokens_mean'], 1)} | {fmt_num(r['tokens_p50'], 1)} | "
                     f"{fmt_num(r['seconds_mean'])} | {fmt_num(r['seconds_p50'])} |")
    return "\n".join(lines) + "\n"


def per_dialogue_table(dialogues, results):
    """Items per branch (memory/explicit/implicit; '-' = branch did not run, 'x' = invalid)."""
    labels = list(results)
    lines = ["### per dialogue (items: memory/explicit/implicit; - not run, x invalid)", "",
             "| id | tags | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for d in dialogues:
        cells = []
        for label in labels:
            rec = next((r for r in results[label]["records"] if r["id"] == d["id"]), None)
            if rec is None:
                cells.append("")
                continue
            parts = []
            for b in BRANCHES:
                o = rec["branches"].get(b)
                parts.append("-" if o is None else (str(len(o["items"])) if o["valid"] else "x"))
            cells.append("/".join(parts) + ("" if rec["status"] == 200 else f" ({rec['status']})"))
        lines.append(f"| {d['id']} | {' '.join(d['tags'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file (or memex model dir) the servers load")
    ap.add_argument("--tokenizer", help="passed to memex serve --tokenizer")
    ap.add_argument("--memex", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "memex"))
    ap.add_argument("--llama", default=os.path.join(ROOT, ".cache/llama.cpp/bin/llama-server"))
    ap.add_argument("--servers", default="memex", help="KIND[:LABEL],... KIND memex|llama")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="extra server args (shell-split) for the server labelled LABEL")
    ap.add_argument("--memex-arg", action="append", default=[], metavar="ARG",
                    help="extra arg for every memex server (use --memex-arg=--flag=value)")
    ap.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                    help="extra arg for every llama server")
    ap.add_argument("--dataset", default=os.path.join(ROOT, "eval", "dialogues.jsonl"))
    ap.add_argument("--limit", type=int, help="first N dialogues (after --ids)")
    ap.add_argument("--ids", help="comma-separated dialogue ids")
    ap.add_argument("--out", default="/tmp/quality")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t")
    ap.add_argument("--ready-timeout", type=float, default=600, help="seconds to load a model")
    ap.add_argument("--heuristic-language", action="store_true",
                    help="use the Unicode-script heuristic even if lingua is installed")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args(argv)
    if args.self_test:
        return args
    if not args.model:
        ap.error("--model is required")
    variants = {}
    for v in args.variant:
        label, sep, rest = v.partition("=")
        if not sep or not label:
            ap.error(f"--variant {v!r}: expected LABEL=ARGS")
        variants.setdefault(label, []).extend(shlex.split(rest))
    specs = []
    for s in filter(None, (x.strip() for x in args.servers.split(","))):
        kind, _, label = s.partition(":")
        if kind not in ("memex", "llama"):
            ap.error(f"--servers: unknown kind {kind!r} (memex or llama)")
        specs.append({"kind": kind, "label": label or kind, "args": variants.get(label or kind, [])})
    labels = [s["label"] for s in specs]
    if not specs or len(set(labels)) != len(labels):
        ap.error(f"--servers: need at least one server and unique labels, got {labels}")
    unused = set(variants) - set(labels)
    if unused:
        ap.error(f"--variant for unknown label(s): {sorted(unused)}")
    args.specs = specs
    return args


def load_dialogues(path, ids=None, limit=None):
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    sys.exit(f"{path}:{n}: {e}")
    if ids:
        want = ids.split(",")
        missing = set(want) - {d["id"] for d in out}
        if missing:
            sys.exit(f"--ids not in dataset: {sorted(missing)}")
        out = [d for d in out if d["id"] in want]
    for d in out:
        d.setdefault("tags", [])
        d.setdefault("expected", {})
    return out[:limit] if limit else out


def main(argv=None):
    args = parse_args(argv)
    if args.self_test:
        return self_test()
    os.makedirs(args.out, exist_ok=True)
    detector = Detector(force_heuristic=args.heuristic_language)
    print(f"language detector: {detector.name}", flush=True)
    dialogues = load_dialogues(args.dataset, args.ids, args.limit)
    for d in dialogues:
        d["rendered"], d["render_error"] = render(args.memex, d["request"])
        if d["rendered"] is None:
            print(f"render {d['id']}: failed ({d['render_error'][:200]}); "
                  "branches guessed from the request", flush=True)
            d["branches_run"] = fallback_branches(d["request"])
        else:
            d["branches_run"] = [r["branch"] for r in d["rendered"]]

    def term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    results, interrupted = {}, False
    try:
        for spec in args.specs:
            run_server(args, spec, dialogues, results)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: servers stopped, writing partial results", flush=True)

    metrics = {}
    for label, run in results.items():
        metrics[label] = {
            "start_error": run["start_error"],
            "branches": {b: branch_metrics(b, dialogues, run["records"], detector)
                         for b in BRANCHES},
            "requests": request_metrics(run["records"]),
        }
    text = tables(metrics, detector.name)
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"# Extraction quality: {os.path.basename(args.model)}, "
                f"{len(dialogues)} dialogues from {args.dataset}"
                + (" (interrupted)" if interrupted else "") + "\n\n")
        f.write(text + "\n" + per_dialogue_table(dialogues, results))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"model": args.model, "tokenizer": args.tokenizer, "dataset": args.dataset,
                   "detector": detector.name, "interrupted": interrupted,
                   "servers": args.specs, "dialogues": dialogues, "runs": results,
                   "metrics": metrics}, f, indent=1, ensure_ascii=False)
    print(f"wrote {args.out}/summary.md and results.json", flush=True)
    return 130 if interrupted else 0


# ---------------------------------------------------------------- self-test

def self_test():
    item = {"type": "object", "properties": {
        "key": {"type": "string", "minLength": 1, "maxLength": 4},
        "memory_type": {"enum": ["UserMemory", "LongTermMemory"]},
        "tags": {"type": "array", "maxItems": 1, "items": {"type": "string"}}},
        "required": ["key", "memory_type", "tags"], "additionalProperties": False}
    schema = {"type": "object", "properties": {"memories": {"type": "array", "maxItems": 2,
              "items": item}}, "required": ["memories"], "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
    ok = {"key": "用户工作", "memory_type": "UserMemory", "tags": ["x"]}
    assert validate({"memories": [ok]}, schema) == []
    assert validate({"memories": []}, schema) == []
    for bad in ({"memories": [dict(ok, key="12345")]}, {"memories": [dict(ok, key="")]},
                {"memories": [dict(ok, memory_type="Other")]}, {"memories": [ok, ok, ok]},
                {"memories": [dict(ok, extra=1)]}, {"memories": [{"key": "a", "tags": []}]},
                {"memories": [dict(ok, tags=["a", "b"])]}, {"memories": {}}, {}, []):
        assert validate(bad, schema), bad

    for det in (Detector(force_heuristic=True), Detector()):
        for text, lang in (("The user works as a backend developer in Hangzhou.", "en"),
                           ("用户是一名在杭州工作的后端开发者。", "zh"),
                           ("ユーザーは東京に住んでいて、コーヒーが好きです。", "ja"),
                           ("사용자는 서울에 살고 커피를 좋아한다.", "ko"),
                           ("Пользователь живёт в Москве и любит кофе.", "ru"),
                           ("L'utilisateur vit à Paris et aime le café.", "fr"),
                           ("Der Nutzer wohnt in Berlin und trinkt gern Kaffee.", "de"),
                           ("El usuario vive en Madrid y prefiere el té.", "es")):
            assert det.detect(text) == lang, (det.name, text, det.detect(text))
    assert norm_lang("zh-CN") == "zh"

    assert tokens("The user's café, 杭州!") == ["the", "user", "s", "café", "杭", "州"]
    assert match_expected("The user lives in Hangzhou.", ["User lives in Hangzhou, China"])
    assert not match_expected("The user lives in Hangzhou.", ["The user is a developer"])
    assert match_expected("用户住在杭州", ["用户目前住杭州"])
    assert not match_expected("用户住在杭州", ["用户喜欢咖啡"])

    body = {"code": 0, "data": {"memory_detail_list": [
        {"memory_key": "k", "memory_value": "v", "memory_type": "UserMemory", "tags": []}],
        "preference_detail_list": [
            {"preference": "p1", "reasoning": "r1", "preference_type": "explicit_preference"},
            {"preference": "p2", "reasoning": "r2", "preference_type": "implicit_preference"}]}}
    m = map_memex(200, body, list(BRANCHES))
    assert [len(m[b]["items"]) for b in BRANCHES] == [1, 1, 1] and all(
        m[b]["valid"] for b in BRANCHES) and m["memory"]["items"][0]["value"] == "v"
    assert m["implicit_preference"]["items"][0]["preference"] == "p2"
    m = map_memex(500, {"code": 50000, "data": None}, ["memory", "explicit_preference"])
    assert set(m) == {"memory", "explicit_preference"} and not any(o["valid"] for o in m.values())
    rendered = {"schema": schema}
    content = json.dumps({"memories": [ok]}, ensure_ascii=False)
    resp = {"choices": [{"message": {"content": content}}], "usage": {"completion_tokens": 7}}
    r = map_llama("memory", rendered, 200, resp)
    assert r["valid"] and r["tokens"] == 7 and r["items"] == [ok]
    resp["choices"][0]["message"]["content"] = content[:-3]
    assert not map_llama("memory", rendered, 200, resp)["valid"]
    assert fallback_branches({"messages": [{"role": "user", "content": "a"}]}) == \
        ["memory", "explicit_preference"]
    assert fallback_branches({"messages": [{"role": "user", "content": "a"}] * 2,
                              "extraction_types": ["preference"]}) == \
        ["explicit_preference", "implicit_preference"]

    a = parse_args(["--model", "m.gguf", "--servers", "memex:compact,memex:flexible,llama",
                    "--variant", "compact=--json-whitespace=compact",
                    "--variant", "flexible=--json-whitespace=flexible --kv-cache-mb 1024",
                    "--memex-arg=--engine=native"])
    assert [(s["kind"], s["label"], s["args"]) for s in a.specs] == [
        ("memex", "compact", ["--json-whitespace=compact"]),
        ("memex", "flexible", ["--json-whitespace=flexible", "--kv-cache-mb", "1024"]),
        ("llama", "llama", [])] and a.memex_arg == ["--engine=native"]

    d = [{"id": "a", "language": "en", "tags": ["facts"], "branches_run": ["memory"],
          "expected": {"facts": ["The user lives in Hangzhou.", "The user is 28."]}},
         {"id": "b", "language": "en", "tags": ["nothing"], "branches_run": ["memory"],
          "expected": {"facts": []}}]
    recs = [{"id": "a", "branches": {"memory": {"valid": True, "items": [
                {"value": "The user lives in Hangzhou."}]}}},
            {"id": "b", "branches": {"memory": {"valid": True, "items": []}}}]
    bm = branch_metrics("memory", d, recs, Detector(force_heuristic=True))
    assert (bm["recall"]["n"], bm["recall"]["of"], bm["non_empty"]["rate"],
            bm["empty_on_nothing"]["rate"], bm["language_match"]["rate"], bm["items_mean"]) == \
        (1, 2, 1.0, 1.0, 1.0, 0.5), bm
    print(f"self-test ok (lingua {'available' if Detector().lingua else 'not installed'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
