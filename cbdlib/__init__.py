"""cbdlib: Class-Balanced Distillation (Iscen et al., BMVC 2021) for long-tailed recognition.

Layout (where to look):
  cbdlib/data/       datasets, long-tailed subsets, caching, statistics, samplers
  cbdlib/models/     ResNet backbones, cosine / linear classifiers, projection
  cbdlib/engine/     training loop, stage 1 teachers, stage 2 students, baselines
  cbdlib/distill.py  the feature-distillation loss
  cbdlib/metrics.py  evaluation and many/medium/few, head/mid/tail accuracy
  cbdlib/config.py   the one parameter schema shared by YAML, CLI and notebooks
  cbdlib/runs.py     run folders, metrics.json, provenance
  cbdlib/pipeline.py papermill pipeline (``python -m cbdlib run``) and aggregation
"""
from .errors import CBDError

__version__ = "0.1.0"
__all__ = ["CBDError", "__version__"]
