"""``python -m peco_scale.visualize``: grid layout, the tokenizer and peco rows checked against
computations done here (numpy PSNR, the models called directly), and the command end to end on a
tokenizer artifact and on the session's tiny stage-2 run (conftest.pretrain_run)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from peco_scale.data import make_demo_dataset
from peco_scale.data.masking import BlockMaskGenerator, RandomMaskGenerator
from peco_scale.data.mim import IMAGENET_MEAN, IMAGENET_STD
from peco_scale.models.artifact import load_tokenizer, save_tokenizer
from peco_scale.models.mae import MAETask
from peco_scale.models.mim import MIMHead
from peco_scale.models.quantizer import QuantizerConfig
from peco_scale.models.tokenizer import TokenizerModelConfig, VQTokenizer
from peco_scale.models.vit import VIT_PRESETS, MaskedViT
from peco_scale.tools import visualize as vis

from conftest import ROOT

SIZE = 64  # px of every test image; the tiny tokenizer's 16x downsample and the pico ViT's patch 16 give 4x4


def tiny_tokenizer_model(seed: int = 0) -> VQTokenizer:
    """An untrained 16x tokenizer with 64 codes of dimension 8 (a real VQTokenizer, random weights)."""
    torch.manual_seed(seed)
    model = TokenizerModelConfig(preset="tiny", base_channels=8, ch_mult=(1, 1, 2, 2, 2), num_res_blocks=1)
    return VQTokenizer(model, QuantizerConfig(codebook_size=64, dim=8)).eval()


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    """A demo ImageFolder tree with one 64-96 px image per class (10 images)."""
    root = tmp_path_factory.mktemp("few_images")
    make_demo_dataset(root, images_per_class=1, seed=0, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def tokenizer_artifact(tmp_path_factory) -> Path:
    """The tiny tokenizer as stage 1 writes it (the training config, and so its 64 px size, in the metadata)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.safetensors"
    return save_tokenizer(tiny_tokenizer_model(), path, extra={"step": 0, "config": {"data": {"img_size": SIZE}}})


def views(root: Path, n: int) -> torch.Tensor:
    """The first n images of the tree at 64 px, in [0, 1]."""
    paths = vis.pick_images(root, n)
    return vis.load_views(paths, [SIZE])[0]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def grid_size(rows: int, cols: int, h: int, w: int, labels: bool, texts: bool) -> tuple[int, int]:
    """(width, height) of make_grid's documented layout."""
    line = vis.LINE
    return (vis.GAP + cols * (w + vis.GAP),
            vis.GAP + (line if labels else 0) + rows * (h + (line if texts else 0) + vis.GAP))


# ----------------------------------------------------------------------------- make_grid / write_grid


@pytest.mark.parametrize("labels,texts", [(True, True), (False, False), (True, False)])
def test_make_grid_size_and_tile_pixels(labels, texts):
    g = torch.Generator().manual_seed(0)
    rows = [[torch.rand(3, 10, 12, generator=g) for _ in range(3)] for _ in range(2)]
    rows[1][2] = rows[1][2] * 1.4 - 0.2  # out-of-range values are clamped
    img = vis.make_grid(rows, ["a", "b", "a long label that does not fit"] if labels else None,
                        ["caption one", "caption two"] if texts else None)
    assert img.mode == "RGB" and img.size == grid_size(2, 3, 10, 12, labels, texts)
    arr = np.asarray(img).astype(np.float64)
    line = vis.LINE
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            x = vis.GAP + c * (12 + vis.GAP)
            y = vis.GAP + (line if labels else 0) + r * (10 + (line if texts else 0) + vis.GAP)
            assert vis.tile_origin(r, c, (10, 12), labels, texts) == (x, y)
            want = tile.clamp(0, 1).permute(1, 2, 0).double().numpy() * 255
            assert np.abs(arr[y:y + 10, x:x + 12] - want).max() <= 0.5 + 1e-6
        if texts:  # the caption band under the row holds ink
            assert arr[y + 10:y + 10 + line, vis.GAP:].min() < 128
    if labels:
        assert arr[:line, :].min() < 128
    else:
        assert (arr[:vis.GAP] == 255).all()


def test_make_grid_pads_smaller_tiles_and_refuses_bad_tiles():
    big, small = torch.zeros(3, 8, 8), torch.ones(3, 4, 6)
    img = vis.make_grid([[big, small]])
    assert img.size == grid_size(1, 2, 8, 8, False, False)
    arr = np.asarray(img)
    x, y = vis.tile_origin(0, 1, (8, 8), False, False)
    assert (arr[y:y + 4, x:x + 6] == 255).all() and (arr[y + 4:y + 8, x:x + 8] == 255).all()  # tile, then background
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        vis.make_grid([[torch.zeros(1, 8, 8)]])
    with pytest.raises(ValueError, match="2 texts for 1 rows"):
        vis.make_grid([[big]], None, ["a", "b"])


