"""The allowed values of every parameter (``RULES``), checked for every run before anything is
written; a value outside its range stops the run with a ``ParameterError`` naming the key."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import CBDError

DATASETS = ("digits", "cifar10", "cifar100", "folder", "splitfile", "imagenet_lt", "places_lt", "inat2018")
SCHEDULES = ("cifar_lt", "cosine")
PRECISIONS = ("auto", "bf16", "fp32")
DECOUPLED_BN_MODES = ("train", "frozen")
NCM_VARIANTS = ("cl2n", "cosine")
LT_SUBSETS = ("cao", "shuffled")  # how the long-tailed subset is drawn (data/longtail.py)
# ``lt_subset: null`` per dataset: the literature's subset where there is one.
DEFAULT_LT_SUBSET = {"cifar10": "cao", "cifar100": "cao"}


def default_lt_subset(dataset: str) -> str:
    return DEFAULT_LT_SUBSET.get(dataset, "shuffled")


class ParameterError(CBDError):
    """A value outside its key's allowed range; ``key`` names the parameter (for ``-p`` / file prefixes)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Rule:
    """What a key's value must satisfy: ``allows(value)``, stated as ``allowed`` ("> 0", "in [0, 1]")."""

    allows: Any                 # value -> bool
    allowed: Any                # str, or a function returning it (for lists known only at check time)
    unknown_word: bool = False  # choices say "unknown arch 'x'" first

    def check(self, key: str, value: Any) -> None:
        if self.allows(value):
            return
        allowed = self.allowed() if callable(self.allowed) else self.allowed
        if self.unknown_word:
            raise ParameterError(key, f"unknown {key} {value!r}: {key} must be {allowed}")
        raise ParameterError(key, f"{key} must be {allowed}, got {value!r}")


def at_least(low) -> Rule:
    return Rule(lambda v: v >= low, f">= {low:g}")


def above(low) -> Rule:
    return Rule(lambda v: v > low, f"> {low:g}")


def between(low, high, *, high_open: bool = False) -> Rule:
    if high_open:
        return Rule(lambda v: low <= v < high, f"in [{low:g}, {high:g})")
    return Rule(lambda v: low <= v <= high, f"in [{low:g}, {high:g}]")


def one_of(*choices) -> Rule:
    options = choices[0] if len(choices) == 1 and callable(choices[0]) else (lambda: choices)
    return Rule(lambda v: v in options(), lambda: "one of " + ", ".join(map(str, options())), unknown_word=True)


def _archs() -> tuple:
    from .models import ARCHS  # torch is imported only when an arch is checked

    return ARCHS


# What the results folder holds besides run folders: a run named so would replace or break it.
RESERVED_RUN_NAMES = ("index.csv", "README.md", "bench", "screenshots")


def plain_run_name(name: str) -> bool:
    """A run folder's name: one plain path component, not hidden, not one of the results folder's own files."""
    return (bool(name) and not any(c in name for c in "/\\\0") and not name.startswith(".")
            and name.lower() not in {n.lower() for n in RESERVED_RUN_NAMES})


def distinct_seeds(seeds: list) -> bool:
    """Training seeds: a non-empty list of distinct integers >= 0."""
    ints = all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    return bool(seeds) and ints and len(set(seeds)) == len(seeds)


# The allowed values of each key, checked for every run before anything is written.
# A key of a None-able type skips its rule when None. Add a key here with its rule.
RULES: dict[str, Rule] = {
    "run_name": Rule(plain_run_name, "a plain folder name (no /, \\ or NUL character, no leading dot, not "
                                     f"one of the results folder's own names {', '.join(RESERVED_RUN_NAMES)})"),
    "dataset": one_of(*DATASETS),
    "imbalance_ratio": at_least(1),
    "profile": one_of("exp", "step"),
    "lt_seed": at_least(0),
    "lt_subset": one_of(*LT_SUBSETS),
    "val_per_class": at_least(1),
    "image_size": at_least(1),
    "arch": one_of(_archs),
    "epochs": at_least(1),
    "decoupled_epochs": at_least(1),
    "lws_epochs": at_least(1),
    "decoupled_lr": above(0),
    "decoupled_weight_decay": at_least(0),
    "decoupled_bn": one_of(*DECOUPLED_BN_MODES),
    "ncm_variant": one_of(*NCM_VARIANTS),
    "precision": one_of(*PRECISIONS),
    "batch_size": at_least(1),
    "lr": above(0),
    "weight_decay": at_least(0),
    "momentum": between(0, 1, high_open=True),
    "schedule": one_of(*SCHEDULES),
    "warmup_epochs": at_least(0),
    "seeds": Rule(distinct_seeds, "a non-empty list of distinct integers >= 0"),
    "alpha": between(0, 1),
    "beta": above(0),
    "cosine_scale": above(0),
    "projection_dim": at_least(1),
    "logit_distill_weight": at_least(0),
    "logit_distill_temperature": above(0),
    "methods": Rule(lambda v: len(v) > 0, "null (every method) or a non-empty list of method names"),
    "eval_batch_size": at_least(1),
    "num_workers": at_least(0),
    "tsne_samples": at_least(1),
    "device": Rule(re.compile(r"auto|cpu|cuda(:\d+)?").fullmatch, "auto, cpu, cuda or cuda:N"),
}


def check_rule(key: str, value: Any) -> None:
    """Refuse a non-finite number, then a value outside ``RULES[key]`` (None passes: it means "derive")."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(key, f"{key} must be a finite number, got {value!r}")
    if key in RULES:
        RULES[key].check(key, value)
