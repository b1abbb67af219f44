"""``python -m cbdlib {stats,run,aggregate,evaluate}``: the workbook's commands."""
from __future__ import annotations

import argparse
import json
import sys

from .plumbing import exits_cleanly, setup_logging


def _stats(args) -> int:
    from ..data import format_stats, load_long_tail
    from ..errors import CBDError
    from ..param_rules import check_rule

    # The same rules as a run's parameters, before any data is read.
    for option, key in (("--dataset", "dataset"), ("--imbalance-ratio", "imbalance_ratio"), ("--lt-seed", "lt_seed"),
                        ("--val-per-class", "val_per_class")):
        value = getattr(args, key)
        try:
            check_rule(key, value)
        except CBDError as error:
            raise CBDError(f"{option} {value}: {error}") from None
    data = load_long_tail(args.dataset, args.data, imbalance_ratio=args.imbalance_ratio, profile=args.profile,
                          lt_seed=args.lt_seed, lt_subset=args.lt_subset, val_per_class=args.val_per_class)
    stats = data.stats()
    stats["class_names"] = data.class_names
    stats["test_images"] = int(len(data.test_labels))
    stats["val_images"] = int(len(data.val_labels))
    if args.json:
        print(json.dumps(stats))
    else:
        print(format_stats(stats))
    return 0


def _run(args) -> int:
    from ..config import parse_override
    from ..pipeline import run_pipeline

    overrides = dict(parse_override(item) for item in args.param)
    run_pipeline(args.params, overrides, progress=not args.no_progress)
    return 0


def _aggregate(args) -> int:
    from ..pipeline import aggregate_runs

    keep = None if args.keep_model.lower() == "none" else args.keep_model
    aggregate_runs(args.run_dirs, args.out, partial=args.partial, notebook=not args.no_notebook, keep_model=keep)
    return 0


def _evaluate(args) -> int:
    from ..evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, data=args.data, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['method']} on {result['dataset']}: top-1 {result['all']:.4f}")
        for key in ("many", "medium", "few", "head", "mid", "tail"):
            value = result[key]
            print(f"  {key:6s} {'n/a' if value is None else f'{value:.4f}'}")
    return 0


def _ablate(args) -> int:
    from ..ablation import run_ablation

    result = run_ablation(args.run_dir, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite,
                          device=args.device)
    print(f"wrote {args.run_dir}/ablation/ablation.md ({len(result['rows'])} students)", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cbdlib", description="Class-Balanced Distillation workbook")
    sub = parser.add_subparsers(dest="command", required=True)

    stats = sub.add_parser("stats", help="statistics of a long-tailed training subset")
    stats.add_argument("--dataset", required=True, help="digits | cifar10 | cifar100 | folder | splitfile")
    stats.add_argument("--data", default=None, help="dataset path (default: CBD_CIFAR10 / CBD_CIFAR100, or embedded)")
    stats.add_argument("--imbalance-ratio", type=float, required=True)
    stats.add_argument("--profile", default="exp", choices=("exp", "step"))
    stats.add_argument("--lt-seed", type=int, default=0)
    stats.add_argument("--lt-subset", default=None, choices=("cao", "shuffled"),
                       help="how the subset is drawn (default: cao for CIFAR, shuffled elsewhere)")
    stats.add_argument("--val-per-class", type=int, default=10)
    stats.add_argument("--json", action="store_true", help="print only one JSON object on stdout")
    stats.set_defaults(func=_stats)

    run = sub.add_parser("run", help="run notebooks 01 -> 04 through papermill into the run folder")
    run.add_argument("--params", default=None, help="YAML parameter file (default: notebooks/params/default.yaml)")
    run.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter (value parsed as YAML); repeatable")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)

    agg = sub.add_parser("aggregate", help="merge runs of different seeds (mean and std)")
    agg.add_argument("run_dirs", nargs="+")
    agg.add_argument("--out", required=True)
    agg.add_argument("--partial", action="store_true",
                     help="merge runs whose methods did not all finish; each mean says how many seeds it covers")
    agg.add_argument("--keep-model", default="cbd_ens", metavar="METHOD",
                     help="the one checkpoint the merged folder keeps, of the first seed "
                          "(default cbd_ens; none: no model)")
    agg.add_argument("--no-notebook", action="store_true",
                     help="do not run notebook 04 on the merged results (no figures)")
    agg.set_defaults(func=_aggregate)

    ab = sub.add_parser("ablate", help="CBD-ENS students with alpha, beta, teachers or projection changed")
    ab.add_argument("run_dir", help="a run folder whose teachers are trained")
    ab.add_argument("--epochs", type=int, default=None, help="epochs per student (default: a quarter of the run's)")
    ab.add_argument("--seed", type=int, default=None, help="training seed whose teachers are used (default: the first)")
    ab.add_argument("--overwrite", action="store_true",
                    help="replace the ablation students already in RUN_DIR/ablation")
    ab.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the run's own)")
    ab.set_defaults(func=_ablate)

    ev = sub.add_parser("evaluate", help="re-evaluate a saved model on its test set")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default=None, help="dataset path when it differs from the one recorded")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=_evaluate)
    return parser


@exits_cleanly
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return args.func(args)
