"""Each bad input gets one clear line and exit code 2 before any training starts."""

import pytest

from conftest import run_launch, tiny_args

CASES = [
    ({"data.img_size": 40}, "data.img_size=40 is not divisible by the tokenizer's downsample factor 16"),
    ({"model.preset": "huge"}, "unknown tokenizer preset 'huge'"),
    ({"quantizer.codebook_size": 1}, "quantizer.codebook_size=1 must be at least 2"),
    ({"data.path": "/nonexistent/images"}, "data folder '/nonexistent/images' does not exist"),
    ({"perceptual.weights": "/nonexistent/mocov3.pth"}, "perceptual weights file '/nonexistent/mocov3.pth' not found"),
    ({"optim.lrr": 1}, "unknown config key 'optim.lrr'"),
]


@pytest.mark.parametrize("over,message", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_input_one_line(demo_data, tmp_path, over, message):
    out = tmp_path / "run"
    res = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, out, **over), timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "metrics.jsonl").exists()  # nothing trained


def test_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("not an image")
    res = run_launch("launch/train_tokenizer.py", tiny_args(empty, tmp_path / "run"), timeout=120)
    assert res.returncode == 2
    assert "error:" in res.stderr and str(empty) in res.stderr
