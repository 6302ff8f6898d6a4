"""Probes (peco_scale.tools.probe): the classifier against numpy, the features against hand computations
with timm's own eval transform, the signal end to end with a label-shifted control, both CLIs on the
demo data, and one clear error line for every bad input.

Class signal. Untrained networks carry almost no class signal on the demo data, whose classes are
shapes and textures in random colours: measured top-1 for 10 classes, 5-30% for random or k-means-
initialised tokenizers of the ``tiny`` preset or shallower, 15-21% for a random pico ViT, even with a
well-fitted head. So the demo-data tests check the whole CLI run and its result fields, and the signal
tests use classes told apart by hue: a random pico ViT keeps the colour, and so do the codewords of a
shallow random tokenizer (one downsample, only the middle block's residual blocks) whose codebook is
k-means of its own encoder outputs (the quantizer's own init); the ``tiny`` depth washes it out
(GroupNorm after GroupNorm).
"""

from __future__ import annotations

import colorsys
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import demo_tree
from peco_scale.data import make_demo_dataset, scan_image_folder
from peco_scale.data.mim import IMAGENET_MEAN, IMAGENET_STD
from peco_scale.train.tokenizer_config import tokenizer_config
from peco_scale.models.artifact import load_tokenizer, save_tokenizer
from peco_scale.models.tokenizer import VQTokenizer
from peco_scale.models.vit import VIT_PRESETS, MaskedViT, export_timm_state_dict, timm_spec
from peco_scale.tools import probe
from peco_scale.tools.export import FORMAT

TOK_SIZE, VIT_SIZE = 24, 64  # sizes where the probe's round(size / 0.875) equals timm's floor
HALF = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------- helpers and fixtures


def make_colour_classes(root: Path, per_class: int, seed: int) -> Path:
    """ImageFolder of 10 classes told apart only by hue (random saturation, value, size, aspect, noise)."""
    rng = np.random.default_rng(seed)
    for c in range(10):
        folder = root / f"hue{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(40, 120, size=2)
            rgb = np.asarray(colorsys.hsv_to_rgb(c / 10, rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
            img = np.clip(rgb + rng.normal(0, 0.15, (h, w, 3)), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def reference_batch(paths: list[str], size: int, mean, std) -> torch.Tensor:
    """Images through timm's own eval transform (crop_pct 0.875, bicubic): the reference for the probe's.

    timm resizes to floor(size / 0.875), the probe to round(size / 0.875); the sizes used here agree.
    """
    tf = timm.data.create_transform(size, is_training=False, crop_pct=0.875, interpolation="bicubic", mean=mean, std=std)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])


def shallow_tokenizer(train_root: Path, seed: int) -> VQTokenizer:
    """A random tokenizer with one downsample and no attention; codebook = k-means of its encoder outputs."""
    torch.manual_seed(seed)
    cfg = tokenizer_config(None, {"model.preset": "tiny", "model.ch_mult": [1, 2], "model.num_res_blocks": 0,
                                       "model.attn_at_lowest": False, "quantizer.codebook_size": 64})
    tok = VQTokenizer(cfg.model, cfg.quantizer).train()
    samples, _, _ = scan_image_folder(train_root)
    with torch.no_grad():
        tok(reference_batch([p for p, _ in samples[::4]], TOK_SIZE, HALF, HALF))  # the k-means init
    assert bool(tok.quantizer.initialized)
    return tok.eval()


def pico_backbone(path: Path, seed: int) -> MaskedViT:
    """A random pico ViT written as `python -m peco_scale.tools.export` writes backbones; returns the source model."""
    torch.manual_seed(seed)
    preset = VIT_PRESETS["vit_pico_patch16"]
    model = MaskedViT(preset, VIT_SIZE, drop_path=0.0).eval()
    name, kwargs = timm_spec(preset, VIT_SIZE)
    meta = {"format": FORMAT, "timm_name": name, "timm_kwargs": json.dumps(kwargs), "preset": "vit_pico_patch16",
            "step": "0", "source": "tests", "tokenizer_sha256": ""}
    save_file(export_timm_state_dict(model), str(path), metadata=meta)
    return model


def link_classes(src: Path, dst: Path, names: dict[str, str]) -> Path:
    """An ImageFolder whose class folder ``names[c]`` is a symlink to ``src/c`` (c not in names: left out)."""
    dst.mkdir()
    for cls, new in names.items():
        (dst / new).symlink_to(src / cls, target_is_directory=True)
    return dst


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("colour")
    return make_colour_classes(root / "train", 20, seed=0), make_colour_classes(root / "val", 10, seed=1)


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory) -> Path:
    """A held-out demo tree: other seed, 10 images per class."""
    return demo_tree(tmp_path_factory, "demo_val", 10, 1)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, colour_data) -> Path:
    return save_tokenizer(shallow_tokenizer(colour_data[0], seed=0), tmp_path_factory.mktemp("tok") / "tok.safetensors")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> tuple[Path, MaskedViT]:
    path = tmp_path_factory.mktemp("vit") / "backbone.safetensors"
    return path, pico_backbone(path, seed=0)


