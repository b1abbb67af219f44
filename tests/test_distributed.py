"""Multi-process training on the CPU (gloo): the distributed class-balanced sampler, DDP
steps that equal one-process steps, resume under torchrun, and the torchrun command.

Runs of two processes are started with ``python -m torch.distributed.run`` (torchrun).
Exact comparisons use a model without BatchNorm: with BatchNorm each rank normalises its
own half of the batch, so a two-process run is a (slightly) different computation.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cbdlib import CBDError
from cbdlib.config import project_root
from cbdlib.data.samplers import DistributedStrategySampler, IndexSampler, shard_indices
from cbdlib.engine import distributed
from cbdlib.metrics import validate_metrics
from cbdlib.train import main as train_main

ROOT = project_root()
SMOKE = ROOT / "notebooks" / "params" / "smoke.yaml"


def long_tailed_labels(counts=(400, 120, 40, 12, 4), seed=0):
    labels = np.concatenate([np.full(c, j, dtype=np.int64) for j, c in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def run(args, timeout=900, **env):  # a hang guard, not a speed requirement
    """A subprocess in the project root; returns it after checking its exit status."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def torchrun(*args, nproc=2, **kw):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return run(command, **kw)


# ---------------------------------------------------------------- the sampler


@pytest.mark.parametrize("strategy", ["instance", "class_balanced", "class_aware"])
def test_ranks_take_disjoint_shares_of_one_stream(strategy):
    labels = long_tailed_labels()
    world = 3
    samplers = [DistributedStrategySampler(labels, strategy, rank=r, world_size=world, generator_seed=5)
                for r in range(world)]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shares = [list(s) for s in samplers]
        stream = IndexSampler(labels, strategy, generator_seed=5).epoch_indices(epoch)
        per_rank = len(stream) // world
        assert all(len(share) == per_rank == len(s) for share, s in zip(shares, samplers))
        # Interleaving the shares gives back the global stream (its first world * per_rank draws):
        # every position of the stream belongs to exactly one rank.
        interleaved = np.stack(shares, axis=1).reshape(-1)
        assert np.array_equal(interleaved, stream[: world * per_rank].numpy())
        if strategy == "instance":  # a permutation: no image is on two ranks
            assert len(set().union(*map(set, shares))) == world * per_rank
    samplers[0].set_epoch(0)
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert first != list(samplers[0])  # reseeded per epoch


def test_every_rank_sees_classes_uniformly_under_class_balanced_sampling():
    labels = long_tailed_labels()
    world, epochs = 2, 40
    for rank in range(world):
        sampler = DistributedStrategySampler(labels, "class_balanced", rank=rank, world_size=world, generator_seed=1)
        drawn = []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            drawn.extend(labels[list(sampler)])
        counts = np.bincount(drawn, minlength=5)
        n = len(drawn)
        sigma = np.sqrt(n * 0.2 * 0.8)
        assert np.abs(counts - 0.2 * n).max() < 4 * sigma, counts


def test_a_rank_shard_of_the_stream_is_its_share_of_each_global_batch():
    stream = torch.arange(100)
    global_batch, world = 8, 4
    local = global_batch // world
    for rank in range(world):
        mine = shard_indices(stream, rank, world)
        for step in range(len(stream) // global_batch):
            batch = stream[step * global_batch:(step + 1) * global_batch]
            assert torch.equal(mine[step * local:(step + 1) * local], batch[rank::world])


def test_bad_shards_and_uneven_global_batches_are_refused(monkeypatch):
    with pytest.raises(CBDError, match="rank must be"):
        shard_indices(torch.arange(4), 2, 2)
    with pytest.raises(CBDError, match="world_size must be"):
        shard_indices(torch.arange(4), 0, 0)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(CBDError, match="batch_size 64 \\(global\\) does not split evenly over 3 processes"):
        distributed.local_batch_size(64)


def test_single_process_helpers_describe_rank_0_of_1(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, torch.device("cpu")) is model


def test_a_local_rank_beyond_the_visible_gpus_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: pytest.fail("set_device before the check"))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999")):
        monkeypatch.setenv(name, value)
    with pytest.raises(CBDError, match=r"LOCAL_RANK 1 needs GPU cuda:1, but this machine shows 1 GPU\(s\); "
                                       r"start at most 1 processes per node"):
        distributed.init()


# ---------------------------------------------------------------- DDP equals one process

