"""``python -m cbdlib.bench [--device cpu|cuda] [--size tiny|full] [--json FILE]``: the engine against a naive loop."""
from __future__ import annotations

import argparse
import json
import sys

from ..bench import PROFILES, run_benchmark
from .plumbing import exits_cleanly, setup_logging


def summary_lines(result: dict) -> list[str]:
    """The headline figures in words (stderr), the JSON object going to stdout."""
    lines = [f"{result['device']}, torch {result['torch']}, {result['threads']} threads, precision "
             f"{result['precision']}, compile {result['compile']}"]
    for arch, r in [(result["arch"], result), *result.get("by_arch", {}).items()]:
        lines.append(f"{arch} batch {result['batch_size']}: naive {r['naive_img_per_s']:.0f} img/s "
                     f"({r['naive_workers']} workers), engine {r['engine_img_per_s']:.0f} img/s: "
                     f"speedup {r['speedup']:.2f}x")
        choice = r.get("precision_choice")
        if choice:
            lines.append(f"  precision auto: {choice['precision']} ({choice['reason']})")
    lines.append(f"4 models together: {result['together_ratio']:.2f}x one model's epoch; full CBD-ENS "
                 f"experiment (extrapolated): {result['full_cbd_ens_s'] / 60:.0f} min")
    return lines


@exits_cleanly
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cbdlib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--size", default=None, choices=tuple(PROFILES),
                        help="tiny: seconds (the default on a CPU); full: CIFAR-10-LT sizes, ResNet-32 and ResNet-8 "
                             "(the default on a GPU; about 8 minutes on a 2-core CPU)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    setup_logging(verbose=False)
    result = run_benchmark(args.device, args.size)
    text = json.dumps(result, indent=2)
    print(text)
    for line in summary_lines(result):
        print(line, file=sys.stderr)
    if args.json:
        from ..io import write_text

        write_text(args.json, text + "\n")
    return 0
