"""Training engine: what to train (``job.py``), the loop (``loop.py``, and ``together.py`` for
several models in one grouped step), the loss of a batch (``losses.py``; the CBD loss is in
``cbdlib/distill.py``), schedules (``schedule.py``) and an experiment's stages (``stages.py``)."""
from ..checkpoint import load_model
from ..data.device import DeviceData, predict
from ..devices import resolve_device
from .job import Job
from .loop import fit
from .stages import STAGE_GROUPS, STAGES, Experiment, train_stage

__all__ = ["DeviceData", "Job", "fit", "predict", "resolve_device", "Experiment", "STAGES", "STAGE_GROUPS",
           "load_model", "train_stage"]
