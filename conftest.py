"""Test-session environment, for ``python3 -m pytest -q --nbval-lax tests notebooks``.

Set here, at import time, before any test or nbval kernel starts (kernels inherit the
environment of the pytest process):

* ``CBD_RESULTS_DIR``: a fresh temporary folder for the session, even when the user has
  set one, so smoke runs of the tests never meet (or are refused by) real run folders;
  it is removed at the end.
* ``MPLBACKEND=Agg``: no display needed.
* ``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1``: one intra-op thread in the test process and
  every process it starts (notebook kernels, commands). On a busy 2-core machine spinning
  OpenMP threads made the smoke trainings about twice as slow (and t-SNE far slower), and CPU
  results are bit-identical between processes only at the same thread count.

nbval collects ``notebooks/`` in alphabetical order, 01 -> 04, so 04 reads the run folder
that 02 and 03 filled (``run_name = "default"`` under the temporary results folder). When the
tests run first, ``smoke_run`` (tests/conftest.py) has already made that run with
``python -m cbdlib run``; the notebooks then resume it (finished models are loaded, every
figure is drawn again and checked by each notebook's final cell) instead of training twice.
"""
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

_CREATED_RESULTS_DIR = tempfile.mkdtemp(prefix="cbd-test-results-")
os.environ["CBD_RESULTS_DIR"] = _CREATED_RESULTS_DIR


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CREATED_RESULTS_DIR, ignore_errors=True)
