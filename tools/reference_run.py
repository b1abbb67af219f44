"""Fixed-seed reference of the engine's results, to show that a refactor keeps them identical.

Trains every method of a small digits-LT experiment (one model at a time, and the stage-1
models grouped), then writes metrics.json's methods and a sha256 of every checkpoint's tensors
to the given JSON file. Run it before and after a change with one thread and compare the files:

    OMP_NUM_THREADS=1 python tools/reference_run.py /tmp/before.json   # on the old commit
    OMP_NUM_THREADS=1 python tools/reference_run.py /tmp/after.json    # on the new one
    cmp /tmp/before.json /tmp/after.json
"""
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from cbdlib.config import make_params, resolve
from cbdlib.data import load_long_tail
from cbdlib.engine import Experiment

SETTINGS = dict(dataset="digits", imbalance_ratio=10, arch="resnet_tiny", epochs=3, decoupled_epochs=2, lws_epochs=1,
                batch_size=32, lr=0.05, warmup_epochs=1, teachers=["vanilla:1", "vanilla:2", "aug:1", "aug:2"],
                seeds=[1], device="cpu", smoke=False, tsne_samples=50, precision="fp32")


def tensor_hash(state):
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        if torch.is_tensor(value):
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(path):
    digits = load_long_tail("digits", imbalance_ratio=10, lt_seed=0, val_per_class=10)
    out = {}
    for together in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            exp = Experiment(resolve(make_params(SETTINGS)), Path(tmp), data=digits, quiet=True)
            exp.together = together
            metrics = exp.run("all")
            hashes = {}
            for p in sorted(Path(tmp, "checkpoints").rglob("*.pt")):
                if ".prev" in p.name:
                    continue
                state = torch.load(p, weights_only=True)
                hashes[p.stem] = tensor_hash(state["model"])
            out[f"together={together}"] = {"methods": metrics["methods"], "checkpoints": hashes}
    Path(path).write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
