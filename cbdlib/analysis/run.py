"""The analyses of a run folder: computed per seed from its checkpoints, merged into ``metrics.json``.

Per seed, ``analyses/seed_<s>/<model>.json`` holds the probes of every model with a backbone of
its own (teachers, one-stage baselines, CBD students; the decoupled methods stand on ``ce``'s
backbone) and ``analyses/seed_<s>/teacher_agreement.json`` the students' agreement with their
teachers. A file newer than the checkpoints it reads is kept, so a resumed run or a second call
computes only what is missing. The calibration of every method is part of its evaluation record
(``ece``, ``reliability``), computed from its test logits where they are made.

``add_analyses`` turns these per-seed records into ``metrics.json``'s ``probes`` / ``probes_std``,
``ece`` / ``ece_std`` and ``teacher_agreement`` (mean and std over seeds), never under ``methods``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CBDError
from ..io import write_json
from ..methods import ONE_STAGE_BASELINES, STUDENTS, is_teacher, method_order
from ..metrics import ACCURACY_KEYS, AGREEMENT
from ..runs.records import checkpoint_path, evaluation_path, load_evaluations
from .agreement import ensemble_gain, pairwise_agreement, student_cosine
from .calibration import ECE_DEFINITION, calibration_record
from .probes import PROBE_SETTINGS, probe_record

log = logging.getLogger("cbdlib")


def analysis_path(out: Path, seed: int, name: str) -> Path:
    return Path(out) / "analyses" / f"seed_{seed}" / f"{name}.json"


def has_own_backbone(name: str) -> bool:
    """Whether ``name`` trains a backbone (probed) rather than re-using ``ce``'s."""
    return name in ONE_STAGE_BASELINES or name in STUDENTS or is_teacher(name)


def _fresh(path: Path, sources: list[Path]) -> bool:
    return path.exists() and all(path.stat().st_mtime >= s.stat().st_mtime for s in sources if s.exists())


class _Outputs:
    """(train features, test features, test logits) of a seed's models, each computed once."""

    def __init__(self, out: Path, seed: int, data, load: Callable, predict: Callable):
        self.out, self.seed, self.data, self.load, self.predict = out, seed, data, load, predict
        self.cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        if (name, split) not in self.cache:
            model = self.load(checkpoint_path(self.out, self.seed, name))
            for part in ("train", "test") if split == "train" else ("test",):
                self.cache[(name, part)] = self.predict(model, part)
        return self.cache[(name, split)]


def analyse_seed(out: Path, seed: int, data, load: Callable, predict: Callable) -> list[str]:
    """Compute the missing analyses of one seed; returns what was computed.

    ``load(checkpoint path) -> model``; ``predict(model, "train" | "test") -> (features, logits)``
    on the unaugmented images of ``data`` (a ``LongTailData``)."""
    out = Path(out)
    evaluations = {m: per_seed[seed] for m, per_seed in load_evaluations(out).items() if seed in per_seed}
    outputs = _Outputs(out, seed, data, load, predict)
    done = []
    models = [m for m in method_order(evaluations) if has_own_backbone(m) and checkpoint_path(out, seed, m).exists()]
    for name in models:
        path = analysis_path(out, seed, name)
        if _fresh(path, [checkpoint_path(out, seed, name)]):
            continue
        train_features, _ = outputs(name, "train")
        test_features, _ = outputs(name, "test")
        record = probe_record(train_features, data.train_labels, test_features, data.test_labels, data.splits,
                              data.num_classes, seed)
        write_json(path, {"model": name, "seed": seed, **record, "settings": PROBE_SETTINGS})
        done.append(f"probes of {name}")
    done += _missing_calibration(out, seed, evaluations, outputs, data)
    done += _agreement(out, seed, evaluations, outputs, data)
    return done


def _missing_calibration(out: Path, seed: int, evaluations: dict, outputs, data) -> list[str]:
    """ECE of evaluations written before calibration was recorded (models with a checkpoint, and
    the teacher ensemble from its members)."""
    done = []
    for method, record in evaluations.items():
        if "ece" in record:
            continue
        members = record.get("members") if method == "teacher_ensemble" else [method]
        if not members or not all(checkpoint_path(out, seed, m).exists() for m in members):
            continue
        logits = np.mean([outputs(m, "test")[1] for m in members], axis=0)
        record.update(calibration_record(logits, data.test_labels, data.splits))
        write_json(evaluation_path(out, seed, method), record)
        done.append(f"calibration of {method}")
    return done


