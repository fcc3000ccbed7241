"""The task registry: every task, what it accepts (media types, params and their bounds), its
priority on a worker and the bundle folder that serves it.

The agent validates every job against its task's spec before it is stored, so workers and
pipelines trust what they receive. Each task folder under `workers/` owns its pipeline; the
contract it answers to is written here, in one place, where the agent (which never imports
OpenVINO) can read it. Every list of task names elsewhere is derived from `TASKS`: adding a
task is one folder under `workers/` and one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge import constants as C
from edge.errors import BadRequest


@dataclass(frozen=True, slots=True)
class Param:
    """One job parameter: its type, default and bounds."""

    kind: type  # str, int, float or bool
    default: Any = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    max_len: int = 256

    def coerce(self, name: str, value: Any) -> Any:
        """The value as `kind`, or `BadRequest` naming the param.

        Strings are accepted for every kind, since MQTT 5 user properties carry only strings.
        """
        try:
            value = _coerce(self.kind, value)
        except (TypeError, ValueError):
            raise BadRequest(f"param {name!r} must be {self.kind.__name__}") from None
        if self.kind in (int, float):
            if self.low is not None and value < self.low:
                raise BadRequest(f"param {name!r} must be >= {self.low:g}")
            if self.high is not None and value > self.high:
                raise BadRequest(f"param {name!r} must be <= {self.high:g}")
        if self.kind is str:
            if len(value) > self.max_len:
                raise BadRequest(f"param {name!r} is longer than {self.max_len} characters")
            if self.choices and value not in self.choices:
                raise BadRequest(f"param {name!r} must be one of {', '.join(self.choices)}")
        return value


def _coerce(kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(value)
    if isinstance(value, bool):
        raise TypeError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, str):
            return int(value.strip())
        if not isinstance(value, (int, float)):
            raise TypeError(value)
        return int(value)
    if kind is float:
        if not isinstance(value, (int, float, str)):
            raise TypeError(value)
        out = float(value)
        if out != out or out in (float("inf"), float("-inf")):
            raise ValueError(value)
        return out
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    raise TypeError(kind)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What one task takes as input."""

    name: str
    inputs: tuple[str, ...]  # which envelope fields carry input: "text", "ids", "data"
    media_types: tuple[str, ...] = ()  # accepted content types for binary input
    params: Mapping[str, Param] = field(default_factory=dict)
    max_items: int = 1  # how many texts / media items one job may carry
    # the bundles (and the folder `workers/<bundle>/`) that serve it; "" = its own name
    bundle: str = ""

    @property
    def bundle_task(self) -> str:
        """The task name of the bundles that serve this task (detokenize: tokenize)."""
        return self.bundle or self.name

    @property
    def module(self) -> str:
        """The worker package that loads its bundles (`load(bundles, core, device)`) and
        prepares them (`.prepare`)."""
        return f"workers.{self.bundle_task}"

    def validate_params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Params with defaults filled in; unknown names are refused."""
        unknown = sorted(set(raw) - set(self.params))
        if unknown:
            raise BadRequest(f"unknown param {unknown[0]!r} for task {self.name!r}")
        out = {}
        for name, spec in self.params.items():
            if name in raw:
                out[name] = spec.coerce(name, raw[name])
            elif spec.default is not None:
                out[name] = spec.default
        return out


_IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
_AUDIO_TYPES = ("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave", "audio/pcm",
                "audio/L16", "application/octet-stream")

# In priority order: a worker drains short interactive jobs before long ones.
TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="tokenize",
            inputs=("text",),
            media_types=("text/plain",),
            max_items=256,
            params={
                "model": Param(str),  # default: the worker's (README, "Model versions")
                "add_special_tokens": Param(bool, True),
            },
        ),
        TaskSpec(
            name="detokenize",
            inputs=("ids",),
            bundle="tokenize",
            max_items=256,
            params={
                "model": Param(str),  # default: the worker's (README, "Model versions")
                "skip_special_tokens": Param(bool, False),
            },
        ),
        TaskSpec(
            name="asr",
            inputs=("data",),
            media_types=_AUDIO_TYPES,
            params={
                "model": Param(str),  # default: the worker's (README, "Model versions")
                "language": Param(str, max_len=16),
                "task": Param(str, "transcribe", choices=("transcribe", "translate")),
                "initial_prompt": Param(str, max_len=1000),
                "timestamps": Param(bool, True),
                # raw PCM (no WAV header) needs these
                "sample_rate": Param(int, low=C.AUDIO_RATE_RANGE[0], high=C.AUDIO_RATE_RANGE[1]),
                "format": Param(str, choices=("s8", "u8", "s16le", "s24le", "s32le", "f32le",
                                               "f64le")),
                "channels": Param(int, low=1, high=C.AUDIO_MAX_CHANNELS),
            },
        ),
        TaskSpec(
            name="superres",
            inputs=("data",),
            media_types=_IMAGE_TYPES,
            max_items=16,
            params={
                "model": Param(str),
                "mode": Param(str, "fast", choices=("fast", "quality")),
                "format": Param(str, "png", choices=("png", "jpeg", "webp")),
                "quality": Param(int, 90, low=1, high=100),
                "compression": Param(int, 1, low=0, high=9),
                "steps": Param(int, 20, low=1, high=200),
                "seed": Param(int, 0, low=0, high=2**63 - 1),
            },
        ),
        TaskSpec(
            name="lcm",
            inputs=("text",),
            media_types=("text/plain",),
            params={
                "model": Param(str),
                "steps": Param(int, 4, low=1, high=8),
                "seed": Param(int, 0, low=0, high=2**63 - 1),
                "guidance_scale": Param(float, 8.0, low=0.0, high=30.0),
                "width": Param(int, low=64, high=1024),
                "height": Param(int, low=64, high=1024),
                "lora": Param(str, max_len=128),
                "lora_weight": Param(float, 1.0, low=-4.0, high=4.0),
                "format": Param(str, "png", choices=("png", "jpeg", "webp")),
            },
        ),
    )
}

TASK_ORDER: tuple[str, ...] = tuple(TASKS)  # a worker's queue priority
BUNDLE_TASKS: tuple[str, ...] = tuple(dict.fromkeys(s.bundle_task for s in TASKS.values()))


def bundle_task(task: str) -> str:
    """The bundle task serving job task `task` (itself when it is not a registered task)."""
    spec = TASKS.get(task)
    return spec.bundle_task if spec is not None else task
