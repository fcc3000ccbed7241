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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = structlog.get_logger("edge.health")

Check = Callable[[], bool]


def run_checks(checks: Mapping[str, Check]) -> tuple[bool, dict]:
    """Run every check; an exception is a failed check with its message (never a 500)."""
    results: dict[str, bool] = {}
    errors: dict[str, str] = {}
    for name, check in checks.items():
        try:
            results[name] = bool(check())
        except Exception as exc:  # noqa: BLE001 - a probe answers, whatever a check raises
            results[name], errors[name] = False, f"{type(exc).__name__}: {exc}"
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
