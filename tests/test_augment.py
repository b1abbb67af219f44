"""Tests for cbdlib.augment: batched per-image augmentation on (B, H, W, C) tensors."""
from __future__ import annotations

import colorsys
import itertools

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from cbdlib import CBDError
from cbdlib.augment import (
    AugmentConfig,
    BatchAugmenter,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    aug_config,
    color_jitter,
    hsv_to_rgb,
    normalize_nchw,
    random_crop,
    random_flip,
    random_grayscale,
    rgb_to_hsv,
    to_float,
    vanilla_config,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LUMA = torch.tensor([0.2989, 0.587, 0.114])


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def rand_images(b, h=8, w=8, seed=0, device="cpu", low=0.0, high=1.0):
    """Float (B, H, W, 3) images uniform in [low, high]."""
    g = gen(seed)
    return (low + (high - low) * torch.rand(b, h, w, 3, generator=g)).to(device)


def rand_uint8(b, h=8, w=8, seed=0, low=0, high=256, device="cpu"):
    g = gen(seed)
    return torch.randint(low, high, (b, h, w, 3), generator=g, dtype=torch.uint8).to(device)


def bchw(x):
    """(B, H, W, C) -> (B, C, H, W) for torchvision's functional ops."""
    return x.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- config


def test_configs():
    v = vanilla_config(32)
    assert v.crop_padding == 4 and v.flip and not v.color_jitter
    assert vanilla_config(8).crop_padding == 1
    assert vanilla_config(4).crop_padding == 1
    a = aug_config(32)
    assert a.color_jitter and a.crop_padding == 4 and a.flip
    assert (a.jitter_p, a.brightness, a.contrast, a.saturation, a.hue, a.grayscale_p) == (0.8, 0.8, 0.8, 0.8, 0.2, 0.2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(crop_padding=-1), r"crop_padding must be a non-negative integer, got -1"),
    (dict(jitter_p=1.5), r"jitter_p must be a probability in \[0, 1\], got 1.5"),
    (dict(grayscale_p=-0.1), r"grayscale_p must be a probability in \[0, 1\], got -0.1"),
    (dict(brightness=-1.0), r"brightness jitter strength must be >= 0, got -1.0"),
    (dict(hue=0.6), r"hue jitter strength must be in \[0, 0.5\], got 0.6"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(CBDError, match=message):
        AugmentConfig(**kwargs)
    with pytest.raises(CBDError, match=r"image_size must be a positive integer, got 0"):
        vanilla_config(0)


# --------------------------------------------------------------------------- crop


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_random_crop_is_window_of_padded_input(device, dtype):
    p, b, h, w = 2, 40, 6, 7
    # Values 1..255 (no zeros) so a window is identified unambiguously against the padding.
    x = rand_uint8(b, h, w, seed=1, low=1, device=device).to(dtype)
    out = random_crop(x, p, gen(3, device))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    padded = torch.zeros(b, h + 2 * p, w + 2 * p, 3, dtype=dtype, device=device)
    padded[:, p : p + h, p : p + w] = x
    offsets = []
    for i in range(b):
        found = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(padded[i, dy : dy + h, dx : dx + w], out[i])
        ]
        assert len(found) == 1, f"image {i}: no unique matching window"
        offsets.append(found[0])
    assert len(set(offsets)) > 5, "offsets should vary across images"
    ys = {o[0] for o in offsets}
    xs = {o[1] for o in offsets}
    assert ys == set(range(2 * p + 1)) and xs == set(range(2 * p + 1))


def test_random_crop_padding_zero_identity():
    x = rand_uint8(4)
    assert torch.equal(random_crop(x, 0, gen(0)), x)


# --------------------------------------------------------------------------- flip


@pytest.mark.parametrize("device", DEVICES)
def test_random_flip(device):
    x = rand_uint8(1000, 4, 5, seed=2, device=device)
    out = random_flip(x, gen(5, device))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(2)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    frac = mirrored.float().mean().item()
    assert 0.43 < frac < 0.57
    assert torch.equal(random_flip(x, gen(5, device), p=0.0), x)
    assert torch.equal(random_flip(x, gen(5, device), p=1.0), x.flip(2))


# --------------------------------------------------------------------------- colour helpers vs torchvision


FACTORS = [0.0, 0.2, 0.7, 1.0, 1.3, 1.8]


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_blend_ops_match_torchvision(ours, theirs):
    x = rand_images(len(FACTORS), 9, 7, seed=4)
    out = ours(x, torch.tensor(FACTORS))
    for i, f in enumerate(FACTORS):
        ref = theirs(bchw(x[i : i + 1]), f)
        torch.testing.assert_close(bchw(out[i : i + 1]), ref, atol=1e-5, rtol=0)


def test_hue_matches_torchvision():
    shifts = [-0.5, -0.2, -0.05, 0.0, 0.1, 0.33, 0.5]
    x = rand_images(len(shifts), 9, 7, seed=5)
    # include exact greys, pure primaries and black/white to hit the branch edges
    x[:, 0, 0] = 0.5
    x[:, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    x[:, 0, 2] = torch.tensor([0.0, 1.0, 0.0])
    x[:, 0, 3] = torch.tensor([0.0, 0.0, 1.0])
    x[:, 0, 4] = 0.0
    x[:, 0, 5] = 1.0
    x[:, 0, 6] = torch.tensor([1.0, 1.0, 0.0])
    out = adjust_hue(x, torch.tensor(shifts))
    for i, s in enumerate(shifts):
        ref = TF.adjust_hue(bchw(x[i : i + 1]), s)
        torch.testing.assert_close(bchw(out[i : i + 1]), ref, atol=1e-5, rtol=0)


def test_hue_against_colorsys():
    pixels = [(0.9, 0.2, 0.1), (0.1, 0.8, 0.3), (0.2, 0.3, 0.95), (0.5, 0.5, 0.5), (0.7, 0.7, 0.1), (0.0, 0.4, 0.4)]
    shifts = [0.3, -0.25, 0.5, 0.1]
    x = torch.tensor(pixels).view(1, 1, -1, 3).expand(len(shifts), 1, -1, 3).contiguous()
    out = adjust_hue(x, torch.tensor(shifts))
    for i, s in enumerate(shifts):
        for j, (r, g, b) in enumerate(pixels):
            h, sat, v = colorsys.rgb_to_hsv(r, g, b)
            ref = colorsys.hsv_to_rgb((h + s) % 1.0, sat, v)
            assert torch.allclose(out[i, 0, j], torch.tensor(ref), atol=1e-5), (i, j)
    hsv = rgb_to_hsv(torch.tensor(pixels))
    for j, px in enumerate(pixels):
        assert torch.allclose(hsv[j], torch.tensor(colorsys.rgb_to_hsv(*px)), atol=1e-6)


def test_hsv_round_trip_and_zero_shift():
    x = rand_images(16, 8, 8, seed=6)
    x[0] = 0.25  # greys
    x[1, ..., 2] = 0.0
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(16)), x, atol=1e-5, rtol=0)
    hsv = rgb_to_hsv(x)
    assert bool(((hsv >= 0) & (hsv <= 1)).all()) and bool((hsv[..., 0] < 1).all())
    assert not bool(torch.isnan(hsv).any())


