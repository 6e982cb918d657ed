// Batch over HTTP: a fixed list of requests (a JSON-lines file, one request body per line, as
// `memex extract` reads it), sent by VUS closed-loop clients until every line has been sent once.
// `loadtest/run batch` runs the same file through `memex extract --max-concurrent VUS` and
// through this script against `memex serve`, and compares dialogues/s and tokens/s.
//
//   BASE_URL=... API_KEY=... REQUESTS=/abs/path/requests.jsonl VUS=8 k6 run loadtest/batch.js
import http from 'k6/http';
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import exec from 'k6/execution';
import { SharedArray } from 'k6/data';
import { API_KEY, BASE_URL, TIMEOUT, TREND_STATS, statusCounters, statusKey, latencyOk } from './lib.js';

const lines = new SharedArray('requests', function () {
  return open(__ENV.REQUESTS).split('\n').filter((l) => l.trim() !== '');
});

// Token counts the server reports per 200 (x-* headers): what the engine computed and produced.
const promptTokens = new Counter('prompt_tokens');
const prefillTokens = new Counter('prefill_tokens');
const generatedTokens = new Counter('generated_tokens');

export const options = {
  scenarios: {
    batch: {
      executor: 'shared-iterations',
      vus: parseInt(__ENV.VUS || '8', 10),
      iterations: lines.length,
      maxDuration: __ENV.MAX_DURATION || '2h',
    },
  },
  thresholds: { http_req_failed: ['rate==0'], checks: ['rate==1'] },
  summaryTrendStats: TREND_STATS,
};

export default function () {
  const line = JSON.parse(lines[exec.scenario.iterationInTest]);
  delete line.custom_id;
  const res = http.post(`${BASE_URL}/extract/memory`, JSON.stringify(line), {
    headers: { 'Content-Type': 'application/json', Authorization: `Token ${API_KEY}` },
    timeout: TIMEOUT,
  });
  statusCounters[statusKey(res)].add(1);
  if (res.status === 200) {
    latencyOk.add(res.timings.duration);
    promptTokens.add(parseInt(res.headers['X-Prompt-Tokens'] || '0', 10));
    prefillTokens.add(parseInt(res.headers['X-Prefill-Tokens'] || '0', 10));
    generatedTokens.add(parseInt(res.headers['X-Generated-Tokens'] || '0', 10));
  }
  check(res, { 'status 200': (r) => r.status === 200 });
}