def _agreement(out: Path, seed: int, evaluations: dict, outputs, data) -> list[str]:
    """Students against their teachers' target; teachers' pairwise agreement and ensemble gain."""
    students = {m: evaluations[m].get("teachers") or [] for m in STUDENTS if m in evaluations}
    teachers = sorted({t for m, ts in students.items() for t in ts}
                      | {m for m in evaluations if is_teacher(m)})
    teachers = [t for t in teachers if checkpoint_path(out, seed, t).exists()]
    students = {m: ts for m, ts in students.items() if ts and checkpoint_path(out, seed, m).exists()
                and all(t in teachers for t in ts)}
    if not teachers:
        return []
    path = analysis_path(out, seed, AGREEMENT)
    if _fresh(path, [checkpoint_path(out, seed, m) for m in [*teachers, *students]]
              + [evaluation_path(out, seed, "teacher_ensemble")]):
        return []
    labels, splits, c = data.test_labels, data.splits, data.num_classes
    record = {"seed": seed, "teachers": teachers,
              "student_cosine": {m: {**student_cosine(outputs(m, "test")[0], [outputs(t, "test")[0] for t in ts],
                                                      labels, splits, c), "teachers": ts}
                                 for m, ts in students.items()},
              "pairwise_agreement": pairwise_agreement({t: outputs(t, "test")[1].argmax(1) for t in teachers},
                                                       labels, splits, c),
              "ensemble_gain": ensemble_gain(evaluations, teachers)}
    write_json(path, record)
    return ["teacher agreement"]


# --------------------------------------------------------------------------- into metrics.json


def load_analyses(*run_dirs: Path) -> dict[str, dict[int, dict]]:
    """``{name: {seed: record}}`` of every per-seed analysis file of one run folder, or of several
    (an aggregate's inputs: their seeds are distinct)."""
    found: dict[str, dict[int, dict]] = {}
    for path in [p for out in run_dirs for p in sorted(Path(out).glob("analyses/seed_*/*.json"))]:
        try:
            seed = int(path.parent.name.split("_", 1)[1])
            found.setdefault(path.stem, {})[seed] = json.loads(path.read_text())
        except (ValueError, json.JSONDecodeError):
            log.warning("warning: %s is damaged; it is left out (delete it to recompute it)", path)
    return found


def _mean_std(records: list, keys) -> tuple[dict, dict]:
    mean, std = {}, {}
    for key in keys:
        values = [r[key] for r in records if r and r.get(key) is not None]
        mean[key] = float(np.mean(values)) if values else None
        std[key] = (float(np.std(values)) if len(values) > 1 else 0.0) if values else None
    return mean, std


def _mean_per_class(records: list) -> list:
    rows = [r["per_class"] for r in records if r and r.get("per_class")]
    if not rows:
        return []
    return [float(np.mean(v)) if (v := [row[c] for row in rows if row[c] is not None]) else None
            for c in range(len(rows[0]))]


def add_analyses(metrics: dict, evaluations: dict, analyses: dict) -> dict:
    """``metrics`` with ``probes``, ``ece`` and ``teacher_agreement`` (mean, std over its seeds)."""
    seeds = set(metrics.get("seeds", []))
    probes, probes_std = {}, {}
    for name in method_order(n for n in analyses if has_own_backbone(n)):
        records = [r for s, r in sorted(analyses[name].items()) if s in seeds]
        if records:
            probes[name], probes_std[name] = {}, {}
            for kind in ("linear", "ncm"):
                probes[name][kind], probes_std[name][kind] = _mean_std([r[kind] for r in records], ACCURACY_KEYS)
    if probes:
        metrics.update(probes=probes, probes_std=probes_std, probe_settings=PROBE_SETTINGS)
    ece, ece_std = {}, {}
    for method in metrics.get("methods", {}):
        records = [r["ece"] for s, r in sorted(evaluations.get(method, {}).items()) if s in seeds and "ece" in r]
        if records:
            ece[method], ece_std[method] = _mean_std(records, ACCURACY_KEYS)
    if ece:
        metrics.update(ece=ece, ece_std=ece_std, ece_definition=ECE_DEFINITION)
    agreement = [r for s, r in sorted(analyses.get(AGREEMENT, {}).items()) if s in seeds]
    if agreement:
        metrics[AGREEMENT] = merge_agreement(agreement)
    return metrics


