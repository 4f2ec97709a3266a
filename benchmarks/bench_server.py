"""The key API over HTTP against the key service it wraps, measured in the same run.

``python -m benchmarks server`` (``BENCH_SERVER_ROUNDS=400`` by default).

Setup: a SQLite store with one workspace of 10 keys (2 per provider), an admin bearer token.

Measured, alternating call by call so that drift hits all alike:

- ``service``: ``KeyService.list_keys(actor, workspace)`` in process: the floor.
- ``asgi``: ``GET /api/workspaces/{id}/byok-keys`` through httpx's ASGI transport (the app's own
  cost: identity, routing, a worker thread for the service, JSON).
- ``http``: the same request to the app on a real uvicorn server on 127.0.0.1, keep-alive.

And whether the event loop stays free while the service works: the median of ``GET
/api/byok/health`` alone, then while 8 threads list keys as fast as they can. The key service runs
in worker threads, so health answers should not queue behind it; on 2 cores they share the CPU.

Targets: ``asgi`` at most 5x ``service`` (the app adds a fixed cost, not a multiple of the work);
health under load at most 20x health alone (no request waits for a database call to finish).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from byok_hookspecs import Actor, Role

from byok_plugin.app import App
from byok_plugin.manager import plugin_manager_for
from byok_plugin.server import BearerTokens, create_app
from byok_plugin.settings import Settings

ROUNDS = int(__import__("os").environ.get("BENCH_SERVER_ROUNDS", "400"))
WARMUP = 30
ASGI_TARGET = 5.0
LOAD_TARGET = 20.0
ADMIN = Actor("bench-admin", {"acme": Role.ADMIN})
TOKEN = secrets.token_urlsafe(24)
URL = "/api/workspaces/acme/byok-keys"


def _median_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def _keys() -> list[tuple[str, str, str]]:
    out = []
    for label in ("a", "b"):
        out += [
            ("openai", label, f"sk-proj-{secrets.token_hex(24)}"),
            ("anthropic", label, f"sk-ant-api03-{secrets.token_hex(24)}"),
            ("google", label, f"AIza{secrets.token_hex(18)[:35]}"),
            ("mistral", label, secrets.token_hex(16)),
            ("exa", label, "0e7f4c2a-1b3d-4e5f-8a9b-" + secrets.token_hex(6)),
        ]
    return out


def _serve(asgi) -> tuple[str, object, threading.Thread]:
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(asgi, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        master = base64.b64encode(secrets.token_bytes(32)).decode()
        settings = Settings.from_environ(
            {
                "BYOK_HOME": tmp,
                "BYOK_DATABASE_URL": f"sqlite:///{Path(tmp) / 'bench.db'}",
                "BYOK_ENCRYPTION_KEYS": f"mk-bench:{master}",
                "BYOK_VALIDATE_KEYS": "0",
            }
        )
        app = App(settings)
        pm = plugin_manager_for(app, load_entrypoints=False)
        service = app.key_service(pm)
        for provider, label, key in _keys():
            service.set_key(ADMIN, "acme", provider, key, label=label, test=False)
        asgi = create_app(app, identify=BearerTokens({TOKEN: ADMIN}), pm=pm)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        base, server, thread = _serve(asgi)
        loop = asyncio.new_event_loop()
        in_process = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=asgi), base_url="http://bench", headers=headers
        )
        http = httpx.Client(base_url=base, headers=headers)
        try:
            times: dict[str, list[float]] = {"service": [], "asgi": [], "http": []}

            def timed(name: str, call) -> None:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)

            def via_asgi() -> None:
                response = loop.run_until_complete(in_process.get(URL))
                assert response.status_code == 200

            def via_http() -> None:
                assert http.get(URL).status_code == 200

            for _ in range(WARMUP):
                service.list_keys(ADMIN, "acme")
                via_asgi()
                via_http()
            for _ in range(ROUNDS):
                timed("service", lambda: service.list_keys(ADMIN, "acme"))
                timed("asgi", via_asgi)
                timed("http", via_http)
            floor = _median_us(times["service"])
            print(f"list 10 keys, {ROUNDS} rounds, medians:")
            for name in ("service", "asgi", "http"):
                median = _median_us(times[name])
                print(f"  {name:8} {median:9.0f} us   {median / floor:5.1f}x service")
            asgi_ratio = _median_us(times["asgi"]) / floor

            def health_median(n: int) -> float:
                samples = []
                with httpx.Client(base_url=base) as probe:
                    for _ in range(n):
                        start = time.perf_counter()
                        assert probe.get("/api/byok/health").status_code == 200
                        samples.append(time.perf_counter() - start)
                return _median_us(samples)

            idle = health_median(ROUNDS // 2)
            stop = threading.Event()

            def hammer() -> None:
                with httpx.Client(base_url=base, headers=headers) as client:
                    while not stop.is_set():
                        client.get(URL)

            workers = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
            for worker in workers:
                worker.start()
            time.sleep(0.2)
            loaded = health_median(ROUNDS // 2)
            stop.set()
            for worker in workers:
                worker.join()
            print(
                f"health alone {idle:.0f} us; while 8 clients list keys {loaded:.0f} us "
                f"({loaded / idle:.1f}x)"
            )
            ok = asgi_ratio <= ASGI_TARGET and loaded / idle <= LOAD_TARGET
            print(
                f"target: asgi <= {ASGI_TARGET:.0f}x service ({asgi_ratio:.1f}x), health under "
                f"load <= {LOAD_TARGET:.0f}x alone ({loaded / idle:.1f}x): "
                + ("met" if ok else "NOT MET")
            )
        finally:
            http.close()
            loop.run_until_complete(in_process.aclose())
            loop.close()
            server.should_exit = True
            thread.join(10)
            app.close()


if __name__ == "__main__":
    main()
    sys.exit(0)
