"""cbdlib: Class-Balanced Distillation (Iscen et al., BMVC 2021) for long-tailed recognition.

Layout (where to look):
  cbdlib/data/       datasets, long-tailed subsets, caching, statistics, samplers
  cbdlib/models/     ResNet backbones, cosine / linear classifiers, projection
  cbdlib/engine/     training loop, stage 1 teachers, stage 2 students, baselines
  cbdlib/distill.py  the feature-distillation loss
  cbdlib/metrics.py  evaluation and many/medium/few, head/mid/tail accuracy
  cbdlib/methods.py  method names, teacher names, what each method needs, table order
  cbdlib/config.py   the one parameter schema shared by YAML, CLI and notebooks (Params, Settings)
  cbdlib/runs/       run folders, metrics.json, history, provenance
  cbdlib/pipeline/   papermill pipeline (``python -m cbdlib run``) and aggregation
  cbdlib/workbook.py the notebooks' one entry point
"""
from .errors import CBDError

__version__ = "0.1.0"
__all__ = ["CBDError", "__version__"]
