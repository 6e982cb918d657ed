// Capacity: closed loop, VUS clients sending back to back for DURATION. The 200s completed inside
// the window (ok_in_window / DURATION) are the server's capacity for the realistic mix; the
// runner (`loadtest/run capacity` or `overload`) computes it and overload.js offers 4x that.
//
//   BASE_URL=... API_KEY=... VUS=4 DURATION=120s k6 run loadtest/capacity.js
//
// Use at least as many VUS as the server runs requests at once (--max-concurrent), and no more
// than it admits (concurrent + queue): the capacity run must not be shed.
import { check } from 'k6';
import { TREND_STATS, extract, contractOk, pickRequest, iterationIndex } from './lib.js';

const DURATION = __ENV.DURATION || '120s';

export const options = {
  scenarios: {
    capacity: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '4', 10),
      duration: DURATION,
      gracefulStop: __ENV.GRACE || '300s',
    },
  },
  thresholds: {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
    ok_in_window: ['count>0'],
  },
  summaryTrendStats: TREND_STATS,
};

export default function () {
  const { dialogue, variant } = pickRequest(iterationIndex());
  const res = extract(dialogue, variant, { window: DURATION });
  check(res, { 'status 200 and contract': (r) => contractOk(r, variant) });
}
