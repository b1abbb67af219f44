"""The precision policy: what ``auto`` picks, that bf16 on a CPU trains with float32 heads and
losses, that ``fp32`` really computes in float32, and that the precision that ran is recorded."""
import json

import numpy as np
import pytest
import torch

from cbdlib import CBDError
from cbdlib.config import make_params, resolve
from cbdlib.engine import DeviceData, Experiment, Job, loop
from cbdlib.engine import precision as prec
from cbdlib.engine.losses import job_loss
from cbdlib.evaluate import evaluate_checkpoint
from cbdlib.models import ModelSpec
from cbdlib.runs import checkpoint_path

CPU = torch.device("cpu")


def test_explicit_precisions_are_taken_as_they_are():
    assert prec.resolve_precision("bf16", CPU) == "bf16"
    assert prec.resolve_precision("fp32", CPU) == "fp32"


def test_an_unknown_precision_is_refused_in_one_line():
    with pytest.raises(CBDError, match="precision must be one of auto, bf16, fp32"):
        prec.resolve_precision("fp16", CPU)
    with pytest.raises(CBDError, match="precision must be one of"):
        make_params({"precision": "half"})


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (True, False, "bf16"),
    (True, True, "bf16"),
    (False, True, "fp32"),         # AVX512-BF16 without AMX: bf16 measured slower than fp32
    (False, False, "fp32"),        # e.g. an AVX2-only AMD EPYC: bf16 would be emulated
])
def test_auto_picks_bf16_only_on_cpus_with_bf16_matrix_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert prec.resolve_precision("auto", CPU) == expected


def test_cosine_logits_and_the_distillation_term_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    spec = ModelSpec("resnet_tiny", 10, "cosine", projection_dim=32)
    model = loop.init_model(spec, 0)
    teacher = loop.init_model(ModelSpec("resnet_tiny", 10, "cosine"), 1).eval()
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with prec.autocast(CPU, "bf16"):
        backbone_out = model.backbone(x)
        features, logits = model(x)
        with torch.no_grad():
            teacher_features = [teacher(x)[0]]
    assert backbone_out.dtype == torch.bfloat16  # the convolutions did run in bf16
    assert logits.dtype == torch.float32
    job = Job(name="cbd", train_seed=1, spec=spec, loss="cbd")
    loss, ce, distill = job_loss(job, features, logits, labels, torch.zeros(10), teacher_features)
    assert loss.dtype == ce.dtype == distill.dtype == torch.float32


def _conv_dtypes(model) -> list:
    seen = []
    model.backbone.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return seen


def _fit(digits, tmp_path, precision, epochs=6):
    data = DeviceData.from_long_tail(digits, CPU)
    spec = ModelSpec("resnet_tiny", digits.num_classes, "cosine")
    job = Job(name="teacher_vanilla_1", train_seed=1, spec=spec, epochs=epochs, batch_size=32, lr=0.05,
              warmup_epochs=1)
    model = loop.init_model(spec, job.seed)
    dtypes = _conv_dtypes(model)
    history = tmp_path / f"{precision}.jsonl"
    loop.fit(job, model, data, device=CPU, checkpoint_path=tmp_path / f"{precision}.pt", history_path=history,
             meta={}, stage="teachers", quiet=True, precision=precision)
    losses = [json.loads(line)["loss"] for line in history.read_text().splitlines()]
    return model, set(dtypes), losses


def test_fp32_really_runs_fp32(digits, tmp_path):
    _, dtypes, _ = _fit(digits, tmp_path, "fp32", epochs=1)
    assert dtypes == {torch.float32}


def test_bf16_on_a_cpu_trains_the_loss_falls(digits, tmp_path):
    _, dtypes, losses = _fit(digits, tmp_path, "bf16")
    # Training convolutions run in bf16; the per-epoch validation forward is float32.
    assert torch.bfloat16 in dtypes
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_the_precision_that_ran_is_recorded_and_evaluate_in_fp32_reproduces_the_top1(digits, tmp_path):
    settings = resolve(make_params(dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=3,
                                        batch_size=32, lr=0.05, teachers=["vanilla:1"], seeds=[1], device="cpu",
                                        smoke=False, warmup_epochs=1, precision="bf16",
                                        methods=["teacher_vanilla_1", "ce"])))
    metrics = Experiment(settings, tmp_path, data=digits, quiet=True).run("teachers")
    assert metrics["precision"] == "bf16"
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"] == "bf16"
    recorded = metrics["methods"]["teacher_vanilla_1"]["all"]
    again = evaluate_checkpoint(checkpoint_path(tmp_path, 1, "teacher_vanilla_1"), device="cpu")
    assert abs(again["all"] - recorded) <= 0.001  # evaluation is float32 in both


@pytest.mark.slow
def test_a_compiled_job_trains_and_saves_plain_state_dict_keys(digits, tmp_path):
    data = DeviceData.from_long_tail(digits, CPU)
    spec = ModelSpec("resnet_tiny", digits.num_classes, "cosine")
    losses = {}
    for compiled in (False, True):
        job = Job(name="teacher_vanilla_1", train_seed=1, spec=spec, epochs=1, batch_size=32, lr=0.05)
        path = tmp_path / f"compiled_{compiled}.pt"
        history = tmp_path / f"compiled_{compiled}.jsonl"
        model = loop.fit(job, loop.init_model(spec, job.seed), data, device=CPU, checkpoint_path=path,
                         history_path=history, meta={}, stage="teachers", quiet=True, use_compile=compiled)
        losses[compiled] = json.loads(history.read_text().splitlines()[-1])["loss"]
        state = torch.load(path, weights_only=True)  # a plain checkpoint, no pickled code
        assert set(state["model"]) == set(model.state_dict())
        assert not any("_orig_mod" in key for key in state["model"])
    # The same arithmetic up to the order of float operations inside fused kernels.
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


@pytest.mark.parametrize("setting, precision, steps, expected", [
    (None, "fp32", 5000, True),     # long float32 job: compiled
    (None, "fp32", 100, False),     # too short to repay the compile
    (None, "bf16", 5000, False),    # bf16 on a CPU: inductor's backward gave NaN gradients
    (True, "bf16", 100, True),      # forced
    (False, "fp32", 5000, False),
])
def test_compile_rule_on_a_cpu(setting, precision, steps, expected):
    from cbdlib.engine.compiled import should_compile

    assert should_compile(setting, CPU, steps, precision) is expected
