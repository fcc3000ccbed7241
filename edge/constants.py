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
OUTBOX_STREAM = KEY_PREFIX + "outbox"  # final answers: never trimmed, deleted once delivered
PROGRESS_STREAM = KEY_PREFIX + "progress"  # progress notes (QoS 0, droppable): trimmed
OUTBOX_GROUP = "agents"
UNANSWERED_KEY = KEY_PREFIX + "unanswered"  # zset: job id -> Redis time the agent stored it
ANSWERED_FIELD = "edge_answered"  # field of RQ's job hash: who answered it
# zset per task and device: job id -> Redis time stored; the device's jobs queued or running
QUOTA_KEY = KEY_PREFIX + "quota:{task}:{device_id}"
# Fair queueing in front of each RQ queue: a list of waiting job ids per device, a ring of the
# devices that have some, and the number waiting. RQ's own list holds at most FEED_DEPTH.
FAIR_PREFIX = KEY_PREFIX + "fair:{queue}:"  # + device id
RING_KEY = KEY_PREFIX + "ring:{queue}"
WAITING_KEY = KEY_PREFIX + "waiting:{queue}"
ALIVE_KEY = KEY_PREFIX + "alive:{queue}"  # zset: worker name -> last heartbeat (Redis TIME, s)
WORKER_KEY = KEY_PREFIX + "worker:{worker}"  # JSON: device, models, unavailable
WATCH_KEY = KEY_PREFIX + "reaper:watched"  # Redis TIME (s) of the last pass of any reaper
# Model activation (README, "Model versions"): `edgectl models` appends prepare / commit / abort
# commands to the stream, every worker reads it and answers in the hash, one field per worker
MODELS_STREAM = KEY_PREFIX + "models:commands"
MODELS_ACK_KEY = KEY_PREFIX + "models:ack:{id}"
MODELS_STREAM_MAXLEN = 1000
QUEUE_NAME = "edge.{task}.{device}"

JOB_FUNCTION = "workers.perform.run"

# Task names, priorities and bundles: the registry in edge/tasks.py.

# Defaults
DEFAULT_BLOB_TTL = 3600  # s: a job's payload outlives any sane queue wait
DEFAULT_DEDUP_TTL = 3600  # s: a QoS 1 duplicate within this window is not run again
PROGRESS_MAXLEN = 10_000  # progress notes kept at most (approximate trim; answers never are)
QUOTA_SLACK = 120  # s past a job's deadline + timeout after which its quota entry is stale
FEED_DEPTH = 1  # jobs on an RQ queue's own list; the rest wait in the fair lists
# A worker takes at most this many jobs in a row from its first-priority queue while another
# of its queues has work; then that one gets a turn (no task starves another).
PRIORITY_BURST = 8
# Jobs one worker runs as one inference (tasks.X.max_batch). 16 short tokenize jobs (1-3 texts
# each) make one call of ~50 texts, where openvino-tokenizers' fixed cost per call is already
# spread thin (FACTS: 64 texts ~0.7 ms vs 0.2 ms for one), while the head job of a batch waits
# at most ~1 ms for the others' texts; it is also the default quota of one device, so a full
# batch can hold every job of one device or one job of each of 16 devices.
DEFAULT_MAX_BATCH = 16
# Tasks with another default. superres: batches of 8 480x270 jobs gave ~all of 16's gain
# (bench/superres_batch.py, LATENCY hint: 2.07x vs 2.12x the images/s of one at a time at load
# 3, 1.46x vs 1.47x at load 6), while the first job of a batch waits for half as many 1080p
# answers and a batch holds half as many answers at once.
TASK_MAX_BATCH = {"superres": 8}
MAX_BATCH_LIMIT = 256
DEFAULT_DEVICE_LIMIT = 16  # jobs of one task one device may have queued or running at once
DEFAULT_JOB_MEMORY = 1 << 30  # bytes of decoded input / output one job may hold in a worker
DEFAULT_JSON_DEPTH = 32  # nesting levels of a JSON envelope
DEFAULT_REDIS_FILL_PERCENT = 90  # of Redis' maxmemory, past which new jobs are refused
# What audio may declare (a WAV header, the sample_rate/channels params, an audio/L16 type);
# the resampler's cost grows with the rate, so a header past these is refused before decoding
AUDIO_RATE_RANGE = (1000, 384_000)  # Hz
AUDIO_MAX_CHANNELS = 64
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
# The agent's intake: job messages (at most this many, of at most this many payload bytes)
# waiting between paho's thread and the thread that stores them, past which paho's thread waits
# (back-pressure to the broker); and how many of them go to Redis in one round trip.
INTAKE_DEPTH = 256
INTAKE_BYTES = 64 << 20
INTAKE_BATCH = 64
MQTT_MAX_IN_FLIGHT = 100  # our own cap on unacknowledged QoS 1 publishes per connection
