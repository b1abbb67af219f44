"""The one parameter schema: YAML files, overrides, types, smoke resolution; every bad value refused
before any work."""
import json
import re

import pytest
import torch
from reliability_helpers import TINY, error_line, run_main, snapshot, tiny_settings, write_params

from cbdlib import CBDError, workbook
from cbdlib import train as train_cli
from cbdlib.config import (
    SMOKE_SETTINGS,
    Params,
    all_method_names,
    check_value,
    load_params_file,
    make_params,
    params_dir,
    parse_override,
    resolve,
)
from cbdlib.engine import Experiment
from cbdlib.param_rules import ParameterError


@pytest.mark.parametrize("name", ["smoke.yaml", "default.yaml"])
def test_shipped_parameter_files_load(name):
    params = make_params(load_params_file(params_dir() / name))
    assert isinstance(params, Params)


def test_override_values_are_parsed_as_yaml():
    assert parse_override("seeds=[1, 2]") == ("seeds", [1, 2])
    assert parse_override("alpha=0.8") == ("alpha", 0.8)
    assert parse_override("data=null") == ("data", None)
    assert parse_override("run_name=abc") == ("run_name", "abc")
    with pytest.raises(CBDError, match="key=value"):
        parse_override("epochs")


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(CBDError, match="unknown parameter 'epochz'.*did you mean epochs"):
        make_params({"epochz": 3})


@pytest.mark.parametrize("key, value", [("epochs", "ten"), ("epochs", 2.5), ("smoke", "yes"), ("seeds", 1),
                                        ("alpha", "0.4"), ("overwrite", 1)])
def test_wrong_types_are_refused(key, value):
    with pytest.raises(CBDError, match=f"parameter '{key}' must be"):
        check_value(key, value)


def test_ints_are_accepted_for_floats():
    assert make_params({"beta": 10, "imbalance_ratio": 100}).beta == 10.0


@pytest.mark.parametrize("values, message", [
    ({"teachers": ["aug:1"]}, "at least one 'vanilla"),
    ({"teachers": ["big:1"]}, "must look like"),
    ({"alpha": 1.5}, "alpha must be in"),
    ({"schedule": "step"}, "schedule must be"),
    ({"dataset": "mnist"}, "unknown dataset"),
    ({"methods": ["cbd", "ldam"]}, "unknown method"),
    ({"seeds": [1, 1]}, "distinct"),
])
def test_meaningless_values_are_refused(values, message):
    with pytest.raises(CBDError, match=message):
        make_params(values)


def test_smoke_none_follows_the_environment(monkeypatch):
    monkeypatch.setenv("CBD_SMOKE", "1")
    s = resolve(make_params({"smoke": None, "epochs": 200}))
    assert s.smoke and s.epochs == SMOKE_SETTINGS["epochs"] and s.arch == SMOKE_SETTINGS["arch"]
    assert not resolve(make_params({"smoke": False})).smoke
    monkeypatch.delenv("CBD_SMOKE")
    assert not resolve(make_params({"smoke": None})).smoke
    assert resolve(make_params({"smoke": True})).smoke


def test_lr_is_derived_from_the_schedule_and_stated():
    assert resolve(make_params({"schedule": "cosine", "batch_size": 512, "smoke": False})).lr == pytest.approx(0.2)
    assert resolve(make_params({"schedule": "cifar_lt", "batch_size": 128, "smoke": False})).lr == pytest.approx(0.1)
    assert resolve(make_params({"lr": 0.03, "smoke": False})).lr == 0.03


def test_contract_method_names():
    names = all_method_names(["vanilla:1", "vanilla:2", "aug:1", "aug:2"])
    assert set(names) == {"ce", "ce_cb", "crt", "lws", "tau_norm", "ncm", "balanced_softmax", "teacher_vanilla_1",
                          "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2", "teacher_ensemble", "cbd", "cbd_ens",
                          "ldam_drw", "ce_drw", "logit_adjust"}


# --- every value checked before any work ------------------------------------------------------

