"""What each task's bundle.json holds: one declarative table per task, checked at pack and
verify time (`edgectl bundle pack|verify`, `edgectl prepare`) so that a hand-made bundle is
refused with the key's path instead of failing when a worker loads it. docs/bundle.md is the
prose of this table; keep the two together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# How a request without `model` picks among a task's models when the config names no
# default: (request param, bundle setting, the setting's value when absent). superres models
# are of one mode each, and the request's mode must match.
SELECTORS: dict[str, tuple[str, str, str]] = {"superres": ("mode", "mode", "fast")}


def default_candidates(task: str, names: Sequence[str], manifests: Mapping[str, Mapping[str, Any]],
                       params: Mapping[str, Any]) -> list[str]:
    """The models (first installed first) that may answer a request of job `task` naming none."""
    from edge.tasks import TASKS, bundle_task

    selector = SELECTORS.get(bundle_task(task))
    if selector is None:
        return list(names)
    param, setting, absent = selector
    spec = TASKS[task].params.get(param)
    want = params.get(param, spec.default if spec is not None else absent)
    return [n for n in names
            if str((manifests[n].get("settings") or {}).get(setting, absent)) == want]
