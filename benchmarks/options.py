"""Per-option timing of one CPU training step, the table of docs/performance.md.

    python benchmarks/options.py grid       # arch x precision x memory format x eager/compiled
    python benchmarks/options.py forward    # inference forward against a training step (FORWARD_COST)
    python benchmarks/options.py threads    # 1 thread against torch's default
    python benchmarks/options.py augment    # batched augmentation alone, eager and compiled
    python benchmarks/options.py aug_epoch  # an aug teacher's epoch, augmentation eager against compiled (paired)

One JSON line per measurement on stdout. Each figure is the best of 3 repeats, after a few
warm-up steps whose time (the compile, when compiled) is reported as ``warmup_s``. Run it on
a quiet machine: two CPU-heavy jobs at once slow each other 2-3x.
"""
from __future__ import annotations

import itertools
import json
import sys
import time

import torch
import torch.nn.functional as F

from cbdlib.augment import BatchAugmenter, aug_config, vanilla_config
from cbdlib.bench import synthetic_data
from cbdlib.engine.loop import init_model
from cbdlib.engine.precision import autocast
from cbdlib.models import ModelSpec

CPU = torch.device("cpu")
BATCH = 128


def step_rate(arch: str, precision: str, channels_last: bool, compiled: bool, forward_only: bool = False,
              steps: int = 15, warmup: int = 4) -> tuple[float, float, bool]:
    """(best img/s, warm-up seconds, whether every gradient stayed finite)."""
    torch.manual_seed(0)
    model = init_model(ModelSpec(arch, 10, "cosine"), 0)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train(not forward_only)
    run = torch.compile(model) if compiled else model

    def one() -> None:
        with autocast(CPU, precision):  # the engine's own autocast rule
            if forward_only:
                with torch.no_grad():
                    run(x)
                return
            _, logits = run(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for _ in range(warmup):
        one()
    warmup_s = time.perf_counter() - start
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            one()
        best = max(best, steps * BATCH / (time.perf_counter() - start))
    # Checked once, after the timing: a check per step would add host syncs to what is timed.
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    return best, warmup_s, finite


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def grid() -> None:
    for arch in ("resnet8", "resnet20", "resnet32"):
        for precision, channels_last, compiled in itertools.product(("fp32", "bf16"), (False, True), (False, True)):
            steps = 20 if arch == "resnet8" else 10
            rate, warmup_s, finite = step_rate(arch, precision, channels_last, compiled, steps=steps)
            emit(arch=arch, precision=precision, channels_last=channels_last, compiled=compiled, img_s=round(rate),
                 warmup_s=round(warmup_s, 1), finite_gradients=finite)


def forward() -> None:
    for arch, precision in itertools.product(("resnet8", "resnet32"), ("fp32", "bf16")):
        train, _, _ = step_rate(arch, precision, True, False)
        infer, _, _ = step_rate(arch, precision, True, False, forward_only=True)
        emit(arch=arch, precision=precision, train_img_s=round(train), forward_img_s=round(infer),
             forward_cost=round(train / infer, 3))


def threads() -> None:
    default = torch.get_num_threads()
    for arch, count in itertools.product(("resnet8", "resnet32"), sorted({1, default})):
        torch.set_num_threads(count)
        rate, _, _ = step_rate(arch, "fp32", True, False)
        emit(arch=arch, precision="fp32", channels_last=True, threads=count, img_s=round(rate))
    torch.set_num_threads(default)


def augment() -> None:
    data = synthetic_data(30 * BATCH, CPU)
    generator = torch.Generator().manual_seed(0)
    for name, config in (("vanilla", vanilla_config(32)), ("aug", aug_config(32))):
        augmenter = BatchAugmenter(config, data.mean, data.std, channels_last=True)
        batches = [(data.train_images[i * BATCH:(i + 1) * BATCH], augmenter.draw(BATCH, generator, CPU))
                   for i in range(30)]
        for compiled in (False, True):
            apply = torch.compile(augmenter.apply) if compiled else augmenter.apply
            start = time.perf_counter()
            apply(*batches[0])
            warmup_s = time.perf_counter() - start
            start = time.perf_counter()
            for images, uniforms in batches:
                apply(images, uniforms)
            rate = len(batches) * BATCH / (time.perf_counter() - start)
            gap = max(float((apply(i, u) - augmenter.apply(i, u)).abs().max()) for i, u in batches[:5])
            emit(augment=name, compiled=compiled, img_s=round(rate), warmup_s=round(warmup_s, 1),
                 max_abs_diff_from_eager=gap)


def aug_epoch(pairs: int = 3) -> None:
    """One ``aug`` ResNet-8 teacher epoch on CIFAR-10-LT-sized data (12,406 images, 96 steps), the
    model compiled in both (fp32, as the engine runs a CPU job of >= 2,000 steps), its augmentation
    eager or compiled. Pairs alternate which goes first, so a load that drifts hits both alike."""
    from cbdlib.engine import Job, loop
    from cbdlib.engine.compiled import compile_for_training
    from cbdlib.engine.losses import class_terms

    data = synthetic_data(12406, CPU)
    job = Job(name="teacher_aug_1", train_seed=1, spec=ModelSpec("resnet8", 10, "cosine"), augment="aug",
              epochs=200, batch_size=BATCH)
    model = loop.init_model(job.spec, job.seed).to(memory_format=torch.channels_last)
    optimizer = loop.make_optimizer(loop.trainable_parameters(model, job), job, CPU)
    step_loss = loop.model_step(job, compile_for_training(model), [], class_terms(data.class_counts), "fp32")
    batch, steps = loop.epoch_steps(len(data.train_labels), BATCH)
    modes = {"eager": data.batches(job, batch, steps, CPU),
             "compiled": data.batches(job, batch, steps, CPU, compile_fn=compile_for_training)}

    def epoch(mode: str, index: int, steps_run: int = steps) -> float:
        batches = itertools.islice(modes[mode](index), steps_run)
        start = time.perf_counter()
        model.train()
        loop.run_epoch([job], batches, step_loss, optimizer, epoch=index, steps=steps_run, stage="bench")
        return time.perf_counter() - start

    for mode in modes:  # compiles: the model's, then the augmentation's
        emit(aug_epoch=mode, warmup_s=round(epoch(mode, 0, 3), 1), steps=3)
    times = {mode: [] for mode in modes}
    for pair in range(pairs):
        for mode in (("eager", "compiled") if pair % 2 == 0 else ("compiled", "eager")):
            times[mode].append(epoch(mode, 1 + pair))
            emit(aug_epoch=mode, pair=pair, seconds=round(times[mode][-1], 2), steps=steps)
    best = {mode: min(values) for mode, values in times.items()}
    emit(aug_epoch="best", eager_s=round(best["eager"], 2), compiled_s=round(best["compiled"], 2),
         ratio=round(best["compiled"] / best["eager"], 3), pairs=pairs, images=steps * batch,
         threads=torch.get_num_threads())


if __name__ == "__main__":
    parts = {"grid": grid, "forward": forward, "threads": threads, "augment": augment, "aug_epoch": aug_epoch}
    if len(sys.argv) != 2 or sys.argv[1] not in parts:
        sys.exit(f"usage: python benchmarks/options.py {'|'.join(parts)}")
    parts[sys.argv[1]]()
