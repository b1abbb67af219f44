"""``python -m cbdlib.train --params FILE --out DIR [--stage teachers|baselines|student|all]``.

Trains the stage(s) of one experiment into DIR and writes ``DIR/metrics.json``. A rerun
of the same command resumes from the last checkpoints; stages add to the same DIR.

Distributed: ``torchrun --nproc_per_node=N -m cbdlib.train ...`` runs the same command
on N processes (one GPU each, NCCL; gloo on CPUs). ``batch_size`` stays the global batch
and ``lr`` is used as stated; rank 0 alone logs and writes.
"""
import sys

from .commands.train import main

if __name__ == "__main__":
    sys.exit(main())
