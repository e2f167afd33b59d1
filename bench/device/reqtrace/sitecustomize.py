"""Per-request timestamps from a vLLM server, for bench/device/req_trace.sh (never imported by qlmctl).

On PYTHONPATH with QLM_REQ_TRACE set, every Python process started imports this; in vLLM's API server it wraps
`IterationStats.update_from_finished_request` so that each finished request appends one JSON line to that file:
its id, the API server's arrival time (wall clock), the engine core's QUEUED / SCHEDULED / first and last token
times (monotonic), the API server's own first-token latency, and the wall-minus-monotonic offset at that moment
(one host: the engine core's monotonic clock is the API server's).

The line's "api" field holds the request's way in through the API server (monotonic, s; from a post-import hook
on vLLM 0.24's modules): `handler` (the completion handler entered), `tok_submit` / `tok_resume` (the prompt's
tokenization handed to the renderer's thread pool and the handler resumed after it), `tok_start` / `tok_end` (the
tokenizer's call in its worker thread) and `add` (AsyncLLM.add_request entered, just before the arrival stamp).
Beside it, `<file>.events` gets the process's garbage collections over 1 ms (every vLLM process) and the API
server's event-loop lags over 2 ms: what can hold every request at once; `<file>.steps` the engine core's steps
(each batch scheduled: its tokens, new requests and requests; each batch's result taken in), to lay the engine's
own step times beside the step model's."""

import os

