// Shared by the k6 scripts: configuration from the environment, the dialogue corpus, the request
// mix, and the counters and latency trend the runner (loadtest/run) reads back.
//
// Environment:
//   BASE_URL     server root (default http://127.0.0.1:8080)
//   API_KEY      sent as `Authorization: Token $API_KEY` (default "loadtest")
//   MAX_TOKENS   only dialogues of at most this many tokens (Qwen3 count; default 6000: all)
//   LANGS        comma list of corpus languages (default "en,zh")
//   TIMEOUT      client timeout per request (default "300s"): a request that takes longer counts
//                as timed out (status_timeout)
//   SEED         makes the request sequence reproducible (default 1)
//   RUN          tags every dialogue of this run (the runner sets one per k6 run): the first
//                message starts with `[RUN:i] `, so that no request repeats a dialogue of
//                another request or another run and the prefix cache serves only what real
//                traffic shares (the templates), never a whole repeated dialogue
import http from 'k6/http';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { Counter, Trend } from 'k6/metrics';

export const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
export const API_KEY = __ENV.API_KEY || 'loadtest';
export const TIMEOUT = __ENV.TIMEOUT || '300s';
const MAX_TOKENS = parseInt(__ENV.MAX_TOKENS || '6000', 10);
const LANGS = (__ENV.LANGS || 'en,zh').split(',').map((s) => s.trim()).filter(Boolean);
const SEED = parseInt(__ENV.SEED || '1', 10);
const RUN = __ENV.RUN || `seed${SEED}`;

// The corpus (loadtest/corpus/*.json, written by gen_corpus.py), parsed once and shared by VUs.
export const corpus = new SharedArray('dialogues', function () {
  const out = [];
  for (const lang of LANGS) {
    const doc = JSON.parse(open(`./corpus/${lang}.json`));
    for (const d of doc.dialogues) {
      if (d.tokens <= MAX_TOKENS) out.push(d);
    }
  }
  if (out.length === 0) throw new Error(`no dialogue of at most ${MAX_TOKENS} tokens in ${LANGS}`);
  return out;
});

// Indexes by size class, built once per VU: reading a SharedArray element copies it, so the hot
// path reads exactly one dialogue per request.
const BY_SIZE = {};
for (let i = 0; i < corpus.length; i++) {
  const size = corpus[i].size;
  (BY_SIZE[size] = BY_SIZE[size] || []).push(i);
}
const SIZE_CLASSES = Object.keys(BY_SIZE).map(Number).sort((a, b) => a - b);

// How often each size class (target tokens) appears in the realistic mix: most dialogues are
// short, a few long. Classes missing after MAX_TOKENS drop out.
const SIZE_WEIGHTS = { 50: 25, 150: 25, 400: 20, 1000: 12, 2000: 9, 4000: 6, 6000: 3 };

// The three `extraction_types` variants, as the hosted API's clients send them.
export const VARIANTS = [
  { name: 'both', weight: 40, types: undefined },
  { name: 'memory', weight: 30, types: ['memory'] },
  { name: 'preference', weight: 30, types: ['preference'] },
];

// Responses by status: the runner reads these from the summary, thresholds can name them.
// `timeout` is a client time-out (k6 error 1050); `no_response` any other failure to get a
// response (connection refused or reset).
const STATUS_KEYS = ['200', '400', '401', '413', '429', '500', '503', 'other', 'timeout', 'no_response'];
export const statusCounters = {};
for (const s of STATUS_KEYS) statusCounters[s] = new Counter(`status_${s}`);

// Latency of successful (200) responses only, in ms: fast 429/503 rejections would otherwise
// flatter the percentiles.
export const latencyOk = new Trend('latency_ok', true);
// Latency of refusals (429, 503), in ms: shedding must be instant, not a wait.
export const latencyShed = new Trend('latency_shed', true);
// 200s that completed inside the load window (see inWindow): throughput without the tail.
export const okInWindow = new Counter('ok_in_window');

export function statusKey(res) {
  if (res.status === 0) return res.error_code === 1050 ? 'timeout' : 'no_response';
  return statusCounters[String(res.status)] ? String(res.status) : 'other';
}