def merge_agreement(records: list) -> dict:
    """Mean and std over seeds of the per-seed teacher-agreement records."""
    out: dict = {"seeds": [r["seed"] for r in records], "teachers": records[0]["teachers"], "student_cosine": {}}
    for student in sorted({m for r in records for m in r["student_cosine"]}, key=STUDENTS.index):
        rows = [r["student_cosine"].get(student) for r in records]
        mean, std = _mean_std(rows, ACCURACY_KEYS)
        out["student_cosine"][student] = {**mean, "std": std, "per_class": _mean_per_class(rows),
                                          "teachers": next(r["teachers"] for r in rows if r)}
    rows = [r["pairwise_agreement"] for r in records if r["pairwise_agreement"]]
    if rows:
        mean, std = _mean_std(rows, ACCURACY_KEYS)
        pairs = {p: float(np.mean([r["pairs"][p] for r in rows if p in r["pairs"]])) for p in rows[0]["pairs"]}
        out["pairwise_agreement"] = {**mean, "std": std, "per_class": _mean_per_class(rows), "pairs": pairs}
    rows = [r["ensemble_gain"] for r in records if r["ensemble_gain"]]
    if rows:
        mean, std = _mean_std(rows, ACCURACY_KEYS)
        out["ensemble_gain"] = {**mean, "std": std, "best_member": [r["best_member"] for r in rows]}
    return out


def needs_analysis(run_dir: Path) -> bool:
    """Whether a finished model of the folder lacks its probes or an evaluation its calibration
    (without loading any data)."""
    for method, per_seed in load_evaluations(run_dir).items():
        for seed, record in per_seed.items():
            checkpoint = checkpoint_path(run_dir, seed, method)
            if not checkpoint.exists():
                continue
            if "ece" not in record or (has_own_backbone(method)
                                       and not _fresh(analysis_path(run_dir, seed, method), [checkpoint])):
                return True
    return False


def analyse_folder(run_dir: str | Path, device: str = "auto") -> list[str]:
    """Compute a finished run folder's missing analyses from its checkpoints and write them into its
    ``metrics.json`` (notebook 04 and ``aggregate`` call it on runs made before the analyses existed).

    The data are rebuilt from ``params.yaml``; a folder without checkpoints keeps what it has."""
    from ..checkpoint import load_model
    from ..config import make_params, resolve
    from ..data import load_for_settings
    from ..data.device import predict
    from ..devices import resolve_device
    from ..metrics import validate_metrics
    from ..runs import read_params_yaml

    run_dir = Path(run_dir)
    if not needs_analysis(run_dir):
        return []
    params = read_params_yaml(run_dir)
    if params is None:
        raise CBDError(f"{run_dir} has checkpoints but no params.yaml: its data cannot be rebuilt for the analyses")
    settings = resolve(make_params(params))
    data = load_for_settings(settings)
    if getattr(data, "streaming", False):
        log.info("%s streams large images: probes and agreement are not computed after the fact", run_dir)
        return []
    dev = resolve_device(device)
    identity = {"num_classes": data.num_classes, "class_counts": data.class_counts}
    images = {"train": data.train_images, "test": data.test_images}
    done = []
    evaluations = load_evaluations(run_dir)
    for seed in sorted({s for per_seed in evaluations.values() for s in per_seed}):
        done += analyse_seed(run_dir, seed, data, lambda path: load_model(path, identity, dev),
                             lambda model, split: predict(model, images[split], data.mean, data.std, dev,
                                                          settings.eval_batch_size))
    if done and (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics = add_analyses(metrics, load_evaluations(run_dir), load_analyses(run_dir))
        validate_metrics(metrics)
        write_json(run_dir / "metrics.json", metrics)
    return done


def reliability_records(run_dir: str | Path, seed: int, methods) -> dict:
    """``{label: evaluation record}`` of ``methods`` that recorded their reliability bins (notebook 04)."""
    from ..methods import method_label

    found = {}
    for method in methods or ():
        path = evaluation_path(Path(run_dir), seed, method)
        record = json.loads(path.read_text()) if path.exists() else {}
        if "reliability" in record:
            found[f"{method_label(method)} (seed {seed})"] = record
    if not found:
        print("note: no reliability bins recorded in this run, so the reliability diagrams are skipped")
    return found
