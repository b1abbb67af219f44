"""What a run folder tells a reader: ``summary.md`` (how it was produced, the data, the results
table, the evidence, wall times) and the run's line in ``<results>/index.csv``."""
from __future__ import annotations

import csv
import datetime as _dt
import io
import os
from pathlib import Path

from .. import config, runs
from ..config import yaml_scalar
from ..data.longtail import overlap_warning
from ..data.stats import split_size_lines
from ..engine.precision import choice_lines
from ..io import file_lock, write_text
from ..methods import BASELINES_NOTE, DECOUPLED_BASELINES, best_baseline, method_order
from ..metrics import ACCURACY_KEYS
from ..notebook_params import NOTEBOOK_PATTERN
from ..text import format_seconds

# Parameters a reader needs to judge a number (in this order in summary.md).
KEY_PARAMETERS = ("arch", "epochs", "batch_size", "lr", "schedule", "warmup_epochs",
                  "weight_decay", "momentum", "alpha", "beta", "cosine_scale", "projection", "teachers",
                  "decoupled_epochs", "lws_epochs", "decoupled_lr", "decoupled_weight_decay", "decoupled_bn",
                  "ncm_variant", "lt_seed", "lt_subset", "val_per_class", "smoke")
INDEX_COLUMNS = ("finished_at", "run_name", "dataset", "imbalance_ratio", "seeds", "arch", "epochs", "cbd_ens_all",
                 "best_baseline", "best_baseline_all", "device", "git_commit", "wall_s", "path")


