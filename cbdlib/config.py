"""One parameter schema for YAML files, ``cbdlib.train``, ``cbdlib run -p`` and notebooks.

``make_params`` is where values enter: it checks every key, type and range once and returns
``Params`` (what a user states). ``resolve`` turns it into ``Settings``, what a run actually uses
(smoke profile applied, ``lr`` and the teachers' names filled in), which the code below trusts.
Both are frozen dataclasses, so they print, compare and serialise as they are.
"""
from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import CBDError
from .methods import BASELINES, STUDENTS, TEACHER_KINDS, teacher_name
from .param_rules import ParameterError, check_rule, default_lt_subset
from .plain_values import check_plain, load_yaml
from .text import did_you_mean


@dataclass(frozen=True)
class Params:
    """Every key a run understands. Comments give the meaning; YAML files use the same names."""

    run_name: str = "default"            # folder name under CBD_RESULTS_DIR
    # digits | cifar10 | cifar100 | folder | splitfile | imagenet_lt | places_lt | inat2018
    dataset: str = "digits"
    data: Optional[str] = None           # path to the data (None: CBD_CIFAR10 / CBD_CIFAR100, or embedded)
    imbalance_ratio: Optional[float] = 10.0  # n_max / n_min of the long-tailed subset (>= 1); None: natural counts
    profile: str = "exp"                 # exp | step
    lt_seed: int = 0                     # draws the long-tailed subset (and digits' train/test split)
    # how the subset is drawn: cao (Cao et al.'s LDAM-DRW recipe, the published CIFAR-LT subsets) | shuffled
    # (one PCG64 permutation per class); None: cao for CIFAR-10/100, shuffled for the other datasets
    lt_subset: Optional[str] = None
    val_per_class: int = 10              # balanced validation images per class (tau is chosen on these)
    # folder / splitfile images are resized to this (CIFAR is 32); the crop side of imagenet_lt /
    # places_lt / inat2018 (224); None (folder trees): keep the images' own size, which must be one
    image_size: Optional[int] = 32
    arch: str = "resnet32"               # resnet32 | resnet20 | resnet8 | resnet_tiny | resnet18/50/101/152
    # torchvision ResNets: each residual block's last BatchNorm gamma starts at 0 (official CBD); CIFAR
    # ResNets ignore it
    zero_init_residual: bool = True
    epochs: int = 200                    # epochs for every model trained from scratch
    # Decoupled baselines as Kang et al. ran them: classifier re-training on ce's frozen backbone with
    # class-aware sampling (an epoch of N images, as their loop stops it), SGD, cosine decay to 0, no warm-up.
    decoupled_epochs: int = 10           # cRT epochs
    lws_epochs: int = 5                  # LWS epochs
    decoupled_lr: Optional[float] = None  # cRT / LWS learning rate; None: 0.2 x batch/512
    decoupled_weight_decay: float = 5e-4  # cRT / LWS weight decay
    # train: the frozen backbone's BatchNorm statistics are re-estimated (Kang et al.) | frozen: kept
    decoupled_bn: str = "train"
    # cl2n: centred, L2-normalised features, Euclidean distance (Kang et al.) | cosine: cosine to the
    # normalised class means
    ncm_variant: str = "cl2n"
    batch_size: int = 128                # global batch size (the decoupled stage uses it too)
    lr: Optional[float] = None           # learning rate; None: 0.1 x batch/128 (cifar_lt) or 0.1 x batch/256 (cosine)
    weight_decay: float = 2e-4
    momentum: float = 0.9                # SGD momentum of every stage
    schedule: str = "cifar_lt"           # cifar_lt (warm-up, x0.01 at 80%, x0.0001 at 90%) | cosine (official CBD)
    warmup_epochs: int = 5               # linear warm-up of the cifar_lt schedule
    teachers: list = field(default_factory=lambda: ["vanilla:1", "vanilla:2", "aug:1", "aug:2"])
    seeds: list = field(default_factory=lambda: [1])   # training seeds on the one long-tailed subset
    alpha: float = 0.4                   # weight of the distillation term
    beta: float = 100.0                  # scale of the distillation term
    cosine_scale: float = 20.0           # fixed scale s of the cosine classifier
    learnable_scale: bool = False        # learn s instead (off in the paper)
    projection: bool = True              # student projection (linear + ReLU) before its classifier
    projection_dim: Optional[int] = None  # None: sum of the teachers' feature sizes
    logit_distill_weight: float = 0.0    # ablation: weight of a KL term on teacher logits (0 = paper)
    logit_distill_temperature: float = 4.0
    methods: Optional[list] = None       # None: every method; else a subset of the contract's names
    eval_batch_size: int = 512
    num_workers: int = 0                 # DataLoader workers (only the streaming path uses them)
    sync_bn: bool = False                # torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    tsne_samples: int = 2000             # test images embedded by t-SNE in notebook 04
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    # auto (bf16 autocast where the CPU/GPU computes bf16 natively, else fp32) | bf16 | fp32
    precision: str = "auto"
    # torch.compile the training step; None: when a job has enough steps to repay it
    torch_compile: Optional[bool] = None
    smoke: Optional[bool] = None         # None: follow CBD_SMOKE; True/False override it
    overwrite: bool = False              # allow replacing a run folder made with other parameters


