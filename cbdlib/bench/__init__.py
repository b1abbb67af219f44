"""``python -m cbdlib.bench [--device cpu|cuda] [--size tiny|full] [--json FILE]``: the engine against a naive loop.

Measured in one run on one device:
(a) images/s of a ResNet training step at batch 128 for a naive reference written here and
    pinned (torch DataLoader + PIL transforms, float32, eager, default memory format, the
    engine's thread count; its DataLoader worker count is reported) and for the engine as a
    long run uses it (data on the device, batched augmentation, the precision policy,
    channels_last, ``torch.compile`` where the engine would compile), and their ratio;
(b) one epoch of four models trained together against one model alone;
(c) the wall time of a full CBD-ENS CIFAR-10-LT experiment (4 teachers + student, 200
    epochs each), extrapolated from the measured epochs and labelled so.
Data are random uint8 images of CIFAR-10-LT's size (12,406 training images, IR 100); speed
does not depend on pixel values. ``--size full`` times ResNet-32 (the top-level keys) and
ResNet-8 (``by_arch``); ``--size tiny`` (the default with ``--device cpu``) runs in seconds
for the tests.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.device import DeviceData
from ..data.longtail import long_tail_counts
from ..devices import resolve_device, use_channels_last
from ..engine.compiled import should_compile
from ..engine.job import Job
from ..engine.loop import fit, init_model
from ..engine.precision import PrecisionChoice, choose_precision
from ..engine.together import fit_together
from ..models import ModelSpec

FULL_EPOCHS = 200
CIFAR10_LT_IMAGES = 12406

# Sizes: (arch, batch size, training images, naive steps timed, extra architectures).
# ``together_images`` caps the four-models-together epoch on a CPU, where grouped convolutions
# are slow and the engine does not train models together (the timed epoch is scaled up).
PROFILES = {
    "tiny": dict(arch="resnet_tiny", batch_size=32, images=320, naive_steps=6, by_arch=(), together_images=None),
    "full": dict(arch="resnet32", batch_size=128, images=CIFAR10_LT_IMAGES, naive_steps=40, by_arch=("resnet8",),
                 together_images=2560),
}
NAIVE_WORKERS = {"cuda": 8, "cpu": 0}  # DataLoader workers of the naive reference (2 cores: the main process)


def synthetic_data(images: int, device: torch.device, num_classes: int = 10, seed: int = 0) -> DeviceData:
    rng = np.random.default_rng(seed)
    # CIFAR-LT's exponential profile at IR 100, scaled to about ``images`` in all.
    profile = long_tail_counts(5000, num_classes, 100)
    counts = [max(1, round(c * images / sum(profile))) for c in profile]
    labels = np.repeat(np.arange(num_classes), counts)
    pixels = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return DeviceData(
        train_images=torch.from_numpy(pixels).to(device), train_labels=torch.from_numpy(labels).to(device),
        val_images=torch.from_numpy(pixels[:100]).to(device), val_labels=torch.from_numpy(labels[:100]).to(device),
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=num_classes,
        class_counts=torch.tensor(np.bincount(labels, minlength=num_classes), dtype=torch.float32, device=device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_images_per_second(data: DeviceData, arch: str, batch_size: int, steps: int, workers: int,
                            device: torch.device) -> float:
    """The usual way: PIL transforms in a DataLoader, float32, one model."""
    from PIL import Image
    from torchvision import transforms

    pixels = data.train_images.cpu().numpy()
    labels = data.train_labels.cpu().numpy()
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(data.mean, data.std)])

    class PilDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(pixels[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(PilDataset(), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    model = init_model(ModelSpec(arch, data.num_classes, "linear"), 0).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    warmup, timed, start = 5, 0, None
    while timed < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _, logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the usual per-step logging sync
            if warmup:
                warmup -= 1
                if not warmup:
                    _sync(device)
                    start = time.perf_counter()
                continue
            timed += 1
            if timed == steps:
                break
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def _job(name: str, spec: ModelSpec, batch_size: int, epochs: int, **kw) -> Job:
    return Job(name=name, train_seed=1, spec=spec, epochs=epochs, batch_size=batch_size, lr=0.1, **kw)


def _epoch_seconds(history: Path, model: str, epoch: int) -> float:
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    return sum(r["time_s"] * r.get("trained_with", 1) for r in rows if r["model"] == model and r["epoch"] == epoch)


def _subset(data: DeviceData, images: int | None) -> DeviceData:
    if images is None or images >= len(data.train_labels):
        return data
    keep = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))[:images]
    keep = keep.to(data.train_labels.device)
    labels = data.train_labels[keep]
    return DeviceData(train_images=data.train_images[keep], train_labels=labels, val_images=data.val_images,
                           val_labels=data.val_labels, mean=data.mean, std=data.std, num_classes=data.num_classes,
                           class_counts=torch.bincount(labels, minlength=data.num_classes).float())


def measure_arch(arch: str, data: DeviceData, batch: int, naive_steps: int, device: torch.device,
                 precision: str, use_compile: bool, tmp: Path) -> dict:
    """Naive and engine images/s of one architecture; the engine's one-model epoch in seconds."""
    workers = NAIVE_WORKERS["cuda" if device.type == "cuda" else "cpu"]
    print(f"{arch}: naive reference (batch {batch}, DataLoader with {workers} workers + PIL, fp32, eager) ...",
          file=sys.stderr)
    naive = naive_images_per_second(data, arch, batch, naive_steps, workers, device)
    print(f"{arch}: engine, one model ({precision}{', compiled' if use_compile else ''}; 2 epochs, the second "
          f"timed) ...", file=sys.stderr)
    cosine = ModelSpec(arch, data.num_classes, "cosine")
    job = _job(f"teacher_vanilla_{arch}", cosine, batch, 2)
    history = tmp / f"{arch}.jsonl"
    t0 = time.perf_counter()
    model = fit(job, init_model(cosine, job.seed), data, device=device, checkpoint_path=tmp / f"{arch}.pt",
                     history_path=history, meta={}, stage="bench", quiet=True, precision=precision,
                     use_compile=use_compile)
    first = _epoch_seconds(history, job.name, 1)
    one = _epoch_seconds(history, job.name, 2)
    steps = len(data.train_labels) // batch
    engine = steps * batch / one
    return {"naive_img_per_s": naive, "engine_img_per_s": engine, "speedup": engine / naive, "naive_workers": workers,
            "one_model_s": one, "first_epoch_s": first, "engine_total_s": time.perf_counter() - t0, "model": model}


