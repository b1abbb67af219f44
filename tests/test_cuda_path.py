"""The CUDA path's rules, checked on the CPU: evaluation without TF32, cuDNN autotuning only
while training on CUDA, frozen teachers in channels_last, and a failed ``torch.compile`` that
falls back to eager instead of ending the run."""
import warnings

import pytest
import torch

from cbdlib.data.device import DeviceData, predict
from cbdlib.devices import exact_float32, tuned_convolutions
from cbdlib.engine import Job, hooks, loop
from cbdlib.engine.compiled import compile_for_training
from cbdlib.models import ModelSpec

CPU = torch.device("cpu")


def tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


class Recorder(torch.nn.Module):
    """A (features, logits) model that records the TF32 flags its forward ran under."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(tf32_flags())
        pooled = x.mean(dim=(2, 3))
        return pooled, self.linear(pooled)


def test_evaluation_runs_without_tf32_and_restores_the_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # cuDNN's default on GPUs
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    model = Recorder()
    predict(model, torch.zeros(5, 4, 4, 3, dtype=torch.uint8), (0.5,) * 3, (0.25,) * 3, CPU, batch_size=2)
    assert model.seen == [(False, False)] * 3
    assert tf32_flags() == (True, True)
    with pytest.raises(RuntimeError), exact_float32():
        raise RuntimeError("an error inside")
    assert tf32_flags() == (True, True)


def test_cudnn_benchmark_is_on_only_while_training_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with tuned_convolutions(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.benchmark
    with tuned_convolutions(CPU):
        assert not torch.backends.cudnn.benchmark


def test_frozen_teachers_are_channels_last_like_the_student(digits, tmp_path):
    data = DeviceData.from_long_tail(digits, CPU)
    spec = ModelSpec("resnet_tiny", 10, "cosine")
    teacher = loop.init_model(spec, 1).eval().requires_grad_(False)
    job = Job(name="cbd", train_seed=1, spec=ModelSpec("resnet_tiny", 10, "cosine", projection_dim=32),
              sampling="class_balanced", loss="cbd", batch_size=64, epochs=1, teachers=["teacher_vanilla_1"])
    layouts = []

    def look(step, loss):
        weights = [m.weight for net in step.teachers for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        layouts.append(all(w.is_contiguous(memory_format=torch.channels_last) for w in weights))

    first_conv = next(m for m in teacher.modules() if isinstance(m, torch.nn.Conv2d))
    assert not first_conv.weight.is_contiguous(memory_format=torch.channels_last)  # as built
    with hooks.on_step(look):
        loop.fit(job, loop.init_model(job.spec, job.seed), data, device=CPU, checkpoint_path=tmp_path / "cbd.pt",
                 history_path=None, meta={}, stage="students", teachers=[teacher], quiet=True)
    assert layouts and all(layouts)


def broken_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found\nmore detail")


def test_a_failed_compile_falls_back_to_eager_with_one_warning():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    compiled = compile_for_training(model, backend=broken_backend)
    with pytest.warns(RuntimeWarning, match=r"torch.compile failed \(.*no C\+\+ compiler found\); running "
                                            r"Sequential in eager mode instead"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second try
        torch.testing.assert_close(compiled(x + 1), model(x + 1), rtol=0, atol=0)
    assert compiled.training and compiled.state_dict().keys() == model.state_dict().keys()  # the eager one's


def test_an_error_of_the_model_itself_still_stops_the_run():
    class Failing(torch.nn.Module):
        def forward(self, x):
            raise ValueError("shape mismatch in the model")

    compiled = compile_for_training(Failing(), backend=broken_backend)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="shape mismatch in the model"):
        compiled(torch.zeros(1))
