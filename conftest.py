"""Test-session environment, for ``python3 -m pytest -q --nbval-lax tests notebooks``.

Set here, at import time, before any test or nbval kernel starts (kernels inherit the
environment of the pytest process):

* ``CBD_RESULTS_DIR``: a fresh temporary folder for the session, even when the user has
  set one, so smoke runs of the tests never meet (or are refused by) real run folders;
  it is removed at the end.
* ``MPLBACKEND=Agg``: no display needed.

nbval collects ``notebooks/`` in alphabetical order, 01 -> 04, so 04 reads the run folder
that 02 and 03 filled (``run_name = "default"`` under the temporary results folder).
"""
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")

_CREATED_RESULTS_DIR = tempfile.mkdtemp(prefix="cbd-test-results-")
os.environ["CBD_RESULTS_DIR"] = _CREATED_RESULTS_DIR


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CREATED_RESULTS_DIR, ignore_errors=True)
