"""Progress on stderr: one tqdm bar over input bytes (rate and ETA in GB), jobs counted in the postfix."""
from __future__ import annotations

import sys

from tqdm import tqdm

from .job import Job


class Progress:
    def __init__(self, jobs: list[Job], done: dict, disable: bool = False):
        total = sum(j.nbytes for j in jobs)
        initial = sum(j.nbytes for j in jobs if j.id in done)
        self._jobs_total = len(jobs)
        self._jobs_done = sum(1 for j in jobs if j.id in done)
        self._bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1000,
                         desc="merge", file=sys.stderr, disable=disable, dynamic_ncols=True,
                         smoothing=0.1)
        self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return f"jobs {self._jobs_done}/{self._jobs_total}"

    def note(self, text: str) -> None:
        """Say what is happening (e.g. workers starting) where the bar's label is."""
        self._bar.set_description_str(text, refresh=True)

    def advance(self, job: Job) -> None:
        self._jobs_done += 1
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(job.nbytes)

    def close(self) -> None:
        self._bar.close()
