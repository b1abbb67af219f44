"""metrics.json: the validator refuses what the contract forbids, and seeds are merged into the
right mean and (population) standard deviation, with a split that has no class kept null.

Expected numbers are written out by hand from the per-seed values below.
"""
import copy
import dataclasses
import json
import math

import pytest
import yaml

from cbdlib import CBDError, config, pipeline, runs
from cbdlib.__main__ import main as cli_main
from cbdlib.data.stats import class_splits
from cbdlib.metrics import aggregate_records, split_accuracy, validate_metrics

# Five classes, none with fewer than 20 images: the few-shot split is empty (null everywhere).
COUNTS = [150, 120, 90, 60, 40]
SPLITS = class_splits(COUNTS)
# Per-class test accuracy of one method for training seeds 1, 2, 3, and its overall top-1.
PER_CLASS = {1: [0.9, 0.6, 0.2, 0.1, 0.0], 2: [0.8, 0.6, 0.5, 0.0, 0.3], 3: [0.4, 0.3, 0.2, 0.2, 0.0]}
TOP1 = {1: 0.40, 2: 0.46, 3: 0.25}
PROV = {"device": "cpu (test)", "torch": "2.x", "git_commit": "abc123"}


def population_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def record(seed, method="cbd_ens"):
    per_class = PER_CLASS[seed]
    out = {"all": TOP1[seed], "per_class": list(per_class), "method": method, "seed": seed}
    out.update({name: split_accuracy(per_class, classes) for name, classes in SPLITS.items()})
    return out


def three_seed_metrics():
    evaluations = {"cbd_ens": {s: record(s) for s in (1, 2, 3)}}
    return runs.build_metrics(evaluations, dataset="cifar10", imbalance_ratio=3.75, class_counts=COUNTS,
                              splits=SPLITS, seeds=[1, 2, 3], prov=PROV)


# --------------------------------------------------------------------------- aggregation


def test_the_splits_of_this_example():
    assert SPLITS["many"] == [0, 1] and SPLITS["medium"] == [2, 3, 4] and SPLITS["few"] == []
    assert SPLITS["head"] == [0, 1] and SPLITS["mid"] == [2, 3] and SPLITS["tail"] == [4]


def test_three_seeds_give_the_mean_and_population_std_of_each_number():
    mean, std = aggregate_records([record(s) for s in (1, 2, 3)])
    assert mean["all"] == pytest.approx(0.37) and std["all"] == pytest.approx(population_std([0.40, 0.46, 0.25]))
    assert std["all"] == pytest.approx(math.sqrt((0.03**2 + 0.09**2 + 0.12**2) / 3))
    # many = classes 0 and 1: per seed 0.75, 0.70, 0.35
    assert mean["many"] == pytest.approx(0.6) and std["many"] == pytest.approx(population_std([0.75, 0.70, 0.35]))
    # tail = class 4 alone: 0.0, 0.3, 0.0
    assert mean["tail"] == pytest.approx(0.1) and std["tail"] == pytest.approx(math.sqrt(0.02))
    assert mean["per_class"] == pytest.approx([0.7, 0.5, 0.3, 0.1, 0.1])
    assert std["per_class"][0] == pytest.approx(math.sqrt((0.2**2 + 0.1**2 + 0.3**2) / 3))  # not the n-1 std
    assert std["per_class"][0] != pytest.approx(math.sqrt((0.2**2 + 0.1**2 + 0.3**2) / 2))
    assert std["per_class"][1] == pytest.approx(population_std([0.6, 0.6, 0.3]))


def test_a_split_without_classes_stays_null_in_mean_and_std():
    mean, std = aggregate_records([record(s) for s in (1, 2, 3)])
    assert mean["few"] is None and std["few"] is None
    metrics = three_seed_metrics()
    validate_metrics(metrics)
    assert metrics["methods"]["cbd_ens"]["few"] is None and metrics["std"]["cbd_ens"]["few"] is None
    assert metrics["methods"]["cbd_ens"]["seeds"] == [1, 2, 3]


def test_one_seed_has_std_zero_and_a_class_without_test_images_stays_null():
    one = record(1)
    one["per_class"][3] = None  # no test image of class 3
    mean, std = aggregate_records([one])
    assert mean["all"] == 0.40 and std["all"] == 0.0 and std["many"] == 0.0
    assert mean["per_class"][3] is None and std["per_class"][3] is None
    two = record(2)
    two["per_class"][3] = None
    mean, std = aggregate_records([one, two])
    assert mean["per_class"][3] is None and mean["per_class"][0] == pytest.approx(0.85)


def make_run(root, name, seed):
    """A finished run folder of one training seed, as ``cbdlib.train`` leaves it."""
    run = root / name
    runs.save_evaluation(run, seed, "cbd_ens", record(seed))
    params = dataclasses.asdict(config.make_params({"run_name": name, "dataset": "cifar10", "seeds": [seed],
                                                       "methods": ["cbd_ens"]}))
    (run / "params.yaml").write_text(yaml.safe_dump(params))
    metrics = runs.build_metrics({"cbd_ens": {seed: record(seed)}}, dataset="cifar10", imbalance_ratio=3.75,
                                 class_counts=COUNTS, splits=SPLITS, seeds=[seed], prov=PROV)
    runs.write_metrics(run, metrics, [f"c{i}" for i in range(5)])
    return run


