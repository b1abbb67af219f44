"""The batch side of the workbook: ``python -m cbdlib run`` and ``python -m cbdlib aggregate``.

- ``run``: the notebooks executed by papermill into one run folder (``run_pipeline``), followed
  by ``follow`` (a bar or one line per finished model);
- ``summary``: the run folder's ``summary.md`` and its line in ``<results>/index.csv``;
- ``aggregate``: run folders of different training seeds merged into one (``aggregate_runs``).
"""
from .aggregate import aggregate_runs
from .run import PACKAGE_ENV, format_command, kernel_environment, package_dir, run_pipeline
from .summary import INDEX_COLUMNS, append_index, format_split_table, index_row, summary_markdown

__all__ = [
    "INDEX_COLUMNS", "PACKAGE_ENV", "aggregate_runs", "append_index", "format_command", "format_split_table",
    "index_row", "kernel_environment", "package_dir", "run_pipeline", "summary_markdown",
]
