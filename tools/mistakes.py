"""Apply each deliberate mistake of docs/testing.md, run the tests said to catch it, revert.

    python tools/mistakes.py [--show] [ID ...]   # all mistakes, or the ones named

Each mistake is a literal replacement in one file of cbdlib (it must match exactly once, so a
changed source stops this script instead of silently testing nothing). The file is restored
from git after its tests ran, so run it on a clean checkout. Prints one line per mistake:
CAUGHT with the failing tests, or MISSED (``--show`` adds pytest's one-line reason for each
failure). Exit status 1 if any mistake was missed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# id: (file, [(old, new), ...], tests that must fail)
MISTAKES = {
    "tau-on-test": ("cbdlib/engine/stages.py", [
        ('self.predict(base, "val")[0]', 'self.predict(base, "test")[0]'),
        ("balanced_accuracy(logits.numpy(), self.data.val_labels)",
         "balanced_accuracy(logits.numpy(), self.data.test_labels)"),
    ], ["tests/test_methods.py::test_tau_is_chosen_on_the_validation_set_never_on_test"]),
    "alpha-swapped": ("cbdlib/distill.py", [
        ("return (1.0 - alpha) * ce + alpha * beta * distill, ce, distill",
         "return alpha * ce + (1.0 - alpha) * beta * distill, ce, distill"),
    ], ["tests/test_distill.py::test_the_engine_trains_students_on_one_minus_alpha_ce_plus_alpha_beta_distill",
        "tests/test_methods.py::test_the_students_trained_on_one_minus_alpha_ce_plus_alpha_beta_distill"]),
    "beta-dropped": ("cbdlib/distill.py", [
        ("return (1.0 - alpha) * ce + alpha * beta * distill, ce, distill",
         "return (1.0 - alpha) * ce + alpha * distill, ce, distill"),
    ], ["tests/test_distill.py::test_the_engine_trains_students_on_one_minus_alpha_ce_plus_alpha_beta_distill",
        "tests/test_methods.py::test_the_students_trained_on_one_minus_alpha_ce_plus_alpha_beta_distill"]),
    "no-projection-target": ("cbdlib/distill.py", [
        ("parts = [F.normalize(torch.stack(parts).mean(0), dim=1)]",
         "parts = [torch.stack([t.detach().float() for t in teacher_features]).mean(0)]"),
    ], ["tests/test_distill.py::test_without_projection_the_target_is_the_normalised_mean_of_the_normalised_teachers"]),
    "logit-distill-first-teacher": ("cbdlib/distill.py", [
        ("t = torch.stack([x.detach().float() for x in teacher_logits]).mean(0)",
         "t = teacher_logits[0].detach().float()"),
    ], ["tests/test_distill.py::test_logit_distillation_adds_weight_times_t2_kl_from_the_teachers_mean_logits"]),
    "logit-distill-no-t2": ("cbdlib/distill.py", [
        ('reduction="batchmean") * temperature**2', 'reduction="batchmean")'),
    ], ["tests/test_distill.py::test_logit_distillation_adds_weight_times_t2_kl_from_the_teachers_mean_logits"]),
    "validator-no-op": ("cbdlib/metrics.py", [
        ('    if not isinstance(metrics, dict):\n        raise CBDError(f"metrics.json holds',
         '    return\n    if not isinstance(metrics, dict):\n        raise CBDError(f"metrics.json holds'),
    ], ["tests/test_metrics.py"]),
    "crt-trains-backbone": ("cbdlib/engine/stages.py", [
        ("train_backbone=False, decoupled_bn=s.decoupled_bn", "train_backbone=True, decoupled_bn=s.decoupled_bn"),
    ], ["tests/test_methods.py::test_decoupled_models_keep_ce_s_backbone_weights_and_lws_its_linear_layer",
        "tests/test_baselines.py::test_crt_reestimates_batchnorm_statistics_under_train_and_keeps_them_under_frozen"]),
    "lws-trains-linear": ("cbdlib/models/heads.py", [
        ("        for p in self.linear.parameters():\n            p.requires_grad_(False)\n",
         "        pass\n"),
    ], ["tests/test_methods.py::test_lws_scales_each_class_of_the_frozen_linear_classifier_and_trains_only_the_scales",
        "tests/test_methods.py::test_decoupled_models_keep_ce_s_backbone_weights_and_lws_its_linear_layer"]),
    "ncm-normalised-means": ("cbdlib/models/heads.py", [
        ("return cls(sums / counts, centre, variant)",
         "return cls(F.normalize(sums / counts, dim=1), centre, variant)"),
    ], ["tests/test_methods.py::test_ncm_means_are_the_class_means_of_the_treated_training_features",
        "tests/test_methods.py::test_tau_norm_and_ncm_heads_are_built_from_ce_by_their_formulas"]),
    "ncm-not-squared": ("cbdlib/models/heads.py", [
        ("return -torch.cdist(x, self.means).pow(2)", "return -torch.cdist(x, self.means)"),
    ], ["tests/test_methods.py::test_ncm_means_are_the_class_means_of_the_treated_training_features"]),
    "tau-norm-ignores-tau": ("cbdlib/models/heads.py", [
        ("weight.detach() / norms.pow(tau)", "weight.detach() / norms"),
    ], ["tests/test_methods.py::test_tau_norm_divides_each_class_weight_by_its_norm_to_the_power_tau",
        "tests/test_methods.py::test_tau_norm_and_ncm_heads_are_built_from_ce_by_their_formulas"]),
    "lws-adds-scale": ("cbdlib/models/heads.py", [
        ("return self.linear(features) * self.class_scale", "return self.linear(features) + self.class_scale"),
    ], ["tests/test_methods.py::"
        "test_lws_scales_each_class_of_the_frozen_linear_classifier_and_trains_only_the_scales"]),
    "ensemble-of-probabilities": ("cbdlib/engine/stages.py", [
        ('self.record(np.mean(logits, axis=0), "teacher_ensemble"',
         'self.record(np.mean([np.exp(z) / np.exp(z).sum(1, keepdims=True) for z in logits], axis=0), '
         '"teacher_ensemble"'),
    ], ["tests/test_methods.py::test_the_teacher_ensemble_is_the_mean_of_the_teachers_logits"]),
    "student-from-teacher": ("cbdlib/engine/stages.py", [
        ("            return init_model(job.spec, job.seed)\n",
         "            model = init_model(job.spec, job.seed)\n"
         "            if job.teachers:\n"
         "                teacher = self.load_trained(job.teachers[0], job.train_seed)\n"
         "                model.backbone.load_state_dict(teacher.backbone.state_dict())\n"
         "            return model\n"),
    ], ["tests/test_methods.py::test_students_start_from_scratch_not_from_a_teacher"]),
    "evaluate-other-normalisation": ("cbdlib/evaluate.py", [
        ("_, logits = predict(model, lt.test_images, lt.mean, lt.std, dev)",
         "_, logits = predict(model, lt.test_images, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), dev)"),
    ], ["tests/test_methods.py::test_cbdlib_evaluate_gives_the_numbers_the_run_stored"]),
    "cifar-plain-unpickler": ("cbdlib/data/sources/cifar_pickles.py", [
        ('obj = _ArrayUnpickler(io.BytesIO(blob), encoding="latin1").load()',
         'obj = pickle.Unpickler(io.BytesIO(blob), encoding="latin1").load()'),
    ], ["tests/test_sources.py::test_a_hostile_pickle_in_a_cifar_batch_is_refused_and_runs_nothing"]),
    "together-bn-not-trained": ("cbdlib/engine/together.py", [
        ("return list(self.backbone.parameters()), own",
         "return [p for n, p in self.backbone.named_parameters() if 'bn' not in n], own"),
    ], ["tests/test_together.py::test_training_together_matches_training_alone_in_every_weight_and_buffer"]),
    "aggregate-sample-std": ("cbdlib/metrics.py", [
        ("float(np.std(present)) if len(present) > 1", "float(np.std(present, ddof=1)) if len(present) > 1"),
    ], ["tests/test_metrics.py::test_three_seeds_give_the_mean_and_population_std_of_each_number",
        "tests/test_metrics.py::test_cbdlib_aggregate_over_three_runs_writes_the_mean_and_std_of_the_seeds"]),
    "aggregate-median": ("cbdlib/metrics.py", [
        ("return float(np.mean(present)), float(np.std(present))",
         "return float(np.median(present)), float(np.std(present))"),
    ], ["tests/test_metrics.py::test_three_seeds_give_the_mean_and_population_std_of_each_number",
        "tests/test_metrics.py::test_cbdlib_aggregate_over_three_runs_writes_the_mean_and_std_of_the_seeds"]),
    "aggregate-null-as-zero": ("cbdlib/metrics.py", [
        ("present = [v for v in values if v is not None]", "present = [0.0 if v is None else v for v in values]"),
    ], ["tests/test_metrics.py::test_a_split_without_classes_stays_null_in_mean_and_std",
        "tests/test_metrics.py::test_cbdlib_aggregate_over_three_runs_writes_the_mean_and_std_of_the_seeds"]),
    "notebook-04-tsne-silently-skipped": ("cbdlib/analysis/views.py", [
        ("    if features_path(Path(run_dir), seed, method).exists():\n        return True\n    print(",
         "    if False:\n        return True\n    print("),
    ], ["tests/test_workbook.py::test_the_smoke_run_fills_the_run_folder"]),
    "figures-not-saved": ("cbdlib/plots/style.py", [
        ('    if path is None:\n        return\n    path = Path(path)\n    path.parent.mkdir',
         '    return\n    path = Path(path)\n    path.parent.mkdir'),
    ], ["tests/test_workbook.py::test_the_smoke_run_fills_the_run_folder"]),
}


def run(mistake_id: str, show: bool = False) -> bool:
    path, replacements, tests = MISTAKES[mistake_id]
    file = ROOT / path
    original = file.read_text()
    text = original
    for old, new in replacements:
        if text.count(old) != 1:
            raise SystemExit(f"{mistake_id}: {old[:60]!r} occurs {text.count(old)} times in {path}")
        text = text.replace(old, new)
    try:
        file.write_text(text)
        env = {**os.environ, "CBD_SMOKE": "1", "MPLBACKEND": "Agg", "COLUMNS": "4000"}  # whole reasons
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                               "-o", "addopts=", *tests], cwd=ROOT, env=env, capture_output=True, text=True)
    finally:
        file.write_text(original)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)))
    caught = done.returncode != 0 and bool(failed)
    print(f"{mistake_id}: {'CAUGHT by ' + ', '.join(failed) if caught else 'MISSED (rc ' + str(done.returncode) + ')'}",
          flush=True)
    if show:
        for line in re.findall(r"^(?:FAILED|ERROR) \S+ - (.*)$", done.stdout, re.M):
            print(f"    {line[:300]}", flush=True)
    return caught


def main(args: list[str]) -> int:
    show = "--show" in args
    ids = [a for a in args if a != "--show"]
    unknown = [i for i in ids if i not in MISTAKES]
    if unknown:
        raise SystemExit(f"unknown mistakes: {', '.join(unknown)}; choose from {', '.join(MISTAKES)}")
    results = [run(i, show) for i in ids or list(MISTAKES)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
