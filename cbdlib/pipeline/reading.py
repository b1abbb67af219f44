"""What merged results say about the questions a reader asks first, with the seed spread.

Does CBD-ENS beat the best single-model baseline, overall and in the tail third? Does the
student reach its own teachers' ensemble? Does distilling all teachers beat distilling one?
Each answer is computed from ``metrics.json`` and the per-seed evaluations, never written
by hand, so ``summary.md`` always agrees with the numbers.

The rule: a gap is *larger than the seed spread* when it exceeds the sum of the two methods'
standard deviations over seeds (their mean ± std ranges do not overlap). The paired count
(in how many seeds one method beat the other on the same training seed) is given beside it.
"""
from __future__ import annotations

from typing import Mapping

from ..analysis import analysis_reading_lines
from ..methods import best_baseline, method_label

# (student, reference, what the comparison asks); "best baseline" is resolved per metrics.
QUESTIONS = (
    ("cbd_ens", "best baseline", "Does CBD-ENS beat the best single-model baseline?"),
    ("cbd_ens", "teacher_ensemble", "Does the CBD-ENS student reach its own teachers' ensemble?"),
    ("cbd_ens", "cbd", "Distilling all teachers (CBD-ENS) against one vanilla teacher (CBD):"),
)
SPLITS_READ = ("all", "tail", "few")   # few only where that split has classes


def compare(metrics: Mapping, evaluations: Mapping, a: str, b: str, split: str) -> dict | None:
    """``a`` against ``b`` on ``split``: the gap of the means, the seed spread, the paired wins.
    None when either method or the split's value is missing."""
    methods, std = metrics.get("methods", {}), metrics.get("std", {})
    if a not in methods or b not in methods:
        return None
    mean_a, mean_b = methods[a].get(split), methods[b].get(split)
    if mean_a is None or mean_b is None:
        return None
    std_a, std_b = (std.get(a) or {}).get(split) or 0.0, (std.get(b) or {}).get(split) or 0.0
    per_seed_a, per_seed_b = evaluations.get(a, {}), evaluations.get(b, {})
    paired = [(per_seed_a[s][split], per_seed_b[s][split]) for s in sorted(set(per_seed_a) & set(per_seed_b))
              if per_seed_a[s].get(split) is not None and per_seed_b[s].get(split) is not None]
    gap, spread = mean_a - mean_b, std_a + std_b
    return {"a": a, "b": b, "split": split, "mean_a": mean_a, "mean_b": mean_b, "std_a": std_a, "std_b": std_b,
            "gap": gap, "spread": spread, "beyond_spread": abs(gap) > spread,
            "wins": sum(x > y for x, y in paired), "losses": sum(x < y for x, y in paired), "seeds": len(paired)}


def verdict(c: dict) -> str:
    """One sentence: the means, the gap in points, whether it exceeds the seed spread, the paired count."""
    a, b = method_label(c["a"]), method_label(c["b"])
    where = "overall" if c["split"] == "all" else f"on the {c['split']} {'third' if c['split'] == 'tail' else 'split'}"
    numbers = (f"{100 * c['mean_a']:.2f} ± {100 * c['std_a']:.2f} vs {100 * c['mean_b']:.2f} ± "
               f"{100 * c['std_b']:.2f} %, a gap of {100 * c['gap']:+.2f} points against a spread of "
               f"{100 * c['spread']:.2f}")
    if not c["beyond_spread"]:
        claim = f"{a} is within the seed spread of {b} {where}"
    else:
        claim = f"{a} **{'beats' if c['gap'] > 0 else 'trails'}** {b} {where} by more than the seed spread"
    paired = f"; {a} is higher in {c['wins']} of {c['seeds']} seeds" if c["seeds"] > 1 else ""
    return f"{claim}: {numbers}{paired}."


def headline(metrics: Mapping, evaluations: Mapping, student: str = "cbd_ens") -> list[str]:
    """One plain sentence first: does the student win overall, and against what does it not?"""
    if student not in metrics.get("methods", {}):
        return []
    best = best_baseline(metrics)
    found = [c for ref in dict.fromkeys([best, "teacher_ensemble"]) if ref
             and (c := compare(metrics, evaluations, student, ref, "all"))]
    if not found:
        return []
    beaten = [method_label(c["b"]) for c in found if c["beyond_spread"] and c["gap"] > 0]
    lost = [f"{method_label(c['b'])} ({100 * c['mean_b']:.2f} %)" for c in found if c["beyond_spread"] and c["gap"] < 0]
    tied = [method_label(c["b"]) for c in found if not c["beyond_spread"]]
    name, score = method_label(student), 100 * metrics["methods"][student]["all"]
    if not lost and not tied:
        return [f"- **In short: {name} wins** ({score:.2f} %): it beats {' and '.join(beaten)} overall by more than "
                "the seed spread."]
    parts = ([f"it **trails** {' and '.join(lost)}"] if lost else []) + (
        [f"it is within the seed spread of {' and '.join(tied)}"] if tied else [])
    return [f"- **In short: {name} does not win here** ({score:.2f} % overall): {'; '.join(parts)}."]


def reading_lines(metrics: Mapping, evaluations: Mapping) -> list[str]:
    """The ``## Reading`` section of every run's ``summary.md``: a plain headline, the comparisons,
    and what the analyses say (empty when nothing can be compared)."""
    best = best_baseline(metrics)
    lines = []
    for student, reference, question in QUESTIONS:
        reference = best if reference == "best baseline" else reference
        if reference is None:
            continue
        found = [c for split in SPLITS_READ if (c := compare(metrics, evaluations, student, reference, split))]
        if not found:
            continue
        if reference == best:
            question += f" (the best by overall accuracy: {method_label(best)}, `{best}`)"
        lines += [f"- {question}"] + [f"  - {verdict(c)}" for c in found]
    lines = headline(metrics, evaluations) + lines + analysis_reading_lines(metrics)
    if not lines:
        return []
    seeds = metrics.get("seeds", [])
    return (["## Reading", "",
             f"Computed from the table above ({len(seeds)} training seed{'s' if len(seeds) != 1 else ''}). A gap is "
             "larger than the seed spread when it exceeds the sum of the two standard deviations (the mean ± std "
             "ranges do not overlap); the paired count compares the two methods seed by seed.", ""]
            + lines + [""])
