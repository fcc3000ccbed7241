"""An lcm job's image must fit the worker's per-job memory budget, checked before it runs."""

from __future__ import annotations

import pytest

from edge.errors import PayloadTooLarge
from workers.api import Request, no_progress
from workers.lcm import LCMHandler


class _NeverRun:
    """A pipeline that fails the test if the handler gets as far as running it."""

    settings = {"default_width": 512, "default_height": 512, "size_multiple": 64}
    lora_names = ()

    def __call__(self, *args, **kwargs):
        raise AssertionError("the job ran although it does not fit the budget")


def test_an_image_past_the_job_budget_is_refused_before_it_is_generated():
    handler = LCMHandler({"m": _NeverRun()}, job_memory=16 << 20)
    request = Request("lcm", {"width": 1024, "height": 1024}, text="a fox")
    with pytest.raises(PayloadTooLarge, match=r"a 1024x1024 image needs 80 MiB .* budget of "
                                              r"16 MiB \(\[limits\] job_memory\)"):
        handler(request, no_progress)