def test_cbdlib_aggregate_over_three_runs_writes_the_mean_and_std_of_the_seeds(tmp_path, capsys):
    folders = [str(make_run(tmp_path, f"seed{s}", s)) for s in (1, 2, 3)]
    assert cli_main(["aggregate", *folders, "--out", str(tmp_path / "merged"), "--no-notebook"]) == 0
    metrics = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    validate_metrics(metrics)
    got, std = metrics["methods"]["cbd_ens"], metrics["std"]["cbd_ens"]
    assert metrics["seeds"] == [1, 2, 3] and got["seeds"] == [1, 2, 3]
    assert got["all"] == pytest.approx(0.37) and std["all"] == pytest.approx(population_std([0.40, 0.46, 0.25]))
    assert got["medium"] == pytest.approx(((0.2 + 0.1 + 0.0) / 3 + (0.5 + 0.0 + 0.3) / 3 + (0.2 + 0.2 + 0.0) / 3) / 3)
    assert got["few"] is None and std["few"] is None
    assert got["per_class"] == pytest.approx([0.7, 0.5, 0.3, 0.1, 0.1])
    assert std["per_class"] == pytest.approx([population_std([r[c] for r in PER_CLASS.values()]) for c in range(5)])
    summary = (tmp_path / "merged" / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| `cbd_ens` |"))
    assert "37.00 ± 8.83" in row and "n/a" in row


# --------------------------------------------------------------------------- the validator


def test_a_valid_object_passes_and_a_non_object_is_refused():
    validate_metrics(three_seed_metrics())
    with pytest.raises(CBDError, match="holds list, not a JSON object"):
        validate_metrics([])


def _broken(change):
    metrics = copy.deepcopy(three_seed_metrics())  # build_metrics keeps SPLITS itself: change a copy
    change(metrics)
    return metrics


def _set(path, value):
    def change(metrics):
        target = metrics
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _delete(path):
    def change(metrics):
        target = metrics
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


BAD = [
    ("no device", _delete(["device"]), r"lacks 'device'"),
    ("no std at all", _delete(["std"]), r"lacks 'std'"),
    ("a method without its tail", _delete(["methods", "cbd_ens", "tail"]), r"method cbd_ens lacks 'tail'"),
    ("accuracy above 1", _set(["methods", "cbd_ens", "all"], 1.5), r"cbd_ens.all = 1.5 is not a fraction"),
    ("a percentage", _set(["methods", "cbd_ens", "many"], 60.0), r"cbd_ens.many = 60.0 is not a fraction"),
    ("negative", _set(["methods", "cbd_ens", "head"], -0.1), r"cbd_ens.head = -0.1 is not a fraction"),
    ("NaN", _set(["methods", "cbd_ens", "all"], float("nan")), r"cbd_ens.all = nan is not a fraction"),
    ("text", _set(["methods", "cbd_ens", "all"], "0.4"), r"cbd_ens.all = '0.4' is not a fraction"),
    ("a boolean", _set(["methods", "cbd_ens", "mid"], True), r"cbd_ens.mid = True is not a fraction"),
    ("an empty split with a number", _set(["methods", "cbd_ens", "few"], 0.0),
     r"cbd_ens.few = 0.0, but the few split has no class \(null expected\)"),
    ("per class too short", _set(["methods", "cbd_ens", "per_class"], [0.5] * 4), r"per_class has 4 entries, not 5"),
    ("per class out of range", _set(["methods", "cbd_ens", "per_class"], [0.5, 0.5, 2.0, 0.5, 0.5]),
     r"cbd_ens.per_class\[2\] = 2.0 is not a fraction"),
    ("no std of a method", _delete(["std", "cbd_ens"]), r"no std for cbd_ens"),
    ("std without a key", _delete(["std", "cbd_ens", "many"]), r"std of cbd_ens lacks 'many'"),
    ("negative std", _set(["std", "cbd_ens", "all"], -0.01), r"std cbd_ens.all = -0.01 is not a standard deviation"),
    ("NaN std per class", _set(["std", "cbd_ens", "per_class"], [0.1, float("nan"), 0.0, 0.0, 0.0]),
     r"non-finite value in metrics.std.cbd_ens.per_class\[1\]"),
    ("a split list missing", _delete(["splits", "tail"]), r"splits lacks the list of 'tail' classes"),
]


@pytest.mark.parametrize("change, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_the_validator_refuses_a_bad_metrics_object(change, message):
    metrics = _broken(change)
    with pytest.raises(CBDError, match=message):
        validate_metrics(metrics)


def test_aggregate_refuses_a_run_whose_metrics_break_the_contract(tmp_path):
    a, b = make_run(tmp_path, "a", 1), make_run(tmp_path, "b", 2)
    metrics = json.loads((b / "metrics.json").read_text())
    bad = copy.deepcopy(metrics)
    bad["methods"]["cbd_ens"]["all"] = 46.0  # a percentage where a fraction belongs
    (b / "metrics.json").write_text(json.dumps(bad))
    with pytest.raises(CBDError, match=r"b/metrics.json: metrics.json: cbd_ens.all = 46.0 is not a fraction"):
        pipeline.aggregate_runs([a, b], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
