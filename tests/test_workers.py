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
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from qlmctl.client.outcomes import call
from qlmctl.engines.http import Pool
from qlmctl.gateway.server import Gateway
from qlmctl.gateway.workers import RestartPolicy
from tests.test_faults import (PROFILE, _exit_code, _free_port, _serve, _up, body, check_exact, emulators,
                               run_requests, scenario, tally, wait_until)


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


async def _worker_pids(port: int, proc) -> list[int]:
    """Once `serve` is up, the relay worker pids it prints when every worker listens."""
    await _up(port, proc)
    line = ""
    while "relay workers" not in line:
        line = await asyncio.to_thread(proc.stdout.readline)
        assert line, "serve printed no worker pids"
    return [int(p) for p in re.search(r"pids ([\d, ]+)\)", line).group(1).split(",")]


@contextmanager
def _qlm_with_workers(stack: ExitStack, tmp_path: Path, workers: int = 2) -> Iterator[tuple[subprocess.Popen, int]]:
    """`qlmctl serve` (qlm, relay workers) in front of one emulator: its process and port; killed at the end if
    it still runs."""
    (e0,) = emulators(stack, 1)
    port = _free_port()
    proc = _serve(tmp_path, e0.url, port, "--policy", "qlm", "--workers", str(workers))
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.asyncio
async def test_sigkill_of_the_core_leaves_no_worker(tmp_path):
    with ExitStack() as stack, _qlm_with_workers(stack, tmp_path) as (proc, port):
        pids = await _worker_pids(port, proc)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        # Mid-stream: the workers hold open client and engine connections when the core dies.
        pool = Pool(f"http://127.0.0.1:{port}", max_idle=8)
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


@pytest.mark.asyncio
async def test_a_worker_that_dies_ends_its_requests_and_the_others_serve_on():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), "qlm", port=0, workers=2) as gw:
            gw.pool.restart = RestartPolicy(first_s=3600.0)  # while it is down (its restart is cancelled at stop)
            victim = gw.pool.procs[0]
            os.kill(victim.pid, signal.SIGKILL)
            assert await wait_until(lambda: gw.pool.channels[0].closed, 10)
            assert gw.cluster.num_active() == 0
            outs = await run_requests(gw, 6, 20)  # the kernel sends new connections to the live worker
            assert tally(outs).completed == 6
            for o in outs:
                check_exact(o, 20)
                assert int(next(iter(o.ids)).rsplit("-", 1)[1]) % 2 == 1
            assert gw.pool.procs[0] is victim


def _rid(o) -> int:
    return int(next(iter(o.ids)).rsplit("-", 1)[1])


def _assert_released(cluster) -> None:
    """Nothing of an ended request stays in the core: queues, instances' in-flight sets, KV and prefill sums."""
    assert cluster.num_active() == 0
    assert all(v == 0 for v in cluster.queued_by_class.values()), cluster.queued_by_class
    for inst in cluster.instances:
        assert not inst.inflight and inst.kv_tokens == 0 and inst.prefill_tokens == 0


