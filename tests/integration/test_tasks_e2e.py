"""Each task end to end over MQTT: both payload forms, answers equal to the in-process run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgectl.localdaemon import ROOT, Daemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _speech(text: str) -> bytes:
    return subprocess.run(["espeak-ng", "--stdout", text], check=True,
                          capture_output=True).stdout


def _task_daemon(task: str, tmp_path_factory, packed_bundles, keyring_file, **limits):
    """A daemon serving one task on CPU (its own broker, Redis, agent and worker)."""
    d = Daemon(tmp_path_factory.mktemp(f"{task}-daemon"), packed_bundles(task), keyring_file,
               tasks={task: {"devices": ["CPU"], **limits}})
    try:
        d.start_worker("CPU", queue=f"edge.{task}.CPU")
        d.start_agent()
    except BaseException:
        d.stop()  # no private server may outlive a failed start
        raise
    return d


@pytest.fixture(scope="module")
def asr_daemon(tmp_path_factory, packed_bundles, keyring_file):
    d = _task_daemon("asr", tmp_path_factory, packed_bundles, keyring_file,
                     max_bytes=20 << 20, timeout=300)
    yield d
    d.stop()


def test_asr_wav_as_raw_mqtt5_bytes_gets_the_text(asr_daemon):
    wav = _speech("Turn on the lights in the kitchen.")
    with asr_daemon.device("mic-1") as dev:
        dev.publish_raw("asr", wav, "utt-1", content_type="audio/wav")
        reply = dev.wait("utt-1", timeout=120)
    assert reply.ok, reply.body
    text = reply.body["result"]["text"].lower()
    assert "kitchen" in text and "light" in text
    segments = reply.body["result"]["segments"]
    assert segments and all(s["start"] <= s["end"] for s in segments)


def test_asr_wav_as_base64_envelope_gets_the_same_text(asr_daemon):
    wav = _speech("Turn on the lights in the kitchen.")
    with asr_daemon.device("mic-2") as dev:
        env = dev.request("asr", data=wav, request_id="utt-2", timeout=120)
        dev.publish_raw("asr", wav, "utt-3", content_type="audio/wav")
        raw = dev.wait("utt-3", timeout=120)
    assert env.ok and env.body["result"]["text"] == raw.body["result"]["text"]
    assert env.progress, "long-audio progress is published per window"


def test_asr_bad_audio_is_answered_and_the_worker_keeps_serving(asr_daemon):
    with asr_daemon.device("mic-3") as dev:
        junk = dev.request("asr", data=b"RIFF\x00\x00\x00\x00WAVEjunk", request_id="bad-1")
        empty = dev.request("asr", data=b"\x00" * 64, request_id="bad-2",
                            params={"sample_rate": 16000, "format": "s16le"})
        ok = dev.request("asr", data=_speech("Hello there."), request_id="good-1", timeout=120)
    assert junk.body["status"] == "error"
    assert junk.body["error"]["code"] in ("unsupported_media", "bad_request")
    assert empty.ok and empty.body["result"]["text"] == "", empty.body  # 2 ms of silence
    assert ok.ok


@pytest.fixture(scope="module")
def lcm_daemon(tmp_path_factory, packed_bundles, keyring_file):
    d = _task_daemon("lcm", tmp_path_factory, packed_bundles, keyring_file, timeout=300)
    yield d
    d.stop()


def test_lcm_over_mqtt_streams_progress_in_order_and_matches_edgectl_run(lcm_daemon, tmp_path):
    params = {"steps": 4, "seed": 11, "width": 64, "height": 64}
    with lcm_daemon.device("cam-1") as dev:
        reply = dev.request("lcm", text="a red bicycle", params=params, timeout=120)
        dev.publish_raw("lcm", b"a red bicycle", "raw-1", content_type="text/plain",
                        params=params)
        raw = dev.wait("raw-1", timeout=120)
    assert reply.ok, reply.body
    assert [p["step"] for p in reply.progress] == [1, 2, 3, 4]
    assert reply.media[0][0] == "image/png" and reply.media[0][1][:4] == b"\x89PNG"
    # raw MQTT 5 request: the answer is the PNG itself with properties
    assert raw.ok and raw.media[0][1] == reply.media[0][1]
    # the same job in-process through edgectl run gives the same bytes
    out = subprocess.run(
        [sys.executable, "-m", "edgectl.cli", "--config", str(lcm_daemon.config), "run", "lcm",
         "a red bicycle", "--out", str(tmp_path)] + [f"--param={k}={v}" for k, v in params.items()],
        capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    png = next(tmp_path.glob("*.png")).read_bytes()
    assert png == reply.media[0][1]


def _image(width: int, height: int, seed: int) -> bytes:
    import numpy as np
    import pyvips

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = pyvips.Image.new_from_array(base).resize(8, kernel="linear")
    return img.crop(0, 0, width, height).cast("uchar").write_to_buffer(".png")


@pytest.fixture(scope="module")
def sr_daemon(tmp_path_factory, packed_bundles, keyring_file):
    d = _task_daemon("superres", tmp_path_factory, packed_bundles, keyring_file,
                     max_bytes=8 << 20, timeout=120)
    yield d
    d.stop()


def test_superres_over_mqtt_equals_edgectl_run_and_batches_keep_order(sr_daemon, tmp_path):
    images = [_image(64, 48, 1), _image(40, 40, 2), _image(72, 32, 3)]
    with sr_daemon.device("cam-sr") as dev:
        batch = dev.request("superres", data=images, request_id="b-3", timeout=120)
        dev.publish_raw("superres", images[0], "one-raw", content_type="image/png")
        raw = dev.wait("one-raw", timeout=120)
    assert batch.ok, batch.body
    sizes = [(i["width"], i["height"]) for i in batch.body["result"]["images"]]
    assert sizes == [(256, 192), (160, 160), (288, 128)]  # request order, each 4x
    assert len(batch.media) == 3 and raw.ok and raw.media[0][0] == "image/png"
    assert raw.media[0][1] == batch.media[0][1]
    src = tmp_path / "in.png"
    src.write_bytes(images[0])
    out = subprocess.run(
        [sys.executable, "-m", "edgectl.cli", "--config", str(sr_daemon.config), "run", "superres",
         str(src), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert next((tmp_path / "out").glob("*.png")).read_bytes() == raw.media[0][1]


def test_superres_bad_image_is_answered(sr_daemon):
    with sr_daemon.device("cam-sr2") as dev:
        reply = dev.request("superres", data=b"\x89PNG\r\n\x1a\nbroken", request_id="bad")
    assert reply.body["error"]["code"] == "unsupported_media"
