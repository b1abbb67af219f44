"""Training engine: the loop (``loop.py``), schedules (``schedule.py``) and an experiment's stages (``stages.py``)."""
from .loop import DeviceData, Job, fit, predict, resolve_device
from .stages import STAGE_GROUPS, STAGES, Experiment, load_model, train_stage

__all__ = ["DeviceData", "Job", "fit", "predict", "resolve_device", "Experiment", "STAGES", "STAGE_GROUPS",
           "load_model", "train_stage"]