@pytest.mark.asyncio
async def test_a_worker_killed_mid_stream_is_restarted_and_what_its_requests_held_is_released():
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), "qlm", port=0, workers=2) as gw:
            pool, cluster = gw.pool, gw.cluster
            (inst,) = cluster.instances
            pool.restart = RestartPolicy(first_s=0.2)
            n_out = 400
            pool_c = Pool(gw.url, max_idle=16)
            # 12 streams on an engine of 8 slots: some run, some wait in the core's queue.
            reqs = [asyncio.ensure_future(call(pool_c, *body(i, n_out, stream=True), timeout_s=60))
                    for i in range(12)]
            assert await wait_until(lambda: any(lr.sent >= 10 for lr in inst.inflight.values()), 30)
            # The victim is a worker with a request streaming now (whichever the kernel gave connections to).
            w = next(rid for rid, lr in inst.inflight.items() if lr.sent >= 10) % 2
            theirs = [rid for rid in cluster._live if rid % 2 == w]
            seen = max(r.request_id for r in cluster.records if r.request_id % 2 == w)
            old = pool.procs[w]
            os.kill(old.pid, signal.SIGKILL)
            assert await wait_until(lambda: all(rid not in cluster._live for rid in theirs), 10)
            # (c) at once: none of its requests is left in the queues or on the instance.
            assert all(rid % 2 != w for rid in inst.inflight)
            assert sum(cluster.queued_by_class.values()) == sum(lr.queued for lr in cluster._live.values())
            outs = await asyncio.gather(*reqs)
            await pool_c.aclose()
            for o in outs:
                if o.kind == "completed":
                    check_exact(o, n_out)
            assert all(o.kind != "completed" for o in outs if o.ids and _rid(o) % 2 == w)
            assert await wait_until(lambda: cluster.num_active() == 0, 10)
            _assert_released(cluster)
            assert await wait_until(lambda: inst.ext_requests == 0, 10)  # the engine dropped its streams too
            dead = [r for r in cluster.records if r.request_id in theirs]
            assert dead and all(r.error == "relay worker died" for r in dead)
            # (a) a new process for the same index, listening again.
            assert await wait_until(lambda: pool.procs[w] is not old and w in pool.live_workers(), 60)
            new = pool.procs[w]
            assert new.pid != old.pid and new.poll() is None
            assert pool.slots[w].restarts == 1
            # (b) requests keep succeeding, the restarted worker's too, numbered on from its predecessor's.
            from_new: list[int] = []
            for _ in range(20):
                outs = await run_requests(gw, 8, 20)
                assert tally(outs).completed == 8, [o for o in outs if o.kind != "completed"]
                for o in outs:
                    check_exact(o, 20)
                from_new += [_rid(o) for o in outs if _rid(o) % 2 == w]
                if from_new:
                    break
            assert from_new and min(from_new) > seen
            _assert_released(cluster)
            # /metrics gathers from both workers again, and counts the restart.
            assert len(await pool.gather_metrics()) == 2
            async with httpx.AsyncClient(base_url=gw.url) as c:
                text = (await c.get("/metrics")).text
            restarts = _samples(text, "qlm_relay_worker_restarts_total{")
            assert restarts == {f'qlm_relay_worker_restarts_total{{worker="{w}"}}': 1.0}
            pids = [old.pid, *pool.pids]
        # (d) stopped: no worker left, the restarted one included.
        assert not any(_alive(p) for p in pids)


@pytest.mark.asyncio
async def test_a_worker_that_dies_while_another_still_starts_is_restarted():
    """Dead after it listened but before the gateway finished starting: restarted, not left dead."""
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        gw = Gateway(scenario([e0.url]), "qlm", port=0, workers=2)
        pool = gw.pool
        pool.restart = RestartPolicy(first_s=0.1)
        spawn, killed = pool._spawn, []

        async def kill_0_before_1(w):
            if w == 1:
                assert await wait_until(lambda: pool._ready[0].done(), 60)
                killed.append(pool.procs[0])
                os.kill(pool.procs[0].pid, signal.SIGKILL)
                assert await wait_until(lambda: pool.channels[0].closed, 10)
            return await spawn(w)

        pool._spawn = kill_0_before_1
        async with gw:
            assert await wait_until(lambda: pool.procs[0] is not killed[0] and pool.live_workers() == [0, 1], 60)
            assert tally(await run_requests(gw, 4, 10)).completed == 4


