"""What a run's numbers say, in sentences computed from ``metrics.json`` and the per-seed
evaluations, never written by hand, so that ``summary.md`` and notebook 04 always agree with them.

Does CBD-ENS beat the best single-model baseline, overall and in the tail third? Does the
student reach its own teachers' ensemble? Does distilling all teachers beat distilling one?
Then what the analyses say: the students' probed features, calibration, teacher agreement.

The rule: a gap is *larger than the seed spread* when it exceeds the sum of the two methods'
standard deviations over seeds (their mean ± std ranges do not overlap); anything smaller is
within the spread. The paired count (in how many seeds one method beat the other on the same
training seed) is given beside it.
"""
from __future__ import annotations

from typing import Mapping

from ..methods import best_baseline, is_teacher, method_label

# (student, reference, what the comparison asks); "best baseline" is resolved per metrics.
QUESTIONS = (
    ("cbd_ens", "best baseline", "Does CBD-ENS beat the best single-model baseline?"),
    ("cbd_ens", "teacher_ensemble", "Does the CBD-ENS student reach its own teachers' ensemble?"),
    ("cbd_ens", "cbd", "Distilling all teachers (CBD-ENS) against one vanilla teacher (CBD):"),
)
SPLITS_READ = ("all", "tail", "few")   # few only where that split has classes


def beyond_spread(gap: float, spread: float) -> bool:
    """The reading's one rule: a gap counts when it exceeds the sum of the two seed spreads."""
    return abs(gap) > spread


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
            "gap": gap, "spread": spread, "beyond_spread": beyond_spread(gap, spread),
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


def _pm(mean, std) -> str:
    return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


def _gap_words(gap: float, spread: float, better: str, worse: str) -> str:
    if not beyond_spread(gap, spread):
        return "are within the seed spread of"
    return better if gap > 0 else worse


def probe_sentences(metrics: Mapping, student: str = "cbd_ens", split: str = "all") -> list[str]:
    """The student's probed features against its best-probed teacher's and ``ce``'s."""
    probes, std = metrics.get("probes") or {}, metrics.get("probes_std") or {}
    if student not in probes or probes[student]["linear"].get(split) is None:
        return []
    teachers = [m for m in probes if is_teacher(m) and probes[m]["linear"].get(split) is not None]
    lines = []
    references = []
    if teachers:
        references.append((max(teachers, key=lambda m: probes[m]["linear"][split]), "its best-probed teacher"))
    if "ce" in probes and probes["ce"]["linear"].get(split) is not None:
        references.append(("ce", "the instance-sampled `ce` backbone"))
    where = "overall" if split == "all" else f"on the {split} {'third' if split == 'tail' else 'split'}"
    for reference, what in references:
        a, b = probes[student]["linear"][split], probes[reference]["linear"][split]
        sa, sb = std[student]["linear"][split] or 0.0, std[reference]["linear"][split] or 0.0
        verb = _gap_words(a - b, sa + sb, "are **better** than", "are **worse** than")
        ncm_a, ncm_b = probes[student]["ncm"].get(split), probes[reference]["ncm"].get(split)
        ncm = (f"; NCM: {_pm(ncm_a, std[student]['ncm'][split])} vs {_pm(ncm_b, std[reference]['ncm'][split])} %"
               if ncm_a is not None and ncm_b is not None else "")
        lines.append(f"{method_label(student)}'s features {verb} {what} ({method_label(reference)}) under the same "
                     f"linear probe {where}: {_pm(a, sa)} vs {_pm(b, sb)} %{ncm}.")
    return lines


def calibration_sentence(metrics: Mapping, student: str = "cbd_ens") -> list[str]:
    ece, std = metrics.get("ece") or {}, metrics.get("ece_std") or {}
    if not ece:
        return []
    ranked = sorted((m for m in ece if ece[m].get("all") is not None), key=lambda m: ece[m]["all"])
    first, last = ranked[0], ranked[-1]
    lines = [f"Best calibrated overall: {method_label(first)} (ECE {_pm(ece[first]['all'], std[first]['all'])} %); "
             f"worst: {method_label(last)} ({_pm(ece[last]['all'], std[last]['all'])} %)."]
    best = best_baseline(metrics)
    if student in ece and best in ece:
        a, b = ece[student]["all"], ece[best]["all"]
        verb = _gap_words(b - a, (std[student]["all"] or 0) + (std[best]["all"] or 0),
                          "is **better calibrated** than", "is **worse calibrated** than")
        verb = verb.replace("are within", "is within")
        lines.append(f"{method_label(student)} {verb} the best baseline ({method_label(best)}): ECE "
                     f"{_pm(a, std[student]['all'])} vs {_pm(b, std[best]['all'])} %.")
    return lines


def agreement_sentences(metrics: Mapping) -> list[str]:
    agreement = metrics.get("teacher_agreement") or {}
    lines = []
    for student, record in agreement.get("student_cosine", {}).items():
        parts = [f"{split} {record[split]:.3f}" for split in ("head", "tail") if record.get(split) is not None]
        lines.append(f"{method_label(student)} follows its {len(record['teachers'])} teacher(s) with a mean test "
                     f"cosine of {record['all']:.3f}" + (f" ({', '.join(parts)})" if parts else "") + ".")
    pairwise = agreement.get("pairwise_agreement")
    if pairwise:
        lines.append(f"The teachers agree pairwise on {100 * pairwise['all']:.1f} % of the test images"
                     + (f" ({100 * pairwise['tail']:.1f} % in the tail third)" if pairwise.get("tail") is not None
                        else "") + ".")
    gain = agreement.get("ensemble_gain")
    if gain and gain.get("all") is not None:
        tail = f", {100 * gain['tail']:+.2f} in the tail third" if gain.get("tail") is not None else ""
        lines.append(f"Their ensemble is {100 * gain['all']:+.2f} ± {100 * (gain['std']['all'] or 0):.2f} points "
                     f"from its best member overall{tail}.")
    return lines


def analysis_reading_lines(metrics: Mapping) -> list[str]:
    """Markdown bullets on the probes, calibration and teacher agreement (empty when none was computed)."""
    sentences = probe_sentences(metrics) + probe_sentences(metrics, split="tail")
    sentences += calibration_sentence(metrics) + agreement_sentences(metrics)
    if not sentences:
        return []
    settings = metrics.get("probe_settings") or {}
    how = (f"linear probe: {settings.get('epochs')} epochs, lr {settings.get('lr')}, {settings.get('sampling')}; "
           f"NCM {settings.get('ncm')}" if settings else "")
    return (["- What the analyses say" + (f" ({how})" if how else "") + ":"]
            + [f"  - {s}" for s in sentences])
