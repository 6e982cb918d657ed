// Shared limits (issue 18): one key's requests spread over several memex processes that share
// its limits through Redis (`--limits-redis`). Offers RATE requests per second, round robin over
// BASE_URLS, for DURATION; counts what the key's rate limit let through (every status but 429
// and 503: a 503 gives its request cell back), what it refused (429), and times the refusals,
// whose only work is the limit check.
//
//   BASE_URLS=http://127.0.0.1:8081,http://127.0.0.1:8082 API_KEY=key LIMIT_RPS=5 BURST=10 \
//     k6 run loadtest/shared_limits.js            (loadtest/shared-limits.sh starts it all)
//
// The threshold is GCRA's bound for one key: at most BURST + LIMIT_RPS x duration accepted in
// all; the run fails when the processes together let through more.
import http from 'k6/http';
import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';

const BASES = (__ENV.BASE_URLS || 'http://127.0.0.1:8080').split(',').map((s) => s.replace(/\/+$/, ''));
const API_KEY = __ENV.API_KEY || 'loadtest';
const RATE = parseInt(__ENV.RATE || '20', 10);
const DURATION_S = parseInt(__ENV.DURATION_S || '60', 10);
const LIMIT_RPS = parseFloat(__ENV.LIMIT_RPS || '5');
const BURST = parseInt(__ENV.BURST || '10', 10);

const accepted = new Counter('accepted');
const limited = new Counter('limited');
const overloaded = new Counter('overloaded');
const limitedMs = new Trend('limited_ms', true);
const acceptedMs = new Trend('accepted_ms', true);

export const options = {
  scenarios: {
    offered: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: `${DURATION_S}s`,
      preAllocatedVUs: 4 * RATE,
      maxVUs: 20 * RATE,
      gracefulStop: '120s',
    },
  },
  thresholds: {
    accepted: [`count<=${BURST + LIMIT_RPS * DURATION_S}`],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'],
};

const BODY = JSON.stringify({
  messages: [{ role: 'user', content: 'I drink green tea every morning and live in Hangzhou.' }],
  extraction_types: ['memory'],
});

export default function () {
  const i = exec.scenario.iterationInTest;
  const res = http.post(`${BASES[i % BASES.length]}/extract/memory`, BODY, {
    headers: { 'Content-Type': 'application/json', Authorization: `Token ${API_KEY}` },
    timeout: '120s',
    responseCallback: http.expectedStatuses(200, 429, 503),
  });
  if (res.status === 503) {
    overloaded.add(1);
  } else if (res.status === 429) {
    limited.add(1);
    limitedMs.add(res.timings.duration);
  } else {
    accepted.add(1);
    acceptedMs.add(res.timings.duration);
  }
}
