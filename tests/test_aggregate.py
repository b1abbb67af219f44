"""``cbdlib aggregate`` leaves a merged folder as complete as a run's: every seed's history, the
first seed's features and CBD-ENS model, notebook 04's figures, wall times and a reading that
agrees with the numbers."""
import json
import logging

import pytest
import yaml
from reliability_helpers import error_line, fake_run, run_main
from shared_runs import copy_run

from cbdlib import CBDError, pipeline, runs
from cbdlib import __main__ as cli
from cbdlib.analysis.reading import compare, reading_lines, verdict
from cbdlib.config import make_params, resolve
from cbdlib.engine import Experiment
from cbdlib.evaluate import evaluate_checkpoint
from cbdlib.pipeline import aggregate_runs
from cbdlib.runs import evaluation_path
from cbdlib.text import format_seconds

SMALL = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=2, decoupled_epochs=1, lws_epochs=1,
             batch_size=32, lr=0.05, warmup_epochs=1, teachers=["vanilla:1", "aug:1"], device="cpu", smoke=False,
             tsne_samples=100)


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory, digits):
    """Two finished run folders of one experiment, training seeds 1 and 2, with wall-time ledgers."""
    root = tmp_path_factory.mktemp("seeds")
    folders = []
    for seed in (1, 2):
        out = root / f"run_seed{seed}"
        settings = resolve(make_params({**SMALL, "seeds": [seed], "run_name": out.name}))
        out.mkdir()
        with runs.timed(out / runs.NOTEBOOK_TIMES, "total"):  # as cbdlib run times its notebooks
            Experiment(settings, out, data=digits, quiet=True).run("all")
        folders.append(out)
    return folders


def test_a_merged_folder_holds_history_features_one_model_figures_and_wall_times(seed_runs, tmp_path):
    a, b = seed_runs
    out = aggregate_runs([a, b], tmp_path / "merged")

    def keys(run):
        return {(r["model"], r["seed"], r["stage"], r["epoch"]) for r in runs.read_history(run)}

    assert keys(out) == keys(a) | keys(b) and {s for _, s, _, _ in keys(out)} == {1, 2}

    saved = sorted(p.name for p in (a / "features" / "seed_1").glob("*.npz"))
    assert saved and sorted(p.name for p in (out / "features" / "seed_1").glob("*.npz")) == saved
    for name in saved:
        assert (out / "features" / "seed_1" / name).read_bytes() == (a / "features" / "seed_1" / name).read_bytes()
    assert not (out / "features" / "seed_2").exists()

    # The first seed's CBD-ENS is the only model kept, and it scores what its run recorded.
    assert [p.name for p in out.rglob("*.pt")] == ["cbd_ens_seed1.pt"]
    assert (out / "cbd_ens_seed1.pt").read_bytes() == runs.checkpoint_path(a, 1, "cbd_ens").read_bytes()
    recorded = json.loads(runs.evaluation_path(a, 1, "cbd_ens").read_text())
    again = evaluate_checkpoint(out / "cbd_ens_seed1.pt", device="cpu")
    for key in ("all", "head", "mid", "tail"):
        assert again[key] == pytest.approx(recorded[key], abs=1e-9), key

    # Notebook 04 ran on the merged results.
    for figure in ("04_split_accuracy.png", "04_per_class_accuracy.png", "04_gain_vs_class_size.png", "04_tsne.png"):
        assert (out / "figures" / figure).stat().st_size > 1000, figure
    assert (out / "04_per_split_analysis.ipynb").exists()

    summary = (out / "summary.md").read_text()
    assert "## Reading" in summary and "## Saved model" in summary
    assert f"python -m cbdlib evaluate --checkpoint {out / 'cbd_ens_seed1.pt'}" in summary
    assert f"{100 * recorded['all']:.2f}%" in summary
    stage_sum = sum(runs.wall_times(run / runs.STAGE_TIMES)["teachers"]["s"] for run in (a, b))
    row = next(line for line in summary.splitlines() if line.startswith("| stage teachers |"))
    assert row.endswith(f"| {format_seconds(stage_sum)} |")  # summed over the seeds
    assert "| **total** |" in summary and "![04_tsne](figures/04_tsne.png)" in summary


