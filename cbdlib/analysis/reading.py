"""What the analyses say, in sentences computed from ``metrics.json`` (summary.md, notebook 04).

The same rule as the accuracy reading (``pipeline/reading.py``): a gap counts when it exceeds the
sum of the two standard deviations over seeds; anything smaller is said to be within the spread.
"""
from __future__ import annotations

from typing import Mapping

from ..methods import best_baseline, is_teacher, method_label


def _pm(mean, std) -> str:
    return f"{100 * mean:.2f} ± {100 * (std or 0.0):.2f}"


def _gap_words(gap: float, spread: float, better: str, worse: str) -> str:
    if abs(gap) <= spread:
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
