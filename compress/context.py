"""What the steps of one recipe run share: the source checkpoint, the calibration batches, a
work folder (distillation checkpoints, for resume) and the teacher (the uncompressed model,
built once and only when a step asks for it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class StepContext:
    source: Any = None  # lathe.source.Source of the checkpoint being compressed
    # the teacher's checkpoint when it is not `source`: a chained run (distilling a pruned
    # checkpoint further) learns from the original model, not from its own parent
    teacher_source: Any = None
    calib: list | None = None
    progress: Callable | None = None
    work_dir: Path | None = None  # survives an interrupted run (resume); None: no checkpoints
    _teacher: Any = field(default=None, repr=False)

    def teacher_origin(self):
        """The checkpoint the teacher is built from."""
        return self.teacher_source or self.source

    def teacher(self):
        """The original model in eval mode, frozen (distillation's teacher)."""
        if self._teacher is None:
            from lathe.compress.checkpoint import build_model

            if self.source is None:
                raise ValueError("this step needs a teacher: give StepContext a source")
            t = build_model(self.teacher_origin())
            for p in t.parameters():
                p.requires_grad_(False)
            self._teacher = t.eval()
        return self._teacher
