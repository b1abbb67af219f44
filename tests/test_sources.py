"""Tests for cbdlib.data.sources and cbdlib.data.cache on fixtures built in tmp_path."""
from __future__ import annotations

import logging
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbdlib.data import cache, load_long_tail, sources
from cbdlib.data.sources import ImageSet, load_source, parse_split_file
from cbdlib.errors import CBDError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder and no CIFAR environment variables."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("CBD_CACHE_DIR", str(folder))
    return folder


# --------------------------------------------------------------------------- fixture builders


def solid(color, size=(8, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def write_tree(root: Path, layout: dict[str, dict[str, list[Image.Image]]], fmt="PNG") -> Path:
    """layout: split -> class -> images, written as root/split/class/NNNN.<ext>."""
    ext = ".png" if fmt == "PNG" else ".jpg"
    for split, classes in layout.items():
        for name, images in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                img.save(folder / f"{i:04d}{ext}", format=fmt)
    return root


def make_tar(source: Path, target: Path, arcname: str = "") -> Path:
    """Tar ``source``'s contents; ``arcname`` puts them under one top-level folder."""
    mode = "w:gz" if target.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(target, mode) as archive:
        for child in sorted(source.iterdir()):
            archive.add(child, arcname=f"{arcname}/{child.name}" if arcname else child.name)
    return target


def mixed_tree(root: Path) -> Path:
    """Three classes (deliberately not created in sorted order) with RGB, L and RGBA images."""
    return write_tree(root, {
        "train": {
            "cat": [solid((200, 10, 10)), solid((190, 20, 20), size=(12, 6))],
            "ant": [solid(77, mode="L"), solid((10, 20, 30, 0), mode="RGBA")],
            "bee": [solid((0, 0, 255))],
        },
        "test": {
            "cat": [solid((1, 2, 3))],
            "ant": [solid(5, mode="L")],
            "bee": [solid((9, 8, 7, 255), mode="RGBA")],
        },
    })


def cifar10_pickles(folder: Path, per_batch=2, n_test=3, protocol=2, seed=0) -> dict[str, np.ndarray]:
    """A fake cifar-10-batches-py in torchvision's format; returns the HWC images written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    written = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        hwc = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        rows = hwc.transpose(0, 3, 1, 2).reshape(n, 3072)  # the on-disk R-plane, G-plane, B-plane rows
        with open(folder / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": rows, b"labels": labels}, handle, protocol=protocol)
        written["test" if name == "test_batch" else "train"].append((hwc, labels))
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}, handle, protocol=protocol)
    return {
        split: (np.concatenate([h for h, _ in parts]), np.concatenate([l for _, l in parts]))
        for split, parts in written.items()
    }


def split_dataset(root: Path, train_lines: list[str], test_lines: list[str], test_name="test.txt") -> Path:
    """A splitfile folder with a 10x10 image for every path its split files mention."""
    root.mkdir(parents=True, exist_ok=True)
    for line in filter(None, train_lines + test_lines):
        rel = line.split()[0]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        solid((40, 50, 60), size=(10, 10)).save(root / rel)
    (root / "LT_train.txt").write_text("\n".join(train_lines) + "\n")
    (root / test_name).write_text("\n".join(test_lines) + "\n")
    return root


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_stratified_split():
    train, test = load_source("digits", None)
    assert isinstance(train, ImageSet)
    assert train.images.shape == (1257, 8, 8, 3) and test.images.shape == (540, 8, 8, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.class_names == [str(i) for i in range(10)]
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert train.images.max() == 255 and train.images.min() == 0
    # Stratified: every class keeps its 70/30 share to within one image.
    total = np.bincount(train.labels, minlength=10) + np.bincount(test.labels, minlength=10)
    assert np.all(np.abs(np.bincount(test.labels, minlength=10) - 0.3 * total) <= 1)


def test_digits_split_depends_on_seed_only():
    a_train, a_test = load_source("digits", None, split_seed=3)
    b_train, _ = load_source("digits", None, split_seed=3)
    c_train, _ = load_source("digits", None, split_seed=4)
    assert np.array_equal(a_train.images, b_train.images) and np.array_equal(a_train.labels, b_train.labels)
    assert not np.array_equal(a_train.images, c_train.images)
    with pytest.raises(CBDError, match="dataset digits is built in and takes no data path"):
        load_source("digits", "some/path")  # a path given for digits is an error, not ignored


# --------------------------------------------------------------------------- ImageFolder trees


@pytest.mark.parametrize("top_folder", ["", "mydata"])
def test_folder_tree_and_tar_gz_agree(tmp_path, top_folder):
    tree = mixed_tree(tmp_path / "tree")
    archive = make_tar(tree, tmp_path / "tree.tar.gz", arcname=top_folder)
    from_dir = load_source("folder", str(tree), image_size=4)
    from_tar = load_source("folder", archive, image_size=4)
    for a, b in zip(from_dir, from_tar):
        assert a.class_names == b.class_names == ["ant", "bee", "cat"]
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    train, test = from_dir
    assert train.images.shape == (5, 4, 4, 3) and test.images.shape == (3, 4, 4, 3)
    assert train.labels.tolist() == [0, 0, 1, 2, 2]


def test_folder_converts_to_rgb_and_resizes(tmp_path):
    train, test = load_source("folder", mixed_tree(tmp_path / "tree"), image_size=5)
    assert train.images.shape[1:] == (5, 5, 3) and train.images.dtype == np.uint8
    assert np.all(train.images[0] == 77)                     # grayscale replicated
    assert np.all(train.images[1] == [10, 20, 30])           # RGBA: alpha dropped, colour kept
    assert np.all(train.images[4] == [190, 20, 20])          # 12x6 resized, solid colour preserved
    assert np.all(test.images[0] == 5) and np.all(test.images[1] == [9, 8, 7])


def test_folder_without_train_test_explains_layout(tmp_path):
    write_tree(tmp_path / "flat", {"images": {"cat": [solid((1, 1, 1))]}})
    with pytest.raises(CBDError, match=r"train/<class>.*test/<class>") as err:
        load_source("folder", tmp_path / "flat")
    assert str(tmp_path / "flat") in str(err.value)


def test_empty_class_folder_is_named(tmp_path):
    tree = mixed_tree(tmp_path / "tree")
    (tree / "train" / "dog").mkdir()
    (tree / "train" / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(CBDError, match="has no images") as err:
        load_source("folder", tree)
    assert str(tree / "train" / "dog") in str(err.value)


def test_corrupt_jpeg_in_folder_is_named(tmp_path):
    tree = mixed_tree(tmp_path / "tree")
    bad = tree / "test" / "bee" / "broken.jpg"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(CBDError, match="cannot read image") as err:
        load_source("folder", tree)
    assert str(bad) in str(err.value)


def test_corrupt_image_in_archive_names_archive_and_member(tmp_path):
    tree = mixed_tree(tmp_path / "tree")
    (tree / "train" / "ant" / "zz.png").write_bytes(b"not a png at all")
    archive = make_tar(tree, tmp_path / "bad.tar")
    with pytest.raises(CBDError, match="cannot read image") as err:
        load_source("folder", archive)
    assert str(archive) in str(err.value) and "train/ant/zz.png" in str(err.value)


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    tree = mixed_tree(tmp_path / "tree")
    serial = load_source("folder", tree, image_size=4)
    # Force the worker-process path (normally only for thousands of images).
    monkeypatch.setattr(sources.decode, "PARALLEL_MIN_IMAGES", 1)
    monkeypatch.setattr(sources.decode, "worker_count", lambda: 2)
    monkeypatch.setenv("CBD_CACHE_DIR", str(tmp_path / "other-cache"))
    parallel = load_source("folder", tree, image_size=4)
    for a, b in zip(serial, parallel):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    bad = tree / "train" / "bee" / "bad.jpg"
    bad.write_bytes(b"garbage")
    with pytest.raises(CBDError, match="cannot read image") as err:  # raised in a worker, re-raised here
        load_source("folder", tree, image_size=4)
    assert str(bad) in str(err.value)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_pickles_load_as_hwc(tmp_path, protocol):
    written = cifar10_pickles(tmp_path / "cifar-10-batches-py", protocol=protocol)
    for data in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent or the folder itself
        train, test = load_source("cifar10", str(data))
        assert train.class_names == CIFAR10_NAMES
        assert train.images.shape == (10, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
        assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
        assert np.array_equal(test.images, written["test"][0])
        assert np.array_equal(train.labels, written["train"][1])
        assert np.array_equal(train.images, written["train"][0])


def test_cifar10_pickle_pixel_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    cifar10_pickles(folder)
    # Rewrite test_batch by hand: image 0 gets pixel (row 1, col 2) = (200, 100, 50).
    rows = np.zeros((1, 3072), dtype=np.uint8)
    rows[0, 0 * 1024 + 1 * 32 + 2] = 200
    rows[0, 1 * 1024 + 1 * 32 + 2] = 100
    rows[0, 2 * 1024 + 1 * 32 + 2] = 50
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({b"data": rows, b"labels": [7]}, handle, protocol=2)
    _, test = load_source("cifar10", folder)
    assert test.images[0, 1, 2].tolist() == [200, 100, 50]
    assert test.images.sum() == 350 and test.labels.tolist() == [7]


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 4), ("test", 2)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": rows, "fine_labels": [99, 0, 5, 1][:n], "coarse_labels": [0] * n}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i:03d}" for i in range(100)]}, handle)
    train, test = load_source("cifar100", tmp_path)
    assert len(train.class_names) == 100 and train.labels.tolist() == [99, 0, 5, 1]
    assert test.images.shape == (2, 32, 32, 3)


class _Hostile:
    """Unpickling this calls ``open(target, "w")``: the file appears if pickled code runs."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("packed", ["folder", "tar.gz"])
def test_a_hostile_pickle_in_a_cifar_batch_is_refused_and_runs_nothing(tmp_path, packed):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    cifar10_pickles(folder)
    target = tmp_path / "pwned"
    rows = np.zeros((2, 3072), dtype=np.uint8)
    blob = pickle.dumps({b"batch_label": b"x", b"data": rows, b"labels": [1, 2], b"extra": _Hostile(target)},
                        protocol=2)
    # The batch really is hostile: plain unpickling, as torchvision's loader does, creates the target.
    pickle.loads(blob, encoding="latin1")
    assert target.exists()
    target.unlink()
    (folder / "data_batch_3").write_bytes(blob)
    data = tmp_path / "data" if packed == "folder" else make_tar(tmp_path / "data", tmp_path / "c.tar.gz")
    with pytest.raises(CBDError, match=r"data_batch_3\)?: not a readable CIFAR pickle \(refusing to load "
                                       r"(builtins|io)\.open\)") as err:
        load_source("cifar10", data)
    assert "\n" not in str(err.value)
    assert not target.exists()


def test_cifar10_image_tree_archive_uses_sorted_names(tmp_path):
    names = sorted(CIFAR10_NAMES, reverse=True)
    layout = {split: {n: [solid((i, i, i), size=(32, 32))] for i, n in enumerate(names)} for split in ("train", "test")}
    tree = write_tree(tmp_path / "tree", layout, fmt="JPEG")
    train, test = load_source("cifar10", make_tar(tree, tmp_path / "c.tgz", arcname="cifar10"))
    assert train.class_names == CIFAR10_NAMES and test.images.shape == (10, 32, 32, 3)


def test_cifar_refuses_wrong_image_size(tmp_path):
    layout = {split: {n: [solid((3, 3, 3), size=(32, 32))] for n in CIFAR10_NAMES} for split in ("train", "test")}
    tree = write_tree(tmp_path / "tree", layout)
    solid((1, 1, 1), size=(31, 32)).save(tree / "train" / "frog" / "odd.png")
    with pytest.raises(CBDError, match="must be 32x32") as err:
        load_source("cifar10", tree)
    assert str(tree / "train" / "frog" / "odd.png") in str(err.value)


def test_cifar_absent_without_env_or_download(tmp_path, monkeypatch):
    monkeypatch.delenv("CBD_CIFAR10", raising=False)
    monkeypatch.setattr(sources.cifar, "default_data_dir", lambda: tmp_path / "data")

    def offline(dataset, root):
        raise OSError("network unreachable")

    monkeypatch.setattr(sources.cifar, "download_cifar", offline)
    with pytest.raises(CBDError, match="CBD_CIFAR10") as err:
        load_source("cifar10", None)
    assert "--data" in str(err.value) and "\n" not in str(err.value)


def test_cifar_env_var_pointing_nowhere(tmp_path, monkeypatch):
    missing = tmp_path / "nope.tar.gz"
    monkeypatch.setenv("CBD_CIFAR100", str(missing))
    with pytest.raises(CBDError, match="CBD_CIFAR100") as err:
        load_source("cifar100", None)
    assert str(missing) in str(err.value)


# --------------------------------------------------------------------------- cache


def counting_decoder(monkeypatch):
    calls = []
    real = sources.decode.decode_images

    def wrapped(*args, **kwargs):
        calls.append(len(args[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sources.decode, "decode_images", wrapped)
    return calls


def test_second_load_hits_cache(tmp_path, monkeypatch, private_cache):
    archive = make_tar(mixed_tree(tmp_path / "tree"), tmp_path / "tree.tar.gz")
    first = load_source("folder", archive, image_size=6)
    assert list(private_cache.glob("*.npz"))

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(sources.decode, "decode_images", refuse)
    second = load_source("folder", archive, image_size=6)
    for a, b in zip(first, second):
        assert np.array_equal(a.images, b.images) and a.class_names == b.class_names
        assert b.labels.dtype == np.int64
    with pytest.raises(AssertionError):  # another image size is another entry
        load_source("folder", archive, image_size=7)


def test_changed_source_changes_key(tmp_path, monkeypatch):
    tree = mixed_tree(tmp_path / "tree")
    archive = make_tar(tree, tmp_path / "tree.tar")
    calls = counting_decoder(monkeypatch)
    load_source("folder", archive)
    load_source("folder", archive)
    assert calls == [8]
    before = cache.source_checksum(archive)
    solid((5, 5, 5)).save(tree / "train" / "bee" / "extra.png")
    make_tar(tree, archive)
    assert cache.source_checksum(archive) != before
    train, _ = load_source("folder", archive)
    assert calls == [8, 9] and len(train) == 6
    # Folder trees: adding a file changes the checksum too.
    tree_sum = cache.source_checksum(tree)
    solid((6, 6, 6)).save(tree / "test" / "bee" / "more.png")
    assert cache.source_checksum(tree) != tree_sum


def test_corrupt_cache_file_is_rebuilt(tmp_path, monkeypatch, private_cache, caplog):
    archive = make_tar(mixed_tree(tmp_path / "tree"), tmp_path / "tree.tgz")
    calls = counting_decoder(monkeypatch)
    first, _ = load_source("folder", archive)
    [entry] = private_cache.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated write
    with caplog.at_level(logging.WARNING, logger="cbdlib.data.cache"):
        again, _ = load_source("folder", archive)
    assert calls == [8, 8] and "corrupt cache file" in caplog.text
    assert np.array_equal(first.images, again.images)
    load_source("folder", archive)
    assert calls == [8, 8]  # the rebuilt entry is good again


def test_cached_arrays_roundtrip(private_cache):
    built = []

    def build():
        built.append(1)
        return {"x": np.arange(6, dtype=np.uint8).reshape(2, 3), "names": np.array(["a", "bb"])}

    key = {"dataset": "unit", "checksum": "abc", "image_size": 3}
    first = cache.cached_arrays(key, build)
    second = cache.cached_arrays(key, build)
    assert built == [1] and second["names"].tolist() == ["a", "bb"]
    assert np.array_equal(first["x"], second["x"])
    assert not list(private_cache.glob("*.tmp"))  # temporary files are renamed, not left behind
    cache.cached_arrays({**key, "checksum": "abd"}, build)
    assert built == [1, 1]


# --------------------------------------------------------------------------- split files


def test_splitfile_loads_and_falls_back_to_val(tmp_path, caplog):
    root = split_dataset(
        tmp_path / "lt",
        ["train/a/1.jpg 0", "", "train/b/2.jpg 3", "train/b/3.jpg 1", "train/b/4.jpg 2"],
        ["val/x.jpg 2", "val/y.png 0", "val/z.png 3"],  # the test split names the last class (3)
        test_name="LT_val.txt",
    )
    with caplog.at_level(logging.WARNING, logger="cbdlib.data.sources"):
        train, test = load_source("splitfile", root, image_size=6)
    assert "LT_val.txt" in caplog.text
    assert train.class_names == ["0", "1", "2", "3"]
    assert train.labels.tolist() == [0, 3, 1, 2] and test.labels.tolist() == [2, 0, 3]
    assert train.images.shape == (4, 6, 6, 3) and np.all(test.images == [40, 50, 60])
    assert parse_split_file(root / "LT_train.txt") == [("train/a/1.jpg", 0), ("train/b/2.jpg", 3), ("train/b/3.jpg", 1),
                                                       ("train/b/4.jpg", 2)]


def test_splitfile_paths_relative_to_split_folder(tmp_path):
    root = tmp_path / "places"
    splits = split_dataset(root / "splits", ["img/a.png 0", "img/b.png 1"], ["img/a.png 1"])
    train, test = load_source("splitfile", root, image_size=4)
    assert len(train) == 2 and len(test) == 1 and splits.is_dir()


@pytest.mark.parametrize("line, problem", [
    ("train/a/1.jpg", "expected 'relative/path label'"),
    ("train/a/1.jpg 0 extra", "expected 'relative/path label'"),
    ("train/a/1.jpg cat", "not an integer"),
    ("train/a/1.jpg -2", "negative"),
])
def test_splitfile_malformed_line(tmp_path, line, problem):
    root = split_dataset(tmp_path / "lt", ["train/a/0.jpg 0"], ["test/a.jpg 0"])
    (root / "LT_train.txt").write_text(f"train/a/0.jpg 0\n{line}\n")
    with pytest.raises(CBDError, match=problem) as err:
        load_source("splitfile", root)
    assert "LT_train.txt" in str(err.value) and "line 2" in str(err.value)


def test_splitfile_test_label_out_of_range(tmp_path):
    root = split_dataset(tmp_path / "lt", ["a.jpg 0", "b.jpg 1"], ["c.jpg 1", "d.jpg 2"])
    with pytest.raises(CBDError, match="out of range") as err:
        load_source("splitfile", root)
    assert "test.txt" in str(err.value) and "line 2" in str(err.value)


def test_splitfile_missing_image(tmp_path):
    root = split_dataset(tmp_path / "lt", ["a.jpg 0", "b.jpg 1"], ["c.jpg 1"])
    (root / "b.jpg").unlink()
    with pytest.raises(CBDError, match="not found") as err:
        load_source("splitfile", root)
    assert "b.jpg" in str(err.value) and "LT_train.txt, line 2" in str(err.value)


def test_a_label_one_past_the_last_class_is_named(tmp_path):
    root = tmp_path / "lt"
    (root / "img").mkdir(parents=True)
    lines = []
    for label in range(10):
        for i in range(3):
            rel = f"img/{label}_{i}.png"
            Image.new("RGB", (8, 8), (label * 20, i * 40, 0)).save(root / rel)
            lines.append(f"{rel} {label}")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    lines[5] = lines[5].rsplit(" ", 1)[0] + " 10"  # one past the last of 10 classes
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CBDError, match="line 6: label 10 has no image in the test split") as err:
        load_long_tail("splitfile", str(root), imbalance_ratio=1, val_per_class=1, image_size=8)
    assert str(err.value) == (f"{root / 'train.txt'}, line 6: label 10 has no image in the test split test.txt, "
                              f"whose labels run 0..9; labels must run 0..C-1: is that line mistyped?")


# --------------------------------------------------------------------------- input errors


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(CBDError, match="imagenet") as err:
        load_source("imagenet", None)
    for name in ("digits", "cifar10", "cifar100", "folder", "splitfile"):
        assert name in str(err.value)


@pytest.mark.parametrize("dataset", ["folder", "splitfile", "cifar10"])
def test_missing_path_is_named(tmp_path, dataset):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(CBDError, match="does not exist") as err:
        load_source(dataset, str(missing))
    assert str(missing) in str(err.value)


def test_empty_tar(tmp_path):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(CBDError, match="empty") as err:
        load_source("folder", empty)
    assert str(empty) in str(err.value)


@pytest.mark.parametrize("content, message", [(os.urandom(4096), "is not a readable tar archive"), (b"", "is empty")])
def test_corrupt_tar_gz(tmp_path, content, message):
    bad = tmp_path / "cifar10-jpg.tar.gz"
    bad.write_bytes(content)
    with pytest.raises(CBDError, match=message) as err:
        load_source("cifar10", bad)
    assert str(bad) in str(err.value)


def test_truncated_tar_gz(tmp_path):
    archive = make_tar(mixed_tree(tmp_path / "tree"), tmp_path / "tree.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CBDError, match="not a readable tar archive") as err:
        load_source("folder", archive)
    assert str(archive) in str(err.value)


# --------------------------------------------------------------------------- the real CIFAR-10 copy


@pytest.mark.integration
@pytest.mark.slow
def test_real_cifar10(cifar10_cache, monkeypatch):
    monkeypatch.setenv("CBD_CACHE_DIR", str(cifar10_cache))  # decoded once per session (see conftest.py)
    train, test = load_source("cifar10", None)
    assert train.images.shape == (50000, 32, 32, 3) and test.images.shape == (10000, 32, 32, 3)
    assert train.images.dtype == np.uint8 == test.images.dtype
    assert np.bincount(train.labels).tolist() == [5000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.class_names == CIFAR10_NAMES