def test_write_grid_replaces_atomically(tmp_path):
    first = vis.make_grid([[torch.zeros(3, 8, 8)]])
    second = vis.make_grid([[torch.ones(3, 8, 8)]])
    out = tmp_path / "sub" / "grid.png"
    assert vis.write_grid(first, out) == out
    vis.write_grid(second, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]  # no temporary file left
    with Image.open(out) as img:
        assert img.format == "PNG" and np.array_equal(np.asarray(img.convert("RGB")), np.asarray(second))


# ----------------------------------------------------------------------------- row functions


def test_tokenizer_rows_psnr_and_reconstruction(few_images):
    tok = tiny_tokenizer_model()
    x = views(few_images, 3) * 2 - 1
    codebook = tok.quantizer.codebook.clone()
    tok.train()
    res = vis.tokenizer_rows(tok, x)
    assert tok.training and all(m.training for m in tok.modules())  # training mode given back
    assert torch.equal(tok.quantizer.codebook, codebook)  # no EMA update from a picture
    tok.eval()
    with torch.no_grad():
        rec = tok.decode_indices(tok.tokenize(x))
    assert res.labels == ["input", "reconstruction"] and len(res.rows) == 3
    for i, (inp, out) in enumerate(res.rows):
        torch.testing.assert_close(inp, ((x[i] + 1) / 2).clamp(0, 1))
        torch.testing.assert_close(out, (rec[i] * 0.5 + 0.5).clamp(0, 1))
        a, b = inp.double().numpy(), out.double().numpy()
        expected = 10 * np.log10(1.0 / np.mean((a - b) ** 2))
        assert res.info["psnr"][i] == pytest.approx(expected, rel=1e-9)
        assert res.texts[i] == f"PSNR {expected:.2f} dB"


def test_peco_rows_ids_and_decoded_columns(few_images):
    tok = tiny_tokenizer_model()
    torch.manual_seed(1)
    backbone = MaskedViT(VIT_PRESETS["vit_pico_patch16"], SIZE, drop_path=0.2)  # eval mode matters: drop path
    head = MIMHead(backbone.embed_dim, tok.quant_cfg.codebook_size, kernels="torch")
    torch.nn.init.normal_(head.weight, std=1.0)  # spread the logits so the argmax is not the tokenizer's id by chance
    img = views(few_images, 4)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    patch, tok_view = (img - mean) / std, img * 2 - 1
    gen = BlockMaskGenerator((4, 4), 6)
    mask = torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(4)]))
    backbone.train(), head.train()
    res = vis.peco_rows(backbone, head, tok, patch, tok_view, mask)
    assert backbone.training and all(m.training for m in backbone.modules()) and head.training

    backbone.eval()
    with torch.no_grad():
        tok_ids = tok.tokenize(tok_view).flatten(1)
        argmax = (backbone(patch, mask) @ head.weight.T + head.bias).argmax(-1)
        m = mask.flatten(1)
        expected = torch.where(m, argmax, tok_ids)
        pred_img = (tok.decode_indices(expected.view(4, 4, 4)) * 0.5 + 0.5).clamp(0, 1)
        rec_img = (tok.decode_indices(tok_ids.view(4, 4, 4)) * 0.5 + 0.5).clamp(0, 1)
    pred = res.info["prediction"]
    assert torch.equal(pred[~m], tok_ids[~m]) and torch.equal(pred[m], argmax[m])
    assert (argmax[m] != tok_ids[m]).any()  # the two sources really differ at some masked patch
    assert res.labels == ["input", "masked input", "prediction", "tokenizer reconstruction"]
    for i, (inp, masked, p, r) in enumerate(res.rows):
        torch.testing.assert_close(inp, img[i], atol=1e-6, rtol=0)
        big = mask[i].repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert (masked[:, big] == vis.MASK_GREY).all() and torch.equal(masked[:, ~big], inp[:, ~big])
        torch.testing.assert_close(p, pred_img[i])
        torch.testing.assert_close(r, rec_img[i])
        hits = int(((argmax[i] == tok_ids[i]) & m[i]).sum())
        assert res.info["correct"][i] == hits and res.texts[i] == f"{hits}/6 masked tokens right"


