"""Run folders, whose layout and rules results/README.md gives. ``folder``: where a run lives and
whether it starts, resumes or is refused, its lock, its wall time summed over invocations and its
provenance; ``records``: what it records, written and read back.
"""

from .folder import (
    LOCK_TOKEN_ENV,
    NOTEBOOK_TIMES,
    PRECISION_FILE,
    RESUMABLE_KEYS,
    STAGE_TIMES,
    clear_run_dir,
    ensure_run_dir,
    has_results,
    lock_token,
    parameter_differences,
    prepare_run_dir,
    provenance,
    read_params_yaml,
    refuse_if_busy,
    results_root,
    run_dir_for,
    run_lock,
    timed,
    wall_times,
)
from .records import (
    append_history,
    build_metrics,
    checkpoint_path,
    evaluation_path,
    features_dir,
    features_path,
    load_evaluations,
    parse_history,
    read_history,
    save_evaluation,
    save_features,
    write_metrics,
)

__all__ = [
    "append_history", "build_metrics", "checkpoint_path", "clear_run_dir", "ensure_run_dir", "evaluation_path",
    "features_dir", "features_path", "has_results", "load_evaluations", "lock_token", "LOCK_TOKEN_ENV",
    "NOTEBOOK_TIMES", "parameter_differences", "parse_history", "PRECISION_FILE", "prepare_run_dir", "provenance",
    "read_history", "read_params_yaml", "refuse_if_busy", "results_root", "RESUMABLE_KEYS", "run_dir_for", "run_lock",
    "save_evaluation", "save_features", "STAGE_TIMES", "timed", "wall_times", "write_metrics",
]
