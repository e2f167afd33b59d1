"""The client tools' HTTP side: URLs as users type them, SSE framing (CRLF too), model choice, one-line
errors, and ITL from token times, against a small server that frames events as the SSE spec allows."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from typer.testing import CliRunner

from qlmctl.cli import app
from qlmctl.client.http import SSEParser, pick_model, server_url
from qlmctl.client.replay import replay
from qlmctl.core.request import Request
from qlmctl.errors import UserError


@pytest.mark.parametrize("given, root", [
    ("127.0.0.1:8001", "http://127.0.0.1:8001"),
    ("http://127.0.0.1:8001/", "http://127.0.0.1:8001"),
    ("http://127.0.0.1:8001/v1", "http://127.0.0.1:8001"),
    ("https://api.example.com/v1/", "https://api.example.com"),
    ("https://gw.example.com/openai/v1", "https://gw.example.com/openai"),
    ("localhost", "http://localhost"),
])
def test_server_url_takes_what_users_type(given, root):
    assert server_url(given) == root


@pytest.mark.parametrize("bad", ["ftp://host", "http://", "", "http://host:notaport"])
def test_server_url_refuses_what_is_no_server(bad):
    with pytest.raises(UserError):
        server_url(bad)


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_sse_events_end_with_any_line_ending_even_split_across_reads(sep):
    body = sep.join([b"data: one", b"", b": a comment", b"", b"data: two", b"data: lines", b"", b"data: [DONE]", b"",
                     b""])
    for cut in range(len(body) + 1):  # every split of the body into two reads
        p = SSEParser()
        got = p.feed(body[:cut]) + p.feed(body[cut:]) + p.finish()
        assert got == [b"one", b"two\nlines", b"[DONE]"], (sep, cut)
        assert not p.pending()


def test_pick_model():
    assert pick_model(["m"], ["m", "x"], None, "u") == {"m": "m"}
    assert pick_model(["a", "b"], ["only"], None, "u") == {"a": "only", "b": "only"}
    assert pick_model(["a"], ["x", "y"], "y", "u") == {"a": "y"}
    with pytest.raises(UserError, match="does not serve a .*serves: x, y"):
        pick_model(["a"], ["x", "y"], None, "u")
    with pytest.raises(UserError, match="does not serve 'z'"):
        pick_model(["a"], ["x"], "z", "u")


class _SSEServer:
    """An OpenAI-ish server on loopback: GET /v1/models, POST /v1/completions streaming `tokens` events with
    CRLF line ends, in bursts of `burst` events per write, `gap_s` apart (so one network read holds several)."""

    def __init__(self, tokens: int = 9, burst: int = 3, gap_s: float = 0.05, model: str = "served") -> None:
        self.tokens, self.burst, self.gap_s, self.model = tokens, burst, gap_s, model
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line = head.split(b"\r\n", 1)[0].decode()
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                      0)
        body = await reader.readexactly(length) if length else b""
        if line.startswith("GET /v1/models"):
            data = json.dumps({"object": "list", "data": [{"id": self.model}]}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n" % len(data) + data)
        elif line.startswith("POST /v1/completions"):
            req = json.loads(body)
            if req["model"] != self.model:
                data = json.dumps({"error": {"message": f"model {req['model']} not found"}}).encode()
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % len(data) + data)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                for k in range(0, self.tokens, self.burst):
                    events = b"".join(b"data: " + json.dumps({"choices": [{"text": f" t{j}"}]}).encode() + b"\r\n\r\n"
                                      for j in range(k, min(k + self.burst, self.tokens)))
                    writer.write(events)
                    await writer.drain()
                    await asyncio.sleep(self.gap_s)
                usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": self.tokens}}
                writer.write(b"data: " + json.dumps(usage).encode() + b"\r\n\r\ndata: [DONE]\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    def __enter__(self) -> "_SSEServer":
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"  # no scheme, as a user types it


def _requests(n: int = 3) -> list[Request]:
    return [Request(request_id=i, arrival_s=0.01 * i, model="m", slo_class="a", ttft_slo_s=10.0, tpot_slo_s=None,
                    priority=0, prompt_tokens=5, output_tokens=9) for i in range(n)]


def test_replay_reads_crlf_events_and_interpolates_itl_within_a_read():
    with _SSEServer(tokens=9, burst=3, gap_s=0.05) as srv:
        res = asyncio.run(replay(srv.url + "/v1", _requests(), model_map={"m": "served"}))
    for r, gaps in zip(res.requests, res.itls):
        assert r.error is None and r.generated_tokens == 9
        # 3 reads of 3 events: the first read's extra 2 tokens came with the first; then 6 gaps, each a
        # share of the ~50 ms between reads (never 0, as vLLM's client reports for tokens read together).
        assert len(gaps) == 8 and gaps[:2] == [0.0, 0.0]
        assert all(g > 0.005 for g in gaps[2:]), gaps
        # The tokens of one read share its gap evenly.
        assert gaps[2] == pytest.approx(gaps[3]) == pytest.approx(gaps[4]), gaps
        # The server spaced its writes 50 ms apart, and the stream ends after the last token: bounds that hold
        # however late a busy client reads.
        assert 2 * 0.05 * 0.9 < sum(gaps) <= r.finish_s - r.first_token_s + 1e-9, (gaps, r.finish_s - r.first_token_s)


def test_replay_command_names_a_wrong_model_and_finds_the_served_one(tmp_path):
    runner = CliRunner()
    with _SSEServer(tokens=4, burst=4, gap_s=0.0) as srv:
        res = runner.invoke(app, ["replay", "--url", srv.url, "--model", "nope", "-n", "3", "-o", str(tmp_path)])
        assert res.exit_code == 2 and "does not serve 'nope'; it serves served" in res.output
        assert "Traceback" not in res.output
        # No --model: the server's only model is used for the scenario's; results are written like simulate's.
        res = runner.invoke(app, ["replay", "--url", f"http://{srv.url}/v1/", "-n", "3", "--request-rate", "50",
                                  "-o", str(tmp_path), "-l", "direct", "--save-result", "--result-dir",
                                  str(tmp_path / "vllm")])
        assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert summary["completed"] == 3 and summary["model_id"] == "served" and summary["max_concurrency"] == 1024
    assert summary["request_rate"] == 50 and summary["num_prompts"] == 3 and summary["median_itl_ms"] is not None
    (result,) = list((tmp_path / "vllm").iterdir())
    assert result.name.startswith("direct-50.0qps-concurrency1024-served-")  # vLLM's name


def test_replay_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["replay", "--url", "127.0.0.1:1", "-n", "2"])
    assert res.exit_code == 2 and "cannot connect to http://127.0.0.1:1" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3
    res = runner.invoke(app, ["replay", "--url", "ftp://x", "-n", "2"])
    assert res.exit_code == 2 and "only http:// and https://" in res.output


def _spaced(n: int, gap_s: float) -> list[Request]:
    return [Request(request_id=100 + i, arrival_s=5.0 + gap_s * i, model="m", slo_class="a", ttft_slo_s=10.0,
                    tpot_slo_s=None, priority=0, prompt_tokens=5, output_tokens=9) for i in range(n)]


def test_replay_says_how_late_the_client_sent_and_wrote_each_request():
    with _SSEServer(tokens=9, burst=3, gap_s=0.01) as srv:
        res = asyncio.run(replay(srv.url, _spaced(4, 0.1), model_map={"m": "served"}))
    c = res.client
    assert c["client_processes"] == 1
    for name in ("client_send_late", "client_send_delay"):
        assert 0 <= c[f"{name}_p50_ms"] <= c[f"{name}_p99_ms"] <= c[f"{name}_max_ms"], c
    for r, sent in zip(res.requests, res.sent_s):
        # The request's bytes go out after its send stamp (where its TTFT starts) and before its first token.
        assert r.error is None and sent is not None
        assert r.arrival_s <= sent <= r.first_token_s, (r.arrival_s, sent, r.first_token_s)


def test_replay_from_several_processes_sends_one_schedule_and_merges_in_send_order():
    from qlmctl.client.replay import replay_in_subprocess

    reqs = _spaced(9, 0.25)
    seen: list[tuple[int, int]] = []
    with _SSEServer(tokens=9, burst=3, gap_s=0.01) as srv:
        res = asyncio.run(replay_in_subprocess(srv.url, reqs, model_map={"m": "served"}, processes=3,
                                               progress=lambda done, total: seen.append((done, total))))
    assert [r.request_id for r in res.requests] == [r.request_id for r in reqs]
    assert all(r.error is None and r.generated_tokens == 9 for r in res.requests)
    assert all(len(g) == 8 for g in res.itls) and res.usage_tokens == [9] * 9
    # One time zero for all: each request went out at its own time from the first arrival (5.0 s), whichever
    # process sent it, so the send stamps keep the schedule's order and spacing (late by at most a loaded
    # machine's margin).
    stamps = [r.arrival_s for r in res.requests]
    assert stamps == sorted(stamps)
    for r, want in zip(res.requests, [0.25 * i for i in range(9)]):
        assert want <= r.arrival_s < want + 0.2, (r.request_id, r.arrival_s, want)
    assert res.client["client_processes"] == 3 and res.client["client_send_late_p50_ms"] is not None
    assert all(s is not None and r.arrival_s <= s for r, s in zip(res.requests, res.sent_s))
    assert seen and seen[-1] == (9, 9)


def test_replay_from_several_processes_stopped_before_it_starts_sends_nothing():
    from qlmctl.client.replay import replay_in_subprocess

    async def run(srv) -> object:
        stop = asyncio.Event()
        stop.set()
        return await replay_in_subprocess(srv.url, _spaced(4, 0.1), model_map={"m": "served"}, processes=2,
                                          stop=stop)

    with _SSEServer(tokens=9, burst=3, gap_s=0.01) as srv:
        res = asyncio.run(run(srv))
    assert [r.request_id for r in res.requests] == [100, 101, 102, 103]
    assert all(r.error == "not sent: the replay was stopped" and r.first_token_s is None for r in res.requests)


def test_client_processes_by_default_leave_cpus_to_a_server_and_a_late_client_is_told():
    from qlmctl.client.replay import auto_client_procs, client_late_warning, client_procs_for

    assert [auto_client_procs(c) for c in (1, 2, 7, 8, 12, 16, 128)] == [1, 1, 1, 2, 3, 4, 4]
    assert client_procs_for(0, cpus=16) == 4 and client_procs_for(3, cpus=16) == 3
    assert client_procs_for(0, own_process=False, cpus=16) == 1  # on the caller's loop: one, whatever was asked
    assert client_late_warning({"client_loop_lag_p99_ms": 3.0, "client_send_delay_p99_ms": 5.0,
                                "client_send_late_p99_ms": None, "client_processes": 1}) is None
    line = client_late_warning({"client_loop_lag_p99_ms": 45.0, "client_send_delay_p99_ms": 180.0,
                                "client_send_late_p99_ms": 50.0, "client_processes": 1})
    assert line is not None and "180 ms" in line and "--client-procs" in line
