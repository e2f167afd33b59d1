"""The client tools' HTTP side (`qlmctl replay`, `qlmctl profile-model`): httpx, so https, proxies
(HTTP(S)_PROXY, NO_PROXY) and any OpenAI-compatible base URL work; server-sent events as the SSE spec
frames them; errors in one line.

`server_url` turns what a user types (`127.0.0.1:8000`, `https://host/v1`, `http://host:8000/openai/v1/`)
into the server's root, to which the OpenAI paths (`/v1/completions`, `/v1/models`) are added. `SSEParser`
reads a streamed body one network read at a time: events end with a blank line, and lines with CRLF,
LF or CR (the spec allows all three; vLLM sends LF, some proxies and servers CRLF). `describe_error` says
what went wrong with a request in a line (and what to try).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from qlmctl.errors import UserError

OPENAI_PREFIX = "/v1"


def server_url(url: str, option: str = "--url") -> str:
    """The server's root URL (no trailing slash, no `/v1`): a missing scheme is http://.

    Raises UserError for what cannot be a server URL.
    """
    text = url.strip()
    if not text:
        raise UserError("empty URL", field=option)
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise UserError(f"'{url}': only http:// and https:// URLs are supported", field=option)
    if not parts.hostname:
        raise UserError(f"'{url}': no host in the URL", field=option)
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise UserError(f"'{url}': bad port", field=option) from None
    path = parts.path.rstrip("/")
    if path.endswith(OPENAI_PREFIX):  # an OpenAI base URL: the paths below add /v1 themselves
        path = path[: -len(OPENAI_PREFIX)]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def make_client(url: str, *, api_key: str | None = None, concurrency: int = 1024, timeout_s: float | None = None,
                verify: bool = True) -> Any:
    """An httpx.AsyncClient on the server's root (see `server_url`), with a bearer token when given.

    Idle connections are few and short-lived: httpx checks every idle connection on each request, which
    costs milliseconds at hundreds of them; a replay opens new ones as its load grows instead.
    """
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=min(concurrency, 64),
                          keepalive_expiry=2.0)
    return httpx.AsyncClient(base_url=server_url(url), headers=headers, limits=limits, verify=verify,
                             timeout=httpx.Timeout(timeout_s, connect=10.0))


class SSEParser:
    """Incremental server-sent-event framing: `feed(bytes)` returns the data payloads of the events it
    completed (an event's `data:` lines joined with LF); comments and events without data are skipped."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data if self._buf else data
        keep = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # its LF may be in the next read
                buf, keep = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf + keep
            return []
        whole, self._buf = buf[:end], buf[end + 2:] + keep
        out = []
        for block in whole.split(b"\n\n"):
            if block.startswith(b"data: ") and b"\n" not in block:
                out.append(block[6:])  # vLLM's events: one data line
                continue
            lines = [ln[5:].removeprefix(b" ") for ln in block.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(lines))
        return out

    def finish(self) -> list[bytes]:
        """At the end of the body: the events a trailing CR completes (held back in case an LF followed)."""
        if self._buf.endswith(b"\r"):
            self._buf = self._buf[:-1] + b"\n"
            return self.feed(b"")
        return []

    def pending(self) -> bool:
        """Whether bytes of an unfinished event are left (a stream cut in the middle of an event)."""
        return bool(self._buf.strip())


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body (or the body's start)."""
    try:
        data = orjson.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)
        return str(err)
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        text = body[:200].decode(errors="replace").strip()
        return text or "(empty body)"


def status_hint(status: int, root: str, path: str) -> str:
    """What to try after an HTTP error status, for a user error message."""
    if status == 404:
        return (f" (no {path} at {root}: give the server's base URL, e.g. http://host:8000 or "
                f"https://host/v1, and check the model name)")
    if status in (401, 403):
        return " (pass --api-key, or set OPENAI_API_KEY)"
    if status == 405:
        return " (the URL is not an OpenAI-compatible server)"
    return ""


def describe_error(e: BaseException, root: str) -> str:
    """One line for a failed request: the exception's kind, without a traceback."""
    import httpx

    if isinstance(e, httpx.ConnectError):
        cause = str(e) or "connection refused"
        return f"cannot connect to {root}: {cause} (is the server running, and the URL right?)"
    if isinstance(e, httpx.ConnectTimeout):
        return f"cannot connect to {root}: timed out"
    if isinstance(e, httpx.ProxyError):
        return f"proxy error reaching {root}: {e} (check HTTP(S)_PROXY / NO_PROXY)"
    if isinstance(e, httpx.UnsupportedProtocol):
        return f"unsupported URL {root}: {e}"
    if isinstance(e, (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout, asyncio.TimeoutError)):
        return f"timed out talking to {root}"
    if isinstance(e, httpx.RemoteProtocolError):
        return f"the server broke the connection: {e}"
    if isinstance(e, httpx.HTTPError):
        return f"{type(e).__name__}: {e}"
    if isinstance(e, OSError):
        return f"network error: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"


async def served_models(client: Any) -> list[str]:
    """The model ids of the server's GET /v1/models. Raises UserError (one line) when it cannot be read."""
    import httpx

    root = str(client.base_url).rstrip("/")
    try:
        resp = await client.get(f"{OPENAI_PREFIX}/models", timeout=30.0)
    except httpx.HTTPError as e:
        raise UserError(describe_error(e, root), field="--url") from None
    if resp.status_code != 200:
        raise UserError(f"GET {OPENAI_PREFIX}/models answered HTTP {resp.status_code}: {error_message(resp.content)}"
                        f"{status_hint(resp.status_code, root, OPENAI_PREFIX + '/models')}", field="--url")
    try:
        data = resp.json()
        return [str(m["id"]) for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        raise UserError(f"GET {OPENAI_PREFIX}/models at {root} is not an OpenAI model list", field="--url") from None


def pick_model(wanted: list[str], served: list[str], given: str | None, root: str) -> dict[str, str]:
    """How each workload model maps to a served model: `given` (--model) for every one; else each to itself
    when the server serves them all; else, when it serves exactly one, everything to that one. UserError
    otherwise, naming what the server serves."""
    if given is not None:
        if served and given not in served:
            raise UserError(f"the server does not serve '{given}'; it serves {', '.join(served)}", field="--model")
        return {m: given for m in wanted}
    missing = [m for m in wanted if m not in served]
    if not missing:
        return {m: m for m in wanted}
    if len(served) == 1:
        return {m: served[0] for m in wanted}
    what = ", ".join(served) if served else "none"
    raise UserError(f"the server at {root} does not serve {', '.join(missing)} (it serves: {what}); pick one with "
                    f"--model", field="--model")
