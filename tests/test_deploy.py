"""deploy/: the container recipe, the Kubernetes example and the Grafana dashboard name only real commands,
options and metrics (the gateway's from a live scrape, vLLM's from a list checked against the emulator)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import httpx
import pytest
import typer.main
import yaml
from prometheus_client.parser import text_string_to_metric_families

from qlmctl.cli import app
from qlmctl.emulator.testing import live_scenario_spec, local_emulators
from qlmctl.gateway.server import Gateway
from qlmctl.scenario import REPO_ROOT, Scenario, ScenarioSpec, load_scenario
from simulator.profile import EngineProfile

DEPLOY = REPO_ROOT / "deploy"
PROFILE = dict(base_s=0.01, per_prefill_token_s=1e-4, per_decode_seq_s=1e-3, per_context_token_s=0.0,
               kv_blocks=1000, block_size=16, max_num_seqs=4, max_num_batched_tokens=1024, max_model_len=2048,
               load_cold_s=1.0, load_warm_s=0.5)
METRIC = re.compile(r"\b(?:qlm|vllm)[:_][A-Za-z0-9_:]*")
"""A gateway or vLLM metric name in a PromQL expression."""


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample names: the gateway's (a live scrape after a request, so every labelled family has samples) and
    vLLM's (the list in deploy/, each checked against the emulator's /metrics)."""
    import asyncio

    listed = {line.strip() for line in (DEPLOY / "grafana" / "vllm-metrics.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    with local_emulators([(EngineProfile(model="m", **PROFILE), "m")], speedup=4) as (engine,):
        emulator = sample_names(httpx.get(engine.url + "/metrics").text)

        async def scrape() -> str:
            sc = Scenario(ScenarioSpec.model_validate(live_scenario_spec(PROFILE, [("g0", "m", engine.url)],
                                                                         speedup=4)))
            async with Gateway(sc, "qlm", port=0) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
                r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1 w2", "max_tokens": 3})
                assert r.status_code == 200
                return (await c.get("/metrics")).text

        gateway = sample_names(asyncio.run(scrape()))
    assert listed <= emulator, f"not vLLM 0.24's (not in the emulator's /metrics): {sorted(listed - emulator)}"
    return {"gateway": gateway, "vllm": listed}


def dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "qlm-dashboard.json").read_text())
    exprs = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            exprs.append(t["expr"])
    for var in dash["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            exprs.append(q["query"])
    return exprs


def test_dashboard_queries_name_only_exported_metrics(exported):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used: set[str] = set()
    for e in exprs:
        names = set(METRIC.findall(e))
        assert names, f"no metric in {e!r}"
        unknown = names - exported["gateway"] - exported["vllm"]
        assert not unknown, f"{e!r} names metrics nobody exports: {sorted(unknown)}"
        used |= names
    # What the dashboard is for: queue wait, TTFT, TPOT, attainment, tokens/s, vLLM's queue and KV cache.
    for name in ("qlm:request_queue_time_seconds_bucket", "qlm:time_to_first_token_seconds_bucket",
                 "qlm:request_time_per_output_token_seconds_bucket", "qlm:request_outcome_total",
                 "qlm:generation_tokens_total", "vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):
        assert name in used, name
    assert any("slo_class" in e and "histogram_quantile(0.99" in e for e in exprs)  # p99 by class


def test_dashboard_is_grafana_json():
    dash = json.loads((DEPLOY / "grafana" / "qlm-dashboard.json").read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["panels"], list)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]


def _serve_options() -> tuple[set[str], dict[str, object]]:
    cmd = typer.main.get_command(app)
    return set(cmd.commands), {o: p for name, c in cmd.commands.items() for p in c.params for o in p.opts
                               if name == "serve"}


def _check_qlmctl_args(argv: list[str]) -> None:
    """`argv` is `qlmctl <command> ...` with only options that command has."""
    commands, serve_opts = _serve_options()
    assert argv[0] == "qlmctl" and argv[1] in commands, argv
    assert argv[1] == "serve"
    for a in argv[2:]:
        if a.startswith("-"):
            assert a.split("=")[0] in serve_opts, f"qlmctl serve has no option {a}"


def dockerfile_instructions(text: str) -> list[str]:
    """The Dockerfile's instructions, one string each (continued lines joined, comments dropped)."""
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def test_dockerfile_runs_qlmctl_serve_as_non_root():
    lines = dockerfile_instructions((DEPLOY / "Dockerfile").read_text())
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD "))[len("CMD "):])
    _check_qlmctl_args(entry + cmd)
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert any(re.search(r'pip install "?\.', ln) for ln in lines if ln.startswith("RUN "))  # this checkout
    # Everything the image copies exists (a renamed folder would break the build).
    for ln in lines:
        if ln.startswith("COPY "):
            for src in ln.split()[1:-1]:
                assert (REPO_ROOT / src).exists(), src


def test_kubernetes_example_parses_and_runs_real_commands(tmp_path):
    gateway = list(yaml.safe_load_all((DEPLOY / "k8s" / "qlm-gateway.yaml").read_text()))
    vllm = list(yaml.safe_load_all((DEPLOY / "k8s" / "vllm.yaml").read_text()))
    kinds = [d["kind"] for d in gateway]
    assert kinds == ["ConfigMap", "Deployment", "Service"]
    cm, dep, svc = gateway
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    argv = container["command"] + container["args"]
    _check_qlmctl_args(argv)
    # The scenario it mounts is a valid scenario, and names the vLLM Services of vllm.yaml.
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "scenario")
    path = argv[argv.index("--scenario") + 1]
    assert Path(path).parent == Path(mount) and Path(path).name in cm["data"]
    scenario_file = tmp_path / "scenario.yaml"
    scenario_file.write_text(cm["data"][Path(path).name])
    sc = load_scenario(scenario_file)
    services = {d["metadata"]["name"]: d["spec"]["ports"][0]["port"] for d in vllm if d["kind"] == "Service"}
    urls = {e.url for e in sc.spec.live.engines}
    assert urls == {f"http://{name}:{port}" for name, port in services.items()}
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > sc.spec.live.drain_timeout_s
    # The engines run with sleep mode, as model swaps need, and serve the scenario's model name.
    for d in vllm:
        if d["kind"] != "Deployment":
            continue
        (c,) = d["spec"]["template"]["spec"]["containers"]
        args = c["command"] + c["args"]
        assert "--enable-sleep-mode" in args
        assert args[args.index("--served-model-name") + 1] in sc.spec.models
        assert {"name": "VLLM_SERVER_DEV_MODE", "value": "1"} in c["env"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_deploy_docs_show_real_commands():
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("qlmctl serve"):
            _check_qlmctl_args(shlex.split(line.split("#")[0]))
