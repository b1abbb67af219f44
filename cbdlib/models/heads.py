"""Classifier heads: cosine (fixed scale), linear, and the decoupled variants (LWS, tau-norm)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
    """Nearest class mean with cosine similarity on the (frozen) backbone's features."""

    def __init__(self, class_means: torch.Tensor):
        super().__init__()
        self.register_buffer("means", F.normalize(class_means.float(), dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=1) @ self.means.t()


class Projection(nn.Sequential):
    """The CBD student's projection: linear + ReLU, sized to the teachers' concatenated features."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.Linear(in_features, out_features), nn.ReLU(inplace=False))
        self.out_features = out_features