def test_aggregating_again_keeps_the_notes_and_replaces_the_rest(seed_runs, tmp_path, capsys):
    a, b = seed_runs
    out = tmp_path / "merged"
    aggregate_runs([a, b], out, notebook=False)
    (out / "notes.md").write_text("Read with care: two seeds of a tiny model.\n")
    (out / "figures").mkdir()
    (out / "figures" / "stale.png").write_bytes(b"old")
    status = cli.main(["aggregate", str(a), str(b), "--out", str(out), "--no-notebook", "--keep-model", "none"])
    assert status == 0
    assert not (out / "figures").exists() and not list(out.glob("*.pt"))
    summary = (out / "summary.md").read_text()
    assert "## Notes" in summary and "Read with care: two seeds of a tiny model." in summary
    assert "## Saved model" not in summary


# --- the reading -------------------------------------------------------------------------------

def _metrics(means: dict, stds: dict) -> dict:
    return {"seeds": [1, 2, 3],
            "methods": {m: {"all": v[0], "tail": v[1], "few": None} for m, v in means.items()},
            "std": {m: {"all": v[0], "tail": v[1], "few": None} for m, v in stds.items()}}


def _per_seed(values: dict) -> dict:
    return {m: {s: {"all": v, "tail": v, "few": None} for s, v in enumerate(vs, 1)} for m, vs in values.items()}


def test_a_gap_counts_only_beyond_the_sum_of_the_two_stds():
    metrics = _metrics({"cbd_ens": (0.70, 0.66), "crt": (0.65, 0.65)}, {"cbd_ens": (0.01, 0.02), "crt": (0.02, 0.0)})
    evaluations = _per_seed({"cbd_ens": [0.69, 0.70, 0.71], "crt": [0.66, 0.65, 0.72]})
    overall = compare(metrics, evaluations, "cbd_ens", "crt", "all")
    assert overall["gap"] == pytest.approx(0.05) and overall["spread"] == pytest.approx(0.03)
    assert overall["beyond_spread"] and (overall["wins"], overall["losses"], overall["seeds"]) == (2, 1, 3)
    assert "CBD-ENS **beats** cRT overall by more than the seed spread" in verdict(overall)
    assert "+5.00 points against a spread of 3.00" in verdict(overall) and "higher in 2 of 3 seeds" in verdict(overall)
    tail = compare(metrics, evaluations, "cbd_ens", "crt", "tail")
    assert not tail["beyond_spread"] and "within the seed spread of cRT on the tail third" in verdict(tail)
    behind = compare(metrics, evaluations, "crt", "cbd_ens", "all")
    assert "cRT **trails** CBD-ENS overall" in verdict(behind)
    assert compare(metrics, evaluations, "cbd_ens", "crt", "few") is None  # a split without classes
    assert compare(metrics, evaluations, "cbd_ens", "lws", "all") is None  # not in the run


def test_the_reading_asks_against_the_best_baseline_the_teacher_ensemble_and_cbd():
    metrics = _metrics({"ce": (0.50, 0.10), "crt": (0.60, 0.60), "lws": (0.60, 0.62), "teacher_ensemble": (0.55, 0.2),
                        "cbd": (0.64, 0.6), "cbd_ens": (0.66, 0.64)},
                       {m: (0.0, 0.0) for m in ("ce", "crt", "lws", "teacher_ensemble", "cbd", "cbd_ens")})
    text = "\n".join(reading_lines(metrics, {}))
    assert "best by overall accuracy: cRT, `crt`" in text  # a tie goes to the first in table order
    assert "CBD-ENS **beats** teacher ensemble overall" in text
    assert "CBD-ENS **beats** CBD on the tail third" in text
    assert reading_lines({"seeds": [1], "methods": {"ce": {"all": 0.5}}, "std": {}}, {}) == []