# What the smoke profile changes: tiny model, 1-2 epochs, a handful of images.
SMOKE_SETTINGS = {
    "arch": "resnet_tiny",
    "epochs": 2,
    "decoupled_epochs": 1,
    "lws_epochs": 1,
    "batch_size": 64,
    "tsne_samples": 200,
    "eval_batch_size": 256,
}
SMOKE_MAX_PER_CLASS = 60      # training images per class at most under smoke (n_max)
SMOKE_TEST_PER_CLASS = 30     # test images per class at most under smoke


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Params)]


TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", list: "a list",
              tuple: "a list", dict: "a mapping", str: "a string"}


def fits_type(value: Any, kind: type) -> bool:
    """Whether a YAML-parsed value fits a type: a bool is no int, an int is a float, a list is a list
    (YAML has no tuples); a type without a word here takes anything. The one type rule of the schema
    and of the notebooks' own parameters."""
    if kind not in TYPE_WORDS:
        return True
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, {float: (int, float), tuple: list}.get(kind, kind))


def _kind(hint: Any) -> tuple[type, bool]:
    """``Optional[float]`` -> ``(float, True)``; ``int`` -> ``(int, False)``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


# Each key's type and whether it may be null.
_KINDS = {name: _kind(hint) for name, hint in typing.get_type_hints(Params).items()}
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_value(key: str, value: Any) -> Any:
    """Validate one key/value pair against the schema; returns the value (ints widened to float)."""
    if key not in _KINDS:
        raise ParameterError(key, f"unknown parameter {key!r}{did_you_mean(key, _KINDS)}; known parameters: "
                                  f"{', '.join(_KINDS)}")
    try:
        check_plain(value, f"parameter {key!r}")
    except CBDError as error:
        raise ParameterError(key, str(error)) from None
    kind, nullable = _KINDS[key]
    if value is None and nullable:
        return None
    if kind is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if not fits_type(value, kind):
        raise ParameterError(key, f"parameter {key!r} must be {TYPE_WORDS[kind]}{' or null' if nullable else ''}, "
                                  f"got {value!r} ({type(value).__name__})")
    return float(value) if kind is float else value


def make_params(values: dict) -> Params:
    """Build ``Params`` from a mapping, checking every key and type, then every value in its allowed
    range (``RULES``), then the checks that involve several keys: the one check of a run's parameters
    (``resolve`` and everything after it trust the result)."""
    p = Params(**{k: check_value(k, v) for k, v in values.items()})
    for f in dataclasses.fields(p):
        check_rule(f.name, getattr(p, f.name))
    if p.device.startswith("cuda"):  # only where such a GPU exists, before any work (torch imported only here)
        from .devices import resolve_device

        try:
            resolve_device(p.device)
        except CBDError as error:
            raise ParameterError("device", str(error)) from None
    if p.dataset == "digits" and p.data is not None:
        raise ParameterError("data", f"data must be null for dataset digits (it is built in), got {p.data!r}")
    known = all_method_names(p.teachers)  # checks the teachers
    unknown = [m for m in p.methods or () if m not in known]
    if unknown:
        raise ParameterError("methods", f"unknown method(s) {unknown}; known: {', '.join(known)}")
    return p


def parse_teachers(teachers: list) -> list[tuple[str, int]]:
    """``["vanilla:1", "aug:2"]`` -> ``[("vanilla", 1), ("aug", 2)]``."""
    if not isinstance(teachers, list) or not teachers:
        raise ParameterError("teachers", f"teachers must be a non-empty list like ['vanilla:1', 'aug:1'], "
                                         f"got {teachers!r}")
    parsed = []
    for spec in teachers:
        kind, _, seed = str(spec).partition(":")
        if kind not in TEACHER_KINDS or not seed.isdigit():
            raise ParameterError("teachers", f"teacher {spec!r} must look like 'vanilla:1' or 'aug:2'")
        parsed.append((kind, int(seed)))
    if len(set(parsed)) != len(parsed):
        raise ParameterError("teachers", f"teachers repeat: {teachers!r}")
    if not any(kind == "vanilla" for kind, _ in parsed):
        raise ParameterError("teachers", "teachers need at least one 'vanilla:N' teacher (CBD uses one vanilla "
                                         "teacher)")
    return parsed


def teacher_names(teachers: list) -> tuple[str, ...]:
    """``["vanilla:1", "aug:2"]`` -> ``("teacher_vanilla_1", "teacher_aug_2")``: the teachers' method names."""
    return tuple(teacher_name(kind, seed) for kind, seed in parse_teachers(teachers))