# Trains three BatchNorm-free models with ``loop.fit`` on digits-LT: a teacher (instance
# sampling, colour augmentation), a CBD student distilling from it (class-balanced
# sampling) and a classifier re-trained on the student's frozen backbone. Run as one
# process or under torchrun; rank 0 saves every final state dict. ``--crash-after N``
# interrupts the first model after N steps (a kill mid-epoch), leaving its checkpoint.
WORKER = textwrap.dedent('''
    import argparse, contextlib, copy
    from pathlib import Path
    import torch, torch.nn as nn
    from cbdlib.data import load_long_tail
    from cbdlib.data.device import DeviceData
    from cbdlib.engine import Job, distributed, hooks, loop
    from cbdlib.models import CosineClassifier, LinearClassifier, ModelSpec, Network, Projection

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--crash-after", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    distributed.init(cpu=True)  # trains on the CPU: gloo, even where CUDA is present
    data = DeviceData.from_long_tail(load_long_tail("digits", imbalance_ratio=10, val_per_class=10),
                                     torch.device("cpu"))

    def mlp(seed, projection=None):
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(192, 48), nn.ReLU())
        head = CosineClassifier(projection or 48, 10)
        return Network(backbone, 48, head, Projection(48, projection) if projection else None)

    def job(name, **kw):
        spec = ModelSpec(arch="mlp", num_classes=10)
        return Job(name=name, train_seed=1, spec=spec, epochs=2, batch_size=64, lr=0.05, schedule="cosine",
                        weight_decay=5e-4, **kw)

    def train(job, model, **kw):
        return loop.fit(job, model, data, device=torch.device("cpu"), checkpoint_path=out / f"{job.name}.pt",
                        history_path=out / "history.jsonl", meta={}, stage="test", quiet=True, **kw)

    if args.crash_after:
        calls = [0]
        def crash(step, loss):
            calls[0] += 1
            if calls[0] > args.crash_after:
                raise SystemExit(0)
        crashing = contextlib.ExitStack()  # kept: the hook stays for the rest of this process
        crashing.enter_context(hooks.on_step(crash))
    teacher = train(job("teacher", augment="aug"), mlp(1))
    teacher.eval().requires_grad_(False)
    student = train(job("student", sampling="class_balanced", loss="cbd", teachers=["teacher"]), mlp(2, 48),
                    teachers=[teacher])
    crt = copy.deepcopy(student)
    torch.manual_seed(3)
    crt.classifier = LinearClassifier(48, 10)
    crt = train(job("crt", sampling="class_balanced", train_backbone=False), crt)
    if distributed.is_main():
        torch.save({name: m.state_dict() for name, m in (("teacher", teacher), ("student", student), ("crt", crt))},
                   out / "final.pt")
    distributed.cleanup()
''')


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    path = tmp_path_factory.mktemp("worker") / "ddp_fit_worker.py"
    path.write_text(WORKER)
    return path


@pytest.fixture(scope="module")
def one_process(worker, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    run([sys.executable, str(worker), str(out)])
    return torch.load(out / "final.pt")


def assert_same_weights(a, b, tolerance=1e-6):
    """Equal up to float32 rounding: within ``tolerance`` of each tensor's largest value (at least 1)."""
    for model in a:
        for key in a[model]:
            expected, got = a[model][key].float(), b[model][key].float()
            diff = (expected - got).abs().max().item()
            assert diff <= tolerance * max(1.0, expected.abs().max().item()), (model, key, diff)


@pytest.mark.slow
def test_two_ddp_ranks_train_the_same_weights_as_one_process_also_after_a_resume(worker, one_process, tmp_path):
    """Same global batch (64 = 2 x 32): the same batches, augmentations and averaged gradients.

    The teacher is first trained alone and killed in its second epoch; both ranks then
    load its checkpoint and finish it, and train the student and the classifier from scratch.
    """
    run([sys.executable, str(worker), str(tmp_path), "--crash-after", "9"])  # epoch 1 saved, killed in epoch 2
    partial = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert partial["meta"]["epoch"] == 0 and not partial["meta"]["complete"]
    torchrun(str(worker), str(tmp_path))
    assert_same_weights(one_process, torch.load(tmp_path / "final.pt"))
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    # one line per epoch, written by rank 0 alone: the teacher's first epoch by the lone run
    assert [(r["model"], r["epoch"]) for r in history] == [
        ("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2), ("crt", 1), ("crt", 2)]


# ---------------------------------------------------------------- the command


@pytest.mark.slow
def test_torchrun_teachers_stage_completes_and_agrees_with_one_process(tmp_path):
    # On the CPU also on a GPU machine: two processes on one GPU would ask for cuda:1.
    command = ["--params", str(SMOKE), "--stage", "teachers", "-p", "device=cpu"]
    done = torchrun("-m", "cbdlib.train", *command, "--out", str(tmp_path / "ddp"))
    assert "on 2 processes" in done.stderr
    assert train_main([*command, "--out", str(tmp_path / "one")]) == 0  # the same command, one process
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    validate_metrics(ddp)
    assert set(ddp["methods"]) == set(one["methods"]) and len(ddp["methods"]) == 5
    assert ddp["class_counts"] == one["class_counts"]

    def first_epoch_losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
        assert len(rows) == 8  # 4 teachers x 2 epochs, written once (by rank 0)
        return {r["model"]: r["loss"] for r in rows if r["epoch"] == 1}

    # Same batches and augmentations, but BatchNorm statistics over 32 images per rank
    # instead of 64: the first epoch's mean training loss agrees within 10%.
    ddp_losses, one_losses = first_epoch_losses(tmp_path / "ddp"), first_epoch_losses(tmp_path / "one")
    for name, loss in one_losses.items():
        assert abs(ddp_losses[name] - loss) < 0.1 * loss, (name, ddp_losses[name], loss)


def test_a_global_batch_the_ranks_cannot_share_is_refused_before_any_work(tmp_path, monkeypatch):
    from cbdlib.config import make_params, resolve
    from cbdlib.engine import Experiment

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    settings = resolve(make_params({"dataset": "digits", "batch_size": 33, "smoke": False, "device": "cpu"}))
    with pytest.raises(CBDError, match=r"batch_size 33 \(global\) does not split evenly over 2 processes"):
        Experiment(settings, tmp_path / "run")
    assert not (tmp_path / "run").exists()