def test_mae_rows_paste_predicted_pixels_and_score_the_masked_patches(few_images):
    torch.manual_seed(2)
    task = MAETask(MaskedViT(VIT_PRESETS["vit_pico_patch16"], SIZE, drop_path=0.2), decoder_dim=32, decoder_depth=2,
                   decoder_heads=4, num_masked=12)
    img = views(few_images, 3)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    patch = (img - mean) / std
    gen = RandomMaskGenerator((4, 4), 12)
    mask = torch.from_numpy(np.stack([gen(np.random.default_rng(i)) for i in range(3)]))
    task.train()
    res = vis.mae_rows(task, patch, mask)
    assert task.training and all(m.training for m in task.modules())

    task.eval()
    with torch.no_grad():
        pred = task(patch, mask)["pred"]
    assert res.labels == ["input", "masked input", "prediction"]
    for i, (inp, masked, p) in enumerate(res.rows):
        big = mask[i].repeat_interleave(16, 0).repeat_interleave(16, 1)
        torch.testing.assert_close(inp, img[i], atol=1e-6, rtol=0)
        assert (masked[:, big] == vis.MASK_GREY).all() and torch.equal(masked[:, ~big], inp[:, ~big])
        torch.testing.assert_close(p[:, ~big], img[i][:, ~big], atol=1e-5, rtol=0)  # visible: the input's own
        # masked: the prediction de-normalised by the input patch's mean and unbiased std, then un-ImageNet-ed
        rows = patch[i].unfold(1, 16, 16).unfold(2, 16, 16).permute(1, 2, 3, 4, 0).reshape(16, -1).double()
        values = pred[i].double() * (rows.var(1, keepdim=True) + 1e-6).sqrt() + rows.mean(1, keepdim=True)
        r, c = np.argwhere(mask[i].numpy())[0]
        tile = values[r * 4 + c].reshape(16, 16, 3).permute(2, 0, 1) * std + mean
        torch.testing.assert_close(p[:, r * 16:(r + 1) * 16, c * 16:(c + 1) * 16], tile.float().clamp(0, 1),
                                   atol=1e-5, rtol=0)
        target = (rows - rows.mean(1, keepdim=True)) / (rows.var(1, keepdim=True) + 1e-6).sqrt()
        loss = ((pred[i].double() - target) ** 2).mean(1)[mask[i].flatten()].mean()
        assert res.info["loss"][i] == pytest.approx(float(loss), rel=1e-4)
        mse = ((p.double() - img[i].double()) ** 2)[:, big].mean()
        assert res.info["psnr"][i] == pytest.approx(float(10 * torch.log10(1 / mse)), rel=1e-4)


# ----------------------------------------------------------------------------- the command