def run_benchmark(device_name: str, size: str | None = None) -> dict:
    device = resolve_device(device_name)
    size = size or ("full" if device.type == "cuda" else "tiny")
    profile = PROFILES[size]
    arch, batch = profile["arch"], profile["batch_size"]
    data = synthetic_data(profile["images"], device)
    steps_per_epoch = len(data.train_labels) // batch
    # Compile where a long run would: a full-size experiment's jobs have thousands of steps.
    compile_long = should_compile(None, device, steps_per_epoch * FULL_EPOCHS) and size == "full"

    def auto_choice(name: str) -> PrecisionChoice:
        """What ``precision: auto`` picks for ``name`` here (tiny: fp32 unmeasured, as a smoke run)."""
        height, width, channels = data.train_images.shape[1:]
        probe = {"arch": name, "batch_size": batch, "num_classes": data.num_classes,
                 "image_shape": [channels, height, width]}
        return choose_precision("auto", device, probe=probe, compiled=compile_long, smoke=size == "tiny")

    def compiles(choice: PrecisionChoice) -> bool:
        return compile_long and choice.compile_setting(None, device) is not False

    choice = auto_choice(arch)
    precision, use_compile = choice.precision, compiles(choice)
    from ..runs import provenance

    result = {**provenance(device), "size": size, "arch": arch, "batch_size": batch,
              "train_images": int(len(data.train_labels)), "precision": precision,
              "precision_choice": choice.record(), "compile": use_compile, "threads": torch.get_num_threads(),
              "channels_last": use_channels_last(device)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        main = measure_arch(arch, data, batch, profile["naive_steps"], device, precision, use_compile, tmp)
        teacher = main.pop("model")
        result.update(main)
        result["by_arch"] = {}
        for other in profile["by_arch"]:
            other_choice = auto_choice(other)
            extra = measure_arch(other, data, batch, profile["naive_steps"], device, other_choice.precision,
                                 compiles(other_choice), tmp)
            extra.pop("model")
            extra["precision_choice"] = other_choice.record()
            result["by_arch"][other] = extra
        one = result["one_model_s"]

        together_data = _subset(data, profile["together_images"] if device.type != "cuda" else None)
        scale_together = len(data.train_labels) / len(together_data.train_labels)
        print(f"engine, four models together (2 epochs of {len(together_data.train_labels)} images; the second "
              f"timed) ...", file=sys.stderr)
        cosine = ModelSpec(arch, data.num_classes, "cosine")
        jobs = [_job(f"teacher_{kind}_{s}", cosine, batch, 2, augment=kind)
                for kind in ("vanilla", "aug") for s in (1, 2)]
        fit_together(jobs, [init_model(cosine, j.seed) for j in jobs], together_data, device=device,
                     checkpoint_paths=[tmp / f"{j.name}.pt" for j in jobs], history_path=tmp / "together.jsonl",
                     metas=[{}] * 4, stage="bench", quiet=True, precision=precision)
        four = _epoch_seconds(tmp / "together.jsonl", jobs[0].name, 2) * scale_together
        result["four_together_s"] = four
        result["together_ratio"] = four / one
        result["together_note"] = ("epoch of 4 grouped models" + (f", timed on {len(together_data.train_labels)} "
                                   f"images and scaled x{scale_together:.2f}" if scale_together != 1 else ""))

        print("engine, CBD-ENS student with 4 teachers (2 epochs; the second timed) ...", file=sys.stderr)
        student_spec = ModelSpec(arch, data.num_classes, "cosine", projection_dim=4 * teacher.feature_dim)
        student_job = _job("cbd_ens", student_spec, batch, 2, sampling="class_balanced", loss="cbd")
        teacher.eval().requires_grad_(False)
        teachers = [teacher] * 4  # the speed of four frozen teachers; their weights do not matter here
        history = tmp / "student.jsonl"
        fit(student_job, init_model(student_spec, 7), data, device=device, checkpoint_path=tmp / "s.pt",
                 history_path=history, meta={}, stage="bench", teachers=teachers, quiet=True, precision=precision,
                 use_compile=use_compile)
        student = _epoch_seconds(history, "cbd_ens", 2)
    scale = CIFAR10_LT_IMAGES / len(data.train_labels)  # the tiny profile runs a fraction of the images
    # Four teachers: one grouped step on CUDA (as the engine trains them), one after another elsewhere.
    teachers_epoch = four if device.type == "cuda" else 4 * one
    result["student_epoch_s"] = student
    result["full_cbd_ens_s"] = FULL_EPOCHS * (teachers_epoch + student) * scale
    result["full_cbd_ens_extrapolated"] = True
    result["full_cbd_ens_note"] = (f"{FULL_EPOCHS} epochs x (measured epoch of the 4 teachers "
                                   f"{'together' if device.type == 'cuda' else 'one after another'} + measured "
                                   f"student epoch), scaled to {CIFAR10_LT_IMAGES} images; extrapolated, not run "
                                   f"end to end")
    return result
