// Smoke: a few requests of each kind, English and Chinese, through both routes; zero errors.
//
//   BASE_URL=http://127.0.0.1:8080 API_KEY=key k6 run loadtest/smoke.js
//
// Each of the three `extraction_types` variants (both, memory only, preference only) on a short
// single-turn and a multi-turn dialogue in each language: 12 requests, two at a time. Every one
// must be a 200 that keeps the contract (requested lists present, others absent) and carries the
// request id and the detected language.
import http from 'k6/http';
import { check } from 'k6';
import exec from 'k6/execution';
import { BASE_URL, VARIANTS, TREND_STATS, corpus, extract, contractOk } from './lib.js';

// Built in the init context of every VU from the shared corpus: the same list everywhere.
const CASES = [];
for (const lang of ['en', 'zh']) {
  const mine = [];
  for (let i = 0; i < corpus.length; i++) if (corpus[i].lang === lang) mine.push(corpus[i]);
  mine.sort((a, b) => a.tokens - b.tokens);
  const single = mine.find((d) => d.user_turns === 1) || mine[0];
  const multi = mine.find((d) => d.user_turns >= 2) || mine[mine.length - 1];
  VARIANTS.forEach((variant, i) => {
    // The hosted path once per language, the short one otherwise.
    CASES.push({ dialogue: single, variant, path: i === 0 ? '/api/openmem/v1/extract/memory' : undefined });
    CASES.push({ dialogue: multi, variant });
  });
}

export const options = {
  scenarios: {
    smoke: {
      executor: 'shared-iterations',
      vus: 2,
      iterations: CASES.length,
      maxDuration: __ENV.MAX_DURATION || '10m',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
    status_200: [`count==${CASES.length}`],
  },
  summaryTrendStats: TREND_STATS,
};

export function setup() {
  // The runner waits for readiness; say so in the results as well. /health/ready arrives with
  // the admission-control work; older servers only have /health.
  const expect = { responseCallback: http.expectedStatuses(200, 404) };
  let res = http.get(`${BASE_URL}/health/ready`, expect);
  if (res.status === 404) res = http.get(`${BASE_URL}/health`);
  check(res, { 'server ready': (r) => r.status === 200 });
}

export default function () {
  const c = CASES[exec.scenario.iterationInTest];
  const res = extract(c.dialogue, c.variant, { path: c.path });
  const ok = check(res, {
    'status 200': (r) => r.status === 200,
    'contract: code 0 and the requested lists only': (r) => contractOk(r, c.variant),
    'x-request-id': (r) => !!r.headers['X-Request-Id'],
    [`x-language matches ${c.dialogue.lang}`]: (r) => {
      const l = (r.headers['X-Language'] || '').toLowerCase();
      return c.dialogue.lang === 'zh' ? l.startsWith('chinese') || l === 'zh' : l.startsWith('english') || l === 'en';
    },
  });
  if (!ok) {
    console.error(`${c.dialogue.id} ${c.variant.name}: ${res.status} ${String(res.body).slice(0, 300)}`);
  }
}
