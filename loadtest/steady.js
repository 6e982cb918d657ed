// Steady: a constant arrival rate of realistic requests; latency thresholds and zero errors.
//
//   BASE_URL=... API_KEY=... RATE=0.1 DURATION=60s P95_MS=60000 P99_MS=90000 k6 run loadtest/steady.js
//
// RATE        offered requests per second (fractions allowed; default 1)
// DURATION    how long requests are started (default 60s)
// P95_MS      p95 latency threshold in ms (default 30000); P99_MS likewise (default 60000)
// MAX_VUS     most requests in flight from the client (default 64); when all are busy, k6 skips
//             the iteration and counts it in `dropped_iterations`: always reported, a failure
//             when MAX_DROPPED (default 0) is exceeded, since the offered rate was then not met
// GRACE       how long requests still running at the end may finish (default 300s)
// plus lib.js's BASE_URL, API_KEY, MAX_TOKENS, LANGS, TIMEOUT, SEED.
import { check } from 'k6';
import { TREND_STATS, arrival, extract, contractOk, pickRequest, iterationIndex } from './lib.js';

const RATE = parseFloat(__ENV.RATE || '1');
const DURATION = __ENV.DURATION || '60s';
const MAX_VUS = parseInt(__ENV.MAX_VUS || '64', 10);

export const options = {
  scenarios: {
    steady: {
      executor: 'constant-arrival-rate',
      ...arrival(RATE),
      duration: DURATION,
      preAllocatedVUs: Math.min(MAX_VUS, 8),
      maxVUs: MAX_VUS,
      gracefulStop: __ENV.GRACE || '300s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
    http_req_duration: [`p(95)<${__ENV.P95_MS || 30000}`, `p(99)<${__ENV.P99_MS || 60000}`],
    // A threshold also makes k6 report the metric when it never fired.
    dropped_iterations: [`count<=${__ENV.MAX_DROPPED || 0}`],
    status_timeout: ['count==0'],
  },
  summaryTrendStats: TREND_STATS,
};

export default function () {
  const { dialogue, variant } = pickRequest(iterationIndex());
  const res = extract(dialogue, variant, { window: DURATION });
  check(res, { 'status 200 and contract': (r) => contractOk(r, variant) });
}
