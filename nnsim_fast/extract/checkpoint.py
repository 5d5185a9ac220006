"""Resumable sketching: a partial representation on disk, and a resume that checks its data.

The checkpoint is an ordinary representation file whose ``meta["progress"]``
says which settings wrote it, how many batches of ``data`` it holds and
whether the run finished.  "Holds k batches" always means the first k
batches the loader yielded were added completely: a batch is counted only
after it was added, and a failure (in the model, in ``next(data)``, anywhere)
writes the batches before it.  A resume reads and counts the first k batches
without running the model on them and checks that they carry as many rows as
the checkpoint, so a loader that is shorter, or batched differently, is an
error rather than a silently reused result.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, Optional, Tuple

from .._checks import check_optional_int
from ..sketch import Representation

__all__ = ["Checkpointer", "Skip"]


def _length(data) -> Optional[int]:
    try:
        return len(data)
    except TypeError:
        return None


class Skip:
    """The batches a resumed checkpoint already holds: counted and checked, not computed."""

    def __init__(self, path: str, batches: int, rows: int, plan=None) -> None:
        self.path, self.batches, self.rows, self.plan = path, batches, rows, plan
        self.seen_rows = 0

    def take(self, batch_index: int, size: int) -> bool:
        """True if the batch is already in the checkpoint (then it must not be added)."""
        if batch_index >= self.batches:
            return False
        self.seen_rows += size if self.plan is None else self.plan.kept(batch_index, size)
        if batch_index == self.batches - 1 and self.seen_rows != self.rows:
            raise ValueError(
                f"checkpoint {self.path!r} holds {self.rows} rows from the first {self.batches} "
                f"batches, but those batches of data carry {self.seen_rows} rows: data does not "
                "yield the batches the checkpoint was written from. Resume with the same data, "
                "batch size and order, or delete the checkpoint")
        return True

    def finish(self, consumed: int) -> None:
        if consumed < self.batches:
            raise ValueError(
                f"checkpoint {self.path!r} holds {self.batches} batches, but data yielded only "
                f"{consumed}: resume with the data the checkpoint was written from (same batches, "
                "same order), or delete the checkpoint")


class Checkpointer:
    """Writes the partial representation every ``every`` batches, on failure and at the end."""

    def __init__(self, path: str, every: Optional[int], settings: Dict) -> None:
        self.path, self.every = path, every
        self.settings = json.loads(json.dumps(settings))     # as it reads back from a file
        self.start = 0

    @classmethod
    def build(cls, checkpoint, checkpoint_every, *, into, suffix: str,
              settings: Dict) -> Optional["Checkpointer"]:
        if checkpoint is None:
            if checkpoint_every is not None:
                raise ValueError("checkpoint_every needs checkpoint=path")
            return None
        every = check_optional_int(checkpoint_every, "checkpoint_every", 1)
        if into is not None:
            raise ValueError("checkpoint= cannot be combined with into=")
        return cls(os.fspath(checkpoint) + suffix, every, settings)

    def resume(self, device, data, max_batches: Optional[int]
               ) -> Optional[Tuple[Representation, int, bool]]:
        """``(representation, batches, complete)`` from an existing checkpoint, or None."""
        if not os.path.exists(self.path):
            return None
        rep = Representation.load(self.path, device=device)
        progress = rep.meta.get("progress") or {}
        self._check_settings(progress.get("settings") or {})
        batches, complete = int(progress.get("batches", 0)), bool(progress.get("complete", False))
        self._check_length(_length(data), batches, complete, max_batches)
        self.start = batches
        return rep, batches, complete

    def _check_settings(self, saved: Dict) -> None:
        if saved != self.settings:
            changed = sorted(k for k in set(saved) | set(self.settings)
                             if saved.get(k) != self.settings.get(k))
            raise ValueError(f"checkpoint {self.path!r} was written with different settings "
                             f"({', '.join(changed)}); delete it or use another path")

    def _check_length(self, total: Optional[int], batches: int, complete: bool,
                      max_batches: Optional[int]) -> None:
        if total is None:
            return
        expected = total if max_batches is None else min(total, max_batches)
        if batches > expected or (complete and batches != expected):
            held = f"a finished run of {batches} batches" if complete else f"{batches} batches"
            raise ValueError(
                f"checkpoint {self.path!r} holds {held}, but data has {expected}: resume with "
                "the data the checkpoint was written from (same batches, same order), or delete "
                "the checkpoint")

    def after_batch(self, rep: Representation, batches: int) -> None:
        # Batches skipped on a resume are already in the file: writing then would claim
        # fewer batches than the representation holds.
        if self.every is not None and batches > self.start and batches % self.every == 0:
            self.save(rep, batches, complete=False)

    def after_failure(self, rep: Representation, batches: int) -> None:
        """Keep the batches added before a failure, so a rerun resumes from the failing one."""
        if batches <= self.start:
            return
        try:
            self.save(rep, batches, complete=False)
        except Exception as error:   # the original failure is the one to report
            warnings.warn(f"could not write checkpoint {self.path!r} after a failure: {error!r}",
                          RuntimeWarning, stacklevel=3)

    def save(self, rep: Representation, batches: int, complete: bool) -> None:
        rep.meta["progress"] = {"settings": self.settings, "batches": batches,
                                "complete": complete}
        rep.save(self.path)
