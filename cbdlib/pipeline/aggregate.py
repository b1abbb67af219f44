"""``python -m cbdlib aggregate``: run folders of different training seeds merged into one."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .. import checkpoint as ckpt
from .. import config, runs
from ..analysis import add_analyses, analyse_folder, analysis_path, load_analyses, reading_lines
from ..errors import CBDError
from ..io import write_bytes, write_json, write_text
from ..methods import is_method_name, method_label, method_order
from ..metrics import validate_metrics
from ..notebook_params import NOTEBOOK_FILES, default_notebooks_dir, discover_notebooks
from ..param_rules import check_rule
from ..runs.records import class_names, load_metrics, read_json
from ..text import first_few, format_seconds
from .run import execute_notebook, kernel_environment
from .summary import display_path, summary_markdown

log = logging.getLogger("cbdlib.pipeline")


# Parameters that may differ between runs merged by aggregate (the rest define the experiment).
MERGEABLE_KEYS = runs.RESUMABLE_KEYS | {"seeds", "run_name", "data"}


def aggregate_runs(run_dirs: list, out: str | os.PathLike, partial: bool = False, notebook: bool = True,
                   keep_model: str | None = "cbd_ens") -> Path:
    """Merge run folders of different training seeds of one experiment into ``out`` (mean and std).

    The merged folder is as complete as a run's: ``metrics.json``, ``per_class.csv``, the
    evaluations of every seed, ``history.jsonl`` of every seed, the first seed's saved test
    features, ``keep_model``'s checkpoint of the first seed (``<method>_seed<k>.pt``, the only
    model it keeps), notebook 04 executed on the merged results (with ``notebook``; its figures
    in ``figures/``) and ``summary.md`` with a reading of the numbers and the wall time of every
    stage per seed. A ``notes.md`` already in ``out`` (hand-written) is kept and shown in it.

    A run whose methods did not all finish is refused; with ``partial`` it is merged and every
    mean says (on the console and in ``summary.md``) how many seeds it covers.
    """
    if not run_dirs:
        raise CBDError("aggregate needs at least one run folder")
    if keep_model is not None and not is_method_name(keep_model):  # it becomes part of two file names
        raise CBDError(f"--keep-model {keep_model!r} is not a method name (e.g. cbd_ens, ce, teacher_vanilla_1; "
                       f"none: keep no model)")
    out = Path(out)
    if notebook:  # notebook 04 takes the folder's name as its run_name
        try:
            check_rule("run_name", out.name)
        except CBDError as error:
            raise CBDError(f"--out {out}: {error} (notebook 04 runs on it by that name)") from None
    loaded = [_load_run(Path(run), out) for run in run_dirs]
    first = loaded[0]
    for other in loaded[1:]:
        _refuse_other_experiment(first, other)
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
    prov = {key: "; ".join(dict.fromkeys(str(entry["metrics"].get(key, "unknown")) for entry in loaded))
            for key in ("device", "torch", "git_commit", "precision")}
    m0 = first["metrics"]
    metrics = runs.build_metrics(merged, dataset=m0["dataset"], imbalance_ratio=m0["imbalance_ratio"],
                                 class_counts=m0["class_counts"], splits=m0["splits"], seeds=sorted(owner),
                                 prov=prov)
    analyses = load_analyses(*(entry["path"] for entry in loaded))
    add_analyses(metrics, merged, analyses)
    # Sources by run name (the folders themselves existed on the machine that ran them), with each
    # input's precision, parameters and data, so that this folder can itself be checked when merged again.
    merged_from = [{"run": entry["path"].name, "seeds": entry["seeds"],
                    "precision": entry["metrics"].get("precision", "unknown"), "params": entry["params"],
                    "data_fingerprint": entry["metrics"].get("data_fingerprint")} for entry in loaded]
    metrics["merged_from"] = merged_from
    for key in ("data_fingerprint", "val_overlap"):  # the same data (checked above), so the same for every run
        if first["metrics"].get(key):
            metrics[key] = first["metrics"][key]
    if short:
        metrics["partial"] = short
    validate_metrics(metrics)

    _prepare_aggregate_dir(out)
    with runs.run_lock(out):
        for method, per_seed in merged.items():
            for seed in per_seed:
                source = runs.evaluation_path(owner[seed], seed, method)
                write_bytes(runs.evaluation_path(out, seed, method), source.read_bytes())
        for name, per_seed in analyses.items():
            for seed, record in per_seed.items():
                write_json(analysis_path(out, seed, name), record)
        runs.write_metrics(out, metrics, first["class_names"])
        _merge_history(loaded, out)
        first_seed = min(owner)
        _copy_features(owner[first_seed], out, first_seed)
        kept_lines = _keep_model(owner[first_seed], out, first_seed, keep_model, merged) if keep_model else []
        if notebook:
            _analyse(out)
        params = dict(first["params"] or {})
        if params:
            params["seeds"] = sorted(owner)
        params["run_name"] = out.name
        seed_columns = [(f"seed {', '.join(map(str, entry['seeds']))}", entry["path"]) for entry in loaded]
        text = summary_markdown(out, metrics, params=params, merged_from=merged_from,
                                after_results=reading_lines(metrics, merged) + _notes(out),
                                after_evidence=kept_lines, wall_time_columns=seed_columns)
        write_text(out / "summary.md", text)
    log.info("merged %d runs (seeds %s) into %s", len(loaded), sorted(owner), out)
    if len({entry["precision"] for entry in merged_from}) > 1:
        log.warning("warning: the merged seeds trained in different precisions (%s)",
                    ", ".join(f"{e['run']}: {e['precision']}" for e in merged_from))
    for method, seeds in short.items():
        log.warning("warning: partial merge: %s is the mean of %d of %d seeds (%s)", method, len(seeds),
                    len(owner), ", ".join(map(str, seeds)))
    print(out / "summary.md")
    return out


# --- what a merged folder holds besides the numbers -----------------------------------------

NOTES = "notes.md"                        # hand-written reading, kept across re-aggregation
ANALYSIS_NOTEBOOK = NOTEBOOK_FILES["04"]
NOTEBOOKS_MAX_BYTES = 5 * 2**20           # executed notebooks above this are stripped (figures stay in figures/)


def _merge_history(loaded: list, out: Path) -> None:
    """Every run's ``history.jsonl`` in one file (each record names its seed)."""
    records = [record for entry in loaded for record in runs.read_history(entry["path"])]
    if records:
        write_text(out / "history.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def _copy_features(run: Path, out: Path, seed: int) -> None:
    """The saved test features of ``seed`` (notebook 04 embeds them with t-SNE)."""
    folder = runs.features_dir(run, seed)
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        write_bytes(runs.features_path(out, seed, path.stem), path.read_bytes())


def _keep_model(run: Path, out: Path, seed: int, method: str, merged: dict) -> list[str]:
    """Copy ``method``'s finished checkpoint of ``seed`` into ``out``; returns what summary.md says of it."""
    source = runs.checkpoint_path(run, seed, method)
    if not source.exists():
        log.warning("warning: %s has no checkpoint of %s (seed %d); the merged folder keeps no model", run, method,
                    seed)
        return []
    meta = ckpt.load_checkpoint(source)["meta"]
    if not meta.get("complete"):
        raise CBDError(f"{source} is not a finished model; finish the run before merging it")
    target = out / f"{method}_seed{seed}.pt"
    write_bytes(target, source.read_bytes())
    top1 = merged.get(method, {}).get(seed, {}).get("all")
    data = meta.get("data") or os.environ.get(f"CBD_{str(meta.get('dataset')).upper()}")
    data_note = ("" if data is None else
                 f" (add `--data PATH` when the dataset is not where the run found it: {display_path(data)})")
    record = f"evaluations/seed_{seed}/{method}.json"
    return ["## Saved model", "",
            f"`{target.name}`: {method_label(method)}, training seed {seed}, the only checkpoint kept here. Its "
            f"recorded test top-1 is {'not recorded' if top1 is None else f'{100 * top1:.2f}%'} "
            f"([{record}]({record})); re-evaluate it with", "",
            f"    python -m cbdlib evaluate --checkpoint {display_path(target)}", "",
            f"from the project root{data_note}.", ""]


def _notes(out: Path) -> list[str]:
    path = out / NOTES
    if not path.exists():
        return []
    return ["## Notes", "", f"Hand-written, from [{NOTES}]({NOTES}):", "",
            path.read_text().strip(), ""]


def _analyse(out: Path) -> None:
    """Notebook 04 on the merged folder (figures, tables, t-SNE), as ``cbdlib run`` would run it."""
    notebooks = {nb.name: nb for nb in discover_notebooks(default_notebooks_dir())}
    if ANALYSIS_NOTEBOOK not in notebooks:
        raise CBDError(f"{ANALYSIS_NOTEBOOK} not found in {default_notebooks_dir()}")
    nb = notebooks[ANALYSIS_NOTEBOOK]
    log.info("running %s on the merged results ...", nb.name)
    with kernel_environment(out, results_root=out.parent):
        seconds = execute_notebook(nb, out, {"run_name": out.name})
    log.info("%s done in %s", nb.name, format_seconds(seconds))
    executed = out / nb.name
    if executed.stat().st_size > NOTEBOOKS_MAX_BYTES:
        _strip_outputs(executed)


def _strip_outputs(path: Path) -> None:
    """Drop a notebook's outputs (its figures are also PNG files in ``figures/``)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    write_text(path, nbformat.writes(nb))
    log.info("%s was over %d MB: outputs stripped, figures kept in figures/", path.name, NOTEBOOKS_MAX_BYTES >> 20)


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
    short = {m: sorted(per_seed) for m, per_seed in merged.items() if sorted(per_seed) != seeds}
    for entry in loaded:
        expected = _expected_methods(entry["params"])
        missing = [f"{m} (seed {s})" for s in entry["seeds"] for m in expected
                   if s not in entry["evaluations"].get(m, {})]
        if missing and not partial:
            raise CBDError(f"cannot merge {entry['path']}: the run is unfinished (no evaluation of "
                           f"{first_few(missing)}); {how}")
        short.update({m: [] for m in expected if m not in merged})  # a method that must be there but is in no run
    if short and not partial:
        method, covered = next(iter(short.items()))
        lacking = [str(e["path"]) for e in loaded if not set(e["seeds"]) <= set(covered)]
        raise CBDError(f"cannot merge: {method} has results for seeds {covered} of {seeds} "
                       f"({', '.join(lacking[:2])} lacks it); {how}")
    return {m: short[m] for m in method_order(list(short))}


def _prepare_aggregate_dir(out: Path) -> None:
    """``out`` is new, empty, or a previous aggregate (all but its ``notes.md`` is replaced); never a run folder."""
    runs.ensure_run_dir(out)  # links refused before anything is read or cleared
    if (out / "params.yaml").exists() or (out / "checkpoints").exists():
        raise CBDError(f"{out} is a run folder; aggregate writes to a new folder")
    if (out / "metrics.json").exists():
        if "merged_from" not in read_json(out / "metrics.json"):
            raise CBDError(f"{out} already holds a metrics.json that is not an aggregate; choose a new folder")
        runs.clear_run_dir(out)  # notes.md stays
        for path in [*out.glob("*_seed*.pt"), out / ANALYSIS_NOTEBOOK]:
            path.unlink(missing_ok=True)


def _load_run(run: Path, out: Path) -> dict:
    """What aggregate needs of one run folder (its analyses computed first where it predates them)."""
    if not run.is_dir():
        raise CBDError(f"run folder not found: {run}")
    if out.resolve() == run.resolve():
        raise CBDError(f"--out {out} is one of the run folders; choose a new folder")
    metrics = load_metrics(run)
    analyse_folder(run)  # a run made before the analyses existed gets them from its checkpoints
    evaluations = runs.load_evaluations(run)
    if not evaluations:
        raise CBDError(f"{run} has no evaluations/seed_*/*.json to merge")
    params = runs.read_params_yaml(run)
    if params is None:  # an aggregate: the parameters it recorded of its first input
        params = next((source["params"] for source in metrics.get("merged_from") or []
                       if isinstance(source, dict) and isinstance(source.get("params"), dict)), None)
    return {"path": run, "metrics": metrics, "evaluations": evaluations, "params": params,
            "seeds": sorted({s for per_seed in evaluations.values() for s in per_seed}),
            "class_names": class_names(run, metrics)}


def _refuse_other_experiment(first: dict, other: dict) -> None:
    """Runs on different data (dataset, class counts and ratio, class names, and the fingerprint of the
    images where both runs recorded one) or with different parameters are never merged."""
    why = None
    for key in ("dataset", "class_counts", "imbalance_ratio"):
        a, b = first["metrics"].get(key), other["metrics"].get(key)
        if a != b:
            why = f"different {key} ({_short(a)} vs {_short(b)})"
            break
    if why is None and first["class_names"] != other["class_names"]:
        label = next(i for i, (a, b) in enumerate(zip(first["class_names"], other["class_names"])) if a != b)
        why = (f"different class names (label {label}: {first['class_names'][label]!r} vs "
               f"{other['class_names'][label]!r})")
    prints = first["metrics"].get("data_fingerprint"), other["metrics"].get("data_fingerprint")
    if why is None and None not in prints and prints[0] != prints[1]:  # runs made before fingerprints: no check
        why = "different data: the images or labels differ (data fingerprints differ)"
    if why:
        raise CBDError(f"cannot merge {first['path']} and {other['path']}: {why}")
    for entry in (first, other):
        if entry["params"] is None:
            raise CBDError(f"cannot merge {entry['path']}: it records no parameters (no params.yaml, nor an "
                           f"aggregate's merged_from), so it cannot be checked to be the same experiment")
    detail = runs.parameter_differences(first["params"], other["params"], MERGEABLE_KEYS, "vs")
    if detail:
        raise CBDError(f"cannot merge {first['path']} and {other['path']}: different parameters ({detail})")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
