"""Class-Balanced Distillation's loss (Iscen et al., BMVC 2021, eq. 2-3): the one place of the
teacher target and of the ``(1 - alpha) CE + alpha beta distill`` weighting the engine trains with."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_target(teacher_features: list[torch.Tensor], student_dim: int | None = None) -> torch.Tensor:
    """What the student's feature is pulled towards; no gradient, float32.

    The paper's target: each teacher's L2-normalised feature, concatenated over teachers and
    normalised again (the student's projection has the concatenated size). The no-projection
    ablation (``student_dim`` differs from the concatenated size, several teachers): the
    normalised mean of the teachers' normalised features, which has one teacher's size.
    """
    if not isinstance(teacher_features, (list, tuple)) or not teacher_features:
        raise ValueError("teacher_features must be a non-empty list of per-teacher tensors")
    parts = [F.normalize(t.detach().float(), dim=1) for t in teacher_features]
    concatenated = sum(p.shape[1] for p in parts)
    if student_dim is not None and student_dim != concatenated and len(parts) > 1:
        parts = [F.normalize(torch.stack(parts).mean(0), dim=1)]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


def feature_distillation_loss(student_features: torch.Tensor, teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """Batch mean of ``1 - cos(s, t)``: ``s`` the student's projected feature, ``t`` the teachers' target.

    ``teacher_features`` is a list of (B, D_k) tensors, one per teacher (sizes may differ);
    see :func:`teacher_target` for the target and the no-projection ablation's. Computed in
    float32 (also under bf16 autocast); no alpha and no beta here: :func:`cbd_loss` weighs it.
    """
    target = teacher_target(teacher_features, student_features.shape[1])
    if target.shape != student_features.shape:
        raise ValueError(
            f"student features {tuple(student_features.shape)} do not match the teachers' "
            f"concatenated features {tuple(target.shape)}"
        )
    with torch.autocast(device_type=student_features.device.type, enabled=False):
        cosine = F.cosine_similarity(student_features.float(), target, dim=1, eps=1e-8)
        return (1.0 - cosine).mean()


def cbd_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    student_features: torch.Tensor,
    teacher_features: list[torch.Tensor],
    alpha: float = 0.4,
    beta: float = 100.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 - alpha) * CE + alpha * beta * distill``; returns (total, ce, distill)."""
    ce = F.cross_entropy(logits.float(), labels)
    distill = feature_distillation_loss(student_features, teacher_features)
    return (1.0 - alpha) * ce + alpha * beta * distill, ce, distill


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: list[torch.Tensor],
                            temperature: float) -> torch.Tensor:
    """Ablation only (the paper distils features): KL(teacher || student) at temperature T, times T^2,
    towards the mean of the teachers' logits."""
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        t = torch.stack([x.detach().float() for x in teacher_logits]).mean(0)
        log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
        p_teacher = F.softmax(t / temperature, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2
