"""The one parameter schema: YAML files, overrides, types, smoke resolution."""
import pytest

from cbdlib import CBDError
from cbdlib.config import (
    SMOKE_SETTINGS,
    Params,
    all_method_names,
    check_value,
    load_params,
    make_params,
    params_dir,
    parse_override,
    resolve,
)


@pytest.mark.parametrize("name", ["smoke.yaml", "default.yaml"])
def test_shipped_parameter_files_load(name):
    params = load_params(params_dir() / name)
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