// Seconds in a k6 duration string ("90s", "2m", "1h30m", "1500ms"); a bare number is seconds.
export function seconds(d) {
  if (/^\d+(\.\d+)?$/.test(String(d))) return parseFloat(d);
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let m;
  while ((m = re.exec(d)) !== null) {
    total += parseFloat(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600 }[m[2]];
  }
  return total;
}

// Whether now is within `duration` of the scenario's start (the load window, grace excluded).
export function inWindow(duration) {
  return Date.now() - exec.scenario.startTime <= seconds(duration) * 1000;
}

// mulberry32: a small seeded PRNG, so that iteration i of a run always sends the same request.
function rng(seed) {
  let a = seed >>> 0;
  return function () {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function weighted(r, items, weightOf) {
  let total = 0;
  for (const it of items) total += weightOf(it);
  let x = r() * total;
  for (const it of items) {
    x -= weightOf(it);
    if (x < 0) return it;
  }
  return items[items.length - 1];
}

// The request for global iteration `i` of the realistic mix: a size class by weight, a dialogue
// of that class (either language), and an `extraction_types` variant by weight.
export function pickRequest(i) {
  const r = rng(SEED * 1000003 + i);
  const size = weighted(r, SIZE_CLASSES, (s) => SIZE_WEIGHTS[s] || 1);
  const pool = BY_SIZE[size];
  const dialogue = corpus[pool[Math.floor(r() * pool.length)]];
  const variant = weighted(r, VARIANTS, (v) => v.weight);
  return { dialogue, variant };
}

export function iterationIndex() {
  return exec.scenario.iterationInTest;
}

export function body(dialogue, variant, tag) {
  let messages = dialogue.messages;
  if (tag) {
    messages = messages.map((m, i) => (i === 0 ? Object.assign({}, m, { content: tag + m.content }) : m));
  }
  const b = { messages };
  if (variant.types) b.extraction_types = variant.types;
  return JSON.stringify(b);
}

// POST one extraction. Options: `path` (default /extract/memory); `window` (a duration string):
// a 200 completed inside the load window counts in ok_in_window; `shedding`: 429 and 503 are the
// server doing its job (overload), not failures for http_req_failed.
export function extract(dialogue, variant, opts) {
  const o = opts || {};
  const params = {
    headers: { 'Content-Type': 'application/json', Authorization: `Token ${API_KEY}` },
    timeout: TIMEOUT,
    tags: { name: 'extract', variant: variant.name, lang: dialogue.lang, size: String(dialogue.size) },
  };
  if (o.shedding) params.responseCallback = http.expectedStatuses(200, 429, 503);
  const tag = `[${RUN}:${exec.scenario.name}:${exec.scenario.iterationInTest}] `;
  const res = http.post(`${BASE_URL}${o.path || '/extract/memory'}`, body(dialogue, variant, tag), params);
  statusCounters[statusKey(res)].add(1);
  if (res.status === 429 || res.status === 503) latencyShed.add(res.timings.duration);
  if (res.status === 200) {
    latencyOk.add(res.timings.duration);
    if (o.window && inWindow(o.window)) okInWindow.add(1);
  }
  return res;
}

// A 200 that keeps the contract: code 0, the requested lists present, the others absent.
export function contractOk(res, variant) {
  if (res.status !== 200) return false;
  let env;
  try {
    env = res.json();
  } catch (e) {
    return false;
  }
  if (!env || env.code !== 0 || !env.data || env.data.success !== true) return false;
  const wantMem = !variant.types || variant.types.includes('memory');
  const wantPref = !variant.types || variant.types.includes('preference');
  const hasMem = Array.isArray(env.data.memory_detail_list);
  const hasPref = Array.isArray(env.data.preference_detail_list);
  return wantMem === hasMem && wantPref === hasPref;
}

// A shed response (429/503) that tells the client when to come back: whole seconds, >= 0.
export function retryAfter(res) {
  const v = res.headers['Retry-After'];
  return v !== undefined && /^\d+$/.test(v.trim());
}

// k6's constant-arrival-rate takes an integer rate per time unit: express a fractional
// requests-per-second rate per hour (0.05 req/s = 180 per hour).
export function arrival(ratePerSecond) {
  const perHour = Math.max(1, Math.round(ratePerSecond * 3600));
  return { rate: perHour, timeUnit: '1h' };
}

// The common trend statistics; p(50) is spelled out so that the summary export carries it.
export const TREND_STATS = ['avg', 'min', 'med', 'p(50)', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'];
