"""Host synchronisations inside the grouped training step, counted on a GPU.

    python tools/gpu/sync_check.py --json OUT.json [--device cuda] [--steps 3] [--batch-size 128]

Trains 2 vanilla + 2 aug ResNet-8 teachers together (``fit_together``) for 2 epochs of
``--steps`` steps on CIFAR-sized synthetic data, with ``torch.cuda.set_sync_debug_mode("warn")``
on throughout. Each warning is placed by the Python stack it was raised from: inside the step
(the augmentation, forward, loss, backward and optimiser step of ``run_epoch``'s loop), or
outside it (the end-of-epoch read of the losses, validation, checkpoints). The first epoch is a
warm-up; the record counts the second epoch's steps, where 0 is expected. On a CPU (the dry
run) the same steps run but nothing can be counted: the record says ``"checked": false``.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch

from cbdlib.bench import synthetic_data
from cbdlib.engine import Job, loop
from cbdlib.engine.precision import resolve_precision
from cbdlib.engine.together import fit_together
from cbdlib.models import ModelSpec

TEACHERS = ("teacher_vanilla_1", "teacher_vanilla_2", "teacher_aug_1", "teacher_aug_2")


def step_lines() -> range:
    """The source lines of ``run_epoch``'s step loop (from the ``for`` to the line before ``totals =``)."""
    lines, first = inspect.getsourcelines(loop.run_epoch)
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("for step, batch in"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("totals ="))
    return range(first + start, first + end)


def where(frame, loop_lines: range) -> tuple[str, int | None, str]:
    """Where a warning raised in ``frame`` came from: ``step`` (run_epoch's loop), ``epoch`` (run_epoch
    after its loop, or its periodic finite check) or ``outside``; the epoch; the innermost project line."""
    innermost = None
    while frame is not None:
        path = frame.f_code.co_filename
        if innermost is None and "cbdlib" in path:
            innermost = f"{Path(path).name}:{frame.f_lineno} {frame.f_code.co_name}"
        if frame.f_code is loop.run_epoch.__code__:
            inside = frame.f_lineno in loop_lines and "check_finite" not in inspect.getframeinfo(frame).code_context[0]
            return ("step" if inside else "epoch"), frame.f_locals.get("epoch"), innermost or "?"
        frame = frame.f_back
    return "outside", None, innermost or "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=3, help="grouped steps per epoch (2 epochs: warm-up, counted)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", required=True, help="where to write the record")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    checked = device.type == "cuda"
    precision = resolve_precision("auto", device)
    data = synthetic_data(args.steps * args.batch_size, device)
    spec = ModelSpec("resnet8", data.num_classes, "cosine")
    jobs = [Job(name=name, train_seed=1, spec=spec, augment="aug" if "aug" in name else "vanilla", epochs=2,
                batch_size=args.batch_size, lr=0.1, warmup_epochs=1) for name in TEACHERS]
    loop_lines = step_lines()
    found = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            found.append(where(sys._getframe(1), loop_lines))
        else:
            print(f"warning: {category.__name__}: {message}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("always")  # every occurrence, not the first per line
        warnings.showwarning = record
        if checked:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            fit_together(jobs, [loop.init_model(j.spec, j.seed) for j in jobs], data, device=device,
                         checkpoint_paths=[Path(scratch) / f"{j.name}.pt" for j in jobs], history_path=None,
                         metas=[{}] * len(jobs), stage="teachers", quiet=True, precision=precision)
        finally:
            if checked:
                torch.cuda.set_sync_debug_mode(0)
    in_step = [f for f in found if f[0] == "step" and f[1] == 1]
    result = {
        "device": torch.cuda.get_device_name(device) if checked else "cpu", "torch": torch.__version__,
        "checked": checked, "precision": precision, "models": list(TEACHERS), "arch": "resnet8",
        "batch_size": args.batch_size, "steps_counted": args.steps,
        "syncs_in_step": len(in_step),
        "syncs_in_warmup_steps": sum(1 for f in found if f[0] == "step" and f[1] == 0),
        "syncs_per_epoch_outside_steps": sum(1 for f in found if f[0] == "epoch") / 2,
        "syncs_outside_the_loop": sum(1 for f in found if f[0] == "outside"),
        "where": dict(Counter(f"{kind} (epoch {epoch}): {at}" if epoch is not None else f"{kind}: {at}"
                              for kind, epoch, at in found)),
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "checked", "syncs_in_step", "syncs_in_warmup_steps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
