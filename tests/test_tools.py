"""peco_scale.tools: every tool answers --help, and the old names (``python -m peco_scale.export`` ...,
``launch/bench_step.py``, ``launch/tokenize_images.py``) still run the same tool."""

import importlib
import subprocess
import sys

import pytest

from conftest import ROOT

TOOLS = ("export", "probe", "plan", "tokenize", "collect", "plot", "bench_step", "stream")
OLD_NAMES = ("export", "probe", "plan", "tokenize", "collect", "plot")


@pytest.mark.parametrize("name", TOOLS)
def test_each_tool_has_a_contract_and_answers_help(name, capsys):
    tool = importlib.import_module(f"peco_scale.tools.{name}")
    assert "error:" in tool.__doc__ and "exits 2" in tool.__doc__
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    assert f"python -m peco_scale.tools.{name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", OLD_NAMES)
def test_old_module_names_are_the_tools(name):
    assert importlib.import_module(f"peco_scale.{name}") is importlib.import_module(f"peco_scale.tools.{name}")


@pytest.mark.parametrize("argv", [[sys.executable, "-m", f"peco_scale.{n}"] for n in OLD_NAMES]
                         + [[sys.executable, str(ROOT / "launch" / f)] for f in ("bench_step.py", "tokenize_images.py")],
                         ids=[*OLD_NAMES, "launch/bench_step.py", "launch/tokenize_images.py"])
def test_old_commands_still_run(argv):
    res = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "usage: python -m peco_scale.tools." in res.stdout, res.stderr[-2000:]


def test_stream_tool_measures_the_stream_and_the_factor_that_undoes_a_scaling(demo_data, tmp_path, capsys):
    """The tool's per-block rms equals the rms of ViTBackbone's maps (another code path); a backbone
    saved at twice its stream gets half the factor, and a fresh init (seed 0) gets exactly 1."""
    import json

    import torch
    from safetensors.torch import save_file

    from peco_scale.data.eval import eval_transform
    from peco_scale.data.folder import load_rgb, scan_image_folder
    from peco_scale.models.dense import ViTBackbone
    from peco_scale.models.transfer import scale_residual_stream
    from peco_scale.tools import stream

    torch.manual_seed(3)
    bb = ViTBackbone("vit_pico_patch16", 32, (0, 1, 2, 3), layer_scale=0.1).eval()
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(0.3 * torch.randn_like(p) * (p.abs().mean() + 0.05))
        bb.vit.pos_embed.normal_()
    sd = {k: v.clone() for k, v in bb.vit.state_dict().items()}
    data = tmp_path / "imgs"
    (data / "a").mkdir(parents=True)
    (data / "a" / "0.jpg").write_bytes(b"not a jpeg")  # sorted first: skipped and counted
    for i, (path, _) in enumerate(scan_image_folder(demo_data)[0][:5]):
        load_rgb(path).save(data / "a" / f"{i + 1}.png")
    rows = {}
    for name, factor in (("one", 1.0), ("two", 2.0)):
        with torch.no_grad():
            w = {k: v.clone() for k, v in sd.items()}
            if factor != 1:
                scale_residual_stream(bb.vit, factor)
                w = {k: v.contiguous() for k, v in bb.vit.state_dict().items()}
        save_file(w, str(tmp_path / f"{name}.safetensors"))
        assert stream.main(["--init", str(tmp_path / f"{name}.safetensors"), "--model", "vit_pico_patch16",
                            "--img_size", "32", "--data", str(data), "--images", "4",
                            "--out", str(tmp_path / f"{name}.json")]) == 0
        rows[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert rows["one"]["images"] == 4 and rows["one"]["skipped_images"] == 1
    x = torch.stack([eval_transform(32)(load_rgb(data / "a" / f"{i}.png")) for i in range(1, 5)])
    with torch.no_grad():
        maps = ViTBackbone("vit_pico_patch16", 32, (0, 1, 2, 3), layer_scale=0.1)
        maps.vit.load_state_dict(sd)
        ref = [m.pow(2).mean().sqrt().item() for m in maps.eval()(x)]
    assert rows["one"]["rms"][1:] == pytest.approx(ref, rel=1e-4)
    assert [2 * v for v in rows["one"]["rms"]] == pytest.approx(rows["two"]["rms"], rel=1e-4)
    assert rows["two"]["stream_scale"] == pytest.approx(rows["one"]["stream_scale"] / 2, rel=1e-4)
    assert "--model.stream_scale" in capsys.readouterr().out
    with torch.no_grad():
        torch.manual_seed(0)
        fresh = ViTBackbone("vit_pico_patch16", 32, (3,), layer_scale=0.1).vit
    save_file({k: v.contiguous() for k, v in fresh.state_dict().items()}, str(tmp_path / "fresh.safetensors"))
    assert stream.main(["--init", str(tmp_path / "fresh.safetensors"), "--model", "vit_pico_patch16", "--img_size",
                        "32", "--data", str(data), "--images", "4", "--out", str(tmp_path / "f.json")]) == 0
    assert json.loads((tmp_path / "f.json").read_text())["stream_scale"] == pytest.approx(1.0, rel=1e-6)
    assert stream.main(["--init", str(tmp_path / "nope"), "--model", "vit_pico_patch16", "--img_size", "32",
                        "--data", str(data)]) == 2
    assert "error:" in capsys.readouterr().err
