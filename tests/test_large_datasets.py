"""ImageNet-LT / Places-LT split files, iNaturalist-2018 json, and the streaming data path,
on tiny fixtures written here with Pillow (solid-colour JPEGs, a few per class)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cbdlib import CBDError
from cbdlib.config import make_params, resolve
from cbdlib.data import load_long_tail
from cbdlib.data.large import LargeLongTail, load_large
from cbdlib.data.samplers import DistributedStrategySampler
from cbdlib.data.streaming import (
    ImageFileDataset,
    SeededSampler,
    StreamData,
    eval_resize,
    eval_transform,
    make_eval_loader,
    make_train_loader,
    train_transform,
)
from cbdlib.engine import Experiment
from cbdlib.metrics import validate_metrics

TRAIN_COUNTS = (8, 4, 2)   # a long tail over three classes
COLOURS = ((200, 30, 30), (30, 200, 30), (30, 30, 200))


def write_jpeg(path, colour, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def write_split_benchmark(root, prefix="ImageNet_LT", leading_slash=False, val_per_class=2, test_per_class=2):
    """An ImageNet-LT style tree: images under train/ and val/, three split files at the root."""
    lines = {"train": [], "val": [], "test": []}
    for label, count in enumerate(TRAIN_COUNTS):
        for split, n, folder in (("train", count, "train"), ("val", val_per_class, "train"),
                                 ("test", test_per_class, "val")):
            for i in range(n):
                rel = f"{folder}/n{label:03d}/{split}_{i}.JPEG"
                write_jpeg(root / rel, COLOURS[label])
                lines[split].append(f"{'/' if leading_slash else ''}{rel} {label}")
    for split, rows in lines.items():
        (root / f"{prefix}_{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def write_inat(root, per_class=(9, 5, 2), val_per_class=3):
    categories = [{"id": cid, "name": f"species {cid}"} for cid in (0, 1, 2)]
    for name, counts in (("train2018.json", per_class), ("val2018.json", (val_per_class,) * 3)):
        images, annotations = [], []
        for label, count in enumerate(counts):
            for i in range(count):
                image_id = len(images) + (1000 if name.startswith("val") else 0)
                rel = f"train_val2018/Plantae/{label}/{name[:3]}_{i}.jpg"
                write_jpeg(root / rel, COLOURS[label])
                images.append({"id": image_id, "file_name": rel, "width": 40, "height": 30})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": label})
        (root / name).write_text(json.dumps({"images": images, "annotations": annotations,
                                             "categories": categories}))
    return root


@pytest.fixture
def imagenet_lt(tmp_path):
    return write_split_benchmark(tmp_path / "imagenet")


# ---------------------------------------------------------------- split files


def test_imagenet_lt_uses_train_val_and_test_splits_as_they_are(imagenet_lt):
    data = load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=1, image_size=32)
    assert isinstance(data, LargeLongTail)
    assert data.class_counts == list(TRAIN_COUNTS)
    assert data.num_classes == 3 and data.image_shape == (32, 32, 3)
    assert np.bincount(data.val_labels).tolist() == [2, 2, 2]  # the official val split, not a part of train
    assert np.bincount(data.test_labels).tolist() == [2, 2, 2]
    assert not set(data.val.paths) & set(data.train.paths)
    assert all(p.startswith(str(imagenet_lt)) for p in data.train.paths + data.test.paths)
    assert data.stats()["class_counts"] == list(TRAIN_COUNTS)


def test_places_lt_split_files_in_a_subfolder_with_leading_slashes(tmp_path):
    root = tmp_path / "places"
    write_split_benchmark(root, prefix="Places_LT", leading_slash=True)
    (root / "Places_LT").mkdir()
    for split in ("train", "val", "test"):
        (root / f"Places_LT_{split}.txt").rename(root / "Places_LT" / f"Places_LT_{split}.txt")
    data = load_long_tail("places_lt", str(root), imbalance_ratio=1)
    assert data.class_counts == list(TRAIN_COUNTS)


def test_a_malformed_line_names_the_file_and_line(imagenet_lt):
    split = imagenet_lt / "ImageNet_LT_train.txt"
    lines = split.read_text().splitlines()
    lines[2] = lines[2].split()[0]  # path without a label
    split.write_text("\n".join(lines) + "\n")
    with pytest.raises(CBDError, match=r"ImageNet_LT_train\.txt, line 3: expected 'relative/path label'"):
        load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=1)
    lines[2] = "train/n000/train_2.JPEG three"
    split.write_text("\n".join(lines) + "\n")
    with pytest.raises(CBDError, match=r"ImageNet_LT_train\.txt, line 3: label 'three' is not an integer"):
        load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=1)


def test_a_missing_image_or_split_file_is_named(imagenet_lt):
    missing = imagenet_lt / "val" / "n001" / "test_1.JPEG"
    missing.unlink()
    with pytest.raises(CBDError, match=rf"image {missing} \(listed in .*ImageNet_LT_test\.txt\) does not exist"):
        load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=1)
    (imagenet_lt / "ImageNet_LT_val.txt").unlink()
    with pytest.raises(CBDError, match=r"split file ImageNet_LT_val\.txt not found"):
        load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=1)


def test_an_out_of_range_test_label_and_a_resampling_request_are_refused(imagenet_lt):
    test = imagenet_lt / "ImageNet_LT_test.txt"
    test.write_text(test.read_text() + "val/n000/test_0.JPEG 7\n")
    with pytest.raises(CBDError, match=r"ImageNet_LT_test\.txt: label 7 is out of range"):
        load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=1)
    with pytest.raises(CBDError, match="long-tailed already: use imbalance_ratio: 1"):
        load_long_tail("imagenet_lt", str(imagenet_lt), imbalance_ratio=100)
    with pytest.raises(CBDError, match=r"no data path given and .*data/places_lt is not a folder"):
        load_long_tail("places_lt", None, imbalance_ratio=1)


def test_stats_command_reads_a_large_benchmark(imagenet_lt, capsys):
    from cbdlib.__main__ import main

    assert main(["stats", "--dataset", "imagenet_lt", "--data", str(imagenet_lt), "--imbalance-ratio", "1",
                 "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["class_counts"] == list(TRAIN_COUNTS) and stats["test_images"] == 6


def test_a_label_one_past_the_last_class_in_a_large_benchmark_is_named(tmp_path):
    root = write_split_benchmark(tmp_path / "imagenet")  # three classes, 0..2 in every split
    train = root / "ImageNet_LT_train.txt"
    train.write_text(train.read_text() + "train/n000/train_0.JPEG 3\n")
    entry = len(train.read_text().splitlines())
    with pytest.raises(CBDError, match="label 3 .* has no image in the test split ImageNet_LT_test.txt") as err:
        load_long_tail("imagenet_lt", str(root), imbalance_ratio=1)
    assert str(err.value) == (f"{train}: label 3 (image {entry}) has no image in the test split ImageNet_LT_test.txt, "
                              f"whose labels run 0..2; labels must run 0..C-1")


# ---------------------------------------------------------------- iNaturalist json


def test_inat_val_is_the_test_set_and_validation_is_held_out_from_train(tmp_path):
    root = write_inat(tmp_path / "inat")
    data = load_long_tail("inat2018", str(root), imbalance_ratio=1, val_per_class=3, lt_seed=0)
    # min(3, n // 2) held out per class: 3 of 9, 2 of 5, 1 of 2
    assert np.bincount(data.val_labels).tolist() == [3, 2, 1]
    assert data.class_counts == [6, 3, 1]
    assert not set(data.val.paths) & set(data.train.paths)
    assert np.bincount(data.test_labels).tolist() == [3, 3, 3]
    assert all("/val_" in p for p in data.test.paths)
    again = load_long_tail("inat2018", str(root), imbalance_ratio=1, val_per_class=3, lt_seed=0)
    assert again.val.paths == data.val.paths  # seeded by lt_seed


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["images"][1].pop("file_name"), r"train2018\.json: images\[1\] lacks 'file_name'"),
    (lambda c: c["annotations"][2].update(category_id=99), r"annotations\[2\]\.category_id 99 is not a known category"),
    (lambda c: c["annotations"][0].update(image_id=555), r"annotations\[0\]\.image_id 555 names no image"),
    (lambda c: c["annotations"][3].update(image_id="3"), r"annotations\[3\]\.image_id must be int"),
    (lambda c: c.update(images={}), r"key 'images' must be a list"),
    (lambda c: c["annotations"].pop(), r"1 image\(s\) have no annotation"),
])
def test_malformed_inat_json_names_the_file_and_key(tmp_path, damage, message):
    root = write_inat(tmp_path / "inat")
    content = json.loads((root / "train2018.json").read_text())
    damage(content)
    (root / "train2018.json").write_text(json.dumps(content))
    with pytest.raises(CBDError, match=message):
        load_long_tail("inat2018", str(root), imbalance_ratio=1)


def test_broken_inat_json_and_missing_image(tmp_path):
    root = write_inat(tmp_path / "inat")
    (root / "val2018.json").write_text('{"images": [')
    with pytest.raises(CBDError, match=r"val2018\.json: not valid json \(line 1"):
        load_long_tail("inat2018", str(root), imbalance_ratio=1)
    root = write_inat(tmp_path / "inat2")
    gone = root / "train_val2018" / "Plantae" / "1" / "tra_4.jpg"
    gone.unlink()
    with pytest.raises(CBDError, match=rf"image {gone} \(listed in .*train2018\.json\) does not exist"):
        load_long_tail("inat2018", str(root), imbalance_ratio=1)


# ---------------------------------------------------------------- streaming


def test_transform_sizes_follow_image_size():
    assert eval_resize(224) == 256 and eval_resize(32) == 37
    names = [type(t).__name__ for t in train_transform(32, (0.5,) * 3, (0.25,) * 3, "aug").transforms]
    assert names[:4] == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale"]
    crop = train_transform(224, (0.5,) * 3, (0.25,) * 3).transforms[0]
    assert crop.size == (224, 224) and crop.scale == (0.05, 1.0)
    with pytest.raises(CBDError, match="unknown augmentation"):
        train_transform(32, (0.5,) * 3, (0.25,) * 3, "strong")


def test_loaders_yield_shaped_normalised_batches(imagenet_lt):
    data = load_large("imagenet_lt", imagenet_lt, image_size=32)
    mean, std = data.mean, data.std
    loader = make_eval_loader(data.test, eval_transform(32, mean, std), batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    # A solid colour normalises to (c / 255 - mean) / std in every pixel (JPEG rounding aside).
    for image, label in zip(x, y):
        expected = (torch.tensor(COLOURS[int(label)]) / 255 - torch.tensor(mean)) / torch.tensor(std)
        assert torch.allclose(image.mean(dim=(1, 2)), expected, atol=0.06)

    sampler = SeededSampler(DistributedStrategySampler(data.train_labels, "class_balanced", generator_seed=3))
    sampler.set_epoch(0, base_seed=11)
    batches = [make_train_loader(data.train, train_transform(32, mean, std, "aug"), sampler, 4, num_workers=workers)
               for workers in (0, 2)]
    first, second = ([b for b in loader] for loader in batches)
    assert len(first) == len(data.train) // 4 and first[0][0].shape == (4, 3, 32, 32)
    for (xa, ya), (xb, yb) in zip(first, second):  # each image's augmentation is seeded: workers do not matter
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_an_unreadable_image_in_a_worker_is_one_clear_error(imagenet_lt):
    data = load_large("imagenet_lt", imagenet_lt, image_size=32)
    broken = data.test.paths[1]
    with open(broken, "wb") as handle:
        handle.write(b"not a jpeg")
    stream = StreamData(data, torch.device("cpu"), num_workers=1, eval_batch_size=4)
    with pytest.raises(CBDError, match=rf"^cannot read image {broken} "):
        stream.predict(torch.nn.Identity(), "test", torch.device("cpu"))
    assert ImageFileDataset(data.test, eval_transform(32, data.mean, data.std))[0][0].shape == (3, 32, 32)


@pytest.mark.slow
def test_experiment_trains_and_evaluates_on_the_streaming_path(imagenet_lt, tmp_path):
    settings = resolve(make_params(dict(
        dataset="imagenet_lt", data=str(imagenet_lt), imbalance_ratio=1, image_size=32, arch="resnet_tiny",
        epochs=2, decoupled_epochs=1, batch_size=4, lr=0.05, schedule="cosine", teachers=["vanilla:1", "aug:1"],
        methods=["teacher_vanilla_1", "teacher_aug_1", "ce", "crt", "tau_norm", "ncm", "cbd_ens"], device="cpu",
        smoke=False, num_workers=0, eval_batch_size=8)))
    metrics = Experiment(settings, tmp_path / "run", quiet=True).run("all")
    validate_metrics(metrics)
    assert set(metrics["methods"]) == set(settings.method_names)
    assert metrics["class_counts"] == list(TRAIN_COUNTS)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert {r["model"] for r in history} == {"teacher_vanilla_1", "teacher_aug_1", "ce", "crt", "cbd_ens"}
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in history)
    # cRT streams class-aware epochs of N images (Kang et al.'s loop), in batches of 4
    assert [r["steps"] for r in history if r["model"] == "crt"] == [sum(TRAIN_COUNTS) // 4]
    assert {r["steps"] for r in history if r["model"] == "ce"} == {sum(TRAIN_COUNTS) // 4}
