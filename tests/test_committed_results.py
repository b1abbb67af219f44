"""The committed CIFAR-10-LT CPU record (results/cifar10_lt_ir100_cpu/) agrees with itself, with
its seed folders and with the README, and its saved model re-evaluates to the recorded number."""
import json
import re
from pathlib import Path

import pytest

from cbdlib.commands.main import main as cli_main
from cbdlib.config import all_method_names
from cbdlib.metrics import ACCURACY_KEYS, validate_metrics

ROOT = Path(__file__).resolve().parent.parent
MERGED = ROOT / "results" / "cifar10_lt_ir100_cpu"
SEEDS = (1, 2, 3)
# CIFAR-10-LT, imbalance ratio 100: n_i = int(5000 * (1/100) ** (i/9)).
IR100_COUNTS = [int(5000 * (1 / 100) ** (i / 9)) for i in range(10)]


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def percent(mean, std) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def test_the_merged_record_holds_three_real_seeds_of_every_method():
    metrics = metrics_of(MERGED)
    validate_metrics(metrics)
    assert metrics["dataset"] == "cifar10" and metrics["class_counts"] == IR100_COUNTS
    # Every method of the contract, ldam_drw, ce_drw and logit_adjust included.
    assert set(metrics["methods"]) == set(all_method_names(["vanilla:1", "vanilla:2", "aug:1", "aug:2"]))
    assert metrics["seeds"] == list(SEEDS)
    assert all(record["seeds"] == list(SEEDS) for record in metrics["methods"].values())
    assert [source["run"] for source in metrics["merged_from"]] == [f"cifar10_lt_ir100_cpu_seed{s}" for s in SEEDS]
    assert {source["precision"] for source in metrics["merged_from"]} == {"fp32"}


def test_every_crt_and_lws_epoch_of_the_record_is_n_images():
    """Kang et al.'s loop stops a class-aware epoch after int(N / batch) steps: 12,406 // 128 = 96."""
    lines = (MERGED / "history.jsonl").read_text().splitlines()
    decoupled = [json.loads(line) for line in lines if '"stage": "decoupled"' in line]
    assert {(r["model"], r["seed"]) for r in decoupled} == {(m, s) for m in ("crt", "lws") for s in SEEDS}
    assert len(decoupled) == 3 * (10 + 5)  # decoupled_epochs 10, lws_epochs 5, per seed
    assert {r["steps"] for r in decoupled} == {sum(IR100_COUNTS) // 128} == {96}


def test_the_record_holds_the_analyses_and_its_summary_reads_them():
    metrics = metrics_of(MERGED)
    backbones = {"ce", "ce_cb", "balanced_softmax", "ce_drw", "ldam_drw", "cbd", "cbd_ens",
                 "teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2"}
    assert set(metrics["probes"]) == backbones
    for model, record in metrics["probes"].items():
        for probe in ("linear", "ncm"):
            assert 0.0 <= record[probe]["all"] <= 1.0 and metrics["probes_std"][model][probe]["all"] is not None
    assert set(metrics["ece"]) == set(metrics["methods"])
    assert all(0.0 <= record["all"] <= 1.0 for record in metrics["ece"].values())
    summary = (MERGED / "summary.md").read_text()
    assert "under the same linear probe" in summary and "ECE" in summary
    # airplane keeps its whole pool, so its validation images are training images: the record says so
    assert metrics["val_overlap"]["classes"] == [0] and "validation images are also training images" in summary


def test_the_merged_mean_and_std_are_those_of_the_committed_seed_folders():
    merged = metrics_of(MERGED)
    seeds = [metrics_of(ROOT / "results" / f"cifar10_lt_ir100_cpu_seed{s}") for s in SEEDS]
    assert {m["git_commit"] for m in seeds} == {merged["git_commit"]}  # all seeds from one commit
    for method, record in merged["methods"].items():
        for key in ACCURACY_KEYS:
            values = [m["methods"][method][key] for m in seeds]
            if None in values:
                assert record[key] is None and merged["std"][method][key] is None
                continue
            mean = sum(values) / 3
            std = (sum((v - mean) ** 2 for v in values) / 3) ** 0.5
            assert record[key] == pytest.approx(mean, abs=1e-9), (method, key)
            assert merged["std"][method][key] == pytest.approx(std, abs=1e-9), (method, key)


def test_summary_and_readme_show_the_numbers_of_metrics_json():
    metrics = metrics_of(MERGED)
    summary = (MERGED / "summary.md").read_text()
    readme = (ROOT / "README.md").read_text()
    results = readme[readme.index("## Results: CIFAR-10-LT"):]
    results = results[:results.index("\n## ", 1)]
    shown_in_readme = set()
    for method, record in metrics["methods"].items():
        std = metrics["std"][method]
        row = next(line for line in summary.splitlines() if line.startswith(f"| `{method}` |"))
        for key in ("all", "many", "medium", "head", "mid", "tail"):
            assert percent(record[key], std[key]) in row, (method, key, row)
        readme_row = re.search(rf"^\| \*?\*?`{method}`.*$", results, flags=re.M)
        if readme_row:
            shown_in_readme.add(method)
            for key in ("all", "head", "mid", "tail"):
                assert percent(record[key], std[key]) in readme_row.group(0), (method, key)
    assert shown_in_readme == {"ce", "ce_cb", "balanced_softmax", "ce_drw", "ldam_drw", "logit_adjust", "crt",
                               "teacher_ensemble", "cbd", "cbd_ens"}
    assert "the only checkpoint kept here" in summary and (MERGED / "cbd_ens_seed1.pt").is_file()
    assert sorted(p.name for p in MERGED.glob("*.pt")) == ["cbd_ens_seed1.pt"]


@pytest.mark.slow
def test_the_saved_model_reevaluates_to_the_recorded_seed_one_accuracy(cifar10_cache, monkeypatch, capsys):
    monkeypatch.setenv("CBD_CACHE_DIR", str(cifar10_cache))
    recorded = json.loads((MERGED / "evaluations" / "seed_1" / "cbd_ens.json").read_text())
    capsys.readouterr()
    assert cli_main(["evaluate", "--checkpoint", str(MERGED / "cbd_ens_seed1.pt"), "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("all", "head", "mid", "tail", "many", "medium"):
        assert printed[key] == pytest.approx(recorded[key], abs=1e-6), key
    quoted = re.search(r"cbd_ens_seed1\.pt +# ([\d.]+) % \(seed 1\)", (ROOT / "README.md").read_text())
    assert quoted and f"{100 * printed['all']:.2f}" == quoted.group(1)  # the number the README quotes
