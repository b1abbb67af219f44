"""Classifier heads: cosine (fixed scale), linear, and the decoupled variants (LWS, tau-norm)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CBDError


class CosineClassifier(nn.Module):
    """logits = s * <f/|f|, w_c/|w_c|>, s fixed at 20 in the paper (learnable as an option).

    Computed in float32 even under bf16 autocast: normalised dot products lose too much
    precision in bf16 once multiplied by s.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 20.0, learnable_scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        # Unit-scale rows: the normalisation divides gradients by |w|, so tiny initial
        # weights would turn every step into a huge jump of the class directions.
        nn.init.normal_(self.weight, std=in_features ** -0.5)
        scale_tensor = torch.tensor(float(scale))
        if learnable_scale:
            self.scale = nn.Parameter(scale_tensor)
        else:
            self.register_buffer("scale", scale_tensor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = F.normalize(features.float(), dim=1)
            w = F.normalize(self.weight.float(), dim=1)
            return self.scale.float() * (f @ w.t())


class LinearClassifier(nn.Linear):
    """Plain linear classifier (the ``ce`` baseline, Kang et al.)."""


class TauNormClassifier(nn.Module):
    """Kang et al.'s tau-normalisation of a trained linear classifier: w_c / |w_c|^tau, no bias."""

    def __init__(self, weight: torch.Tensor, tau: float):
        super().__init__()
        norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.register_buffer("weight", weight.detach() / norms.pow(tau))
        self.tau = float(tau)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight.t()


class LWSClassifier(nn.Module):
    """Learnable weight scaling: a frozen linear classifier times one learned scale per class."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        for p in self.linear.parameters():
            p.requires_grad_(False)
        self.class_scale = nn.Parameter(torch.ones(linear.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features) * self.class_scale


class NCMClassifier(nn.Module):
    """Nearest class mean on the (frozen) backbone's features, in one of two variants.

    ``cl2n`` (Kang et al.'s default): a feature is centred on the mean training feature
    (``centre``) and L2-normalised; ``means`` are the class means of the training features
    so treated; logits are minus the squared Euclidean distance to each mean.
    ``cosine``: cosine similarity between the L2-normalised feature and the normalised
    class means, no centring.
    """

    def __init__(self, class_means: torch.Tensor, centre: torch.Tensor | None = None, variant: str = "cl2n"):
        super().__init__()
        if variant not in ("cl2n", "cosine"):
            raise CBDError(f"unknown NCM variant {variant!r}; choose cl2n or cosine")
        self.variant = variant
        if variant == "cl2n":
            self.register_buffer("centre", torch.zeros(class_means.shape[1]) if centre is None else centre.float())
            self.register_buffer("means", class_means.float())
        else:
            self.register_buffer("means", F.normalize(class_means.float(), dim=1))

    @classmethod
    def from_features(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      variant: str = "cl2n") -> "NCMClassifier":
        """The classifier of training ``features`` (N, D) with their ``labels``."""
        features = features.float()
        centre = features.mean(0) if variant == "cl2n" else torch.zeros(features.shape[1])
        treated = F.normalize(features - centre, dim=1)
        sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, labels, treated)
        counts = torch.bincount(labels, minlength=num_classes).clamp_min(1).unsqueeze(1)
        return cls(sums / counts, centre, variant)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            if self.variant == "cosine":
                return F.normalize(features.float(), dim=1) @ self.means.t()
            x = F.normalize(features.float() - self.centre, dim=1)
            return -torch.cdist(x, self.means).pow(2)


class Projection(nn.Sequential):
    """The CBD student's projection: linear + ReLU, sized to the teachers' concatenated features."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.ReLU(inplace=False))
        self.out_features = out_features
