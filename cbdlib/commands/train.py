"""``python -m cbdlib.train --params FILE --out DIR [--stage teachers|baselines|student|all]``.

Trains the stage(s) of one experiment into DIR and writes ``DIR/metrics.json``. A rerun
of the same command resumes from the last checkpoints; stages add to the same DIR.

Distributed: ``torchrun --nproc_per_node=N -m cbdlib.train ...`` runs the same command
on N processes (one GPU each, NCCL; gloo on CPUs). ``batch_size`` stays the global batch
and ``lr`` is used as stated; rank 0 alone logs and writes.
"""
from __future__ import annotations

import argparse
import sys

from ..config import format_smoke_replacements, load_params_file, make_params, parse_override, resolve
from ..engine import distributed
from .plumbing import exits_cleanly, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from ..engine import STAGE_GROUPS

    parser = argparse.ArgumentParser(prog="python -m cbdlib.train", description=__doc__.splitlines()[0])
    parser.add_argument("--params", required=True, help="YAML parameter file (see notebooks/params/)")
    parser.add_argument("--out", required=True, help="run folder to write (created if absent)")
    parser.add_argument("--stage", default="all", choices=sorted(STAGE_GROUPS),
                        help="which stage to run (default: all)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter (value parsed as YAML); repeatable")
    return parser


@exits_cleanly
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    overrides = dict(parse_override(item) for item in args.param)
    given = {**load_params_file(args.params), **overrides}
    settings = resolve(make_params(given))
    distributed.init(cpu=settings.device == "cpu")  # torchrun: join the process group; a no-op otherwise
    setup_logging(verbose=distributed.is_main())  # the other ranks only report warnings
    replaced = format_smoke_replacements(given, {k: "-p" if k in overrides else args.params for k in given})
    if settings.smoke and replaced and distributed.is_main():
        print(replaced, file=sys.stderr)
    from ..engine import train_stage

    metrics = train_stage(settings, args.out, args.stage)
    if distributed.is_main():
        ranks = f" on {distributed.world_size()} processes" if distributed.is_distributed() else ""
        print(f"wrote {args.out}/metrics.json ({len(metrics['methods'])} methods{ranks})", file=sys.stderr)
    # After an error a rank just exits (torchrun then stops the others); here all ranks leave together.
    distributed.cleanup()
    return 0