PATH = os.environ.get("QLM_REQ_TRACE")
if PATH:
    try:
        import contextvars
        import gc
        import importlib.abc
        import importlib.machinery
        import json
        import sys
        import threading
        import time

        from vllm.v1.metrics import stats as _stats

        _orig = _stats.IterationStats.update_from_finished_request
        _api: dict[str, dict] = {}  # request id -> its "api" record, until the request finishes
        _pending: dict[str, dict] = {}  # "cmpl-<x-request-id>" -> its record, from the handler to add_request
        _current: contextvars.ContextVar = contextvars.ContextVar("qlm_reqtrace", default=None)
        _thread_times: dict[int, tuple[float, float]] = {}  # id(prompt text) -> the tokenizer call's bounds
        _events: list[dict] = []
        _lock = threading.Lock()
        _flushed = [time.monotonic()]

        def _flush(force: bool = False) -> None:
            now = time.monotonic()
            with _lock:
                if not _events or (not force and len(_events) < 200 and now - _flushed[0] < 2.0):
                    return
                lines, _events[:] = list(_events), []
                _flushed[0] = now
            with open(PATH + ".events", "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in lines))

        _gc_start = [0.0]

        def _on_gc(phase: str, info: dict) -> None:
            if phase == "start":
                _gc_start[0] = time.monotonic()
                return
            dur = time.monotonic() - _gc_start[0]
            if dur > 0.001:
                with _lock:
                    _events.append({"kind": "gc", "pid": os.getpid(), "t": _gc_start[0], "dur": dur,
                                    "gen": info.get("generation"), "collected": info.get("collected")})

        gc.callbacks.append(_on_gc)
        import atexit

        atexit.register(_flush, True)

        def _traced(self, finish_reason, request_id, num_prompt_tokens, max_tokens_param, req_stats, *a, **k):
            s = req_stats
            rec = {"id": request_id, "arrival_wall": s.arrival_time, "queued": s.queued_ts,
                   "scheduled": s.scheduled_ts, "first_token": s.first_token_ts, "last_token": s.last_token_ts,
                   "first_token_latency": s.first_token_latency, "prompt_tokens": num_prompt_tokens,
                   "generated": s.num_generation_tokens, "wall_minus_mono": time.time() - time.monotonic(),
                   "pid": os.getpid(), "api": _api.pop(request_id, None)}
            with open(PATH, "a") as f:
                f.write(json.dumps(rec) + "\n")
            _flush()
            return _orig(self, finish_reason, request_id, num_prompt_tokens, max_tokens_param, req_stats, *a, **k)

        _stats.IterationStats.update_from_finished_request = _traced

        async def _watch_loop() -> None:
            import asyncio

            while True:
                t = time.monotonic()
                await asyncio.sleep(0.005)
                lag = time.monotonic() - t - 0.005
                if lag > 0.002:
                    with _lock:
                        _events.append({"kind": "lag", "pid": os.getpid(), "t": t + 0.005, "dur": lag})

        _watching = [False]

        def _patch_serving(mod) -> None:
            cls = mod.OpenAIServingCompletion
            orig = cls.create_completion

            async def create_completion(self, request, raw_request=None):
                if not _watching[0]:
                    import asyncio

                    _watching[0] = True
                    asyncio.get_running_loop().create_task(_watch_loop())
                hdr = raw_request.headers.get("x-request-id") if raw_request is not None else None
                rec = {"handler": time.monotonic(), "header_id": hdr}
                _current.set(rec)  # seen by the tokenization, which runs in this task
                if hdr:
                    # vLLM's route runs this handler in a task of its own (cancellation on disconnect), and the
                    # engine's add_request runs later in the response's task, which does not see the context
                    # variable: it finds the record by id ("cmpl-<x-request-id>", vLLM's request id for it).
                    _pending[f"cmpl-{hdr}"] = rec
                return await orig(self, request, raw_request)

            cls.create_completion = create_completion

        def _patch_renderer(mod) -> None:
            cls = mod.BaseRenderer
            enc, tok = cls._encode, cls._tokenize_prompt_async

            def _encode(self, *args, **kwargs):
                t0 = time.monotonic()
                out = enc(self, *args, **kwargs)
                if args:
                    _thread_times[id(args[0])] = (t0, time.monotonic())
                return out

            async def _tokenize_prompt_async(self, prompt, params):
                rec = _current.get()
                t0 = time.monotonic()
                out = await tok(self, prompt, params)
                if rec is not None:
                    rec["tok_submit"], rec["tok_resume"] = t0, time.monotonic()
                    tt = _thread_times.pop(id(prompt.get("prompt")), None)
                    if tt is not None:
                        rec["tok_start"], rec["tok_end"] = tt
                return out

            cls._encode, cls._tokenize_prompt_async = _encode, _tokenize_prompt_async

        def _patch_async_llm(mod) -> None:
            cls = mod.AsyncLLM
            orig = cls.add_request

            async def add_request(self, request_id, *args, **kwargs):
                # request_id is "cmpl-<id>-<choice index>"
                rec = _pending.pop(request_id.rsplit("-", 1)[0], None) or _current.get()
                if rec is not None:
                    rec = dict(rec, add=time.monotonic())
                    _api[request_id] = rec
                return await orig(self, request_id, *args, **kwargs)

            cls.add_request = add_request

        _steps: list[str] = []
        _steps_flushed = [time.monotonic()]

        def _flush_steps(force: bool = False) -> None:
            # At least every second: a replay's file is moved away when it ends, and what is still held here would
            # land in the next one's.
            now = time.monotonic()
            if _steps and (force or len(_steps) >= 500 or now - _steps_flushed[0] > 1.0):
                lines, _steps[:] = list(_steps), []
                _steps_flushed[0] = now
                with open(PATH + ".steps", "a") as f:
                    f.write("".join(lines))

        def _patch_scheduler(mod) -> None:
            # The engine core's steps: each batch scheduled (tokens, new requests, requests in it) and each batch's
            # result taken in (with asynchronous scheduling the core blocks on it: the end of that step on the GPU).
            cls = mod.Scheduler
            sched, update = cls.schedule, cls.update_from_output
            atexit.register(_flush_steps, True)

            def schedule(self, *args, **kwargs):
                out = sched(self, *args, **kwargs)
                _steps.append(json.dumps({"k": "s", "t": time.monotonic(), "tok": out.total_num_scheduled_tokens,
                                          "new": len(out.scheduled_new_reqs), "n": len(out.num_scheduled_tokens)})
                              + "\n")
                return out

            def update_from_output(self, scheduler_output, *args, **kwargs):
                t = time.monotonic()
                out = update(self, scheduler_output, *args, **kwargs)
                _steps.append(json.dumps({"k": "u", "t": t, "done": time.monotonic(),
                                          "tok": scheduler_output.total_num_scheduled_tokens}) + "\n")
                _flush_steps()
                return out

            cls.schedule, cls.update_from_output = schedule, update_from_output

        _PATCHES = {"vllm.v1.core.sched.scheduler": _patch_scheduler,
                    "vllm.entrypoints.openai.completion.serving": _patch_serving,
                    "vllm.renderers.base": _patch_renderer,
                    "vllm.v1.engine.async_llm": _patch_async_llm}

        class _PostImport(importlib.abc.MetaPathFinder):
            """Runs a patch right after its module executes (the modules are vLLM's; importing them here, at
            interpreter start, would pull all of vLLM into every process)."""

            def find_spec(self, name, path=None, target=None):
                patch = _PATCHES.get(name)
                if patch is None:
                    return None
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is None or spec.loader is None:
                    return None
                run = spec.loader.exec_module

                def exec_module(module, _run=run, _patch=patch):
                    _run(module)
                    try:
                        _patch(module)
                    except Exception as e:  # a tracing aid must not stop the server
                        print(f"reqtrace: {module.__name__} not patched ({e!r})", flush=True)

                spec.loader.exec_module = exec_module
                return spec

        sys.meta_path.insert(0, _PostImport())
        for _name, _patch in _PATCHES.items():  # those imported already (with vllm.v1.metrics.stats, above)
            if _name in sys.modules:
                _patch(sys.modules[_name])
        print(f"reqtrace: installed in pid {os.getpid()}", flush=True)
    except Exception as e:  # a tracing aid must not stop the server
        print(f"reqtrace: not installed ({e!r})", flush=True)
