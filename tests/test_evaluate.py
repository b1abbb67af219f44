"""``cbdlib evaluate`` scores a checkpoint only on the data it was trained on."""
import shutil

import pytest
from reliability_helpers import TINY, error_line, image_tree, private_folders, run_main, tiny_settings

from cbdlib import __main__ as cli
from cbdlib.config import make_params, resolve
from cbdlib.engine import Experiment
from cbdlib.runs import checkpoint_path


@pytest.fixture(autouse=True)
def private(tmp_path, monkeypatch):
    private_folders(tmp_path, monkeypatch)


FOLDER_RUN = dict(TINY, dataset="folder", imbalance_ratio=2, val_per_class=1, image_size=8, methods=["ce"], epochs=1,
                  batch_size=8)  # the tree trains on about 24 images


def test_evaluate_refuses_data_whose_classes_differ(tmp_path, capsys):
    trained_on = image_tree(tmp_path / "abc")                       # ant, bee, cat
    other = image_tree(tmp_path / "abd")
    shutil.move(other / "train" / "cat", other / "train" / "dog")    # same counts, another class name
    shutil.move(other / "test" / "cat", other / "test" / "dog")
    out = tmp_path / "run"
    Experiment(resolve(make_params({**FOLDER_RUN, "data": str(trained_on)})), out, quiet=True).run("one_stage")
    model = checkpoint_path(out, 1, "ce")
    status, err = run_main(cli.main, ["evaluate", "--checkpoint", str(model), "--data", str(other)], capsys)
    assert status == 2
    assert error_line(err) == (f"error: checkpoint {model} was trained on other classes than the data at {other} has "
                               f"(1 of 3 differ; label 2: 'cat' vs 'dog'); evaluate it on the data it was trained on")
    assert run_main(cli.main, ["evaluate", "--checkpoint", str(model), "--data", str(trained_on)], capsys)[0] == 0


def test_evaluate_refuses_a_data_path_for_digits(tmp_path, digits, capsys):
    Experiment(tiny_settings(methods=["ce"], epochs=1), tmp_path / "run", data=digits, quiet=True).run("one_stage")
    model = checkpoint_path(tmp_path / "run", 1, "ce")
    status, err = run_main(cli.main, ["evaluate", "--checkpoint", str(model), "--data", str(tmp_path)], capsys)
    assert status == 2
    assert "dataset digits is built in and takes no data path" in error_line(err)

