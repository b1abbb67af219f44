"""The methods of the contract: their names, the order tables list them in, their labels in
figures, and which of them count as baselines. Everything that orders, labels or picks
methods asks here, so the tables, the figures and the summaries agree.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

from .errors import CBDError
from .text import did_you_mean

# Trained from scratch: ce, ce_cb, Balanced Softmax (Ren et al.), and with deferred re-weighting
# (Cao et al.): cross-entropy (ce_drw) and the LDAM loss (ldam_drw).
ONE_STAGE_BASELINES = ("ce", "ce_cb", "balanced_softmax", "ce_drw", "ldam_drw")
# On ce's trained model: re-trained or re-derived classifiers on its frozen backbone (Kang et al.),
# and post-hoc logit adjustment of its logits (Menon et al.).
DECOUPLED_BASELINES = ("crt", "lws", "tau_norm", "ncm", "logit_adjust")
# Single-model baselines: what CBD is compared against (teachers and their ensemble are not baselines).
BASELINES = ONE_STAGE_BASELINES + DECOUPLED_BASELINES
STUDENTS = ("cbd", "cbd_ens")
# Every method with a fixed name (the individual teachers are ``teacher_<kind>_<seed>``).
NAMED_METHODS = (*BASELINES, "teacher_ensemble", *STUDENTS)
TEACHER_KINDS = ("vanilla", "aug")   # crop + flip | + colour jitter and grayscale
TEACHER_NAME = re.compile(r"^teacher_(vanilla|aug)_(\d+)$")
# The stage whose run makes each method (every teacher_<kind>_<seed>: "teachers").
STAGE_OF = {"teacher_ensemble": "teachers", **{m: "one_stage" for m in ONE_STAGE_BASELINES},
            **{m: "decoupled" for m in DECOUPLED_BASELINES}, **{m: "students" for m in STUDENTS}}
# What a method stands on besides its own training: the decoupled baselines use ce's trained
# model; a student distils its teachers (``student_teachers``).
STANDS_ON = {m: ("ce",) for m in DECOUPLED_BASELINES}

LABELS = {
    "ce": "CE",
    "ce_cb": "CE (class-balanced)",
    "balanced_softmax": "Balanced Softmax",
    "ce_drw": "CE-DRW",
    "ldam_drw": "LDAM-DRW",
    "logit_adjust": "logit adjustment",
    "crt": "cRT",
    "lws": "LWS",
    "tau_norm": "τ-norm",
    "ncm": "NCM",
    "teacher_ensemble": "teacher ensemble",
    "cbd": "CBD",
    "cbd_ens": "CBD-ENS",
}


# How the baselines were run, as summary.md says it (docs/baselines.md has the references).
BASELINES_NOTE = (
    "Decoupled baselines as in Kang et al.'s code, on `ce`'s frozen backbone: cRT and LWS re-train the "
    "classifier with class-aware sampling (4 images per visited class, an epoch of N images as their loop "
    "stops it; SGD, cosine decay to 0, BatchNorm statistics per `decoupled_bn`), tau-norm's tau is "
    "chosen on the balanced validation set, NCM per `ncm_variant`. `ldam_drw` and `ce_drw` as Cao et al.'s "
    "code (LDAM margins, s = 30, deferred re-weighting from 80% of the epochs); `logit_adjust` is Menon et "
    "al.'s post-hoc adjustment of `ce`, tau on validation. Final epoch reported, they keep best-val (or best "
    "test, in LDAM-DRW's code)."
)


def teacher_name(kind: str, seed: int) -> str:
    """The method name of a teacher: ``("aug", 2)`` -> ``teacher_aug_2`` (``parse_teacher_name`` reads it)."""
    return f"teacher_{kind}_{seed}"


def parse_teacher_name(name) -> tuple[str, int] | None:
    """``teacher_aug_2`` -> ``("aug", 2)``; None for a name that is not an individual teacher's."""
    match = TEACHER_NAME.fullmatch(name) if isinstance(name, str) else None
    return (match[1], int(match[2])) if match else None


def is_teacher(name) -> bool:
    return parse_teacher_name(name) is not None


def teacher_sort_key(name: str) -> tuple:
    """Vanilla teachers first, then by seed."""
    kind, seed = parse_teacher_name(name)
    return kind != "vanilla", seed


def stage_of(name: str) -> str | None:
    """The stage that makes ``name`` (None: no stage of this package makes it)."""
    return "teachers" if is_teacher(name) else STAGE_OF.get(name)


def student_teachers(student: str, teacher_names) -> list[str]:
    """The teachers a student distils: CBD the first vanilla teacher, CBD-ENS all of them."""
    if student == "cbd":
        return [n for n in teacher_names if parse_teacher_name(n)[0] == "vanilla"][:1]
    return list(teacher_names)


def stands_on(methods, teacher_names) -> list[str]:
    """The trained models that ``methods`` need from earlier stages (teachers, ``ce``), in order, once each."""
    needed = []
    for method in methods:
        needed += student_teachers(method, teacher_names) if method in STUDENTS else STANDS_ON.get(method, ())
    return list(dict.fromkeys(needed))


def method_order(names) -> list[str]:
    """``names`` in table order: baselines, teachers (sorted), the teacher ensemble, students;
    unknown names last, sorted."""
    names = list(names)
    teachers = sorted(n for n in names if is_teacher(n))
    order = [*BASELINES, *teachers, "teacher_ensemble", *STUDENTS]
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def method_label(name: str) -> str:
    """Readable label of a method key: ``cbd_ens`` -> ``CBD-ENS``, ``teacher_aug_2`` -> ``teacher aug 2``."""
    return LABELS.get(name, name.replace("_", " "))


def best_baseline(metrics: Mapping, candidates=BASELINES, exclude: Optional[str] = None) -> Optional[str]:
    """The candidate with the highest overall (``all``) accuracy in ``metrics``; the first
    listed wins a tie. None when no candidate has an overall accuracy."""
    methods = metrics.get("methods", {})
    present = [b for b in candidates if b != exclude and (methods.get(b) or {}).get("all") is not None]
    if not present:
        return None
    return max(present, key=lambda b: (methods[b]["all"], -present.index(b)))


def is_method_name(name) -> bool:
    """Whether ``name`` is a method of the contract: a baseline, a student, the teacher ensemble or a
    ``teacher_<kind>_<seed>``. Options that name methods (and become file names) accept these only."""
    if not isinstance(name, str):
        return False
    return name in NAMED_METHODS or is_teacher(name)


def check_method_name(name) -> None:
    """Refuse a name that ``is_method_name`` does not accept, with the names that are."""
    if not is_method_name(name):
        raise CBDError(f"unknown method {name!r}{did_you_mean(name, NAMED_METHODS)}; methods: "
                       f"{', '.join(NAMED_METHODS)}, teacher_<vanilla|aug>_<seed>")
