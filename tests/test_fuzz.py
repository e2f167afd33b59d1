"""Fuzzing: the gateway's HTTP API (schemathesis from its own OpenAPI document, and raw hypothesis bodies
and headers), the trace parsers and the scenario loader.

HTTP: every answer is 2xx or 4xx (never a 5xx, never a hang) and the gateway keeps serving. Parsers:
any input gives a result or a `UserError`, never another exception. Bounded example counts, loopback
only, a fixed seed (`derandomize`): the same inputs on every run.
"""

from __future__ import annotations

import asyncio
import json
import string
import threading
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qlmctl.emulator.server import start_emulator
from qlmctl.emulator.testing import live_scenario_spec
from qlmctl.errors import UserError
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import Scenario, ScenarioSpec, load_scenario
from qlmctl.traces import LoadedTrace, load_trace
from simulator.profile import EngineProfile

PROFILE = dict(base_s=0.002, per_prefill_token_s=1e-5, per_decode_seq_s=1e-4, per_context_token_s=0.0,
               kv_blocks=4000, block_size=16, max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=1024,
               load_cold_s=1.0, load_warm_s=0.5)
SPEEDUP = 20
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


class ThreadedGateway:
    """A gateway on a background thread with its own event loop (for synchronous HTTP clients)."""

    def __init__(self, scenario: Scenario, policy: str) -> None:
        self.gw = Gateway(scenario, policy, port=0, record=False)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.gw.start()
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await self.gw.stop()

    def __enter__(self) -> Gateway:
        self._thread.start()
        assert self._ready.wait(30), "gateway did not start"
        if self._error is not None:
            raise self._error
        return self.gw

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def gateway_url():
    with start_emulator(EngineProfile(model="m", **PROFILE), "m", speedup=SPEEDUP) as emu:
        spec = live_scenario_spec(PROFILE, [("g0", "m", emu.url)], speedup=SPEEDUP, max_body_bytes=1 << 16)
        with ThreadedGateway(Scenario(ScenarioSpec.model_validate(spec)), "qlm") as gw:
            yield gw.url


def _still_serving(url: str) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "w1 w2", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------------------------------------------
# schemathesis, from the gateway's own OpenAPI document


def test_schemathesis_finds_no_server_error(gateway_url):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error
    from schemathesis.config import SchemathesisConfig

    config = SchemathesisConfig.from_dict({"generation": {"mode": "all", "max-examples": 25, "deterministic": True},
                                           "seed": 7})
    schema = schemathesis.openapi.from_url(gateway_url + "/openapi.json", config=config)
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    calls = 0
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            nonlocal calls
            calls += 1
            case.call_and_validate(base_url=gateway_url, checks=[not_a_server_error], timeout=20)

        check()
    assert calls >= len(ops) * 5
    _still_serving(gateway_url)


# ---------------------------------------------------------------------------------------------------------------
# raw bodies and headers

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=30))
_json = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                                                       max_size=4), max_leaves=12)
_weird = st.one_of(_json, st.integers(-3, 5), st.integers(2000, 2**64), st.sampled_from(["", "m", "w1", "interactive"]))
_field_names = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "min_tokens", "stream",
                "stream_options", "n", "best_of", "slo_class", "slo_ttft_s", "temperature", "echo", "logprobs"]


