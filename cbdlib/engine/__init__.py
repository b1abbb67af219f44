"""Training engine: what to train (``job.py``), the loop (``loop.py``, and ``together.py`` for
several models in one grouped step), the loss of a batch (``losses.py``; the CBD loss is in
``cbdlib/distill.py``), schedules (``schedule.py``) and an experiment's stages (``stages.py``)."""
from .job import Job
from .stages import STAGE_GROUPS, Experiment, train_stage

__all__ = ["Job", "Experiment", "STAGE_GROUPS", "train_stage"]
