"""The metrics port's HTTP endpoints: `/metrics`, `/healthz` (liveness), `/readyz` (readiness).

For load balancers and container orchestrators (Kubernetes probes, Nomad/Consul checks, a
systemd timer with curl):

* `/healthz`: 200 `ok` while the process's main loop makes progress (the same test that feeds
  the systemd watchdog), else 503. A 503 here means "restart me".
* `/readyz`: 200 when every readiness check passes, else 503; the body is JSON,
  `{"ready": bool, "checks": {name: bool}, "errors": {name: reason}}`. The agent checks Redis
  and the MQTT broker; a worker checks its compiled models and Redis (RQ's broker). A 503 here
  means "send no traffic yet", not "restart".

Like `/metrics`, they listen on 127.0.0.1 only (see edge/metrics.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = structlog.get_logger("edge.health")

Check = Callable[[], bool]


CHECK_TIMEOUT = 2.0  # s; a Redis that hangs (rather than refuses) must not hang the probe


def run_checks(checks: Mapping[str, Check], timeout: float = CHECK_TIMEOUT) -> tuple[bool, dict]:
    """Run every check at once; an exception, or no verdict within `timeout`, is a failed check
    with its reason (never a 500, never a probe that hangs)."""
    results: dict[str, bool] = {}
    errors: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(len(checks), 1), thread_name_prefix="health")
    futures = {name: pool.submit(check) for name, check in checks.items()}
    wait(futures.values(), timeout=timeout)
    for name, future in futures.items():
        if not future.done():
            results[name], errors[name] = False, f"no answer within {timeout:g} s"
            continue
        exc = future.exception()
        if exc is not None:
            results[name], errors[name] = False, f"{type(exc).__name__}: {exc}"
        else:
            results[name] = bool(future.result())
    pool.shutdown(wait=False)  # a hung check's thread ends when its call does
    ok = all(results.values())
    return ok, {"ready": ok, "checks": results, "errors": errors}


def _handler(registry: CollectorRegistry, live: Check, ready: Mapping[str, Check]) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(registry), content_type)
            elif path == "/healthz":
                alive, doc = run_checks({"live": live})
                self._send(200 if alive else 503, b"ok\n" if alive else
                           json.dumps(doc).encode(), "text/plain; charset=utf-8")
            elif path == "/readyz":
                ok, doc = run_checks(ready)
                self._send(200 if ok else 503, json.dumps(doc).encode(), "application/json")
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass  # probes every few seconds would flood the journal

    return Handler


def start(port: int, host: str, registry: CollectorRegistry, live: Check | None = None,
          ready: Mapping[str, Check] | None = None) -> ThreadingHTTPServer:
    """Serve the three endpoints on a daemon thread; OSError when the port is taken."""
    server = ThreadingHTTPServer((host, port), _handler(registry, live or (lambda: True),
                                                        dict(ready or {})))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
