"""A device on its own host (run inside a network namespace by the multi-host tests).

`python -m tests.multihost._device HOST PORT CA USER PASSWORD_FILE TAG N PACE` publishes N
tokenize jobs `TAG-0`..`TAG-N-1` over TLS as device USER, one every PACE seconds, and prints one
JSON line per answer it receives (`{"id", "status"}`, duplicates included) and `{"published":
i}` as it goes. It runs until stdin closes (the test decides when it has seen enough), so a
late duplicate would still be printed.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str]) -> int:
    host, port, ca, user, password_file, tag, n, pace = argv
    out = threading.Lock()

    def emit(doc: dict) -> None:
        with out:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()

    def on_message(client, userdata, msg) -> None:
        try:
            body = json.loads(msg.payload)
            emit({"id": body.get("id"), "status": body.get("status"),
                  "code": (body.get("error") or {}).get("code")})
        except ValueError:
            emit({"topic": msg.topic, "unparsed": len(msg.payload)})

    subscribed = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{user}-{tag}",
                    protocol=paho.MQTTv5)
    c.username_pw_set(user, open(password_file).read().strip())
    c.tls_set(ca_certs=ca)
    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"edge/results/{user}/#", qos=1)
    c.connect(host, int(port), keepalive=30)
    c.loop_start()
    if not subscribed.wait(30):
        emit({"error": "no SUBACK"})
        return 1
    for i in range(int(n)):
        info = c.publish(f"edge/jobs/tokenize/{user}",
                         json.dumps({"id": f"{tag}-{i}", "text": f"job {i} from {user}"}), qos=1)
        info.wait_for_publish(30)
        emit({"published": i + 1})
        time.sleep(float(pace))
    sys.stdin.read()  # until the test closes it
    c.disconnect()
    c.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
