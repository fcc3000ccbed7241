"""Config: parsed once into frozen objects; a bad field is named in the error."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edge.config import ConfigError, load, parse

ROOT = Path(__file__).resolve().parents[2]


def test_demo_and_example_configs_parse():
    demo = load(ROOT / "configs" / "demo.toml")
    assert demo.tasks["tokenize"].devices == ("CPU",)
    example = load(ROOT / "configs" / "edge.example.toml")
    assert example.tasks_on("CPU")


def test_config_is_frozen():
    cfg = parse({"node": "n"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = "other"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "c.toml").write_text('bundle_dir = "b"\n')
    assert load(tmp_path / "c.toml").bundle_dir == tmp_path / "b"


@pytest.mark.parametrize("raw,field", [
    ({"tasks": {"superres": {"devices": ["CPU", "TPU"]}}}, "tasks.superres.devices[1]"),
    ({"tasks": {"paint": {}}}, "tasks.paint"),
    ({"mqtt": {"port": 70000}}, "mqtt.port"),
    ({"mqtt": {"prot": 1883}}, "mqtt.prot"),
    ({"devices": {"CPU": {"performance_hint": "FAST"}}}, "devices.CPU.performance_hint"),
    ({"devices": {"CPU": {"inference_precision": "f8"}}}, "devices.CPU.inference_precision"),
    ({"tasks": {"asr": {"queue_limit": 0}}}, "tasks.asr.queue_limit"),
    ({"redis": {"url": "http://x"}}, "redis.url"),
    ({"node": 5}, "node"),
])
def test_bad_config_names_the_field(raw, field):
    with pytest.raises(ConfigError) as exc:
        parse(raw)
    assert str(exc.value).startswith(field + ":")


def test_unreadable_and_invalid_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("node = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path / "bad.toml")


def test_device_properties_map_to_openvino_names():
    cfg = parse({"devices": {"CPU": {"performance_hint": "THROUGHPUT", "num_streams": 2,
                                     "inference_precision": "f32"}}})
    assert cfg.device("CPU").properties() == {"PERFORMANCE_HINT": "THROUGHPUT",
                                              "NUM_STREAMS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    assert cfg.device("GPU").properties() == {"PERFORMANCE_HINT": "LATENCY"}


def test_a_config_without_a_node_name_gets_the_default_name():
    config = parse({})
    assert config.node == "edge-gateway"
    assert config.client_id == "edge-agent-edge-gateway"
