"""``python -m cbdlib aggregate``: run folders of different training seeds merged into one."""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
from pathlib import Path

from .. import config, runs
from ..errors import CBDError, one_line
from ..io import write_bytes, write_text
from ..methods import method_order
from .summary import read_metrics, summary_markdown

log = logging.getLogger("cbdlib.pipeline")


# Parameters that may differ between runs merged by aggregate (the rest define the experiment).
MERGEABLE_KEYS = runs.RESUMABLE_KEYS | {"seeds", "run_name", "data"}


def aggregate_runs(run_dirs: list, out: str | os.PathLike, partial: bool = False) -> Path:
    """Merge run folders of different training seeds of one experiment into ``out`` (mean and std).

    A run whose methods did not all finish is refused; with ``partial`` it is merged and every
    mean says (on the console and in ``summary.md``) how many seeds it covers.
    """
    if not run_dirs:
        raise CBDError("aggregate needs at least one run folder")
    out = Path(out)
    loaded = []
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise CBDError(f"run folder not found: {run}")
        if out.resolve() == run.resolve():
            raise CBDError(f"--out {out} is one of the run folders; choose a new folder")
        metrics = read_metrics(run)
        try:
            runs.validate_metrics(metrics)
        except (CBDError, ValueError) as exc:
            raise CBDError(f"{run}/metrics.json: {one_line(exc)}") from None
        evaluations = runs.load_evaluations(run)
        if not evaluations:
            raise CBDError(f"{run} has no evaluations/seed_*/*.json to merge")
        seeds = sorted({s for per_seed in evaluations.values() for s in per_seed})
        loaded.append({"path": run, "metrics": metrics, "evaluations": evaluations, "seeds": seeds,
                       "params": runs.read_params_yaml(run)})

    first = loaded[0]
    for other in loaded[1:]:
        for key in ("dataset", "class_counts", "imbalance_ratio"):
            if other["metrics"][key] != first["metrics"][key]:
                raise CBDError(f"cannot merge {first['path']} and {other['path']}: different {key} "
                               f"({_short(first['metrics'][key])} vs {_short(other['metrics'][key])})")
        if first["params"] and other["params"]:
            differ = sorted(k for k in set(first["params"]) | set(other["params"])
                            if k not in MERGEABLE_KEYS and first["params"].get(k) != other["params"].get(k))
            if differ:
                detail = ", ".join(f"{k}: {first['params'].get(k)!r} vs {other['params'].get(k)!r}" for k in differ[:4])
                raise CBDError(f"cannot merge {first['path']} and {other['path']}: different parameters ({detail})")
    owner: dict[int, Path] = {}
    for entry in loaded:
        for seed in entry["seeds"]:
            if seed in owner:
                raise CBDError(f"seed {seed} appears in both {owner[seed]} and {entry['path']}; "
                               "aggregate merges runs of different training seeds")
            owner[seed] = entry["path"]

    merged: dict[str, dict[int, dict]] = {}
    for entry in loaded:
        for method, per_seed in entry["evaluations"].items():
            merged.setdefault(method, {}).update(per_seed)
    short = _short_coverage(loaded, merged, sorted(owner), partial)
    prov = {key: _joined(entry["metrics"].get(key, "unknown") for entry in loaded)
            for key in ("device", "torch", "git_commit", "precision")}
    m0 = first["metrics"]
    metrics = runs.build_metrics(merged, dataset=m0["dataset"], imbalance_ratio=m0["imbalance_ratio"],
                                 class_counts=m0["class_counts"], splits=m0["splits"], seeds=sorted(owner),
                                 prov=prov)
    merged_from = [{"path": str(entry["path"]), "seeds": entry["seeds"]} for entry in loaded]
    metrics["merged_from"] = merged_from
    if short:
        metrics["partial"] = {method: seeds for method, seeds in short.items()}
    runs.validate_metrics(metrics)

    _prepare_aggregate_dir(out)
    for entry in loaded:
        for method, per_seed in entry["evaluations"].items():
            for seed in per_seed:
                source = runs.evaluation_path(entry["path"], seed, method)
                write_bytes(runs.evaluation_path(out, seed, method), source.read_bytes())
    runs.write_metrics(out, metrics, _class_names(loaded, len(m0["class_counts"])))
    params = dict(first["params"] or {})
    if params:
        params["seeds"] = sorted(owner)
    params["run_name"] = out.name
    text = summary_markdown(out, metrics, params=params, merged_from=merged_from)
    write_text(out / "summary.md", text)
    log.info("merged %d runs (seeds %s) into %s", len(loaded), sorted(owner), out)
    for method, seeds in short.items():
        log.warning("warning: partial merge: %s is the mean of %d of %d seeds (%s)", method, len(seeds),
                    len(owner), ", ".join(map(str, seeds)))
    print(out / "summary.md")
    return out


