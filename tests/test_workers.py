"""`qlmctl serve --workers N`: relay worker processes in front of one QLM core process.

Emulated engines on loopback, the core in this test's loop (a `Gateway` with `workers`), the relay
workers in processes of their own. The fault and drain tests of tests/test_faults.py also run with
workers; these are what only the split has: the port shared by the workers, an eviction decided in the
core and carried out in a worker, /metrics summed over processes, admission checked by the core, and no
worker outliving its core.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from contextlib import ExitStack

import httpx
import pytest

from qlmctl.engines.http import Pool
from qlmctl.gateway.server import Gateway
from tests.test_faults import (PROFILE, _exit_code, _free_port, _serve, _up, check_exact, emulators, run_requests,
                               scenario, tally, wait_until)


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize("workers", [1, 2])
async def test_requests_complete_exactly_on_every_worker_and_metrics_add_up(workers):
    with ExitStack() as stack:
        e0, e1 = emulators(stack, 2)
        async with Gateway(scenario([e0.url, e1.url]), "qlm", port=0, workers=workers) as gw:
            n, n_out = 48, 40
            outs = await run_requests(gw, n, n_out)
            outs += await run_requests(gw, n, n_out, chat=True)
            t = tally(outs)
            assert (t.completed, t.failed, t.lost) == (2 * n, 0, 0), [o for o in outs if o.kind != "completed"]
            for o in outs:
                check_exact(o, n_out)
            # Ids are numbered per worker (i, i + N, ...): with fresh connections, every worker served some.
            served = {int(next(iter(o.ids)).rsplit("-", 1)[1]) % workers for o in outs}
            assert served == set(range(workers))
            assert len(gw.cluster.records) == 2 * n and all(r.error is None for r in gw.cluster.records)
            async with httpx.AsyncClient(base_url=gw.url) as c:
                # A refused request is counted by the worker that refused it; /metrics sums them all.
                for _ in range(4):
                    assert (await c.post("/v1/completions", json={"model": "nope", "prompt": "w"})).status_code == 404
                text = (await c.get("/metrics")).text
            ended = _samples(text, "qlm_requests_total{")
            assert sum(ended.values()) == 2 * n
            assert sum(_samples(text, "qlm_rejected_requests_total{").values()) == 4
            assert _samples(text, "qlm_time_to_first_token_seconds_count")  # histograms come through
            if workers > 1:
                assert sum(_samples(text, "qlm_core_decision_seconds_count").values()) == 2 * n
                # The core's own registry holds what it did; the workers' lag histograms add to its own.
                assert sum(_samples(text, "qlm_gateway_event_loop_lag_seconds_count").values()) > \
                    sum(s.value for m in gw.metrics.registry.collect() for s in m.samples
                        if s.name == "qlm_gateway_event_loop_lag_seconds_count")
            assert text.count("# TYPE qlm_requests_total counter") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("resume", ["continue", "restart"])
async def test_eviction_decided_in_the_core_resumes_exactly_in_the_worker(resume):
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        n_out, evict_at = 300, 20
        async with Gateway(scenario([e0.url], resume=resume), "qlm", port=0, workers=2) as gw:
            evicted: list[bool] = []

            async def evict_mid_answer():
                inst = gw.cluster.instances[0]
                assert await wait_until(lambda: any(lr.sent >= evict_at for lr in inst.inflight.values()), 20)
                (lr,) = inst.inflight.values()
                evicted.append(gw.cluster.evict(lr.req.request_id))

            (out,) = await run_requests(gw, 1, n_out, during=evict_mid_answer)
            assert evicted == [True]
            assert out.kind == "completed", out
            check_exact(out, n_out)  # every token once, in order, across the two engine attempts
            (r,) = gw.cluster.records
            assert r.num_evictions == 1 and r.generated_tokens == n_out and r.error is None
            assert gw.cluster.num_evictions == 1


@pytest.mark.asyncio
async def test_api_key_and_queue_limit_hold_across_workers():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        sc = scenario([e0.url], queue_limit=2, first_token_timeout_s=60, inter_token_timeout_s=60)
        async with Gateway(sc, "fcfs", port=0, workers=2, api_key="k" * 24) as gw:
            pool = Pool(gw.url, max_idle=32)
            async with httpx.AsyncClient(base_url=gw.url) as c:
                for _ in range(4):  # whichever worker gets the connection
                    r = await c.post("/v1/completions", json={"model": "m", "prompt": "w1", "max_tokens": 2},
                                     headers={"connection": "close"})
                    assert r.status_code == 401
                assert (await c.get("/health")).status_code == 200
            from qlmctl.client.outcomes import call
            from tests.test_faults import body

            hdr = {"authorization": "Bearer " + "k" * 24}
            # 8 engine slots, then 2 may wait in the core's queue; the rest are refused by the core with a 429.
            reqs = [asyncio.ensure_future(call(pool, *body(i, 400, stream=True), headers=hdr, timeout_s=60))
                    for i in range(14)]
            outs = await asyncio.gather(*reqs)
            await pool.aclose()
            refused = [o for o in outs if o.status == 429]
            assert len(refused) >= 14 - PROFILE["max_num_seqs"] - 2
            assert all("too many requests" in o.error["message"] for o in refused)
            assert tally(outs).lost == 0
            for o in outs:
                if o.kind == "completed":
                    check_exact(o, 400)


@pytest.mark.asyncio
async def test_sigkill_of_the_core_leaves_no_worker(tmp_path):
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        port = _free_port()
        proc = _serve(tmp_path, e0.url, port, "--policy", "qlm", "--workers", "2")
        try:
            await _up(port, proc)
            line = ""
            while "relay workers" not in line:
                line = await asyncio.to_thread(proc.stdout.readline)
                assert line, "serve printed no worker pids"
            pids = [int(p) for p in re.search(r"pids ([\d, ]+)\)", line).group(1).split(",")]
            assert len(pids) == 2 and all(_alive(p) for p in pids)
            # Mid-stream: the workers hold open client and engine connections when the core dies.
            pool = Pool(f"http://127.0.0.1:{port}", max_idle=8)
            from qlmctl.client.outcomes import call
            from tests.test_faults import body

            reqs = [asyncio.ensure_future(call(pool, *body(i, 2000, stream=True), timeout_s=30)) for i in range(4)]
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            await _exit_code(proc)
            assert await wait_until(lambda: not any(_alive(p) for p in pids), 10)
            outs = await asyncio.gather(*reqs)
            assert all(o.kind != "completed" for o in outs)  # cut off, not hung: the client sees the end
            await pool.aclose()
            # The port is free again: nothing listens on it.
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.asyncio
async def test_a_worker_that_dies_ends_its_requests_and_the_others_serve_on():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), "qlm", port=0, workers=2) as gw:
            victim = gw.pool.procs[0]
            os.kill(victim.pid, signal.SIGKILL)
            assert await wait_until(lambda: gw.pool.channels[0].closed, 10)
            assert gw.cluster.num_active() == 0
            outs = await run_requests(gw, 6, 20)  # the kernel sends new connections to the live worker
            assert tally(outs).completed == 6
            for o in outs:
                check_exact(o, 20)
                assert int(next(iter(o.ids)).rsplit("-", 1)[1]) % 2 == 1


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_worker_listening_socket_says_tcp_so_asyncio_sets_nodelay():
    """Without proto IPPROTO_TCP asyncio leaves Nagle on for accepted connections: ~40 ms per small write."""
    import socket

    from qlmctl.gateway.relayproc import listen_socket

    sock = listen_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        sock.close()


@pytest.mark.asyncio
async def test_a_second_gateway_on_a_held_port_is_refused():
    """SO_REUSEPORT would let two gateways' workers share a port; the core checks that it is free first."""
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        sc = scenario([e0.url])
        async with Gateway(sc, "fcfs", port=0, workers=2) as gw:
            other = Gateway(sc, "fcfs", port=gw.port, workers=2)
            with pytest.raises(OSError, match="could not listen"):
                await other.start()
            async with httpx.AsyncClient(base_url=gw.url) as c:
                assert (await c.get("/health")).status_code == 200
