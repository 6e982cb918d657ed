// Soak: a long steady run under capacity. Zero errors and bounded latency here; the runner
// (`loadtest/run soak`) samples the server's RSS meanwhile and fails on growth beyond a bound.
//
//   BASE_URL=... API_KEY=... RATE=0.05 DURATION=30m k6 run loadtest/soak.js
//
// RATE (default 0.5), DURATION (default 30m), P99_MS (default 120000), MAX_VUS (default 32),
// MAX_DROPPED (default 0), GRACE (default 300s), plus lib.js's variables.
import { check } from 'k6';
import { TREND_STATS, arrival, extract, contractOk, pickRequest, iterationIndex } from './lib.js';

const DURATION = __ENV.DURATION || '30m';
const MAX_VUS = parseInt(__ENV.MAX_VUS || '32', 10);

export const options = {
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      ...arrival(parseFloat(__ENV.RATE || '0.5')),
      duration: DURATION,
      // All VUs up front: an arrival that finds none free while k6 is still starting one is
      // dropped, which would fail the run on a latency blip rather than on the server.
      preAllocatedVUs: MAX_VUS,
      maxVUs: MAX_VUS,
      gracefulStop: __ENV.GRACE || '300s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
    status_timeout: ['count==0'],
    http_req_duration: [`p(99)<${__ENV.P99_MS || 120000}`],
    dropped_iterations: [`count<=${__ENV.MAX_DROPPED || 0}`],
  },
  summaryTrendStats: TREND_STATS,
};

export default function () {
  const { dialogue, variant } = pickRequest(iterationIndex());
  const res = extract(dialogue, variant, { window: DURATION });
  check(res, { 'status 200 and contract': (r) => contractOk(r, variant) });
}