def display_path(path) -> str:
    """``path`` relative to the project root where that is shorter (a path inside it, or a dataset
    beside it), else as given."""
    try:
        relative = os.path.relpath(Path(path).resolve(), config.project_root())
    except ValueError:
        return str(path)
    return relative if len(relative) < len(str(path)) else str(path)


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def format_split_table(metrics: dict) -> str:
    """Methods x splits (all, many, medium, few, head, mid, tail) in %, mean ± std over seeds."""
    splits = metrics.get("splits", {})
    header = ["method", "seeds"] + [
        key if key == "all" else f"{key} ({len(splits.get(key, []))})" for key in ACCURACY_KEYS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name in method_order(list(metrics.get("methods", {}))):
        record = metrics["methods"][name]
        std = metrics.get("std", {}).get(name, {})
        seeds = record.get("seeds") or metrics.get("seeds", [])
        cells = [f"`{name}`", str(len(seeds))]
        for key in ACCURACY_KEYS:
            mean = record.get(key)
            if mean is None:
                cells.append("n/a")
            elif len(seeds) > 1 and std.get(key) is not None:
                cells.append(f"{_percent(mean)} ± {_percent(std[key])}")
            else:
                cells.append(_percent(mean))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(run_dir: str | os.PathLike, metrics: dict | None, *, params: dict | None = None,
                     command: str | None = None, params_file: str | os.PathLike | None = None,
                     merged_from: list | None = None,
                     wall_time_columns: list | None = None, after_results: list[str] | None = None,
                     after_evidence: list[str] | None = None) -> str:
    """The run folder's ``summary.md``: how it was produced, the data, the results, the evidence.

    ``wall_time_columns`` (default: the folder itself) are the run folders whose ledgers give the
    wall-time table (``wall_time_lines``). ``after_results`` and ``after_evidence`` are markdown
    lines of sections placed there (aggregate's reading and its saved model).
    """
    run_dir = Path(run_dir)
    params = params or {}
    title = params.get("run_name") or run_dir.name
    out = [f"# {title}", ""]
    if params.get("smoke"):
        out += ["**Smoke run**: tiny model, a few epochs, a handful of images. It checks the plumbing; "
                "its numbers are not results.", ""]

    out += ["## How this was produced", ""]
    if merged_from:
        out.append(f"Merged with `python -m cbdlib aggregate` from {len(merged_from)} run folders "
                   "(mean and std over all their training seeds):")
        out += [f"- `{entry['run']}`: seeds {', '.join(map(str, entry['seeds']))}, precision {entry['precision']}"
                for entry in merged_from]
        if len({entry["precision"] for entry in merged_from}) > 1:
            out.append("- **the seeds trained in different precisions** (bf16 and fp32 move single-seed numbers "
                       "by about a seed's spread; docs/performance.md)")
        short = (metrics or {}).get("partial") or {}
        if short:
            every = len((metrics or {}).get("seeds", []))
            out.append("- **partial merge** (`--partial`): " + "; ".join(
                f"`{m}` is the mean of {len(s)} of {every} seeds ({', '.join(map(str, s)) or 'none'})"
                for m, s in short.items()))
    if command:  # its -p values are the overrides of the parameter file
        out.append(f"- command: `{command}`")
    if params_file is not None:
        out.append(f"- parameter file: `{display_path(Path(params_file))}`")
    out.append(f"- written: {_now_iso()}")
    out.append("")

    if metrics is not None:
        counts = metrics.get("class_counts", [])
        out += ["## Data", ""]
        measured = f" (measured max/min {max(counts) / min(counts):.1f})" if counts and min(counts) > 0 else ""
        ratio = metrics.get("imbalance_ratio") or "natural (the data's own counts)"
        out.append(f"- dataset: {metrics.get('dataset')}, imbalance ratio {ratio}{measured}"
                   f"{', profile ' + str(params['profile']) if params.get('profile') else ''}")
        out.append(f"- {len(counts)} classes, {sum(counts)} training images; class counts by label: "
                   f"{' '.join(str(c) for c in counts)}")
        out += ["- " + line for line in split_size_lines(metrics.get("splits", {}))]
        overlap = metrics.get("val_overlap")
        if overlap:
            warning = overlap_warning(overlap.get("images"), overlap.get("classes"), overlap.get("val_per_class"))
            out.append(f"- **warning: {warning}**")
        out.append("")

        seeds = metrics.get("seeds", [])
        out += ["## Results", "",
                f"Test top-1 accuracy in %, final epoch, mean ± std over training seeds {seeds} "
                "(population std; one seed shows the mean only). Split headers give their number of classes; "
                "n/a: no class in that split.", "",
                format_split_table(metrics), ""]
        if any(b in metrics.get("methods", {}) for b in DECOUPLED_BASELINES):
            out += [BASELINES_NOTE, ""]
        out += after_results or []
    else:
        out += ["## Results", "", "No `metrics.json` in this folder: the notebooks wrote no results.", ""]

    if params:
        out += ["## Parameters that matter", "", "| parameter | value |", "|---|---|"]
        out += [f"| {k} | `{yaml_scalar(params[k])}` |" for k in KEY_PARAMETERS if k in params]
        note = "`lr` is the learning rate used"
        if (run_dir / "params.yaml").exists():
            note += "; every parameter is in [params.yaml](params.yaml)"
        out += ["", note + ".", ""]

    if metrics is not None:
        out += ["## Evidence", ""]
        out.append(f"- device: {metrics.get('device')}")
        out.append(f"- precision of the training steps: {metrics.get('precision', 'not recorded')} "
                   f"(evaluation is float32)")
        out += choice_lines(metrics.get("precision_choice"))
        out.append(f"- torch: {metrics.get('torch')}")
        out.append(f"- git commit: `{metrics.get('git_commit')}`")
        out.append("")
    out += after_evidence or []

    out += wall_time_lines(wall_time_columns or [("wall time", run_dir)])
    figures, tables = sorted(run_dir.glob("figures/*.png")), sorted(run_dir.glob("figures/*.csv"))
    if figures or tables:
        out += ["## Figures", ""]
        for fig in figures:
            out += [f"![{fig.stem}](figures/{fig.name})", ""]
        if tables:
            out += ["Tables: " + ", ".join(f"[{t.name}](figures/{t.name})" for t in tables), ""]
    notebooks = sorted(p for p in run_dir.glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    if notebooks:
        out += ["## Executed notebooks", ""]
        out += [f"- [{p.name}]({p.name})" for p in notebooks]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def wall_time_lines(columns: list[tuple[str, Path]]) -> list[str]:
    """The wall time of every engine stage and notebook, one column per run folder (``(header, folder)``),
    each read from the folder's ledgers (summed over its invocations); several folders get a sum column."""
    table: dict[str, list] = {}
    for k, (_, folder) in enumerate(columns):
        for ledger, prefix in ((runs.STAGE_TIMES, "stage "), (runs.NOTEBOOK_TIMES, "")):
            for name, entry in runs.wall_times(Path(folder) / ledger).items():
                table.setdefault(prefix + name, [None] * len(columns))[k] = entry
    if not table:
        return []
    several = len(columns) > 1
    lines = ["## Wall time", "", "Summed over every invocation of each run; *resumed*: an invocation was interrupted "
             "and a later one went on from its checkpoints. Engine stages run inside notebooks 02 and 03.", "",
             "| stage | " + " | ".join(header for header, _ in columns) + " |" + (" sum |" if several else ""),
             "|---|" + "---:|" * (len(columns) + several)]
    # Stages, then notebooks, each in the order their ledger wrote them; the total last.
    for name in sorted(table, key=lambda name: (name == "total", not name.startswith("stage "))):
        cells = ["n/a" if e is None else format_seconds(e["s"]) + (" (resumed)" if e["resumed"] else "")
                 for e in table[name]]
        if several:
            cells.append(format_seconds(sum(e["s"] for e in table[name] if e is not None)))
        lines.append(f"| {'**total**' if name == 'total' else name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --- results/index.csv ----------------------------------------------------------------------

def index_row(run_dir: Path, metrics: dict | None, params: dict, wall_s: float) -> dict:
    metrics = metrics or {}
    methods = metrics.get("methods", {})
    best = best_baseline(metrics) or ""
    best_all = methods[best]["all"] if best else None
    cbd_ens = methods.get("cbd_ens", {}).get("all")
    return {
        "finished_at": _now_iso(),
        "run_name": params.get("run_name", run_dir.name),
        "dataset": metrics.get("dataset", params.get("dataset", "")),
        "imbalance_ratio": metrics.get("imbalance_ratio", params.get("imbalance_ratio", "")),
        "seeds": " ".join(str(s) for s in metrics.get("seeds", params.get("seeds", []))),
        "arch": params.get("arch", ""),
        "epochs": params.get("epochs", ""),
        "cbd_ens_all": "" if cbd_ens is None else f"{cbd_ens:.4f}",
        "best_baseline": best,
        "best_baseline_all": "" if best_all is None else f"{best_all:.4f}",
        "device": metrics.get("device", ""),
        "git_commit": metrics.get("git_commit", ""),
        "wall_s": f"{wall_s:.1f}",
        "path": str(run_dir),
    }


def append_index(row: dict, index_path: Path | None = None) -> Path:
    """Add one line to ``<results>/index.csv`` (header created if absent), written atomically."""
    path = index_path or runs.results_root() / "index.csv"
    with file_lock(path):
        rows, columns = [], list(INDEX_COLUMNS)
        if path.exists():
            reader = csv.DictReader(io.StringIO(path.read_text()))
            columns += [c for c in (reader.fieldnames or []) if c not in columns]
            rows = list(reader)
        rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(path, buffer.getvalue())
    return path

