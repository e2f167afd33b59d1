"""Per-request timestamps from a vLLM server, for bench/device/req_trace.sh (never imported by qlmctl).

On PYTHONPATH with QLM_REQ_TRACE set, every Python process started imports this; in vLLM's API server it wraps
`IterationStats.update_from_finished_request` so that each finished request appends one JSON line to that file:
its id, the API server's arrival time (wall clock), the engine core's QUEUED / SCHEDULED / first and last token
times (monotonic), the API server's own first-token latency, and the wall-minus-monotonic offset at that moment
(one host: the engine core's monotonic clock is the API server's)."""

import os

PATH = os.environ.get("QLM_REQ_TRACE")
if PATH:
    try:
        import json
        import time

        from vllm.v1.metrics import stats as _stats

        _orig = _stats.IterationStats.update_from_finished_request

        def _traced(self, finish_reason, request_id, num_prompt_tokens, max_tokens_param, req_stats, *a, **k):
            s = req_stats
            rec = {"id": request_id, "arrival_wall": s.arrival_time, "queued": s.queued_ts,
                   "scheduled": s.scheduled_ts, "first_token": s.first_token_ts, "last_token": s.last_token_ts,
                   "first_token_latency": s.first_token_latency, "prompt_tokens": num_prompt_tokens,
                   "generated": s.num_generation_tokens, "wall_minus_mono": time.time() - time.monotonic()}
            with open(PATH, "a") as f:
                f.write(json.dumps(rec) + "\n")
            return _orig(self, finish_reason, request_id, num_prompt_tokens, max_tokens_param, req_stats, *a, **k)

        _stats.IterationStats.update_from_finished_request = _traced
    except Exception as e:  # a tracing aid must not stop the server
        print(f"reqtrace: not installed ({e!r})", flush=True)