def test_saturation_zero_is_grayscale():
    x = rand_images(5, 6, 6, seed=7)
    out = adjust_saturation(x, torch.zeros(5))
    gray = (x * LUMA).sum(-1, keepdim=True).expand_as(x)
    torch.testing.assert_close(out, gray, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- color_jitter


def only(**kw) -> AugmentConfig:
    """Jitter config with every op off except those given; always applied."""
    base = dict(color_jitter=True, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    base.update(kw)
    return AugmentConfig(**base)


def test_jitter_brightness_only_is_per_image_scale():
    x = rand_images(500, 4, 4, seed=8, low=0.1, high=0.5)  # 0.5 * 1.8 < 1: no clamping
    out = color_jitter(x, gen(9), only(brightness=0.8))
    ratio = (out / x).flatten(1)
    f = ratio[:, 0]
    assert torch.allclose(ratio, f[:, None].expand_as(ratio), atol=1e-5), "one factor per image"
    assert bool((f >= 0.2 - 1e-6).all() and (f <= 1.8 + 1e-6).all())
    assert f.min().item() < 0.35 and f.max().item() > 1.65, "factors should span the range"


def test_jitter_ranges_clip_at_zero():
    # strength > 1: lower bound max(0, 1 - b) = 0, so factors lie in [0, 2.5]
    x = rand_images(400, 2, 2, seed=10, low=0.1, high=0.3)
    out = color_jitter(x, gen(11), only(brightness=1.5))
    f = (out / x).flatten(1)[:, 0]
    assert bool((f >= 0).all() and (f <= 2.5 + 1e-6).all()) and f.min().item() < 0.15


def test_jitter_p_zero_and_all_off_are_identity():
    x = rand_images(20, 5, 5, seed=12)
    cfg = AugmentConfig(color_jitter=True, jitter_p=0.0)
    assert torch.equal(color_jitter(x, gen(0), cfg), x)
    assert torch.equal(color_jitter(x, gen(0), only()), x)


def test_jitter_probability():
    x = rand_images(2000, 4, 4, seed=13)
    out = color_jitter(x, gen(14), aug_config(32))
    changed = (out != x).flatten(1).any(1).float().mean().item()
    assert 0.76 < changed < 0.84


@pytest.mark.parametrize("device", DEVICES)
def test_jitter_output_in_unit_range(device):
    x = rand_images(300, 6, 6, seed=15, device=device)
    x[:50] = (x[:50] > 0.5).float()  # saturated extremes
    cfg = AugmentConfig(color_jitter=True, jitter_p=1.0, brightness=2.0, contrast=2.0, saturation=2.0, hue=0.5)
    out = color_jitter(x, gen(16, device), cfg)
    assert out.device == x.device and out.shape == x.shape
    assert bool((out >= 0).all() and (out <= 1).all()) and not bool(torch.isnan(out).any())


def test_jitter_matches_torchvision_in_per_image_order():
    """White-box: replay the jitter's draws (layout [apply, 4 factors, 4 order keys]) and
    apply torchvision's functional ops per image in the same order and with the same factors."""
    b = 150
    cfg = aug_config(32)
    x = rand_images(b, 5, 5, seed=17)
    out = color_jitter(x, gen(18), cfg)
    u = torch.rand(b, 9, generator=gen(18))
    tv_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    orders = set()
    for i in range(b):
        img = bchw(x[i : i + 1])
        if u[i, 0] < cfg.jitter_p:
            fu = u[i, 1:5]
            factors = [0.2 + 1.6 * fu[0], 0.2 + 1.6 * fu[1], 0.2 + 1.6 * fu[2], (2 * fu[3] - 1) * cfg.hue]
            order = torch.argsort(u[i, 5:9]).tolist()
            orders.add(tuple(order))
            for k in order:
                img = tv_ops[k](img, float(factors[k]))
        torch.testing.assert_close(bchw(out[i : i + 1]), img, atol=1e-4, rtol=0)
    assert len(orders) == 24, "every permutation of the four ops should occur"


def test_jitter_order_matters_per_image():
    # brightness then contrast differs from contrast then brightness once clamping bites;
    # over many images with identical inputs, both orders must show up.
    x = rand_images(1, 6, 6, seed=19).expand(400, -1, -1, -1).contiguous()
    cfg = only(brightness=0.8, contrast=0.8)
    out = color_jitter(x, gen(20), cfg)
    u = torch.rand(400, 9, generator=gen(20))
    fb = 0.2 + 1.6 * u[:, 1]
    fc = 0.2 + 1.6 * u[:, 2]
    bc = adjust_contrast(adjust_brightness(x, fb), fc)
    cb = adjust_brightness(adjust_contrast(x, fc), fb)
    first_b = u[:, 5] < u[:, 6]
    expected = torch.where(first_b.view(-1, 1, 1, 1), bc, cb)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert 0.4 < first_b.float().mean().item() < 0.6


# --------------------------------------------------------------------------- grayscale


@pytest.mark.parametrize("device", DEVICES)
def test_random_grayscale(device):
    x = rand_images(2000, 3, 3, seed=21, device=device)
    out = random_grayscale(x, gen(22, device), p=0.2)
    conv = (out != x).flatten(1).any(1)
    gray = (x * LUMA.to(device)).sum(-1, keepdim=True).expand_as(x)
    torch.testing.assert_close(out[conv], gray[conv], atol=1e-6, rtol=0)
    assert bool((out[conv][..., 0] == out[conv][..., 1]).all() and (out[conv][..., 1] == out[conv][..., 2]).all())
    assert torch.equal(out[~conv], x[~conv])
    assert 0.17 < conv.float().mean().item() < 0.23
    ref = TF.rgb_to_grayscale(bchw(x[:4]), num_output_channels=3)
    torch.testing.assert_close(bchw(random_grayscale(x[:4], gen(0, device), p=1.0)), ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- pipeline


def test_to_float_and_normalize():
    x = rand_uint8(3, 4, 5, seed=23)
    xf = to_float(x)
    assert xf.dtype == torch.float32 and float(xf.max()) <= 1.0
    torch.testing.assert_close(xf * 255, x.float())
    with pytest.raises(CBDError, match=r"to_float expects a uint8 tensor, got torch\.float32"):
        to_float(xf)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    out = normalize_nchw(xf, mean, std)
    assert out.shape == (3, 3, 4, 5) and out.is_contiguous()
    ref = (bchw(xf) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref)
    cl = normalize_nchw(xf, mean, std, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_eval_augmenter_is_plain_normalisation(device):
    x = rand_uint8(64, 8, 8, seed=24, device=device)
    xf = x.float() / 255
    mean = xf.mean(dim=(0, 1, 2)).tolist()
    std = xf.std(dim=(0, 1, 2)).tolist()
    out = BatchAugmenter(None, mean, std)(x, None)
    assert out.shape == (64, 3, 8, 8) and out.dtype == torch.float32 and out.device == x.device
    assert out.is_contiguous()
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(3, device=device), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.ones(3, device=device), atol=1e-5, rtol=0)
    mean_t, std_t = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))
    ref = (bchw(xf) - mean_t) / std_t
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [vanilla_config, aug_config])
def test_augmenter_determinism(device, make):
    x = rand_uint8(32, 8, 8, seed=25, device=device)
    aug = BatchAugmenter(make(8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), channels_last=True)
    a = aug(x, gen(1, device))
    b = aug(x, gen(1, device))
    c = aug(x, gen(2, device))
    assert a.shape == (32, 3, 8, 8) and a.dtype == torch.float32 and a.device == x.device
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a generator advances: two successive calls differ
    g = gen(1, device)
    assert not torch.equal(aug(x, g), aug(x, g))


