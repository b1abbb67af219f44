"""Analyses of a finished run, kept out of ``methods``: feature probes, calibration, teacher agreement;
and what notebook 04 shows of a finished run (``views``)."""
from .agreement import ensemble_gain, pairwise_agreement, student_cosine
from .calibration import ECE_BINS, ECE_DEFINITION, calibration_record, expected_calibration_error, reliability_bins
from .probes import PROBE_SETTINGS, linear_probe_logits, ncm_probe_logits, probe_record
from .reading import analysis_reading_lines, reading_lines
from .run import (
    add_analyses,
    analyse_folder,
    analyse_seed,
    analysis_path,
    has_own_backbone,
    load_analyses,
    reliability_records,
)

__all__ = [
    "ECE_BINS", "ECE_DEFINITION", "PROBE_SETTINGS", "add_analyses", "analyse_folder", "analyse_seed",
    "analysis_path", "analysis_reading_lines", "reading_lines", "calibration_record", "ensemble_gain",
    "expected_calibration_error", "has_own_backbone", "linear_probe_logits", "load_analyses", "ncm_probe_logits",
    "pairwise_agreement", "probe_record", "reliability_bins", "reliability_records", "student_cosine",
]
