"""Every command-line entry point, together:

- ``main``: ``python -m cbdlib stats | run | aggregate | evaluate | ablate``;
- ``train``: ``python -m cbdlib.train`` (also under ``torchrun``);
- ``bench``: ``python -m cbdlib.bench``;
- ``plumbing``: logging to stderr and one-line errors instead of tracebacks.

``cbdlib/__main__.py``, ``cbdlib/train.py`` and ``cbdlib/bench/__main__.py`` only start these.
"""