def test_cpu_generator_with_other_device_images_and_bad_input():
    # CPU generator is allowed whatever the images' device (draws move to the images)
    x = rand_uint8(4, 8, 8, seed=26)
    aug = BatchAugmenter(aug_config(8), (0.5,) * 3, (0.5,) * 3)
    assert aug(x, None).shape == (4, 3, 8, 8)
    with pytest.raises(CBDError, match=r"BatchAugmenter expects uint8 images, got torch\.float32"):
        aug(x.float(), gen(0))
    with pytest.raises(CBDError, match=r"images must have 3 channels in the last dim, got shape \(4, 8, 8, 2\)"):
        aug(x[..., :2], gen(0))
    with pytest.raises(CBDError, match=r"std must be positive, got \[0\.0, 1\.0, 1\.0\]"):
        BatchAugmenter(None, (0.5,) * 3, (0.0, 1.0, 1.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_cuda_images():
    x = rand_uint8(8, 8, 8, seed=27, device="cuda")
    aug = BatchAugmenter(aug_config(8), (0.5,) * 3, (0.5,) * 3)
    a = aug(x, gen(3, "cpu"))
    b = aug(x.cpu(), gen(3, "cpu"))
    assert a.device.type == "cuda"
    torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=0)


def test_augmenter_draw_apply_split_and_vanilla_geometry():
    b, h, w, p = 60, 6, 6, 1
    x = rand_uint8(b, h, w, seed=28, low=1)
    aug = BatchAugmenter(vanilla_config(8), (0.0,) * 3, (1.0,) * 3)
    out = aug(x, gen(4))
    u = aug.draw(b, gen(4), "cpu")
    assert u.shape == (b, BatchAugmenter.NUM_UNIFORMS)
    assert torch.equal(aug.apply(x, u), out)
    # undo the (identity) normalisation: each image is a padded window, possibly mirrored
    img = (out.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    padded = torch.zeros(b, h + 2 * p, w + 2 * p, 3, dtype=torch.uint8)
    padded[:, p : p + h, p : p + w] = x
    n_flipped = 0
    for i in range(b):
        wins = [padded[i, dy : dy + h, dx : dx + w] for dy, dx in itertools.product(range(2 * p + 1), repeat=2)]
        plain = any(torch.equal(img[i], win) for win in wins)
        mirror = any(torch.equal(img[i], win.flip(1)) for win in wins)
        assert plain or mirror, f"image {i} is not a (mirrored) window"
        n_flipped += int(mirror and not plain)
    assert 10 < n_flipped < 50
    with pytest.raises(CBDError, match=r"apply needs uniforms of shape \(60, 13\) from draw\(\)"):
        aug.apply(x, None)


# --------------------------------------------------------------------------- no host copies per step


class PythonDataTensors:
    """Counts tensors built from Python data (``torch.tensor`` / ``as_tensor`` of a list or a
    number): on CUDA each is a blocking host-to-device copy, so none may happen per step."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("tensor", "as_tensor"):
            monkeypatch.setattr(torch, name, self.counting(getattr(torch, name), name))

    def counting(self, make, name):
        def wrapped(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                self.calls.append(f"torch.{name}({data!r})")
            return make(data, *args, **kwargs)
        return wrapped


def test_no_tensor_is_built_from_python_data_in_the_augmentation_or_the_training_step(monkeypatch, digits):
    from cbdlib.data.device import DeviceData
    from cbdlib.engine import Job, loop
    from cbdlib.engine.losses import log_prior
    from cbdlib.models import ModelSpec

    cpu = torch.device("cpu")
    data = DeviceData.from_long_tail(digits, cpu)
    spec = ModelSpec("resnet_tiny", 10, "cosine")
    teacher = loop.init_model(spec, 1).eval().requires_grad_(False)
    jobs = [Job(name="teacher_aug_1", train_seed=1, spec=spec, augment="aug", batch_size=16, epochs=2),
            Job(name="cbd", train_seed=1, spec=ModelSpec("resnet_tiny", 10, "cosine", projection_dim=32),
                sampling="class_balanced", loss="cbd", batch_size=16, epochs=2, teachers=["teacher_vanilla_1"])]
    augmenter = BatchAugmenter(aug_config(8), digits.mean, digits.std)
    images = rand_uint8(16, seed=3)
    augmenter(images, gen(0))  # built once: the device copies of mean and std
    counter = PythonDataTensors(monkeypatch)
    for seed in range(3):
        augmenter(images, gen(seed))
    assert counter.calls == [], counter.calls
    for job in jobs:
        model = loop.init_model(job.spec, job.seed)
        teachers = [teacher] if job.loss == "cbd" else []
        optimizer = loop.make_optimizer(loop.trainable_parameters(model, job), job, cpu)
        step_loss = loop.model_step(job, model, teachers, log_prior(data.class_counts), "fp32")
        batches = data.batches(job, 16, 4, cpu)
        counter.calls.clear()
        loop.run_epoch([job], batches(0), step_loss, optimizer, epoch=0, steps=4, stage="test", check_every=2)
        assert counter.calls == [], (job.name, counter.calls)


@pytest.mark.slow
def test_compiled_colour_jitter_equals_eager_within_a_hundredth_of_a_grey_level():
    """The compiled augmentation (what training runs wherever it compiles the model) against eager on
    the same uniforms: within 1e-4 after normalisation (std ~0.25: 2.5e-5 in [0, 1] pixel units, under a
    hundredth of one uint8 level); measured up to 1e-5 (fused kernels sum in another order)."""
    from cbdlib.engine.compiled import compile_for_training

    images = rand_uint8(64, 32, 32, seed=11)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    eager = BatchAugmenter(aug_config(32), mean, std, channels_last=True)
    compiled = BatchAugmenter(aug_config(32), mean, std, channels_last=True, compile_fn=compile_for_training)
    assert compiled.compiled and not eager.compiled
    assert not BatchAugmenter(vanilla_config(32), mean, std, compile_fn=compile_for_training).compiled  # cheap
    g = gen(5)
    for _ in range(3):
        u = eager.draw(64, g, "cpu")
        want, got = eager.apply(images, u), compiled.apply(images, u)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert not torch.equal(want, BatchAugmenter(None, mean, std, channels_last=True)(images, None))  # augmented
