"""The baselines as their authors ran them: class-aware sampling, cRT / LWS BatchNorm modes,
NCM cl2n, the tau-norm curve, the large-image recipes, and ``steps`` in the history."""
import json
import math
import os

os.environ.setdefault("MPLBACKEND", "Agg")  # before pyplot is imported anywhere

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cbdlib import CBDError, plots, workbook  # noqa: E402
from cbdlib.analysis.views import post_hoc_curves  # noqa: E402
from cbdlib.checkpoint import load_model  # noqa: E402
from cbdlib.config import load_params_file, make_params, params_dir, resolve  # noqa: E402
from cbdlib.data import long_tail_counts  # noqa: E402
from cbdlib.data.samplers import CLASS_AWARE_SAMPLES_PER_CLASS, IndexSampler, StrategySampler, epoch_length  # noqa: E402
from cbdlib.engine import Experiment  # noqa: E402
from cbdlib.engine.loop import epoch_steps  # noqa: E402
from cbdlib.engine.stages import first_best  # noqa: E402
from cbdlib.evaluate import evaluate_checkpoint  # noqa: E402
from cbdlib.models import ModelSpec, NCMClassifier, build_model  # noqa: E402
from cbdlib.runs import checkpoint_path, evaluation_path  # noqa: E402


def labels_with_counts(counts, seed=0):
    labels = np.concatenate([np.full(c, j, dtype=np.int64) for j, c in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def runs_of(classes):
    """Split a sequence of class labels into runs of CLASS_AWARE_SAMPLES_PER_CLASS."""
    k = CLASS_AWARE_SAMPLES_PER_CLASS
    return [classes[i:i + k] for i in range(0, len(classes), k)]


# --------------------------------------------------------------------------- class-aware sampling


def test_a_class_aware_epoch_is_n_images_as_kang_et_als_loop_stops_it():
    assert CLASS_AWARE_SAMPLES_PER_CLASS == 4
    assert epoch_length("class_aware", [6, 3, 2]) == 11    # N, not largest count x classes (18)
    assert epoch_length("class_aware", [50, 20, 0, 8, 3]) == 81
    assert epoch_length("class_balanced", [6, 3, 2]) == epoch_length("instance", [6, 3, 2]) == 11
    labels = labels_with_counts([6, 3, 2])
    sampler = IndexSampler(labels, "class_aware", generator_seed=3)
    assert len(sampler) == 11 and sampler.epoch_indices(0).numel() == 11
    assert len(StrategySampler(labels, "class_aware")) == 11
    # CIFAR-10-LT IR 100 (12,406 images) at batch 128: int(12406 / 128) = 96 steps, not 390
    cifar = long_tail_counts(5000, 10, 100)
    assert sum(cifar) == 12406 and epoch_steps(epoch_length("class_aware", cifar), 128) == (128, 96)


def test_each_visit_takes_four_images_of_one_class_in_shuffled_rounds_of_classes():
    labels = labels_with_counts([12, 6, 2])
    for seed in range(5):
        idx = IndexSampler(labels, "class_aware", generator_seed=seed).epoch_indices(seed).numpy()
        visits = runs_of(labels[idx].tolist())
        # 20 images: five whole visits
        assert [len(v) for v in visits] == [4, 4, 4, 4, 4]
        assert all(len(set(v)) == 1 for v in visits), visits
        classes = [v[0] for v in visits]
        assert sorted(classes[:3]) == [0, 1, 2]  # the first round visits every class once
        assert len(set(classes[3:])) == 2        # the second round has begun: no class twice


def test_a_class_is_walked_through_in_whole_reshuffled_passes():
    counts = [12, 5, 3]
    labels = labels_with_counts(counts)
    sampler = IndexSampler(labels, "class_aware", generator_seed=1)
    orders = set()
    for epoch in range(4):
        idx = sampler.epoch_indices(epoch).numpy()
        for c, n in enumerate(counts):
            stream = idx[labels[idx] == c]
            for start in range(0, len(stream) - n + 1, n):  # every whole pass holds each image once
                assert sorted(stream[start:start + n]) == sorted(np.flatnonzero(labels == c))
            if c == 1:
                orders.add(tuple(stream[:n]))
    assert len(orders) > 1  # passes are reshuffled from epoch to epoch


def test_class_aware_epochs_are_balanced_and_reproducible_from_seed_and_epoch():
    labels = labels_with_counts([1000, 300, 100, 30, 10])
    sampler = IndexSampler(labels, "class_aware", generator_seed=7)
    idx = sampler.epoch_indices(2)
    # N = 1,440 draws = 72 whole rounds of 5 visits of 4: every class exactly 288 times
    assert np.bincount(labels[idx.numpy()], minlength=5).tolist() == [288] * 5
    again = IndexSampler(labels, "class_aware", generator_seed=7)
    assert torch.equal(again.epoch_indices(2), idx)  # no state carried from earlier epochs
    assert not torch.equal(sampler.epoch_indices(3), idx)


# --------------------------------------------------------------------------- NCM


def test_ncm_cl2n_centres_on_the_mean_training_feature_which_can_change_the_prediction():
    # Class 0: three images at (3, 1); class 1: one at (1, 3). Mean training feature (2.5, 1.5).
    features = torch.tensor([[3.0, 1.0], [3.0, 1.0], [3.0, 1.0], [1.0, 3.0]])
    labels = torch.tensor([0, 0, 0, 1])
    cl2n = NCMClassifier.from_features(features, labels, 2, "cl2n")
    cosine = NCMClassifier.from_features(features, labels, 2, "cosine")
    assert torch.allclose(cl2n.centre, torch.tensor([2.5, 1.5]))
    r = 1 / math.sqrt(2)
    assert torch.allclose(cl2n.means, torch.tensor([[r, -r], [-r, r]]))
    query = torch.tensor([[2.0, 1.5]])
    # Centred and normalised the query is (-1, 0): squared distances 2 + sqrt(2) and 2 - sqrt(2).
    assert torch.allclose(cl2n(query), -torch.tensor([[2 + math.sqrt(2), 2 - math.sqrt(2)]]))
    assert int(cl2n(query).argmax()) == 1
    # Without centring the query (x > y) is nearer in angle to class 0's (3, 1).
    assert int(cosine(query).argmax()) == 0


def test_an_ncm_head_rebuilt_from_its_spec_and_state_gives_the_same_logits():
    features = torch.randn(40, 32) + 2.0  # resnet_tiny features are 32-D
    labels = torch.arange(40) % 4
    queries = torch.randn(5, 32)
    for variant in ("cl2n", "cosine"):
        head = NCMClassifier.from_features(features, labels, 4, variant)
        model = build_model(ModelSpec(arch="resnet_tiny", num_classes=4, classifier="ncm", ncm_variant=variant))
        model.classifier.load_state_dict(head.state_dict(), strict=True)
        assert torch.allclose(model.classifier(queries), head(queries))
        assert ("centre" in head.state_dict()) == (variant == "cl2n")
    # Checkpoints made before cl2n record no variant: they are the cosine head.
    assert build_model(ModelSpec(arch="resnet_tiny", num_classes=4, classifier="ncm")).classifier.variant == "cosine"


# --------------------------------------------------------------------------- cRT / LWS on digits


def decoupled_run(out, digits, decoupled_bn):
    settings = resolve(make_params(dict(
        dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=2, decoupled_epochs=2, lws_epochs=1,
        batch_size=32, lr=0.05, seeds=[1], device="cpu", smoke=False, decoupled_bn=decoupled_bn,
        methods=["ce", "crt", "lws", "tau_norm", "ncm"])))
    Experiment(settings, out, data=digits, quiet=True).run("baselines")
    return settings


def backbone_state(path):
    state = load_model(path).backbone.state_dict()
    weights = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    stats = {k: v for k, v in state.items() if k.endswith(("running_mean", "running_var"))}
    return weights, stats


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def train_bn_run(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("crt_train_bn")
    return out, decoupled_run(out, digits, "train")


def test_crt_reestimates_batchnorm_statistics_under_train_and_keeps_them_under_frozen(train_bn_run, digits, tmp_path):
    out, _ = train_bn_run
    ce_weights, ce_stats = backbone_state(checkpoint_path(out, 1, "ce"))
    for method in ("crt", "lws"):
        weights, stats = backbone_state(checkpoint_path(out, 1, method))
        assert same(weights, ce_weights), method      # backbone weights frozen
        assert not same(stats, ce_stats), method      # statistics re-estimated on class-aware batches
    decoupled_run(tmp_path, digits, "frozen")
    ce_weights, ce_stats = backbone_state(checkpoint_path(tmp_path, 1, "ce"))
    for method in ("crt", "lws"):
        weights, stats = backbone_state(checkpoint_path(tmp_path, 1, method))
        assert same(weights, ce_weights) and same(stats, ce_stats), method


def test_history_records_n_image_class_aware_epochs_for_crt_and_lws(train_bn_run, digits):
    out, settings = train_bn_run
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r["steps"], int) for r in rows)
    counts = digits.class_counts
    by_model = {m: [r for r in rows if r["model"] == m] for m in ("ce", "crt", "lws")}
    assert [r["steps"] for r in by_model["ce"]] == [sum(counts) // 32] * 2
    # class-aware epochs of N images: int(N / batch) steps, as Kang et al.'s loop runs them
    assert [r["steps"] for r in by_model["crt"]] == [sum(counts) // 32] * 2  # decoupled_epochs
    assert [r["steps"] for r in by_model["lws"]] == [sum(counts) // 32] * 1  # lws_epochs
    # Kang et al.'s optimiser: lr 0.2 x 32/512, cosine to 0 over the cRT steps
    assert settings.decoupled_lr == pytest.approx(0.2 * 32 / 512)
    assert by_model["crt"][-1]["lr"] < by_model["crt"][0]["lr"] <= settings.decoupled_lr


def test_ncm_and_tau_norm_checkpoints_reevaluate_identically(train_bn_run):
    out, _ = train_bn_run
    for method in ("ncm", "tau_norm"):
        record = json.loads(evaluation_path(out, 1, method).read_text())
        assert evaluate_checkpoint(checkpoint_path(out, 1, method), device="cpu")["all"] == pytest.approx(record["all"])
    assert json.loads(evaluation_path(out, 1, "ncm").read_text())["ncm_variant"] == "cl2n"
    assert load_model(checkpoint_path(out, 1, "ncm")).classifier.variant == "cl2n"


def test_the_whole_tau_curve_is_recorded_and_plotted(train_bn_run, tmp_path):
    out, _ = train_bn_run
    curves = post_hoc_curves(out, [1, 2], methods=["tau_norm"])["tau_norm"]
    assert list(curves) == [1]  # seed 2 was not run
    curve = curves[1]
    assert curve["tau"] == [round(0.1 * i, 1) for i in range(21)] and len(curve["val_acc"]) == 21
    assert curve["chosen"] == curve["tau"][first_best(curve["val_acc"])]
    fig = plots.tau_curve(workbook.post_hoc_curves(out, [1]), path=tmp_path / "tau.png")
    assert (tmp_path / "tau.png").stat().st_size > 0
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["τ-norm", "logit adjustment"]
    line, star = fig.axes[0].get_lines()
    assert np.allclose(line.get_xdata(), curve["tau"])
    assert np.allclose(line.get_ydata(), 100 * np.array(curve["val_acc"]))
    assert star.get_xdata()[0] == curve["chosen"]
    assert fig.axes[1].texts[0].get_text() == "no logit adjustment validation curve"  # this run has none


def test_tau_ties_go_to_the_smallest_tau_even_when_rounding_differs():
    # 0.93 as a mean of ten per-class accuracies summed in another order: 0.9299999999999999
    assert first_best([0.9299999999999999, 0.93, 0.93, 0.92]) == 0
    assert first_best([0.90, 0.91, 0.9099999999999999]) == 1
    assert first_best([0.5, 0.5 + 1e-6]) == 1  # a real difference still counts


def test_tau_curve_plot_placeholder_and_bad_input():
    assert plots.tau_curve({}).axes[0].texts[0].get_text() == "no τ-norm validation curve"
    with pytest.raises(plots.PlotInputError, match="tau_norm seed 1: tau and val_acc"):
        plots.tau_curve({"tau_norm": {1: {"tau": [0.0, 0.1], "val_acc": [0.5], "chosen": 0.0}}})


# --------------------------------------------------------------------------- parameters and recipes


def test_decoupled_parameters_defaults_and_choices():
    s = resolve(make_params({"batch_size": 128, "smoke": False}))
    assert (s.decoupled_epochs, s.lws_epochs, s.decoupled_weight_decay) == (10, 5, 5e-4)
    assert s.decoupled_lr == pytest.approx(0.05) and s.decoupled_bn == "train" and s.ncm_variant == "cl2n"
    assert resolve(make_params({"decoupled_lr": 0.3, "smoke": False})).decoupled_lr == 0.3
    smoke = resolve(make_params({"smoke": True}))
    assert (smoke.decoupled_epochs, smoke.lws_epochs) == (1, 1)  # the smoke profile keeps the stage tiny
    with pytest.raises(CBDError, match="decoupled_bn must be one of train, frozen"):
        make_params({"decoupled_bn": "eval"})
    with pytest.raises(CBDError, match="ncm_variant must be one of cl2n, cosine"):
        make_params({"ncm_variant": "l2"})


@pytest.mark.parametrize("name", ["imagenet_lt_r50_cbd_ens.yaml", "inat2018_r50_cbd_ens.yaml"])
def test_large_image_recipes_carry_the_official_cbd_values(name):
    raw = load_params_file(params_dir() / name)
    assert "sync_bn" in raw and "zero_init_residual" in raw  # stated, not left to defaults
    p = make_params(load_params_file(params_dir() / name))
    assert (p.batch_size, p.lr, p.schedule, p.warmup_epochs, p.momentum) == (128, 0.05, "cosine", 0, 0.9)
    assert p.lr == pytest.approx(0.1 * p.batch_size / 256)
    assert p.zero_init_residual is True and p.sync_bn is True
    assert (p.decoupled_epochs, p.lws_epochs, p.decoupled_weight_decay) == (10, 5, 5e-4)
    assert p.decoupled_lr == pytest.approx(0.2 * p.batch_size / 512)


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "cifar10_lt_ir100.yaml", "cifar100_lt_ir100.yaml"])
def test_parameter_files_state_kang_et_al_decoupled_settings(name):
    p = make_params(load_params_file(params_dir() / name))
    assert p.decoupled_lr == pytest.approx(0.2 * p.batch_size / 512)
    assert (p.decoupled_weight_decay, p.decoupled_bn, p.ncm_variant) == (5e-4, "train", "cl2n")
    assert p.lws_epochs == (1 if name == "smoke.yaml" else 5)


def test_zero_init_residual_zeroes_the_last_batchnorm_gamma_of_each_torchvision_block():
    model = build_model(ModelSpec(arch="resnet18", num_classes=3, classifier="linear", zero_init_residual=True))
    blocks = [m for m in model.backbone.modules() if m.__class__.__name__ == "BasicBlock"]
    assert len(blocks) == 8 and not any(b.bn2.weight.detach().any() for b in blocks)
    assert model.backbone.bn1.weight.detach().all()  # the stem is untouched
    plain = build_model(ModelSpec(arch="resnet18", num_classes=3, classifier="linear"))
    assert all(m.bn2.weight.detach().all() for m in plain.backbone.modules() if m.__class__.__name__ == "BasicBlock")