BAD_VALUES = [
    ("lr", -0.1, "lr must be > 0, got -0.1"),
    ("lr", 0, "lr must be > 0, got 0.0"),
    ("lr", float("nan"), "lr must be a finite number, got nan"),
    ("alpha", float("inf"), "alpha must be a finite number, got inf"),
    ("weight_decay", -1e-4, "weight_decay must be >= 0, got -0.0001"),
    ("momentum", 1.5, "momentum must be in [0, 1), got 1.5"),
    ("epochs", 0, "epochs must be >= 1, got 0"),
    ("decoupled_epochs", 0, "decoupled_epochs must be >= 1, got 0"),
    ("warmup_epochs", -1, "warmup_epochs must be >= 0, got -1"),
    ("val_per_class", 0, "val_per_class must be >= 1, got 0"),
    ("batch_size", 0, "batch_size must be >= 1, got 0"),
    ("cosine_scale", 0, "cosine_scale must be > 0, got 0.0"),
    ("beta", -1, "beta must be > 0, got -1.0"),
    ("logit_distill_temperature", 0, "logit_distill_temperature must be > 0, got 0.0"),
    ("projection_dim", 0, "projection_dim must be >= 1, got 0"),
    ("imbalance_ratio", 0.5, "imbalance_ratio must be >= 1, got 0.5"),
    ("lt_seed", -1, "lt_seed must be >= 0, got -1"),
    ("tsne_samples", 0, "tsne_samples must be >= 1, got 0"),
    ("methods", [], "methods must be null (every method) or a non-empty list of method names, got []"),
    ("arch", "resnet33", "unknown arch 'resnet33': arch must be one of resnet32, resnet20, resnet8, resnet_tiny"),
    ("device", "gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("data", "some/folder", "data must be null for dataset digits (it is built in), got 'some/folder'"),
]
if not torch.cuda.is_available():
    BAD_VALUES.append(("device", "cuda", "device 'cuda' asked for, but CUDA is not available here; "
                                         "use device: auto or cpu"))


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_every_bad_value_is_refused_before_any_work(tmp_path, capsys, key, value, message):
    with pytest.raises(ParameterError, match="^" + re.escape(message)) as err:
        make_params({**TINY, key: value})
    assert err.value.key == key
    # cbdlib.train: one line, exit 2, no run folder.
    params = write_params(tmp_path / "p.yaml", {**TINY, key: value})
    out = tmp_path / "run"
    status, stderr = run_main(train_cli.main, ["--params", str(params), "--out", str(out)], capsys)
    assert status == 2 and message in error_line(stderr) and not out.exists()
    # A notebook's setup cell (notebook 02 declares every key).
    with pytest.raises(CBDError, match="^" + re.escape(message)):
        workbook.setup({**TINY, key: value}, notebook="02")


def test_a_gpu_the_machine_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert make_params({"device": "cuda:0"}).device == "cuda:0"
    with pytest.raises(CBDError, match=r"^device 'cuda:3' asked for, but this machine has 1 GPU\(s\) \(cuda:0..\)$"):
        make_params({"device": "cuda:3"})


def test_a_refused_value_changes_nothing_in_an_existing_run(tmp_path, digits, capsys):
    out = tmp_path / "run"
    Experiment(tiny_settings(methods=["ce"], epochs=1), out, data=digits, quiet=True).run("one_stage")
    before = snapshot(out)
    params = write_params(tmp_path / "p.yaml", {**TINY, "methods": ["ce"], "epochs": 1})
    status, err = run_main(train_cli.main, ["--params", str(params), "--out", str(out), "-p", "lr=-1"], capsys)
    assert status == 2 and "lr must be > 0" in error_line(err)
    assert snapshot(out) == before


def test_smoke_names_the_given_values_it_replaces(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CBD_SMOKE", "1")
    params = write_params(tmp_path / "p.yaml", {**TINY, "smoke": None, "methods": ["teacher_vanilla_1"]})
    status, err = run_main(train_cli.main, ["--params", str(params), "--out", str(tmp_path / "run"), "--stage",
                                            "teachers", "-p", "epochs=5", "-p", "arch=resnet32"], capsys)
    assert status == 0, err
    # decoupled_epochs: 1 is the smoke value already, so it is not listed.
    assert (f"warning: the smoke profile (CBD_SMOKE or smoke: true) replaced given values: arch='resnet32' -> "
            f"'resnet_tiny' (-p), epochs=5 -> 2 (-p), batch_size=32 -> 64 ({params}), tsne_samples=50 -> 200 "
            f"({params})") in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["seeds"] == [1]
