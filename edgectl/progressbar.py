"""A one-line progress bar on a terminal, drawn from a job's progress notes (QoS 0, may skip).

What a note counts, per task (docs/protocol.md, "Progress notes"): asr `window`/`windows`,
lcm `step`/`steps`, superres `image`/`images` (and `step`/`steps` of the image in quality mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TextIO

WIDTH = 30


def fraction(note: Mapping[str, Any]) -> tuple[float, str] | None:
    """(done in 0..1, a label) for one progress note; None for a note it cannot read."""
    try:
        if "image" in note:
            image, images = int(note["image"]), int(note["images"])
            if "step" in note:
                step, steps = int(note["step"]), int(note["steps"])
                done = (image - 1 + step / steps) / images
                return done, f"image {image}/{images} step {step}/{steps}"
            return image / images, f"image {image}/{images}"
        if "window" in note:
            window, windows = int(note["window"]), int(note["windows"])
            return window / windows, f"window {window}/{windows}"
        if "step" in note:
            step, steps = int(note["step"]), int(note["steps"])
            return step / steps, f"step {step}/{steps}"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def bar(done: float, label: str, width: int = WIDTH) -> str:
    """`[#########.....]  60%  step 3/5`"""
    done = min(max(done, 0.0), 1.0)
    filled = int(round(done * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done:3.0f}%  {label}"


class ProgressBar:
    """Redraws one line of `stream` (a terminal) at every note; `finish()` ends the line."""

    def __init__(self, stream: TextIO, task: str) -> None:
        self.stream, self.task = stream, task
        self.drawn = False

    def update(self, note: Mapping[str, Any]) -> None:
        got = fraction(note)
        if got is None:
            return
        self.stream.write(f"\r\x1b[K{self.task} {bar(*got)}")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
