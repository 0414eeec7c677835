"""The HTTP face's 401 path at 100k ``remotes`` rows (issue 14, finding 4).

A SQLite database gets 100,000 ``remotes`` rows with CMS-issued tokens in clear (the
column has no index, as in the CMS). ``kiosk-bridge run --http`` serves it in a process
of its own, its failed-authentication limit lifted so that nothing is answered 429.
One keep-alive connection then sends N heartbeats (2,000 by default), each with a random
64-hex bearer token, and times each 401 from the first byte sent to the last byte read.

Beside it, the floor: the simplest program doing the same work in the same run, a bare
Starlette app under the same uvicorn (h11, TCP_NODELAY) that hashes the token, looks it
up in a dict of 100,000 hashes and answers the same 401 JSON. The figure is the ratio.
For comparison, the query the face used to run for every unknown token (``remotes.token
IN (token, sha256)``, a full scan) is timed on the same file, and the load of the
in-memory token map that replaces it.

    python bench/http_auth.py [--scale 1] [--json bench/results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, BridgeProcess, Result, mosquitto, percentiles, wait_until, workdir
from sqlalchemy import insert, text

from bridge.db.engine import create_schema, make_engine
from bridge.db.models import Remote
from bridge.db.token_index import CmsTokenIndex

ROWS = 100_000
REQUESTS = 2_000
TARGET_P99_MS = 5.0
LIFTED = "1000000000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fill(db_url: str, rows: int) -> None:
    """``rows`` devices with tokens in ``remotes.token``, as the CMS leaves them."""
    engine = make_engine(db_url)
    try:
        create_schema(engine)
        now = datetime(2026, 1, 1)
        batch: list[dict[str, Any]] = []
        with engine.begin() as conn:
            for i in range(rows):
                batch.append(
                    {
                        "device_identifier": f"bench{i:08d}",
                        "token": secrets.token_hex(32),
                        "status": "Disconnected",
                        "remote_control_enabled": False,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
                if len(batch) == 5_000:
                    conn.execute(insert(Remote.__table__), batch)
                    batch = []
            if batch:
                conn.execute(insert(Remote.__table__), batch)
    finally:
        engine.dispose()


def old_scan_ms(db_url: str, n: int) -> dict[str, float]:
    """What every unknown token cost before: ``remotes.token IN (token, hash)``."""
    engine = make_engine(db_url)
    times: list[float] = []
    try:
        with engine.connect() as conn:
            stmt = text(
                "SELECT id, device_identifier, deleted_at, remote_control_enabled, token "
                "FROM remotes WHERE token IN (:a, :b)"
            )
            for _ in range(n):
                token = secrets.token_hex(32)
                hashed = hashlib.sha256(token.encode()).hexdigest()
                started = time.perf_counter()
                assert conn.execute(stmt, {"a": token, "b": hashed}).first() is None
                times.append((time.perf_counter() - started) * 1000)
    finally:
        engine.dispose()
    return percentiles(times)


def index_load_s(db_url: str) -> float:
    engine = make_engine(db_url)
    try:
        index = CmsTokenIndex(engine, "plaintext")
        started = time.perf_counter()
        index.load()
        return time.perf_counter() - started
    finally:
        engine.dispose()


class Client:
    """One keep-alive HTTP/1.1 connection, timed per request (no client library in the
    way: the bench measures the server)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def heartbeat(self, token: str) -> tuple[int, float]:
        body = b"{}"
        request = (
            f"POST /api/devices/heartbeat HTTP/1.1\r\nHost: bench\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.perf_counter()
        self.sock.sendall(request)
        status = self._response()
        return status, (time.perf_counter() - started) * 1000

    def _response(self) -> int:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            rest += chunk
        self.buffer = rest[length:]
        return status

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


def measure(ports: dict[str, int], n: int) -> dict[str, tuple[dict[str, float], dict[int, int]]]:
    """``n`` 401s from each server, taking turns request by request, so that whatever
    else the machine does weighs on both alike."""
    clients = {name: Client(port) for name, port in ports.items()}
    times: dict[str, list[float]] = {name: [] for name in ports}
    codes: dict[str, dict[int, int]] = {name: {} for name in ports}
    try:
        for client in clients.values():
            for _ in range(50):  # warm-up: first requests pay for imports and caches
                client.heartbeat(secrets.token_hex(32))
        for _ in range(n):
            for name, client in clients.items():
                status, took = client.heartbeat(secrets.token_hex(32))
                codes[name][status] = codes[name].get(status, 0) + 1
                times[name].append(took)
    finally:
        for client in clients.values():
            client.close()
    return {name: (percentiles(times[name]), codes[name]) for name in ports}


def answers(port: int) -> bool:
    try:
        client = Client(port)
    except OSError:
        return False
    try:
        client.heartbeat("0" * 64)
        return True
    except OSError:
        return False
    finally:
        client.close()


# --- the floor: a bare app doing the same work -------------------------------------------


def floor_server(port: int, db_url: str) -> None:
    """A Starlette app under uvicorn (h11, proxy headers off), a dict of every token's
    hash, the same 401 body. Run in its own process by ``floor``."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    engine = make_engine(db_url)
    with engine.connect() as conn:
        known = {
            hashlib.sha256(row.token.encode()).digest(): row.device_identifier
            for row in conn.execute(text("SELECT device_identifier, token FROM remotes"))
        }
    engine.dispose()
    refusal = {"success": False, "error": {"code": "invalid_token", "message": "not valid"}}

    async def heartbeat(request: Request) -> JSONResponse:
        await request.body()
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if hashlib.sha256(token.encode()).digest() in known:
            return JSONResponse({"success": True})
        return JSONResponse(refusal, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    app = Starlette(routes=[Route("/api/devices/heartbeat", heartbeat, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off", http="h11", proxy_headers=False
    )
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def floor(db_url: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--floor-server", str(port), "--db", db_url],
        cwd=REPO,
    )
    try:
        wait_until(lambda: answers(port), 60, what="the floor server")
        yield port
    finally:
        proc.terminate()
        proc.wait(20)


# --- the run -----------------------------------------------------------------------------


def run(scale: float) -> Result:
    rows = max(1_000, int(ROWS * scale))
    n = max(100, int(REQUESTS * scale))
    result = Result(f"http 401 path ({rows} remotes rows, sqlite)")
    with workdir() as tmp:
        work = Path(tmp)
        db_url = f"sqlite:///{work / 'bench.db'}"
        fill(db_url, rows)
        result.figures["old scan per unknown token ms"] = old_scan_ms(db_url, 50)
        result.figures["token map load s"] = index_load_s(db_url)
        port = free_port()
        env = {
            "KB_HTTP__AUTH_FAIL_BURST": LIFTED,
            "KB_HTTP__AUTH_FAIL_PER_S": LIFTED,
            "KB_HTTP__API_KEYS": "bench-key",
        }
        with mosquitto(work) as broker, floor(db_url) as floor_port:
            bridge = BridgeProcess(broker.url, db_url, work, "--http", f"127.0.0.1:{port}", env=env)
            try:
                try:
                    wait_until(lambda: answers(port), 120, what="the bridge's HTTP face")
                except TimeoutError:
                    tail = bridge.log_path.read_text(errors="replace")[-3000:]
                    raise TimeoutError(f"the bridge's HTTP face did not answer:\n{tail}") from None
                measured = measure({"face": port, "floor": floor_port}, n)
                bridge.sample()
            finally:
                bridge.stop()
    (face, codes), (bare, floor_codes) = measured["face"], measured["floor"]
    result.figures["401 ms (kiosk-bridge)"] = face
    result.figures["401 ms (floor: bare starlette + dict)"] = bare
    result.figures["ratio p50"] = face["p50"] / bare["p50"]
    result.figures["ratio p99"] = face["p99"] / bare["p99"]
    result.figures["target p99 ms"] = TARGET_P99_MS
    result.figures["answers"] = {str(k): v for k, v in sorted(codes.items())}
    if set(codes) != {401} or set(floor_codes) != {401}:
        result.notes.append(f"not all 401: face {codes}, floor {floor_codes}")
    if bridge.rss_samples:
        result.figures["bridge RSS MiB"] = bridge.rss_samples[-1]
    result.notes.append(
        "one keep-alive connection to each, sequential requests taking turns between "
        "the face and the floor (each in a process of its own), random 64-hex bearer "
        "tokens; default limits but the failed-auth bucket lifted, so the token map's "
        "miss-triggered passes (every 5 s under a flood) fall inside the run"
    )
    return result


def collect(scale: float) -> list[Result]:
    return [run(scale)]


def record(results: list[Result], path: Path) -> None:
    """Replace this benchmark's entries in ``path`` (the other benchmarks' stay)."""
    existing: list[dict[str, Any]] = []
    if path.is_file():
        existing = json.loads(path.read_text())
    names = {r.name for r in results}
    kept = [entry for entry in existing if not entry.get("name", "").startswith("http 401 path")]
    kept = [entry for entry in kept if entry.get("name") not in names]
    merged = kept + [r.to_json() for r in results]
    path.write_text(json.dumps(merged, indent=2, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="merge the result into")
    parser.add_argument("--floor-server", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--db", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server is not None:
        floor_server(args.floor_server, args.db)
        return
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = collect(args.scale)
    for result in results:
        result.print()
    if args.json is not None:
        record(results, args.json)
        print(f"\nmerged into {args.json}")


if __name__ == "__main__":
    main()
