// Overload: 4x the measured capacity. The server must shed what it cannot serve, quickly and
// politely, and keep serving at capacity. Pass means:
//   - every response is 200, 429 or 503, and each 429/503 carries Retry-After (whole seconds);
//   - no request times out (the client gives up after TIMEOUT) or goes unanswered;
//   - 200s completed inside the load window number at least OK_FRACTION (default 0.7) of
//     CAPACITY x DURATION.
//
//   BASE_URL=... API_KEY=... CAPACITY=0.1 DURATION=120s k6 run loadtest/overload.js
//
// CAPACITY    measured capacity in requests/s (capacity.js, or `loadtest/run overload` measures it)
// FACTOR      offered rate = FACTOR x CAPACITY (default 4)
// MAX_VUS     most requests in flight from the client (default 256)
// plus lib.js's BASE_URL, API_KEY, MAX_TOKENS, LANGS, TIMEOUT, SEED.
import { check } from 'k6';
import { Rate } from 'k6/metrics';
import { TREND_STATS, arrival, extract, contractOk, retryAfter, pickRequest, iterationIndex, seconds } from './lib.js';

const CAPACITY = parseFloat(__ENV.CAPACITY || '1');
const FACTOR = parseFloat(__ENV.FACTOR || '4');
const OK_FRACTION = parseFloat(__ENV.OK_FRACTION || '0.7');
const DURATION = __ENV.DURATION || '120s';
const allowed = new Rate('allowed_status');
const minOk = Math.max(1, Math.floor(CAPACITY * seconds(DURATION) * OK_FRACTION));

export const options = {
  scenarios: {
    overload: {
      executor: 'constant-arrival-rate',
      ...arrival(CAPACITY * FACTOR),
      duration: DURATION,
      preAllocatedVUs: 16,
      maxVUs: parseInt(__ENV.MAX_VUS || '256', 10),
      gracefulStop: __ENV.GRACE || '300s',
    },
  },
  thresholds: {
    allowed_status: ['rate==1'],
    checks: ['rate==1'],
    status_timeout: ['count==0'],
    status_no_response: ['count==0'],
    ok_in_window: [`count>=${minOk}`],
    dropped_iterations: ['count>=0'],
  },
  summaryTrendStats: TREND_STATS,
};

export default function () {
  const { dialogue, variant } = pickRequest(iterationIndex());
  const res = extract(dialogue, variant, { window: DURATION, shedding: true });
  allowed.add(res.status === 200 || res.status === 429 || res.status === 503);
  check(res, {
    'answered (no time-out)': (r) => r.status !== 0,
    '200 keeps the contract': (r) => r.status !== 200 || contractOk(r, variant),
    '429/503 carry Retry-After': (r) => (r.status !== 429 && r.status !== 503) || retryAfter(r),
  });
}