def test_seeds_that_trained_in_different_precisions_are_merged_and_said_so(seed_runs, tmp_path, caplog):
    a, b = (copy_run(run, tmp_path / "runs") for run in seed_runs)
    metrics = json.loads((b / "metrics.json").read_text())
    metrics["precision"] = "bf16"  # as if seed 2 ran on a CPU where auto measured bf16 faster
    (b / "metrics.json").write_text(json.dumps(metrics))
    out = aggregate_runs([a, b], tmp_path / "merged", notebook=False)
    merged = json.loads((out / "metrics.json").read_text())
    assert [{k: e[k] for k in ("run", "seeds", "precision")} for e in merged["merged_from"]] == [
        {"run": "copy_of_run_seed1", "seeds": [1], "precision": "fp32"},
        {"run": "copy_of_run_seed2", "seeds": [2], "precision": "bf16"}]
    assert "different precisions" in caplog.text
    summary = (out / "summary.md").read_text()
    assert "- `copy_of_run_seed2`: seeds 2, precision bf16" in summary
    assert "the seeds trained in different precisions" in summary
    assert str(a.parent) not in summary  # sources by run name, not by the folders of the machine that ran them


# --- refusals ----------------------------------------------------------------------------------

def test_aggregate_refuses_an_unfinished_run_or_says_what_each_mean_covers(tmp_path, monkeypatch, capsys, caplog):
    # workbook.configure_logging (a notebook's setup run in process) stops propagation; caplog needs it.
    monkeypatch.setattr(logging.getLogger("cbdlib"), "propagate", True)
    done = fake_run(tmp_path, "seed1", [1], ["ce", "cbd"], ["ce", "cbd"])
    killed = fake_run(tmp_path, "seed2", [2], ["ce"], ["ce", "cbd"])  # killed before cbd finished
    out = tmp_path / "merged"
    status, err = run_main(cli.main, ["aggregate", str(done), str(killed), "--out", str(out)], capsys)
    assert status == 2
    assert error_line(err) == (f"error: cannot merge {killed}: the run is unfinished (no evaluation of cbd (seed 2)); "
                               f"finish it with the command that made it, or pass --partial to merge what there is "
                               f"(each mean then says how many seeds it covers)")
    assert not out.exists()

    with caplog.at_level(logging.INFO, logger="cbdlib.pipeline"):
        pipeline.aggregate_runs([done, killed], out, partial=True, notebook=False)  # fake records: no figures
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"]["ce"]["seeds"] == [1, 2] and metrics["methods"]["cbd"]["seeds"] == [1]
    assert metrics["partial"] == {"cbd": [1]}
    assert "warning: partial merge: cbd is the mean of 1 of 2 seeds (1)" in caplog.text
    assert "**partial merge** (`--partial`): `cbd` is the mean of 1 of 2 seeds (1)" in (out / "summary.md").read_text()


def test_a_run_made_before_a_schema_field_existed_merges_with_one_that_states_its_default(tmp_path):
    old = fake_run(tmp_path, "seed1", [1], ["ce"], ["ce"])
    new = fake_run(tmp_path, "seed2", [2], ["ce"], ["ce"])
    stored = yaml.safe_load((old / "params.yaml").read_text())
    del stored["zero_init_residual"]  # as in a params.yaml written before the field was added
    (old / "params.yaml").write_text(yaml.safe_dump(stored))
    out = pipeline.aggregate_runs([old, new], tmp_path / "merged", notebook=False)
    assert json.loads((out / "metrics.json").read_text())["seeds"] == [1, 2]
    stored["epochs"] = 7  # a real difference is still refused
    (old / "params.yaml").write_text(yaml.safe_dump(stored))
    with pytest.raises(CBDError, match=r"different parameters \(epochs: 7 vs 200\)"):
        pipeline.aggregate_runs([old, new], tmp_path / "again", notebook=False)


def test_aggregate_names_a_damaged_evaluation(tmp_path):
    run = fake_run(tmp_path, "r", [1], ["ce"], ["ce"])
    evaluation_path(run, 1, "ce").write_bytes(b"\x00\xff garbage")
    with pytest.raises(CBDError, match=r"^.*/evaluations/seed_1/ce.json is damaged \(not valid JSON: .*\); delete it "
                                       r"and rerun the stage that wrote it"):
        pipeline.aggregate_runs([run], tmp_path / "out")