@st.composite
def _bodies(draw: st.DrawFn) -> object:
    """Mostly a valid request with up to two fields set to odd values or removed; sometimes any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)
    body: dict = {"model": "m", "max_tokens": draw(st.integers(1, 4)), "stream": draw(st.booleans()),
                  "prompt": " ".join(f"w{j}" for j in range(draw(st.integers(1, 6)))),
                  "messages": [{"role": "user", "content": "w1 w2"}]}
    if body["stream"] and draw(st.booleans()):
        body["stream_options"] = {"include_usage": True}
    for name in draw(st.lists(st.sampled_from(_field_names), max_size=2, unique=True)):
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(_weird)
    return body


_header_text = st.text(alphabet=string.ascii_letters + string.digits + string.punctuation + " ", max_size=20).map(str.strip)
_headers = st.dictionaries(st.sampled_from(["x-slo-class", "x-slo-ttft-s", "x-request-id", "authorization",
                                            "content-type"]), _header_text, max_size=3)


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=_bodies(), raw=st.none() | st.none() | st.binary(max_size=64), headers=_headers)
def test_random_bodies_and_headers_never_5xx(gateway_url, path, body, raw, headers):
    content = raw if raw is not None else json.dumps(body).encode()
    r = httpx.post(gateway_url + path, content=content, headers=headers, timeout=20)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    event(f"HTTP {r.status_code}")
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["code"] == r.status_code


def test_gateway_serves_after_fuzzing(gateway_url):
    _still_serving(gateway_url)
    assert httpx.get(gateway_url + "/health").status_code == 200


# ---------------------------------------------------------------------------------------------------------------
# trace parsers and the scenario loader

_number = st.one_of(st.integers(0, 5000).map(str), st.floats(0, 1e4).map(lambda x: f"{x:.3f}"))
_cells = st.one_of(_number, _number, _number, st.integers(-5, 10**12).map(str), st.floats(allow_nan=True).map(str),
                   st.text(max_size=8), st.sampled_from(["", "nan", "inf", "-1", "1e400", "0x10", " 3 ", "llama",
                                                         '"a,b"']))
_headers_csv = st.sampled_from([
    "arrival_s,prompt_tokens,output_tokens", "arrival_s,prompt_tokens,output_tokens,model,slo_class",
    "TIMESTAMP,ContextTokens,GeneratedTokens", "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
    "arrived_at,num_prefill_tokens,num_decode_tokens", "a,b,c", "",
])


@FUZZ
@given(header=_headers_csv,
       rows=st.one_of(st.lists(st.lists(_number, min_size=3, max_size=3), max_size=8),
                      st.lists(st.one_of(st.lists(_cells, min_size=3, max_size=3), st.lists(_cells, max_size=6)),
                               max_size=8)),
       junk=st.none() | st.binary(max_size=40))
def test_csv_trace_gives_a_trace_or_a_user_error(tmp_path_factory, header, rows, junk):
    path = tmp_path_factory.mktemp("t") / "trace.csv"
    if junk is not None:
        path.write_bytes(junk)
    else:
        path.write_text("\n".join([header, *(",".join(r) for r in rows)]) + "\n")
    try:
        t = load_trace(path)
    except UserError as e:
        assert str(e)
        event("UserError")
        return
    event("trace")
    assert isinstance(t, LoadedTrace) and len(t) >= 0
    if len(t):
        assert (t.frame["prompt_tokens"] >= 1).all() and (t.frame["output_tokens"] >= 1).all()
        assert t.frame["arrival_s"].is_monotonic_increasing


@FUZZ
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({}, optional={"timestamp": _json | st.integers(0, 10**7), "input_length": _json | st.integers(),
                                        "output_length": _json | st.integers(), "hash_ids": _json}).map(json.dumps),
    st.text(max_size=30)), max_size=6))
def test_jsonl_trace_gives_a_trace_or_a_user_error(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("t") / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for fmt in ("auto", "mooncake"):
        try:
            load_trace(path, fmt)
        except UserError as e:
            assert str(e)


_SCENARIO_PATHS = [
    ("name",), ("seed",), ("models",), ("models", "m"), ("models", "m", "profile"), ("models", "m", "profile", "kv_blocks"),
    ("models", "m", "profile", "base_s"), ("models", "m", "profile", "max_model_len"), ("cluster",),
    ("cluster", "instances"), ("cluster", "instances", 0), ("cluster", "instances", 0, "model"), ("slo_classes",),
    ("slo_classes", "interactive"), ("slo_classes", "interactive", "ttft_s"), ("workload",), ("workload", "synthetic"),
    ("workload", "synthetic", "rate_rps"), ("workload", "synthetic", "num_requests"), ("scheduler",),
    ("scheduler", "policy"), ("scheduler", "gurobi"), ("live",), ("live", "engines"), ("live", "engines", 0),
    ("live", "engines", 0, "url"), ("live", "engines", 0, "model"), ("live", "port"), ("live", "speedup"),
    ("live", "max_retries"), ("live", "queue_limits"), ("live", "queue_limit"), ("live", "api_key"),
    ("live", "first_token_timeout_s"), ("live", "resume"), ("live", "default_slo_class"), ("extra_key",),
]


def _set(tree: dict, path: tuple, value: object) -> None:
    node = tree
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        pass


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(_SCENARIO_PATHS), _weird), max_size=3),
       text=st.none() | st.none() | st.text(max_size=60))
def test_scenario_loader_gives_a_scenario_or_a_user_error(tmp_path_factory, changes, text):
    spec = live_scenario_spec(PROFILE, [("g0", "m", "http://127.0.0.1:9")])
    for path, value in changes:
        _set(spec, path, value)
    path = tmp_path_factory.mktemp("s") / "s.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec))
    try:
        sc = load_scenario(path)
    except UserError as e:
        assert str(e)
        event("UserError")
        return
    event("scenario")
    assert isinstance(sc, Scenario)
    sc.dump()


def test_scenario_loader_reports_a_bad_live_field_with_its_line(tmp_path: Path):
    spec = live_scenario_spec(PROFILE, [("g0", "m", "http://127.0.0.1:9")])
    spec["live"]["queue_limits"] = {"platinum": 3}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError) as e:
        load_scenario(path)
    assert "platinum" in str(e.value) and "queue_limits" in str(e.value)
    spec["live"]["queue_limits"] = {}
    spec["live"]["max_retries"] = -1
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError) as e:
        load_scenario(path)
    assert e.value.field == "live.max_retries" and e.value.line is not None
