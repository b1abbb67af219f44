"""An experiment's stages: teachers, one-stage baselines, decoupled baselines, CBD students.

Stage 1 (``teachers``): cosine-classifier teachers with instance sampling, "vanilla"
(crop + flip) or "aug" (+ colour jitter, grayscale), each with its own seed.
``one_stage``: ``ce`` (linear, instance), ``ce_cb`` (linear, class-balanced),
``balanced_softmax``. ``decoupled`` (as in Kang et al.'s code, except that the final
epoch is reported where they keep the best-validation one): ``crt`` (a new linear
classifier) and ``lws`` (per-class scales of ``ce``'s classifier), re-trained with
class-aware sampling on ``ce``'s frozen backbone; ``tau_norm`` (tau chosen on the balanced
validation set) and ``ncm`` (``cl2n`` by default). ``students``: ``cbd`` (one vanilla
teacher) and ``cbd_ens`` (all teachers), trained from scratch with class-balanced
sampling and feature distillation.

Under ``torchrun`` every rank builds the same ``Experiment`` and trains every model
together (DDP); rank 0 alone prepares the run folder, evaluates on the test set, derives
tau-norm / NCM and writes metrics, while the others wait at barriers.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint as ckpt
from .. import runs
from ..analysis import add_analyses, analyse_seed, calibration_record, load_analyses
from ..config import Settings
from ..data import LongTailData, check_trainable, data_fingerprint, load_for_settings
from ..data.device import DeviceData, predict
from ..devices import place, resolve_device
from ..errors import CBDError
from ..io import write_json
from ..methods import (
    ONE_STAGE_BASELINES,
    STANDS_ON,
    STUDENTS,
    parse_teacher_name,
    stage_of,
    stands_on,
    student_teachers,
)
from ..metrics import accuracy_record, balanced_accuracy
from ..models import (
    TORCHVISION_ARCHS,
    LinearClassifier,
    LWSClassifier,
    ModelSpec,
    NCMClassifier,
    Network,
    TauNormClassifier,
    backbone_dim,
)
from ..progress import PlannedModel, step_cost, write_plan
from . import distributed
from .compiled import should_compile
from .job import Job
from .loop import epoch_steps, fit, init_model, report
from .losses import LDAM_SCALE, drw_start, log_prior
from .precision import PrecisionChoice, choose_precision
from .together import can_train_together, fit_together

log = logging.getLogger("cbdlib")

STAGES = ("teachers", "one_stage", "decoupled", "students")
# Names accepted by ``python -m cbdlib.train --stage`` and the notebooks.
STAGE_GROUPS = {
    "teachers": ("teachers",),
    "one_stage": ("one_stage",),
    "decoupled": ("decoupled",),
    "students": ("students",),
    "student": ("students",),
    "baselines": ("one_stage", "decoupled"),
    "all": STAGES,
}
TAU_GRID = tuple(round(0.1 * i, 1) for i in range(21))  # 0.0 .. 2.0


def _stored_choice(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent or damaged: decided again


class Experiment:
    """One run folder: its data on the device, and the stages that fill it."""

    def __init__(self, settings: Settings, out_dir: str | Path, *, data: LongTailData | None = None,
                 quiet: bool | None = None):
        self.settings = settings
        distributed.init(cpu=settings.device == "cpu")  # a no-op outside torchrun (or when already joined)
        self.main = distributed.is_main()
        distributed.local_batch_size(settings.batch_size)  # a global batch the ranks cannot share stops here
        # Rank 0 checks (and may clear) the run folder; the others wait until it is ready.
        self.out = runs.prepare_run_dir(out_dir, settings) if self.main else Path(out_dir)
        distributed.barrier()
        self.device = distributed.device_for(resolve_device(settings.device))
        self.quiet = settings.smoke if quiet is None else quiet
        self.data = data if data is not None else load_for_settings(settings)
        check_trainable(self.data, settings.batch_size)  # before any model is trained
        self.streaming = getattr(self.data, "streaming", False)  # large images: decoded by DataLoader workers
        if self.streaming:
            from ..data.streaming import StreamData

            self.device_data = StreamData(self.data, self.device, num_workers=settings.num_workers,
                                          eval_batch_size=settings.eval_batch_size)
        else:  # small images: resident on the device
            self.device_data = DeviceData.from_long_tail(self.data, self.device)
            self.test_images = torch.from_numpy(np.ascontiguousarray(self.data.test_images))
        self.splits = self.data.splits
        self.precision_choice = self._precision_choice()
        self.precision = self.precision_choice.precision  # what the training steps compute in
        self.use_compile = self.precision_choice.compile_setting(settings.torch_compile, self.device)
        self.prov = {**runs.provenance(self.device), "precision": self.precision,
                     "precision_choice": self.precision_choice.record()}
        self.stage_times: dict[str, float] = {}
        # Stage-1 models share one grouped step on a GPU; on a CPU grouped convolutions are
        # slower than separate ones, and DDP / streaming runs train one model at a time.
        self.together = (self.device.type == "cuda" and not distributed.is_distributed()
                         and not self.streaming)
        self._logits_cache: dict[tuple[int, str], np.ndarray] = {}
        # What each stage trains for one training seed, and what it derives from that without training.
        self.stage_jobs = {"teachers": self._teacher_jobs, "one_stage": self._one_stage_jobs,
                           "decoupled": self._decoupled_jobs, "students": self._student_jobs}
        self.derived = {"teachers": self._teacher_ensemble, "decoupled": self._post_hoc}
        if self.main:
            write_plan(self.out, self.plan())  # what ``cbdlib run`` weighs its ETA by

    def _precision_choice(self) -> PrecisionChoice:
        """The run's precision: decided once (by rank 0, measuring where ``auto`` meets a CPU with
        bf16) and kept in the run folder, so that a resumed run computes in what it started with."""
        path = self.out / runs.PRECISION_FILE
        if self.main:
            stored = _stored_choice(path) if runs.has_results(self.out) else None  # a resume
            if stored is not None and stored.get("setting") == self.settings.precision:
                choice = PrecisionChoice.from_record(stored)
                choice = PrecisionChoice(choice.precision, f"{choice.reason} (kept from the run's start)",
                                         choice.compile_bf16, choice.measurement)
            else:
                s = self.settings
                height, width, channels = self.data.image_shape
                probe = {"arch": s.arch, "batch_size": s.batch_size, "num_classes": self.data.num_classes,
                         "image_shape": [channels, height, width]}
                long_job = s.epochs * epoch_steps(len(self.data.train_labels), s.batch_size)[1]
                choice = choose_precision(s.precision, self.device, probe=probe, smoke=s.smoke,
                                          compiled=should_compile(s.torch_compile, self.device, long_job))
                write_json(path, {"setting": s.precision, **choice.record()})
            report(f"precision: {choice.precision} ({choice.reason})")
        distributed.barrier()
        if not self.main:
            choice = PrecisionChoice.from_record(_stored_choice(path))
        return choice

    # --- bookkeeping -------------------------------------------------------------------
    @property
    def wanted(self) -> set:
        return set(self.settings.method_names)

    def data_identity(self) -> dict:
        """What a checkpoint must agree on to be used in this run."""
        s = self.settings
        return {"dataset": s.dataset, "num_classes": self.data.num_classes, "image_shape": list(self.data.image_shape),
                "class_counts": self.data.class_counts, "lt_seed": s.lt_seed, "lt_subset": s.lt_subset,
                "imbalance_ratio": s.imbalance_ratio,
                "profile": s.profile}

    def meta(self, method: str, seed: int) -> dict:
        return {**self.data_identity(), "method": method, "train_seed": seed, "mean": list(self.data.mean),
                "std": list(self.data.std), "class_names": self.data.class_names, "data": self.settings.data,
                "val_per_class": self.settings.val_per_class, "image_size": self.settings.image_size,
                "smoke": self.settings.smoke}

    def job(self, name: str, seed: int, spec: ModelSpec, **kw) -> Job:
        s = self.settings
        values = dict(name=name, train_seed=seed, spec=spec, epochs=s.epochs, schedule=s.schedule, lr=s.lr,
                      warmup_epochs=s.warmup_epochs, batch_size=s.batch_size, weight_decay=s.weight_decay,
                      momentum=s.momentum, alpha=s.alpha, beta=s.beta)
        values.update(kw)
        return Job(**values)

    def spec(self, classifier: str, projection_dim: int | None = None) -> ModelSpec:
        s = self.settings
        return ModelSpec(arch=s.arch, num_classes=self.data.num_classes, classifier=classifier,
                         cosine_scale=s.cosine_scale, learnable_scale=s.learnable_scale, projection_dim=projection_dim,
                         ncm_variant=s.ncm_variant if classifier == "ncm" else None,
                         zero_init_residual=s.zero_init_residual and s.arch in TORCHVISION_ARCHS)

    def plan(self) -> list[PlannedModel]:
        """Every model this run trains, with its epochs and the cost of its steps (for the ETA)."""
        # Every epoch is of N images, cRT's and LWS's class-aware ones too (Kang et al.'s loop).
        steps = epoch_steps(len(self.data.train_labels), self.settings.batch_size)[1]
        return [PlannedModel(job.name, seed, stage, job.epochs, steps,
                             step_cost(train_backbone=job.train_backbone, teachers=len(job.teachers)))
                for seed in self.settings.seeds for stage in STAGES for job in self.jobs(stage, seed)]

    def jobs(self, stage: str, seed: int) -> list[Job]:
        """What ``stage`` trains for training seed ``seed``: its jobs (nothing is loaded or trained)."""
        return self.stage_jobs[stage](seed)

    # --- running -----------------------------------------------------------------------
    def run(self, stage: str = "all") -> dict:
        if stage not in STAGE_GROUPS:
            raise CBDError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_GROUPS)}")
        # One writer per run folder: a second process is refused while this one trains.
        with runs.run_lock(self.out) if self.main else contextlib.nullcontext():
            for part in STAGE_GROUPS[stage]:
                t0 = time.perf_counter()
                # Wall time summed over invocations (a killed or failed one included) for metrics.json.
                with runs.timed(self.out / runs.STAGE_TIMES, part) if self.main else contextlib.nullcontext():
                    self.run_stage(part)
                self.stage_times[part] = self.stage_times.get(part, 0.0) + time.perf_counter() - t0
                report(f"stage {part} done in {self.stage_times[part]:.1f} s")
            metrics = self.write_metrics() if self.main else {}
        distributed.barrier()
        return metrics

    def run_stage(self, stage: str) -> None:
        """Train ``stage``'s models of every seed, then evaluate each seed's. Models that can share
        a step (stage 1 on a GPU, see ``together.py``) train together, every seed at once."""
        by_seed = {seed: self.jobs(stage, seed) for seed in self.settings.seeds}
        jobs = [job for seed_jobs in by_seed.values() for job in seed_jobs]
        grouped = self.together and can_train_together(jobs)
        if grouped:
            models = iter(fit_together(  # the trained models, in the order of jobs
                jobs, [self.start_model(j) for j in jobs], self.device_data, device=self.device,
                checkpoint_paths=[runs.checkpoint_path(self.out, j.train_seed, j.name) for j in jobs],
                history_path=self.out / "history.jsonl", metas=[self.meta(j.name, j.train_seed) for j in jobs],
                stage=stage, quiet=self.quiet, precision=self.precision))
        for seed, seed_jobs in by_seed.items():
            trained = [(job, next(models) if grouped else self.train_job(job, stage)) for job in seed_jobs]
            self.evaluate_stage(stage, seed, trained)

    def start_model(self, job: Job) -> Network:
        """The weights ``job`` starts from: a new model of its own seed (a student too: from scratch,
        not from a teacher); for cRT and LWS, ``ce``'s finished model with a new classifier (its
        backbone stays frozen: ``train_backbone=False``)."""
        if job.train_backbone:
            return init_model(job.spec, job.seed)
        model = self.load_trained(STANDS_ON[job.name][0], job.train_seed)  # ce
        if job.name == "crt":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(job.seed)
                model.classifier = LinearClassifier(model.feature_dim, self.data.num_classes).to(self.device)
        else:
            model.classifier = LWSClassifier(model.classifier)
        return model

    def train_job(self, job: Job, stage: str) -> Network:
        """``job`` trained from its start model (a student against its frozen teachers)."""
        teachers = self.frozen_teachers(job.teachers, job.train_seed) if job.teachers else None
        return self.train(job, self.start_model(job), stage, teachers=teachers)

    def train(self, job: Job, model: Network, stage: str, teachers=None, checkpoint_path: Path | None = None,
              history_path: Path | None = None) -> Network:
        """``fit`` into this run's checkpoints and history (the ablation passes its own files)."""
        return fit(job, model, self.device_data, device=self.device,
                   checkpoint_path=checkpoint_path or runs.checkpoint_path(self.out, job.train_seed, job.name),
                   history_path=history_path or self.out / "history.jsonl", meta=self.meta(job.name, job.train_seed),
                   stage=stage, teachers=teachers, quiet=self.quiet, sync_bn=self.settings.sync_bn,
                   precision=self.precision, use_compile=self.use_compile)

    # --- evaluation --------------------------------------------------------------------
    def evaluate_stage(self, stage: str, seed: int, trained: list[tuple[Job, Network]]) -> None:
        """Test metrics of ``stage``'s trained models of ``seed``, then of the models it derives from
        them without training (the teacher ensemble; tau-norm, NCM, logit adjustment); rank 0 only."""
        if not self.main:
            return
        for job, model in trained:
            extra = {"teachers": job.teachers} if job.teachers else None
            self.evaluate(model, job.name, seed, extra, save_features=job.name in self.feature_methods())
        if stage in self.derived:
            self.derived[stage](seed)

    def feature_methods(self) -> tuple:
        """The models whose test features are kept for t-SNE: the first teacher, ``ce`` and CBD-ENS."""
        return (*self.settings.teacher_names[:1], "ce", "cbd_ens")

    def finished_model(self, job: Job) -> Network:
        """``job``'s model from its finished checkpoint, on the device in training's layout (to evaluate again)."""
        path = runs.checkpoint_path(self.out, job.train_seed, job.name)
        if not path.exists():
            raise CBDError(f"{job.name} (seed {job.train_seed}) has no finished checkpoint")
        return place(ckpt.load_model(path, self.data_identity(), self.device), self.device)

    def predict(self, model: Network, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features, logits) of the train, val or test images, without augmentation."""
        if self.streaming:
            features, logits, _ = self.device_data.predict(model, split, self.device)
            return features, logits
        images = {"train": self.data.train_images, "val": self.data.val_images, "test": self.test_images}[split]
        return predict(model, images, self.data.mean, self.data.std, self.device, self.settings.eval_batch_size)

    def evaluate(self, model: Network, method: str, seed: int, extra: dict | None = None,
                 save_features: bool = False) -> dict | None:
        """Test metrics of a model, saved in the run folder (rank 0 only; None elsewhere)."""
        if not self.main:
            return None
        features, logits = self.predict(model, "test")
        self._logits_cache[(seed, method)] = logits
        if save_features:
            runs.save_features(self.out, seed, method, features, self.data.test_labels, self.settings.tsne_samples)
        return self.record(logits, method, seed, extra)

    def record(self, logits: np.ndarray, method: str, seed: int, extra: dict | None = None) -> dict:
        record = accuracy_record(logits, self.data.test_labels, self.splits)
        record.update(calibration_record(logits, self.data.test_labels, self.splits))
        record.update({"method": method, "seed": seed, **(extra or {})})
        runs.save_evaluation(self.out, seed, method, record)
        report(f"{method} seed {seed}: test top-1 {record['all']:.4f}")
        return record

    def write_metrics(self) -> dict:
        evaluations = self._evaluations()  # a damaged evaluation is recomputed first: the analyses read them
        self.analyse()
        metrics = runs.build_metrics(
            evaluations, dataset=self.settings.dataset,
            imbalance_ratio=self.settings.imbalance_ratio, class_counts=self.data.class_counts, splits=self.splits,
            seeds=self.settings.seeds, prov=self.prov)
        times = runs.wall_times(self.out / runs.STAGE_TIMES)
        metrics["data_fingerprint"] = data_fingerprint(self.data)  # aggregate merges only runs on the same data
        metrics["stage_times_s"] = {k: round(v["s"], 2) for k, v in times.items()}
        resumed = [k for k, v in times.items() if v["resumed"]]
        if resumed:
            metrics["resumed_stages"] = resumed
        add_analyses(metrics, evaluations, load_analyses(self.out))
        overlap = self.data.notes.get("val_overlap_images", 0)
        if overlap:  # validation images that are also training images: summary.md warns
            metrics["val_overlap"] = {"images": overlap, "classes": self.data.notes.get("val_overlap_classes", []),
                                      "val_per_class": self.settings.val_per_class}
        runs.write_metrics(self.out, metrics, self.data.class_names)
        return metrics

    def analyse(self) -> None:
        """Probes and teacher agreement of the finished models (``cbdlib.analysis``), once each.
        Streamed large images are left out: a probe would need every training feature of every model."""
        if self.streaming:
            return
        for seed in self.settings.seeds:
            done = analyse_seed(self.out, seed, self.data, lambda path: ckpt.load_model(path, self.data_identity(),
                                                                                   self.device), self.predict)
            if done:
                report(f"seed {seed} analysed: {', '.join(done)}")

    def _evaluations(self) -> dict:
        """The run's evaluations; a damaged file is evaluated again from the finished checkpoints of its
        stage (with a warning)."""
        damaged: list = []
        evaluations = runs.load_evaluations(self.out, damaged)
        for path, reason in damaged:
            method, seed = path.stem, int(path.parent.name.split("_", 1)[1])
            try:
                stage = stage_of(method)
                if stage is None:
                    raise CBDError("no stage of this package makes it")
                self.evaluate_stage(stage, seed, [(job, self.finished_model(job)) for job in self.jobs(stage, seed)])
                if not runs.load_evaluations(self.out, []).get(method, {}).get(seed):
                    raise CBDError(f"this run no longer makes {method}")
            except CBDError as error:
                raise CBDError(f"{path} is damaged ({reason}) and cannot be recomputed: {error}; delete it and "
                               f"rerun its stage, or set overwrite: true") from None
            log.warning("warning: %s was damaged (%s); recomputed it from the run's checkpoints", path, reason)
        return runs.load_evaluations(self.out) if damaged else evaluations

    def load_trained(self, method: str, seed: int) -> Network:
        """A finished model of this run, checked against the run's data before use."""
        path = runs.checkpoint_path(self.out, seed, method)
        if not path.exists():
            raise CBDError(f"{method} (seed {seed}) has not been trained in {self.out}; run its stage first")
        return ckpt.load_model(path, self.data_identity(), self.device)

    # --- stage 1 -----------------------------------------------------------------------
    def teacher_names(self) -> list[str]:
        return list(self.settings.teacher_names)

    def _teacher_jobs(self, seed: int) -> list[Job]:
        return [self.job(name, seed, self.spec("cosine"), sampling="instance", augment=parse_teacher_name(name)[0])
                for name in self.settings.teacher_names]

    def _teacher_ensemble(self, seed: int) -> None:
        if "teacher_ensemble" in self.wanted:
            names = self.teacher_names()
            logits = [self._teacher_logits(name, seed) for name in names]
            self.record(np.mean(logits, axis=0), "teacher_ensemble", seed, {"members": names})

    def _teacher_logits(self, name: str, seed: int) -> np.ndarray:
        if (seed, name) not in self._logits_cache:
            self._logits_cache[(seed, name)] = self.predict(self.load_trained(name, seed), "test")[1]
        return self._logits_cache[(seed, name)]

    # --- one-stage baselines ---------------------------------------------------------
    def _one_stage_jobs(self, seed: int) -> list[Job]:
        drw = drw_start(self.settings.epochs)  # deferred re-weighting: the last 20% of the epochs
        linear = self.spec("linear")
        # LDAM-DRW's normalised classifier; its fixed s = 30 is the LDAM loss's scale (engine/losses.py).
        ldam = dataclasses.replace(self.spec("cosine"), cosine_scale=LDAM_SCALE, learnable_scale=False)
        recipes = {"ce": (linear, dict(sampling="instance", loss="ce")),
                   "ce_cb": (linear, dict(sampling="class_balanced", loss="ce")),
                   "balanced_softmax": (linear, dict(sampling="instance", loss="balanced_softmax")),
                   "ce_drw": (linear, dict(sampling="instance", loss="ce", reweight_from_epoch=drw)),
                   "ldam_drw": (ldam, dict(sampling="instance", loss="ldam", reweight_from_epoch=drw))}
        s = self.settings
        needed = [m for m in stands_on(s.method_names, s.teacher_names) if stage_of(m) == "one_stage"]  # ce
        needed += [m for m in ONE_STAGE_BASELINES if m in self.wanted and m not in needed]
        return [self.job(name, seed, recipes[name][0], **recipes[name][1]) for name in needed]

    # --- decoupled baselines (Kang et al. 2020) --------------------------------------
    def _decoupled_jobs(self, seed: int) -> list[Job]:
        """cRT (a new linear classifier) and LWS (per-class scales of ``ce``'s), re-trained on ``ce``'s frozen
        backbone as Kang et al.'s code does: class-aware sampling, SGD with cosine decay to 0."""
        s = self.settings
        recipes = {"crt": (self.spec("linear"), s.decoupled_epochs), "lws": (self.spec("lws"), s.lws_epochs)}
        return [self.job(name, seed, spec, sampling="class_aware", epochs=epochs, schedule="cosine", warmup_epochs=0,
                         lr=s.decoupled_lr, weight_decay=s.decoupled_weight_decay,
                         train_backbone=False, decoupled_bn=s.decoupled_bn)
                for name, (spec, epochs) in recipes.items() if name in self.wanted]

    def _post_hoc(self, seed: int) -> None:
        """tau-norm, NCM and logit adjustment: derived from ``ce``'s finished model, trained not at all."""
        derive = {"tau_norm": self._tau_norm, "ncm": self._ncm, "logit_adjust": self._logit_adjust}
        needed = [name for name in derive if name in self.wanted]
        if needed:
            base = self.load_trained("ce", seed)
            for name in needed:
                derive[name](base, seed)

    def _tau_norm(self, base: Network, seed: int) -> None:
        weight = base.classifier.weight.detach().float().cpu()
        val_features = torch.from_numpy(self.predict(base, "val")[0])
        scores = []
        for tau in TAU_GRID:  # chosen on the balanced validation set, never on test
            logits = val_features @ TauNormClassifier(weight, tau).weight.t()
            scores.append(balanced_accuracy(logits.numpy(), self.data.val_labels))
        best = first_best(scores)
        tau = TAU_GRID[best]
        model = copy.deepcopy(base)
        model.classifier = TauNormClassifier(weight, tau).to(self.device)
        spec = self.spec("tau_norm")
        spec.tau = tau
        self._save_derived(model, spec, "tau_norm", seed)
        self.evaluate(model, "tau_norm", seed, {"tau": tau, "tau_val_balanced_acc": scores[best],
                                                "tau_grid": list(TAU_GRID), "tau_val_curve": scores})

    def _logit_adjust(self, base: Network, seed: int) -> None:
        """Menon et al.'s post-hoc logit adjustment of ``ce``: predict with ``logits - tau * log(prior)``,
        tau chosen on the balanced validation set (ties to the tau closest to 1, the paper's default).
        The adjusted model is ``ce`` with ``tau * log(prior)`` taken off its classifier's bias."""
        prior = log_prior(torch.as_tensor(self.data.class_counts, dtype=torch.float64)).numpy()
        val_logits = self.predict(base, "val")[1].astype(np.float64)
        scores = [balanced_accuracy(val_logits - tau * prior, self.data.val_labels) for tau in TAU_GRID]
        best = closest_best(scores, TAU_GRID, prefer=1.0)
        tau = TAU_GRID[best]
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.classifier.bias -= torch.as_tensor(tau * prior, dtype=model.classifier.bias.dtype,
                                                     device=model.classifier.bias.device)
        self._save_derived(model, self.spec("linear"), "logit_adjust", seed)
        self.evaluate(model, "logit_adjust", seed, {"tau": tau, "tau_val_balanced_acc": scores[best],
                                                    "tau_grid": list(TAU_GRID), "tau_val_curve": scores})

    def _ncm(self, base: Network, seed: int) -> None:
        features = torch.from_numpy(self.predict(base, "train")[0])
        labels = torch.from_numpy(self.data.train_labels).long()
        model = copy.deepcopy(base)
        variant = self.settings.ncm_variant
        model.classifier = NCMClassifier.from_features(features, labels, self.data.num_classes, variant).to(self.device)
        self._save_derived(model, self.spec("ncm"), "ncm", seed)
        self.evaluate(model, "ncm", seed, {"ncm_variant": variant})

    def _save_derived(self, model: Network, spec: ModelSpec, name: str, seed: int) -> None:
        """Models built without training (tau-norm, NCM) are saved too, so they can be re-evaluated."""
        ckpt.save_checkpoint(runs.checkpoint_path(self.out, seed, name), spec=spec.to_dict(),
                             meta={**self.meta(name, seed), "epoch": 0, "complete": True, "job": None},
                             model=model.state_dict())

    # --- stage 2: class-balanced distillation ----------------------------------------
    def _student_jobs(self, seed: int) -> list[Job]:
        return [self.student_job(name, seed, student_teachers(name, self.settings.teacher_names))
                for name in STUDENTS if name in self.wanted]

    def frozen_teachers(self, names: list[str], seed: int) -> list[Network]:
        """The trained teachers ``names`` of ``seed``, in eval mode and without gradients."""
        teachers = [self.load_trained(name, seed) for name in names]
        for teacher in teachers:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        return teachers

    def student_job(self, name: str, seed: int, teacher_names: list[str], projection: bool | None = None,
                    **changes) -> Job:
        """A CBD student's recipe: class-balanced sampling, the CBD loss on the features of the teachers
        ``teacher_names``, a projection to their summed feature size (``projection_dim`` when set);
        ``changes`` (the ablation's) replace the run's own settings."""
        s = self.settings
        projection = s.projection if projection is None else projection
        teacher_dims = len(teacher_names) * backbone_dim(s.arch)  # the run's teachers share its arch
        projection_dim = (s.projection_dim or teacher_dims) if projection else None
        values = dict(sampling="class_balanced", loss="cbd", teachers=list(teacher_names),
                      logit_distill_weight=s.logit_distill_weight,
                      logit_distill_temperature=s.logit_distill_temperature)
        return self.job(name, seed, self.spec("cosine", projection_dim), **{**values, **changes})


def first_best(scores, tolerance: float = 1e-9) -> int:
    """Index of the best score, ties going to the first (the smallest tau). Scores equal up to
    float rounding tie: a mean of per-class accuracies differs in its last bits with the order
    of the classes it sums."""
    scores = np.asarray(scores, dtype=np.float64)
    return int(np.flatnonzero(scores >= scores.max() - tolerance)[0])


def closest_best(scores, grid, prefer: float, tolerance: float = 1e-9) -> int:
    """Index of the best score, ties going to the grid value closest to ``prefer`` (then the smaller)."""
    scores = np.asarray(scores, dtype=np.float64)
    tied = np.flatnonzero(scores >= scores.max() - tolerance)
    return int(min(tied, key=lambda i: (abs(grid[i] - prefer), grid[i])))


def train_stage(settings: Settings, out_dir: str | Path, stage: str = "all", **kw) -> dict:
    """Run one stage (or all) of an experiment into ``out_dir``; returns the merged metrics."""
    return Experiment(settings, out_dir, **kw).run(stage)


__all__ = ["Experiment", "STAGES", "STAGE_GROUPS", "first_best", "train_stage"]