def _relay_workers_of(core_pid: int) -> list[int]:
    """Relay worker processes started by `core_pid` (their command line ends with its pid), reparented or not."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"qlmctl.gateway.relayproc" in argv and argv[-2:] == [str(core_pid).encode(), b""] and _alive(int(d)):
            found.append(int(d))
    return found


@pytest.mark.asyncio
async def test_serve_restarts_a_killed_worker_and_sigterm_leaves_none(tmp_path):
    with ExitStack() as stack, _qlm_with_workers(stack, tmp_path) as (proc, port):
        first = await _worker_pids(port, proc)
        assert sorted(_relay_workers_of(proc.pid)) == sorted(first)
        os.kill(first[0], signal.SIGKILL)
        # The core says when the new worker listens, and its pid (the log goes to the same stream).
        seen, line = [], ""
        while (m := re.search(r"relay worker 0 restarted \(pid (\d+)", line)) is None:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line, "serve exited: " + "".join(seen)
            seen.append(line)
        new = int(m.group(1))
        assert new != first[0] and new in _relay_workers_of(proc.pid), "".join(seen)
        async with httpx.AsyncClient() as c:
            for _ in range(8):  # fresh connections, to either worker
                r = await c.post(f"http://127.0.0.1:{port}/v1/completions", headers={"connection": "close"},
                                 json={"model": "m", "prompt": "w1 w2", "max_tokens": 4}, timeout=30)
                assert r.status_code == 200, r.text
        # Killed again, then SIGTERM while its restart waits out the backoff: it does not come back.
        os.kill(new, signal.SIGKILL)
        proc.send_signal(signal.SIGTERM)
        assert await _exit_code(proc, 60) == 0
        out = "".join(seen) + proc.stdout.read()
        assert "restarting it in" in out and "restart 1" in out, out
        assert _relay_workers_of(proc.pid) == []
        assert not any(_alive(p) for p in (*first, new))


def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_stable_run():
    p = RestartPolicy(first_s=0.5, max_s=30.0, stable_s=60.0)
    delays, last = [], None
    for _ in range(9):
        last = p.delay(last, uptime_s=0.1)
        delays.append(last)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert p.delay(30.0, uptime_s=59.0) == 30.0
    assert p.delay(30.0, uptime_s=60.0) == 0.5


@pytest.mark.asyncio
async def test_a_worker_that_crashes_at_start_is_restarted_backed_off_then_recovers(caplog):
    with ExitStack() as stack:
        (e0,) = emulators(stack, 1)
        async with Gateway(scenario([e0.url]), "qlm", port=0, workers=2) as gw:
            pool = gw.pool
            pool.restart = RestartPolicy(first_s=0.2, max_s=0.8, stable_s=60.0)
            command = pool.command
            pool.command = [sys.executable, "-c", "import sys; sys.exit(3)"]  # dies before it listens
            spawns: list[float] = []
            spawn = pool._spawn

            async def counted(w):
                spawns.append(asyncio.get_running_loop().time())
                return await spawn(w)

            pool._spawn = counted
            os.kill(pool.procs[1].pid, signal.SIGKILL)
            assert await wait_until(lambda: len(spawns) >= 5, 60)
            pool.command = command
            gaps = [b - a for a, b in zip(spawns, spawns[1:])]
            # Each start waited out its backoff after the one before it died: 0.4, 0.8, then capped at 0.8.
            for gap, delay in zip(gaps, [0.4, 0.8, 0.8, 0.8]):
                assert gap >= delay - 0.01, (gaps, delay)
            assert await wait_until(lambda: pool.live_workers() == [0, 1], 60)
            assert pool.slots[1].restarts == len(spawns)
            assert "exit status 3" in caplog.text and "exit status -9 (SIGKILL)" in caplog.text
            outs = await run_requests(gw, 8, 20)
            assert tally(outs).completed == 8
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


def test_serve_defaults_to_one_worker_per_cpu_beyond_the_core_up_to_eight():
    import inspect

    from qlmctl.commands.serve import serve
    from qlmctl.gateway.workers import auto_workers

    assert inspect.signature(serve).parameters["workers"].default.default == 0  # 0: auto
    assert [auto_workers(n) for n in (1, 2, 3, 9, 16, 64)] == [1, 1, 2, 8, 8, 8]
