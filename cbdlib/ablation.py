"""``python -m cbdlib ablate RUN_DIR``: CBD-ENS students with one setting changed, on a finished run's teachers.

Varies alpha (0, 0.4, 0.8), beta (10, 100), the teachers (1 vanilla / 2 vanilla / all)
and the projection (with / without), one seed, a short schedule: every row is labelled
with what it changed and how long it trained. Rows go to ``RUN_DIR/ablation/`` and never
into ``metrics.json``, whose methods are the full-schedule results.
"""
from __future__ import annotations

from pathlib import Path

from . import runs
from .config import Settings, make_params, resolve
from .errors import CBDError
from .io import write_json, write_text
from .methods import parse_teacher_name, student_teachers
from .metrics import ACCURACY_KEYS, accuracy_record
from .param_rules import ParameterError

SPLIT_COLUMNS = ACCURACY_KEYS


def variants(settings: Settings) -> list[tuple[str, dict]]:
    """(label, changes) pairs; the paper's setting comes first and is not repeated."""
    teachers = settings.teacher_names
    vanilla = [n for n in teachers if parse_teacher_name(n)[0] == "vanilla"]
    rows = [("paper (alpha 0.4, beta 100, all teachers, projection)", {}),
            ("alpha 0 (no distillation)", {"alpha": 0.0}),
            ("alpha 0.8", {"alpha": 0.8}),
            ("beta 10", {"beta": 10.0}),
            ("1 vanilla teacher (CBD)", {"teachers": student_teachers("cbd", teachers)})]
    if len(vanilla) >= 2 and len(vanilla) < len(teachers):
        rows.append(("2 vanilla teachers", {"teachers": vanilla[:2]}))
    rows.append(("no projection", {"projection": False}))
    return rows


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.split(" (")[0].lower()).strip("_")


def run_ablation(run_dir: str | Path, epochs: int | None = None, seed: int | None = None, quiet: bool | None = None,
                 overwrite: bool = False, device: str | None = None) -> dict:
    """Train the ablation rows on a run's teachers into ``RUN_DIR/ablation/``.

    ``epochs`` (default: a quarter of the run's, at least 1) and ``seed`` (default: the first)
    are checked before anything is trained. Students of another schedule already in the folder
    are refused unless ``overwrite`` (which replaces ``ablation/`` only, never the run).
    ``device`` replaces the run's own (a run made on a GPU, ablated on a CPU).
    """
    import shutil

    from .engine import Experiment
    from .engine.loop import init_model
    from .seeding import derive_seed

    run_dir = Path(run_dir)
    stored = runs.read_params_yaml(run_dir)
    if stored is None:
        raise CBDError(f"{run_dir} is not a run folder (no params.yaml); train its teachers first")
    if device is not None:
        stored = {**stored, "device": device}
    try:
        settings = resolve(make_params(stored))
    except ParameterError as error:
        flag = " (pass --device to choose another)" if error.key == "device" else ""
        raise CBDError(f"{run_dir}/params.yaml: {error}{flag}") from None
    if epochs is not None and (isinstance(epochs, bool) or epochs < 1):
        raise CBDError(f"--epochs must be >= 1 (epochs per ablation student), got {epochs}")
    epochs = max(1, settings.epochs // 4) if epochs is None else epochs
    seed = settings.seeds[0] if seed is None else seed
    if seed not in settings.seeds:
        raise CBDError(f"--seed {seed}: {run_dir} has training seeds {settings.seeds}")
    out = run_dir / "ablation"
    with runs.run_lock(runs.ensure_run_dir(run_dir)):  # one writer: no training of the run beside it
        if overwrite:
            shutil.rmtree(out, ignore_errors=True)
        _refuse_other_students(out / "checkpoints" / f"seed_{seed}", epochs)
        exp = Experiment(settings, run_dir, quiet=quiet)
        # The run's teachers loaded once (a missing one stops here, before any row trains); frozen, rows share them.
        loaded = dict(zip(exp.teacher_names(), exp.frozen_teachers(exp.teacher_names(), seed)))
        rows, plans = [], []
        for label, changes in variants(settings):
            changes = dict(changes)
            names = changes.pop("teachers", exp.teacher_names())
            slug = _slug(label)
            job = exp.student_job(f"ablation_{slug}", seed, names, epochs=epochs, **changes)
            plans.append((label, names, changes.get("projection", settings.projection), job, slug))
        for label, names, projection, job, slug in plans:
            model = init_model(job.spec, derive_seed("cbd_ens", seed))  # the same start for every row
            model = exp.train(job, model, "ablation", teachers=[loaded[name] for name in names],
                              checkpoint_path=out / "checkpoints" / f"seed_{seed}" / f"{slug}.pt",
                              history_path=out / "history.jsonl")
            record = accuracy_record(exp.predict(model, "test")[1], exp.data.test_labels, exp.splits)
            record.pop("confusion")
            row = {"variant": label, "alpha": job.alpha, "beta": job.beta, "teachers": names,
                   "projection": projection, "epochs": epochs, "seed": seed, **record}
            write_json(out / f"{slug}.json", row)
            rows.append(row)
        result = {"run": str(run_dir), "seed": seed, "epochs": epochs, "full_epochs": settings.epochs, "rows": rows}
        write_json(out / "ablation.json", result)
        write_text(out / "ablation.md", ablation_markdown(result))
    return result


def _refuse_other_students(folder: Path, epochs: int) -> None:
    """Students of another ``--epochs`` in the ablation folder are refused before anything is written."""
    from . import checkpoint as ckpt

    for path in sorted(folder.glob("*.pt")):
        if path.name.endswith(".prev.pt"):
            continue
        made = (ckpt.load_checkpoint(path, fallback=True)["meta"].get("job") or {}).get("epochs")
        if made != epochs:
            unit = "epoch" if made == 1 else "epochs"
            raise CBDError(f"{folder.parent.parent} holds students of {made} {unit}, not {epochs}; "
                           f"rerun with --epochs {made} to finish them, or with --overwrite to replace them "
                           f"(the run itself is kept)")


def ablation_markdown(result: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [f"Ablation of CBD-ENS: seed {result['seed']}, {result['epochs']} epochs per student "
             f"(short schedule; the full runs use {result['full_epochs']}), teachers from the run's stage 1.",
             "Without a projection the student distils the normalised mean of the teachers' normalised features.", "",
             "| variant | alpha | beta | teachers | projection | " + " | ".join(SPLIT_COLUMNS) + " |",
             "|---|---|---|---|---|" + "---|" * len(SPLIT_COLUMNS)]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['alpha']:g} | {r['beta']:g} | {len(r['teachers'])} | "
                     f"{'yes' if r['projection'] else 'no'} | " + " | ".join(pct(r[k]) for k in SPLIT_COLUMNS) + " |")
    return "\n".join(lines) + "\n"
