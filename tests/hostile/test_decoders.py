"""Crafted media against the real agent, worker, Redis and Mosquitto: a header that lies or a
request that would decode gigabytes is refused from its headers, with the error that names its
bound; the worker's memory grows by less than its per-job budget; other devices go on being
served."""

from __future__ import annotations

import base64
import struct
import time
import zlib

import pyvips
import pytest

from edgectl.localdaemon import Daemon
from tests.hostile.probe import MiB, answers, code, memory, reset_peak

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUDGET = 256 * MiB  # [limits] job_memory, well under the default so that a breach shows


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, packed_bundles, keyring_file):
    limits = {"devices": ["CPU"], "max_bytes": 20 << 20, "timeout": 120}
    d = Daemon(tmp_path_factory.mktemp("hostile-decoders"), packed_bundles("asr", "superres"),
               keyring_file, tasks={"asr": limits, "superres": limits},
               extra={"limits": {"job_memory": BUDGET}})
    try:
        d.start_worker("CPU", queue="edge.superres.CPU")
        d.start_agent()
    except BaseException:
        d.stop()  # no private server may outlive a failed start
        raise
    yield d
    d.stop()


def _wav(rate: int, samples: bytes) -> bytes:
    """A 16-bit mono PCM WAV whose header says `rate`."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def _attack(daemon: Daemon, task: str, rid: str, data: bytes | list[bytes]) -> tuple[dict, int]:
    """Send one job as an envelope; its only answer and the worker's peak memory growth."""
    pid = daemon.workers[0].pid
    items = data if isinstance(data, list) else [data]
    encoded = [base64.b64encode(d).decode() for d in items]
    envelope = {"id": rid, "data": encoded if isinstance(data, list) else encoded[0]}
    before = reset_peak(pid)
    with daemon.device("attacker") as dev:
        dev.publish_envelope(task, envelope)
        got = answers(dev, [rid], timeout=120, settle=3.0)  # and 3 s more for a duplicate
    growth = memory(pid)["VmHWM"] - before
    assert len(got[rid]) == 1, f"{rid} answered {len(got[rid])} times"
    return got[rid][0], growth


def _still_serving(daemon: Daemon, task: str, data: bytes) -> float:
    """An ordinary job from another device is answered ok; returns its wall time (s)."""
    started = time.perf_counter()
    with daemon.device("bystander") as dev:
        reply = dev.request(task, data=data, timeout=60)
    assert reply.ok, reply.body
    assert all(w.poll() is None for w in daemon.workers) and daemon.agent.poll() is None
    return time.perf_counter() - started


def test_a_wav_claiming_1_6_mhz_is_unsupported_media_without_the_worker_growing(daemon):
    bomb = _wav(1_600_033, b"\0\1" * 64)  # 172 bytes
    body, growth = _attack(daemon, "asr", "rate-bomb-1", bomb)
    assert code(body) == "unsupported_media", body
    assert "1600033 Hz is outside the supported 1000-384000 Hz" in body["error"]["message"]
    assert growth < BUDGET, f"worker grew {growth / MiB:.0f} MiB"
    wall = _still_serving(daemon, "asr", _wav(16000, b"\0\0" * 16000))
    print(f"1.6 MHz WAV: worker peak growth {growth / MiB:.1f} MiB; next job {wall:.2f} s")


def test_sixteen_2000x2000_pngs_are_refused_by_the_job_budget_before_decoding(daemon):
    black = pyvips.Image.black(2000, 2000, bands=3).pngsave_buffer()
    assert len(black) < 64 << 10
    body, growth = _attack(daemon, "superres", "png-flood-1", [black] * 16)
    assert code(body) == "payload_too_large", body
    message = body["error"]["message"]
    assert "16 image(s) of 64.0 MP" in message and "budget of 256 MiB" in message, message
    assert growth < BUDGET, f"worker grew {growth / MiB:.0f} MiB"
    small = pyvips.Image.black(64, 48, bands=3).pngsave_buffer()
    wall = _still_serving(daemon, "superres", small)
    print(f"16 x 2000x2000 PNGs: worker peak growth {growth / MiB:.1f} MiB; next job {wall:.2f} s")


def test_a_png_header_claiming_100000x100000_is_refused_from_the_header(daemon):
    tiny = pyvips.Image.black(4, 4, bands=3).pngsave_buffer()
    ihdr = tiny[12:16] + struct.pack(">II", 100_000, 100_000) + tiny[24:29]
    bomb = tiny[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + tiny[33:]
    body, growth = _attack(daemon, "superres", "png-bomb-1", bomb)
    assert code(body) == "payload_too_large", body
    assert "100000x100000, over the 16 MP limit" in body["error"]["message"]
    assert growth < BUDGET, f"worker grew {growth / MiB:.0f} MiB"


def test_images_within_the_budget_are_upscaled_in_less_than_the_budget(daemon):
    """The largest request the budget admits is answered, and the worker stays under it."""
    photo = pyvips.Image.gaussnoise(500, 400, mean=128, sigma=40).cast("uchar")
    noisy = photo.bandjoin([photo, photo]).pngsave_buffer(compression=1)
    warm, _ = _attack(daemon, "superres", "fits-warm", noisy)  # compiles the 400x500 shape
    assert code(warm) == "ok", warm
    body, growth = _attack(daemon, "superres", "fits-1", [noisy] * 4)
    assert code(body) == "ok", body
    assert len(body["result"]["images"]) == 4
    assert growth < BUDGET, f"worker grew {growth / MiB:.0f} MiB"
    print(f"4 x 500x400 noise PNGs: worker peak growth {growth / MiB:.1f} MiB")