def cli(*args: str):
    return subprocess.run([sys.executable, "-m", "peco_scale.visualize", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_tool_answers_help_and_the_old_name_is_the_tool(capsys):
    import peco_scale.visualize

    assert peco_scale.visualize is vis
    assert "error:" in vis.__doc__ and "exits 2" in vis.__doc__
    with pytest.raises(SystemExit) as e:
        vis.main(["--help"])
    assert e.value.code == 0 and "python -m peco_scale.visualize" in capsys.readouterr().out


def test_cli_on_a_tokenizer_artifact(tokenizer_artifact, few_images, tmp_path, capsys):
    out = tmp_path / "grid.png"
    res = cli(str(tokenizer_artifact), "--data", str(few_images), "--out", str(out), "--num", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    with Image.open(out) as img:  # 64 px: the size the artifact says it was trained at
        assert img.format == "PNG" and img.size == grid_size(3, 2, SIZE, SIZE, True, True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    printed = [float(line.split("PSNR ")[1].split(" dB")[0]) for line in res.stdout.splitlines()
               if line.startswith("row ")]
    expected = vis.tokenizer_rows(load_tokenizer(tokenizer_artifact), views(few_images, 3) * 2 - 1).info["psnr"]
    assert printed == pytest.approx(expected, abs=0.006)
    # the stage-1 run folder that holds the artifact gives the same picture; --img_size picks another size
    assert vis.main([str(tokenizer_artifact.parent), "--data", str(few_images), "--out", str(tmp_path / "b.png"),
                     "--num", "3"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "b.png")))
    assert vis.main([str(tokenizer_artifact), "--data", str(few_images), "--out", str(tmp_path / "c.png"),
                     "--num", "1", "--img_size", "32"]) == 0
    assert Image.open(tmp_path / "c.png").size == grid_size(1, 2, 32, 32, True, True)
    capsys.readouterr()


def test_cli_on_a_stage2_run(pretrain_run, few_images, tmp_path, capsys):
    out = tmp_path / "grid.png"
    res = cli(str(pretrain_run), "--data", str(few_images), "--out", str(out), "--num", "3", "--seed", "5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sum(line.startswith("row ") and "masked tokens right" in line for line in res.stdout.splitlines()) == 3
    with Image.open(out) as img:
        assert img.size == grid_size(3, 4, SIZE, SIZE, True, True)
        arr = np.asarray(img.convert("RGB"))
    # the masked-input column greys exactly the run's masks: grid 4x4, 6 patches (75/196 of 16), seed + i
    gen = BlockMaskGenerator((4, 4), 6, min_block=1)
    for i in range(3):
        x, y = vis.tile_origin(i, 1, (SIZE, SIZE), True, True)
        tile = arr[y:y + SIZE, x:x + SIZE].reshape(4, 16, 4, 16, 3)
        grey = (tile == 128).all(axis=(1, 3, 4))
        np.testing.assert_array_equal(grey, gen(np.random.default_rng(5 + i)))
    # the step folder, with the same seed, gives the same picture (deterministic)
    step = pretrain_run / "checkpoints" / "step_00000006"
    assert vis.main([str(step), "--data", str(few_images), "--out", str(tmp_path / "b.png"), "--num", "3",
                     "--seed", "5"]) == 0
    assert np.array_equal(arr, np.asarray(Image.open(tmp_path / "b.png").convert("RGB")))
    capsys.readouterr()


def test_recorded_tokenizer_missing_needs_override(pretrain_run, tiny_tokenizer, few_images, tmp_path, capsys):
    """A checkpoint moved where its tokenizer path does not exist: one line asking for --tokenizer,
    then --tokenizer makes it work."""
    step = tmp_path / "step_00000006"
    shutil.copytree(pretrain_run / "checkpoints" / "step_00000006", step)
    state = json.loads((step / "state.json").read_text())
    state["tokenizer"]["path"] = str(tmp_path / "gone" / "tokenizer.safetensors")
    (step / "state.json").write_text(json.dumps(state))
    listing = json.loads((step / "COMPLETE").read_text())
    listing["files"] = {str(f.relative_to(step)): f.stat().st_size for f in step.rglob("*")
                        if f.is_file() and f.name != "COMPLETE"}
    (step / "COMPLETE").write_text(json.dumps(listing))
    args = [str(step), "--data", str(few_images), "--out", str(tmp_path / "g.png"), "--num", "2"]
    assert vis.main(args) == 2
    line = one_error_line(capsys)
    assert "gone/tokenizer.safetensors" in line and "--tokenizer" in line
    assert not (tmp_path / "g.png").exists()
    assert vis.main([*args, "--tokenizer", str(tiny_tokenizer)]) == 0 and (tmp_path / "g.png").is_file()
    capsys.readouterr()


def test_bad_inputs_are_one_line_and_exit_2(tokenizer_artifact, few_images, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "outdir.png").mkdir()
    good = tmp_path / "ok.png"
    cases = [  # (argv, words the line must hold)
        ([str(tmp_path / "nothing"), "--data", str(few_images), "--out", str(good)], ["nothing", "does not exist"]),
        ([str(tmp_path / "notes.txt"), "--data", str(few_images), "--out", str(good)], ["notes.txt", "tokenizer.safetensors"]),
        ([str(few_images), "--data", str(few_images), "--out", str(good)], [str(few_images), "stage-2"]),
        ([str(tokenizer_artifact), "--data", str(tmp_path / "empty"), "--out", str(good)], ["empty", "no images"]),
        ([str(tokenizer_artifact), "--data", str(tmp_path / "missing"), "--out", str(good)], ["missing", "does not exist"]),
        ([str(tokenizer_artifact), "--data", str(few_images), "--out", str(tmp_path / "notes.txt" / "g.png")],
         ["notes.txt", "not a writable folder"]),
        ([str(tokenizer_artifact), "--data", str(few_images), "--out", str(tmp_path / "outdir.png")], ["outdir.png", "folder"]),
        ([str(tokenizer_artifact), "--data", str(few_images), "--out", str(tmp_path / "g.jpg")], ["g.jpg", ".png"]),
        ([str(tokenizer_artifact), "--data", str(few_images), "--out", str(good), "--num", "0"], ["--num 0"]),
        ([str(tokenizer_artifact), "--data", str(few_images), "--out", str(good), "--img_size", "40"], ["40", "16"]),
        ([str(tokenizer_artifact), "--data", str(few_images), "--out", str(good), "--tokenizer", str(tokenizer_artifact)],
         ["--tokenizer", "stage-2"]),
    ]
    for argv, words in cases:
        assert vis.main(argv) == 2, argv
        line = one_error_line(capsys)
        assert all(w in line for w in words), (argv, line)
    assert not good.exists()
    res = cli(str(tmp_path / "notes.txt"), "--data", str(few_images), "--out", str(good))  # as a user runs it
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith("error: ") and "notes.txt" in res.stderr