def all_method_names(teachers: list) -> list[str]:
    return [*teacher_names(teachers), "teacher_ensemble", *BASELINES, *STUDENTS]


def load_params_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CBDError(f"parameter file not found: {path}")
    try:
        values = load_yaml(path.read_text(), f"parameter file {path}") or {}
    except yaml.YAMLError as exc:
        raise CBDError(f"parameter file {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(values, dict):
        raise CBDError(f"parameter file {path} must hold a mapping of key: value")
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``-p seeds=[1,2]``); ``yaml_scalar`` writes it."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise CBDError(f"-p expects key=value, got {text!r}")
    try:
        value = load_yaml(raw, f"-p {text}") if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def yaml_scalar(value: Any) -> str:
    """``value`` as ``-p key=value`` writes it (one line of YAML, no document end marker)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def smoke_enabled(smoke: Optional[bool]) -> bool:
    """``None`` follows the CBD_SMOKE environment variable; a literal True/False overrides it."""
    if smoke is not None:
        return bool(smoke)
    return os.environ.get("CBD_SMOKE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings(Params):
    """What a run actually uses: every parameter after the smoke profile (``smoke`` a bool, ``lr``
    and ``decoupled_lr`` the rates used), and what the run derives from them. ``teachers`` stays
    the parameter (``["vanilla:1", ...]``); the teachers' method names are ``teacher_names``."""

    lr: float = 0.1
    decoupled_lr: float = 0.05
    teacher_names: tuple = ()                  # ("teacher_vanilla_1", ...), in the order of ``teachers``
    method_names: tuple = ()                   # the methods this run produces (``methods``, or every one)
    max_train_per_class: Optional[int] = None  # smoke's cap on training images per class
    max_test_per_class: Optional[int] = None   # smoke's cap on test images per class

    @property
    def params(self) -> Params:
        """The effective parameters, as ``params.yaml`` records them (lr stated)."""
        return Params(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Params)})


def resolve(params: Params) -> Settings:
    """Apply the smoke profile and compute derived values (lr, teacher names, method list).
    ``params`` comes from ``make_params``, which checked it."""
    smoke = smoke_enabled(params.smoke)
    values = dataclasses.asdict(params)
    if smoke:
        values.update(SMOKE_SETTINGS)
        values["seeds"] = list(params.seeds[:1])  # one seed, the first one asked for
    values["smoke"] = smoke
    if values["lt_subset"] is None:  # stated in params.yaml, so a later default cannot change a run's data
        values["lt_subset"] = default_lt_subset(params.dataset)
    if values["lr"] is None:
        values["lr"] = 0.1 * values["batch_size"] / (256 if values["schedule"] == "cosine" else 128)
    if values["decoupled_lr"] is None:  # Kang et al.: lr 0.2 at batch 512, scaled linearly
        values["decoupled_lr"] = 0.2 * values["batch_size"] / 512
    return Settings(**values, teacher_names=teacher_names(params.teachers),
                    method_names=tuple(params.methods or all_method_names(params.teachers)),
                    max_train_per_class=SMOKE_MAX_PER_CLASS if smoke else None,
                    max_test_per_class=SMOKE_TEST_PER_CLASS if smoke else None)


def format_smoke_replacements(given: dict, origins: dict) -> str | None:
    """One console line naming the values stated in ``given`` that the smoke profile replaces
    (``origins``: ``-p`` or a file, per key), or None. Smoke keeps winning (tests and CI rely on
    it); the commands print this so a user knows."""
    replaced = {k: (given[k], used) for k, used in SMOKE_SETTINGS.items() if k in given and given[k] != used}
    seeds = given.get("seeds")
    if isinstance(seeds, list) and len(seeds) > 1:
        replaced["seeds"] = (seeds, seeds[:1])
    if not replaced:
        return None
    shown = ", ".join(f"{k}={v!r} -> {used!r}" + (f" ({origins[k]})" if k in origins else "")
                      for k, (v, used) in replaced.items())
    return f"warning: the smoke profile (CBD_SMOKE or smoke: true) replaced given values: {shown}"


def project_root() -> Path:
    """The checkout's root (the folder holding ``cbdlib/``), found from the package."""
    return Path(__file__).resolve().parent.parent


def params_dir() -> Path:
    return project_root() / "notebooks" / "params"