@pytest.fixture
def small_folder(colour_data, tmp_path) -> Path:
    """2 classes x 3 images copied from the colour training set."""
    for cls in ("hue2", "hue7"):
        (tmp_path / "small" / cls).mkdir(parents=True)
        for f in sorted((colour_data[0] / cls).iterdir())[:3]:
            shutil.copy(f, tmp_path / "small" / cls / f.name)
    return tmp_path / "small"


def gaussian_features(means: np.ndarray, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n_per_class unit-variance Gaussian samples around each row of ``means`` [C, D], shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(means)), n_per_class)
    rng.shuffle(labels)
    x = means[labels] + rng.normal(size=(len(labels), means.shape[1]))
    return torch.tensor(x, dtype=torch.float32), torch.tensor(labels)


# ----------------------------------------------------------------------------- classifier


def test_separable_gaussians_are_classified_almost_perfectly():
    means = np.random.default_rng(0).normal(0, 3, size=(10, 32))  # pairwise distances ~24 sigma
    (xt, yt), (xv, yv) = gaussian_features(means, 50, 1), gaussian_features(means, 50, 2)
    # an offset and a scale far from the unit range: the BatchNorm standardises them away
    res = probe.train_linear_probe(100 + 20 * xt, yt, 100 + 20 * xv, yv, 10, epochs=30, lr=1e-2, batch_size=64,
                                   device="cpu")
    assert res["top1"] > 0.98 and res["train_top1"] > 0.98 and res["top5"] == 1.0


def test_random_labels_stay_at_chance():
    rng = np.random.default_rng(0)
    xt, xv = (torch.tensor(rng.normal(size=(n, 64)), dtype=torch.float32) for n in (500, 2000))
    yt, yv = (torch.tensor(rng.integers(0, 10, n)) for n in (500, 2000))
    res = probe.train_linear_probe(xt, yt, xv, yv, 10, epochs=50, lr=1e-2, batch_size=64, device="cpu")
    assert res["chance"] == 0.1
    assert abs(res["top1"] - 0.1) < 0.03  # 2000 val samples: one standard error is 0.0067


def test_accuracies_match_numpy_on_the_fitted_head():
    means = np.random.default_rng(1).normal(0, 0.4, size=(10, 16))  # overlapping classes: accuracy in between
    (xt, yt), (xv, yv) = gaussian_features(means, 40, 3), gaussian_features(means, 40, 4)
    kw = {"epochs": 20, "lr": 3e-3, "batch_size": 50, "seed": 7, "device": "cpu"}
    res = probe.train_linear_probe(xt, yt, xv, yv, 10, **kw)
    head = probe.fit_linear_head(xt, yt, 10, **kw)  # same seed on the CPU: the head the probe evaluated
    bn, linear = head
    assert not bn.affine and list(bn.parameters()) == [] and len(list(head.parameters())) == 2
    assert not head.training

    def np_logits(x: torch.Tensor) -> np.ndarray:
        z = (x.numpy() - bn.running_mean.numpy()) / np.sqrt(bn.running_var.numpy() + bn.eps)
        return z @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()

    lv, lt = np_logits(xv), np_logits(xt)
    top5 = np.mean([y in np.argsort(row)[-5:] for row, y in zip(lv, yv.numpy())])
    assert res["top1"] == pytest.approx(np.mean(lv.argmax(1) == yv.numpy()), abs=1e-6)
    assert res["top5"] == pytest.approx(top5, abs=1e-6)
    assert res["train_top1"] == pytest.approx(np.mean(lt.argmax(1) == yt.numpy()), abs=1e-6)
    assert 0.2 < res["top1"] < 0.9 and res["top5"] > res["top1"]  # the comparison is not a trivial 0 or 1
    assert {k: res[k] for k in ("chance", "num_train", "num_val", "feature_dim", "num_classes", "epochs")} == {
        "chance": 0.1, "num_train": 400, "num_val": 400, "feature_dim": 16, "num_classes": 10, "epochs": 20}
    assert probe.train_linear_probe(xt, yt, xv, yv, 10, **kw) == res  # deterministic given the seed
    other = probe.fit_linear_head(xt, yt, 10, **{**kw, "seed": 8})
    assert not torch.equal(other[1].weight, linear.weight)


