"""``python -m cbdlib.bench [--device cpu|cuda] [--json FILE]``: the engine against a naive loop.

Measured in one run on one device:
(a) images/s of a ResNet training step for a naive reference written here (DataLoader +
    PIL transforms + fp32) and for the engine (data on the device, batched augmentation,
    bf16 and channels_last on CUDA), and their ratio;
(b) one epoch of four models trained together against one model alone;
(c) the wall time of a full CBD-ENS CIFAR-10-LT experiment (4 teachers + student, 200
    epochs each), extrapolated from the measured epochs and labelled so.
Data are random uint8 images of CIFAR-10-LT's size (12,406 training images); speed does
not depend on pixel values. ``--device cpu`` uses tiny sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .cli_util import exits_cleanly, setup_logging
from .data.longtail import long_tail_counts
from .engine import loop
from .engine.together import fit_together
from .models import ModelSpec

FULL_EPOCHS = 200
CIFAR10_LT_IMAGES = 12406

# Sizes per device: (arch, batch size, training images, naive steps timed)
PROFILES = {
    "cuda": dict(arch="resnet32", batch_size=128, images=CIFAR10_LT_IMAGES, naive_steps=60, workers=8),
    "cpu": dict(arch="resnet_tiny", batch_size=32, images=320, naive_steps=6, workers=0),
}


def synthetic_data(images: int, device: torch.device, num_classes: int = 10, seed: int = 0) -> loop.DeviceData:
    rng = np.random.default_rng(seed)
    # CIFAR-LT's exponential profile at IR 100, scaled to about ``images`` in all.
    profile = long_tail_counts(5000, num_classes, 100)
    counts = [max(1, round(c * images / sum(profile))) for c in profile]
    labels = np.repeat(np.arange(num_classes), counts)
    pixels = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return loop.DeviceData(
        train_images=torch.from_numpy(pixels).to(device), train_labels=torch.from_numpy(labels).to(device),
        val_images=torch.from_numpy(pixels[:100]).to(device), val_labels=torch.from_numpy(labels[:100]).to(device),
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=num_classes,
        class_counts=torch.tensor(np.bincount(labels, minlength=num_classes), dtype=torch.float32, device=device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_images_per_second(data: loop.DeviceData, arch: str, batch_size: int, steps: int, workers: int, device: torch.device) -> float:
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
    model = loop.init_model(ModelSpec(arch, data.num_classes, "linear"), 0).to(device).train()
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


def _job(name: str, spec: ModelSpec, batch_size: int, epochs: int, **kw) -> loop.Job:
    return loop.Job(name=name, train_seed=1, spec=spec, epochs=epochs, batch_size=batch_size, lr=0.1, **kw)


def _epoch_seconds(history: Path, model: str, epoch: int) -> float:
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    return sum(r["time_s"] * r.get("trained_with", 1) for r in rows if r["model"] == model and r["epoch"] == epoch)


def run_benchmark(device_name: str) -> dict:
    device = loop.resolve_device(device_name)
    profile = PROFILES["cuda" if device.type == "cuda" else "cpu"]
    arch, batch = profile["arch"], profile["batch_size"]
    data = synthetic_data(profile["images"], device)
    steps_per_epoch = len(data.train_labels) // batch
    result = {"device": None, "torch": torch.__version__, "arch": arch, "batch_size": batch,
              "train_images": int(len(data.train_labels)), "compile": False}
    from .runs import device_description, git_commit

    result["device"] = device_description(device)
    result["git_commit"] = git_commit()

    print(f"naive reference ({arch}, batch {batch}, DataLoader + PIL, fp32) ...", file=sys.stderr)
    result["naive_img_per_s"] = naive_images_per_second(data, arch, batch, profile["naive_steps"], profile["workers"], device)

    cosine = ModelSpec(arch, data.num_classes, "cosine")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        history = tmp / "history.jsonl"
        print("engine, one model (2 epochs; the second is timed) ...", file=sys.stderr)
        job = _job("teacher_vanilla_1", cosine, batch, 2)
        teacher = loop.fit(job, loop.init_model(cosine, job.seed), data, device=device, checkpoint_path=tmp / "one.pt",
                           history_path=history, meta={}, stage="bench", quiet=True)
        one = _epoch_seconds(history, "teacher_vanilla_1", 2)
        result["engine_img_per_s"] = steps_per_epoch * batch / one
        result["speedup"] = result["engine_img_per_s"] / result["naive_img_per_s"]
        result["one_model_s"] = one

        print("engine, four models together (2 epochs; the second is timed) ...", file=sys.stderr)
        jobs = [_job(f"teacher_{kind}_{s}", cosine, batch, 2, augment=kind) for kind in ("vanilla", "aug") for s in (1, 2)]
        teachers = fit_together(jobs, [loop.init_model(cosine, j.seed) for j in jobs], data, device=device,
                                checkpoint_paths=[tmp / f"{j.name}.pt" for j in jobs], history_path=tmp / "together.jsonl",
                                metas=[{}] * 4, stage="bench", quiet=True)
        four = _epoch_seconds(tmp / "together.jsonl", jobs[0].name, 2)  # the whole grouped epoch
        result["four_together_s"] = four
        result["together_ratio"] = four / one

        print("engine, CBD-ENS student with 4 teachers (2 epochs; the second is timed) ...", file=sys.stderr)
        student_spec = ModelSpec(arch, data.num_classes, "cosine", projection_dim=4 * teacher.feature_dim)
        student_job = _job("cbd_ens", student_spec, batch, 2, sampling="class_balanced", loss="cbd")
        for t in teachers:
            t.eval().requires_grad_(False)
        loop.fit(student_job, loop.init_model(student_spec, 7), data, device=device, checkpoint_path=tmp / "s.pt",
                 history_path=history, meta={}, stage="bench", teachers=teachers, quiet=True)
        student = _epoch_seconds(history, "cbd_ens", 2)
    scale = CIFAR10_LT_IMAGES / len(data.train_labels)  # CPU profile runs a fraction of the images
    result["student_epoch_s"] = student
    result["full_cbd_ens_s"] = FULL_EPOCHS * (four + student) * scale
    result["full_cbd_ens_extrapolated"] = True
    result["full_cbd_ens_note"] = (f"{FULL_EPOCHS} epochs x (measured epoch of 4 teachers together + measured student "
                                   f"epoch), scaled to {CIFAR10_LT_IMAGES} images; extrapolated, not run end to end")
    return result


@exits_cleanly
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbdlib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    setup_logging(verbose=False)
    result = run_benchmark(args.device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from .io import write_text

        write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
