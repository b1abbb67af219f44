"""Models behind one interface: ``model(x) -> (features, logits)``.

``ModelSpec`` is the plain description a checkpoint stores, so a model can be rebuilt
and checked (architecture, class count, classifier) before its weights are loaded.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from ..errors import CBDError
from .heads import (
    CosineClassifier,
    LinearClassifier,
    LWSClassifier,
    NCMClassifier,
    Projection,
    TauNormClassifier,
)
from .resnet_cifar import CifarResNet

# 32x32 backbones: blocks per stage and widths. resnet_tiny is for tests and smoke runs.
CIFAR_ARCHS = {
    "resnet32": (5, (16, 32, 64)),
    "resnet20": (3, (16, 32, 64)),
    "resnet8": (1, (16, 32, 64)),
    "resnet_tiny": (1, (8, 16, 32)),
}
TORCHVISION_ARCHS = ("resnet18", "resnet50", "resnet101", "resnet152")
ARCHS = tuple(CIFAR_ARCHS) + TORCHVISION_ARCHS
CLASSIFIERS = ("cosine", "linear", "lws", "tau_norm", "ncm")


@dataclass
class ModelSpec:
    arch: str
    num_classes: int
    classifier: str = "cosine"
    cosine_scale: float = 20.0
    learnable_scale: bool = False
    projection_dim: Optional[int] = None
    tau: Optional[float] = None
    ncm_variant: Optional[str] = None    # NCM heads: cl2n | cosine (None, in checkpoints made before cl2n: cosine)
    zero_init_residual: bool = False     # torchvision ResNets: last BatchNorm gamma of each block starts at 0

    def to_dict(self) -> dict:
        return asdict(self)


class Network(nn.Module):
    """Backbone -> pooled feature -> (optional projection) -> classifier.

    Returns ``(features, logits)``; ``features`` is what the classifier sees (for the CBD
    student: the projected feature after its ReLU, the one that is distilled).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, classifier: nn.Module,
                 projection: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.backbone_dim = feature_dim
        self.projection = projection
        self.classifier = classifier

    @property
    def feature_dim(self) -> int:
        return self.projection.out_features if self.projection is not None else self.backbone_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        if self.projection is not None:
            features = self.projection(features)
        return features, self.classifier(features)


def build_backbone(arch: str, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """The backbone and its pooled feature size; ``zero_init_residual`` applies to torchvision ResNets."""
    if arch in CIFAR_ARCHS:
        blocks, widths = CIFAR_ARCHS[arch]
        net = CifarResNet(blocks, widths)
        return net, net.feature_dim
    if arch in TORCHVISION_ARCHS:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise CBDError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")


@functools.cache
def backbone_dim(arch: str) -> int:
    """The pooled feature size of ``arch``'s backbone (a teacher's feature size). Built on the meta
    device: no weights are allocated or initialised (a ResNet-152 costs nothing), the RNG is untouched."""
    with torch.device("meta"):
        return build_backbone(arch)[1]


def build_classifier(spec: ModelSpec, in_features: int) -> nn.Module:
    c = spec.num_classes
    if spec.classifier == "cosine":
        return CosineClassifier(in_features, c, spec.cosine_scale, spec.learnable_scale)
    if spec.classifier == "linear":
        return LinearClassifier(in_features, c)
    if spec.classifier == "lws":
        return LWSClassifier(LinearClassifier(in_features, c))
    if spec.classifier == "tau_norm":
        return TauNormClassifier(torch.zeros(c, in_features), spec.tau if spec.tau is not None else 1.0)
    if spec.classifier == "ncm":
        return NCMClassifier(torch.zeros(c, in_features), variant=spec.ncm_variant or "cosine")
    raise CBDError(f"unknown classifier {spec.classifier!r}; choose one of {', '.join(CLASSIFIERS)}")


def build_model(spec: ModelSpec) -> Network:
    backbone, dim = build_backbone(spec.arch, spec.zero_init_residual)
    projection = Projection(dim, spec.projection_dim) if spec.projection_dim else None
    in_features = spec.projection_dim or dim
    return Network(backbone, dim, build_classifier(spec, in_features), projection)


__all__ = [
    "ARCHS", "ModelSpec", "Network", "build_model", "build_backbone", "backbone_dim",
    "CosineClassifier", "LinearClassifier", "LWSClassifier", "NCMClassifier", "TauNormClassifier", "Projection",
]
