"""cbdlib: Class-Balanced Distillation (Iscen et al., BMVC 2021) for long-tailed recognition.

Layout (where to look; README.md's Layout names every module):
  cbdlib/data/       datasets, long-tailed subsets, caching, statistics, samplers, on-device and streamed batches
  cbdlib/augment/    batched on-device augmentation (crop, flip, colour jitter, grayscale)
  cbdlib/models/     ResNet backbones, cosine / linear / LWS / tau-norm / NCM heads, projection, grouped models
  cbdlib/engine/     what to train (Job), the training loop, the stages: teachers, baselines, CBD students
  cbdlib/distill.py  the CBD loss (feature distillation from the teachers)
  cbdlib/analysis/   probes, calibration and teacher agreement of a run's models
  cbdlib/metrics.py  evaluation and many/medium/few, head/mid/tail accuracy
  cbdlib/methods.py  method names, teacher names, what each method needs, table order
  cbdlib/config.py   the one parameter schema shared by YAML, CLI and notebooks (Params, Settings)
  cbdlib/runs/       run folders, metrics.json, history, wall times, provenance
  cbdlib/pipeline/   papermill pipeline (``python -m cbdlib run``) and aggregation
  cbdlib/plots/      the notebooks' figures
  cbdlib/workbook.py the notebooks' one entry point
  cbdlib/commands/   the command-line entry points (``python -m cbdlib``, ``cbdlib.train``, ``cbdlib.bench``)
  cbdlib/bench/      the engine timed against a naive loop
"""
from .errors import CBDError

__version__ = "0.1.0"
__all__ = ["CBDError", "__version__"]
