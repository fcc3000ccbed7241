"""Every topic pattern, Redis key, queue name and default limit, in one place."""

from __future__ import annotations

import re

# MQTT topics (the public interface; documented in README.md)
JOBS_SUBSCRIPTION = "edge/jobs/+/+"
JOB_TOPIC = "edge/jobs/{task}/{device_id}"
RESULT_TOPIC = "edge/results/{device_id}/{request_id}"
PROGRESS_TOPIC = "edge/progress/{device_id}/{request_id}"
STATUS_TOPIC = "edge/status/{node}"
SHARED_PREFIX = "$share/edge/"

DEVICE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
REQUEST_ID_RE = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces, no wildcards

# Redis keys (RQ names its own keys; these are ours)
KEY_PREFIX = "edge:"
BLOB_KEY = KEY_PREFIX + "blob:{job_key}"
OUTBOX_STREAM = KEY_PREFIX + "outbox"
OUTBOX_GROUP = "agents"
ALIVE_KEY = KEY_PREFIX + "alive:{queue}"  # zset: worker name -> last heartbeat (unix s)
WORKER_KEY = KEY_PREFIX + "worker:{worker}"  # JSON: device, models, unavailable
QUEUE_NAME = "edge.{task}.{device}"

JOB_FUNCTION = "workers.jobs.run"

# Task priority: a worker drains short interactive jobs before long ones.
TASK_ORDER = ("tokenize", "detokenize", "asr", "superres", "lcm")
# Which bundle task serves a job task (detokenize uses the tokenizer bundles).
BUNDLE_TASK = {"tokenize": "tokenize", "detokenize": "tokenize", "asr": "asr",
               "superres": "superres", "lcm": "lcm"}

# Defaults
DEFAULT_BLOB_TTL = 3600  # s: a job's payload outlives any sane queue wait
DEFAULT_DEDUP_TTL = 3600  # s: a QoS 1 duplicate within this window is not run again
DEFAULT_OUTBOX_MAXLEN = 100_000  # entries kept at most (approximate trim)
ALIVE_WINDOW = 30.0  # s: a worker whose last heartbeat is older is not routed to
HEARTBEAT_INTERVAL = 5.0  # s
STATUS_INTERVAL = 10.0  # s
PUBACK_TIMEOUT = 10.0  # s
# An answer not delivered yet (no PUBACK in time, or refused for a reason that may pass, such
# as quota exceeded) is sent again after a back-off that doubles from the first figure to the
# last; the last stays under the 30 s after which another agent claims an idle entry.
OUTBOX_RETRY_BACKOFF = (0.5, 15.0)  # s
# One answer's media, at most (workers refuse more with `payload_too_large`). Base64 in an
# envelope answer adds a third: 85.4 MiB, which configs/mosquitto.conf's max_packet_size (96 MiB)
# carries with room for the JSON around it. The relay checks every answer against the limit
# the broker announces and answers `payload_too_large` instead of sending one past it.
MAX_ANSWER_BYTES = 64 << 20
# The largest PUBLISH packet MQTT allows (a remaining length of 268435455 plus its header), for
# a broker that announces no Maximum Packet Size.
MQTT_MAX_PACKET_BYTES = 268_435_455 + 5
MQTT_RECEIVE_MAXIMUM = 65_535  # MQTT 5's default when a CONNACK names none
MQTT_MAX_IN_FLIGHT = 100  # our own cap on unacknowledged QoS 1 publishes per connection