def _expected_methods(params: dict | None) -> list[str]:
    """The methods a run folder's parameters ask for (its evaluations must hold each, for every seed)."""
    if not params:
        return []
    try:
        methods = params.get("methods") or config.all_method_names(params.get("teachers") or [])
    except CBDError:
        return []
    return [m for m in methods if m != "teachers"]


def _short_coverage(loaded: list, merged: dict, seeds: list, partial: bool) -> dict[str, list]:
    """{method: seeds it covers} for every method that misses a seed; refused unless ``partial``."""
    how = ("finish it with the command that made it, or pass --partial to merge what there is "
           "(each mean then says how many seeds it covers)")
    for entry in loaded:
        missing = [f"{m} (seed {s})" for s in entry["seeds"] for m in _expected_methods(entry["params"])
                   if s not in entry["evaluations"].get(m, {})]
        if missing and not partial:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise CBDError(f"cannot merge {entry['path']}: the run is unfinished (no evaluation of {shown}); {how}")
    short = {m: sorted(per_seed) for m, per_seed in merged.items() if sorted(per_seed) != seeds}
    for entry in loaded:  # a method that must be there but is in no run at all
        for m in _expected_methods(entry["params"]):
            if m not in merged:
                short[m] = []
    if short and not partial:
        method, covered = next(iter(short.items()))
        lacking = [str(e["path"]) for e in loaded if not set(e["seeds"]) <= set(covered)]
        raise CBDError(f"cannot merge: {method} has results for seeds {covered} of {seeds} "
                       f"({', '.join(lacking[:2])} lacks it); {how}")
    return {m: short[m] for m in method_order(list(short))}


def _prepare_aggregate_dir(out: Path) -> None:
    """``out`` is new, empty, or a previous aggregate (its evaluations are replaced); never a run folder."""
    if (out / "params.yaml").exists() or (out / "checkpoints").exists():
        raise CBDError(f"{out} is a run folder; aggregate writes to a new folder")
    if (out / "metrics.json").exists():
        previous = read_metrics(out, required=False) or {}
        if "merged_from" not in previous:
            raise CBDError(f"{out} already holds a metrics.json that is not an aggregate; choose a new folder")
        shutil.rmtree(out / "evaluations", ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CBDError(f"cannot create {out}: {exc.strerror or exc}") from None


def _class_names(loaded: list, num_classes: int) -> list:
    """Class names from an evaluation record, else a run's per_class.csv, else the label numbers."""
    for entry in loaded:
        for per_seed in entry["evaluations"].values():
            for record in per_seed.values():
                names = record.get("class_names")
                if isinstance(names, list) and len(names) == num_classes:
                    return [str(n) for n in names]
    for entry in loaded:
        path = entry["path"] / "per_class.csv"
        if path.exists():
            names: dict[int, str] = {}
            with contextlib.suppress(csv.Error, KeyError, ValueError):
                for row in csv.DictReader(io.StringIO(path.read_text())):
                    names[int(row["label"])] = row["class_name"]
            if len(names) == num_classes and set(names) == set(range(num_classes)):
                return [names[i] for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def _joined(values) -> str:
    distinct = list(dict.fromkeys(str(v) for v in values))
    return "; ".join(distinct)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
