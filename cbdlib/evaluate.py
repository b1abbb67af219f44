"""Re-evaluate a saved model (``python -m cbdlib evaluate --checkpoint FILE``)."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt
from .data import load_long_tail
from .data.device import predict
from .devices import resolve_device
from .errors import CBDError
from .metrics import accuracy_record


def evaluate_checkpoint(path: str | Path, data: str | None = None, device: str = "auto") -> dict:
    """Rebuild the model and its test set from what the checkpoint records, and evaluate it."""
    meta = ckpt.load_checkpoint(path)["meta"]
    for key in ("dataset", "imbalance_ratio", "lt_seed"):
        if key not in meta:
            raise CBDError(f"checkpoint {path} does not record {key!r}; it was not written by cbdlib")
    from .config import SMOKE_MAX_PER_CLASS, SMOKE_TEST_PER_CLASS

    smoke = bool(meta.get("smoke"))
    lt = load_long_tail(
        meta["dataset"], data if data is not None else meta.get("data"), imbalance_ratio=meta["imbalance_ratio"],
        profile=meta.get("profile", "exp"), lt_seed=meta["lt_seed"],
        lt_subset=meta.get("lt_subset", "shuffled"),  # checkpoints from before lt_subset existed: the old draw
        val_per_class=meta.get("val_per_class", 10),
        image_size=meta.get("image_size", 32), max_train_per_class=SMOKE_MAX_PER_CLASS if smoke else None,
        max_test_per_class=SMOKE_TEST_PER_CLASS if smoke else None,
    )
    _check_same_classes(meta, lt, path, data if data is not None else meta.get("data"))
    dev = resolve_device(device)
    expected = {"dataset": meta["dataset"], "num_classes": lt.num_classes, "class_counts": lt.class_counts}
    model = ckpt.load_model(path, expected, dev)
    _, logits = predict(model, lt.test_images, lt.mean, lt.std, dev)
    record = accuracy_record(logits, lt.test_labels, lt.splits)
    record.pop("confusion")
    return {"method": meta.get("method"), "seed": meta.get("train_seed"), "dataset": meta["dataset"],
            "checkpoint": str(path), "test_images": int(len(lt.test_labels)), **record}


def _check_same_classes(meta: dict, lt, path, data) -> None:
    """Refuse data whose classes or image size differ from the checkpoint's: a score there means nothing."""
    where = f"the data at {data}" if data is not None else f"the {meta['dataset']} data found here"
    names = meta.get("class_names")
    if names is not None:
        if len(names) != lt.num_classes:
            raise CBDError(f"checkpoint {path} was trained on {len(names)} classes, but {where} has "
                           f"{lt.num_classes}; evaluate it on the data it was trained on")
        differ = [i for i, (a, b) in enumerate(zip(names, lt.class_names)) if str(a) != str(b)]
        if differ:
            i = differ[0]
            raise CBDError(f"checkpoint {path} was trained on other classes than {where} has ({len(differ)} of "
                           f"{len(names)} differ; label {i}: {names[i]!r} vs {lt.class_names[i]!r}); "
                           f"evaluate it on the data it was trained on")
    shape = meta.get("image_shape")
    if shape is not None and list(shape) != list(lt.image_shape):
        raise CBDError(f"checkpoint {path} was trained on {'x'.join(map(str, shape))} images, but {where} gives "
                       f"{'x'.join(map(str, lt.image_shape))}; evaluate it on the data it was trained on")
