"""The batch side of the workbook: ``python -m cbdlib run`` and ``python -m cbdlib aggregate``.

- ``run``: the notebooks executed by papermill into one run folder (``run_pipeline``), followed
  by ``follow`` (a bar or one line per finished model);
- ``summary``: the run folder's ``summary.md`` and its line in ``<results>/index.csv``;
- ``aggregate``: run folders of different training seeds merged into one (``aggregate_runs``).
"""
from ..notebook_params import Notebook, checked_values, discover_notebooks
from .aggregate import aggregate_runs
from .run import PACKAGE_ENV, execute_notebook, format_command, kernel_environment, package_dir, run_pipeline
from .summary import INDEX_COLUMNS, SPLIT_COLUMNS, append_index, format_split_table, index_row, summary_markdown

__all__ = [
    "INDEX_COLUMNS", "Notebook", "PACKAGE_ENV", "SPLIT_COLUMNS", "aggregate_runs", "append_index",
    "checked_values", "discover_notebooks", "execute_notebook", "format_command",
    "format_split_table", "index_row", "kernel_environment", "package_dir", "run_pipeline", "summary_markdown",
]