def test_no_top5_below_five_classes():
    (xt, yt), (xv, yv) = (gaussian_features(np.eye(3, 4) * 5, 20, s) for s in (0, 1))
    res = probe.train_linear_probe(xt, yt, xv, yv, 3, epochs=5, batch_size=16, device="cpu")
    assert "top5" not in res and res["chance"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- features


def test_codeword_features_match_a_hand_computation(tokenizer_file, small_folder):
    tok = load_tokenizer(tokenizer_file)
    feats, labels, classes, skipped = probe.extract_codeword_features(tok, small_folder, img_size=TOK_SIZE,
                                                                      batch_size=4, device="cpu")
    samples, _, _ = scan_image_folder(small_folder)
    x = reference_batch([p for p, _ in samples], TOK_SIZE, HALF, HALF)
    ref = tok.quantizer.lookup(tok.tokenize(x)).mean((2, 3))
    assert feats.dtype == torch.float32 and feats.shape == (6, tok.quant_cfg.dim)
    torch.testing.assert_close(feats, ref)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["hue2", "hue7"] and skipped == 0


def test_vit_features_match_the_source_model(backbone, small_folder):
    path, source = backbone
    model = probe.load_backbone(path)
    feats, labels, _, _ = probe.extract_vit_features(model, small_folder, batch_size=4, device="cpu")
    samples, _, _ = scan_image_folder(small_folder)
    with torch.no_grad():  # MaskedViT returns the normed patch tokens; export folded its layer scale
        ref = source(reference_batch([p for p, _ in samples], VIT_SIZE, IMAGENET_MEAN, IMAGENET_STD)).mean(1)
    assert feats.shape == (6, 128) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(feats, ref, rtol=1e-4, atol=1e-4)


def test_unreadable_images_are_skipped_and_counted(tokenizer_file, small_folder):
    tok = load_tokenizer(tokenizer_file)
    clean = probe.extract_codeword_features(tok, small_folder, img_size=TOK_SIZE, batch_size=4, device="cpu")
    good = sorted((small_folder / "hue2").iterdir())[0]
    (small_folder / "hue2" / "0_truncated.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (small_folder / "hue7" / "notes.jpg").write_text("not an image\n")
    for bad in (small_folder / "hue2" / "0_truncated.jpg", small_folder / "hue7" / "notes.jpg"):
        with pytest.raises(OSError):  # both really fail to decode
            Image.open(bad).convert("RGB")
    feats, labels, classes, skipped = probe.extract_codeword_features(tok, small_folder, img_size=TOK_SIZE,
                                                                      batch_size=4, device="cpu", workers=2)
    assert skipped == 2
    torch.testing.assert_close(feats, clean[0])
    assert torch.equal(labels, clean[1]) and classes == clean[2]


# ----------------------------------------------------------------------------- the signal, end to end


# 200 training images: batches of 32 and lr 1e-2 fit the head in 50 epochs (the defaults are sized for ImageNet)
SIGNAL_KW = {"epochs": 50, "batch_size": 32, "lr": 1e-2, "device": "cpu"}


def shifted_val(val: Path, tmp_path: Path) -> Path:
    """The control: the same val images with every class folder named after the next class."""
    names = [f"hue{c}" for c in range(10)]
    return link_classes(val, tmp_path / "shifted", {c: names[(i + 1) % 10] for i, c in enumerate(names)})


def test_codeword_probe_finds_the_colour_signal(tokenizer_file, colour_data, tmp_path):
    train, val = colour_data
    res = probe.codeword_probe(tokenizer_file, train, val, img_size=TOK_SIZE, **SIGNAL_KW)
    assert res["top1"] > 0.4, res  # chance 0.10; measured 0.68-0.94 over 8 tokenizer seeds
    control = probe.codeword_probe(tokenizer_file, train, shifted_val(val, tmp_path), img_size=TOK_SIZE, **SIGNAL_KW)
    assert control["top1"] < 0.2, control  # measured 0.04-0.11 (neighbouring hues are alike)


def test_linear_probe_finds_the_colour_signal(backbone, colour_data, tmp_path):
    train, val = colour_data
    res = probe.linear_probe(backbone[0], train, val, **SIGNAL_KW)
    assert res["top1"] > 0.6, res  # chance 0.10; measured 1.00 over 8 ViT seeds
    control = probe.linear_probe(backbone[0], train, shifted_val(val, tmp_path), **SIGNAL_KW)
    assert control["top1"] < 0.2, control  # measured 0.00


def _check_cli_result(out: Path, line: str, kind: str, feature_dim: int, img_size: int) -> dict:
    res = json.loads(out.read_text())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # the atomic write left no temp file
    assert {k: res[k] for k in ("probe", "num_train", "num_val", "skipped", "num_classes", "feature_dim", "chance",
                                "epochs", "img_size")} == {
        "probe": kind, "num_train": 300, "num_val": 100, "skipped": 0, "num_classes": 10, "feature_dim": feature_dim,
        "chance": 0.1, "epochs": 10, "img_size": img_size}
    assert 0 <= res["top1"] <= res["top5"] <= 1 and 0 <= res["train_top1"] <= 1
    assert line == (f"{kind} probe: top-1 {res['top1']:.1%}, top-5 {res['top5']:.1%} (chance 10.0%) on 100 val "
                    f"images, 10 classes, {feature_dim}-d features; wrote {out}")
    return res


def test_codeword_cli_on_the_demo_data(tokenizer_file, demo_data, demo_val, tmp_path, capsys):
    out = tmp_path / "res" / "codeword.json"
    assert probe.main(["codeword", "--tokenizer", str(tokenizer_file), "--data", str(demo_data), "--val", str(demo_val),
                       "--img_size", str(TOK_SIZE), "--epochs", "10", "--workers", "0", "--device", "cpu",
                       "--out", str(out)]) == 0
    _check_cli_result(out, capsys.readouterr().out.strip(), "codeword", 16, TOK_SIZE)


def test_linear_cli_on_the_demo_data(backbone, demo_data, demo_val, tmp_path, capsys):
    out = tmp_path / "linear.json"
    assert probe.main(["linear", "--backbone", str(backbone[0]), "--data", str(demo_data), "--val", str(demo_val),
                       "--epochs", "10", "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    _check_cli_result(out, capsys.readouterr().out.strip(), "linear", 128, VIT_SIZE)


# ----------------------------------------------------------------------------- bad input

BAD_INPUT = {
    # name: (subcommand + model args, extra args, substrings of the error line)
    "missing backbone": (["linear", "--backbone", "{missing}"], [],
                         ["'{missing}' not found", "peco_scale.tools.export RUN"]),
    "tokenizer as backbone": (["linear", "--backbone", "{tok}"], [], ["{tok}", "not a peco-scale backbone export"]),
    "garbage backbone": (["linear", "--backbone", "{garbage}"], [], ["{garbage}", "not a safetensors file"]),
    "classifier as backbone": (["linear", "--backbone", "{classifier}"], [], ["{classifier}", "fine-tuned classifier"]),
    "missing tokenizer": (["codeword", "--tokenizer", "{missing}"], [], ["'{missing}' not found"]),
    "backbone as tokenizer": (["codeword", "--tokenizer", "{vit}"], [], ["{vit}", "not a peco-scale tokenizer"]),
    "garbage tokenizer": (["codeword", "--tokenizer", "{garbage}"], [], ["{garbage}", "not a safetensors file"]),
    "missing data": (["codeword", "--tokenizer", "{tok}"], ["--data", "{nodir}"], ["{nodir}", "does not exist"]),
    "missing val": (["linear", "--backbone", "{vit}"], ["--val", "{nodir}"], ["{nodir}", "does not exist"]),
    "class mismatch": (["codeword", "--tokenizer", "{tok}"], ["--val", "{val9}"],
                       ["class lists differ", "'{train}' has 10 classes", "'{val9}' has 9",
                        "position 3: 'hue3' vs 'hue4'"]),
    "zero epochs": (["linear", "--backbone", "{vit}"], ["--epochs", "0"], ["--epochs 0 must be positive"]),
    "zero lr": (["codeword", "--tokenizer", "{tok}"], ["--lr", "0"], ["--lr 0.0 must be positive"]),
    "negative lr": (["linear", "--backbone", "{vit}"], ["--lr", "-0.1"], ["--lr -0.1 must be positive"]),
    "zero batch": (["codeword", "--tokenizer", "{tok}"], ["--batch_size", "0"], ["--batch_size 0 must be at least 2"]),
    "batch of one": (["linear", "--backbone", "{vit}"], ["--batch_size", "1"], ["--batch_size 1 must be at least 2"]),
    "zero extract batch": (["codeword", "--tokenizer", "{tok}"], ["--extract_batch_size", "0"],
                           ["--extract_batch_size 0 must be positive"]),
    "negative workers": (["linear", "--backbone", "{vit}"], ["--workers", "-1"], ["--workers -1"]),
    "img_size off the grid": (["codeword", "--tokenizer", "{tok}"], ["--img_size", "33"],
                              ["--img_size 33", "downsample factor 2", "use 32"]),
    "zero img_size": (["codeword", "--tokenizer", "{tok}"], ["--img_size", "0"], ["--img_size 0", "use 2"]),
    "out is a folder": (["codeword", "--tokenizer", "{tok}"], ["--out", "{outdir}"], ["--out '{outdir}' is a directory"]),
    "cuda without a GPU": (["linear", "--backbone", "{vit}"], ["--device", "cuda"], ["--device cuda", "--device cpu"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_line(case, tokenizer_file, backbone, colour_data, tmp_path, monkeypatch, capsys):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")

    def no_extraction(*args, **kwargs):
        raise AssertionError("bad input must be refused before feature extraction")

    monkeypatch.setattr(probe, "_extract", no_extraction)
    (tmp_path / "garbage.safetensors").write_text("not a safetensors file\n")
    with safe_open(str(backbone[0]), framework="pt") as f:  # what `export` writes for a fine-tuning run
        save_file(load_file(str(backbone[0])), str(tmp_path / "classifier.safetensors"),
                  metadata={**f.metadata(), "kind": "finetune"})
    (tmp_path / "outdir").mkdir()
    train, val = colour_data
    paths = {"missing": tmp_path / "nope.safetensors", "tok": tokenizer_file, "vit": backbone[0],
             "garbage": tmp_path / "garbage.safetensors", "classifier": tmp_path / "classifier.safetensors",
             "nodir": tmp_path / "no_such_dir", "train": train,
             "val9": link_classes(val, tmp_path / "val9", {f"hue{c}": f"hue{c}" for c in range(10) if c != 3}),
             "outdir": tmp_path / "outdir"}
    model_args, extra, expected = BAD_INPUT[case]
    argv = [a.format(**paths) for a in [*model_args, "--data", "{train}", "--val", str(val), "--workers", "0",
                                         "--device", "cpu", *extra]]
    assert probe.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and captured.out == "", captured.err
    for text in expected:
        assert text.format(**paths) in lines[0], lines[0]


def test_cli_help_names_both_probes(capsys):
    with pytest.raises(SystemExit) as exc:
        probe.main(["--help"])
    assert exc.value.code == 0
    assert re.search(r"\{linear,codeword\}", capsys.readouterr().out)


def test_codeword_probe_of_a_trained_tokenizer_is_above_chance_on_the_demo_data(tiny_tokenizer, demo_data, tmp_path):
    """The stage-1 fixture (40 steps on the demo data) against 300 held-out demo images: its codewords
    carry class information beyond chance (one-sided binomial test, chance 0.1 per image)."""
    import math

    val = tmp_path / "val"
    make_demo_dataset(val, images_per_class=30, seed=1)
    res = probe.codeword_probe(tiny_tokenizer, demo_data, val, img_size=64, epochs=100, lr=1e-2, batch_size=32, seed=0)
    hits = round(res["top1"] * res["num_val"])
    p_value = sum(math.comb(300, k) * 0.1**k * 0.9 ** (300 - k) for k in range(hits, 301))
    assert res["num_val"] == 300 and p_value < 0.01, (res["top1"], p_value)
