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
    res = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, out, **over), timeout=600)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (out / "metrics.jsonl").exists()  # nothing trained


def test_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "notes.txt").write_text("not an image")
    res = run_launch("launch/train_tokenizer.py", tiny_args(empty, tmp_path / "run"), timeout=600)
    assert res.returncode == 2
    assert "error:" in res.stderr and str(empty) in res.stderr


def test_stage_sections_take_their_own_defaults_and_keep_the_shared_docs():
    """A stage's Train/Optim/Data sections are the shared ones with other defaults (with_defaults):
    the docs stay the shared ones unless reworded, new fields come after, a name the base lacks is
    refused; the stage tree is a dataclass whose sections are built fresh per instance."""
    import dataclasses
    import pickle

    from peco_scale.config import describe, with_defaults
    from peco_scale.train.config import OptimConfig, TrainConfig
    from peco_scale.train.detect_config import DetectConfig
    from peco_scale.train.tokenizer_config import TokenizerConfig

    cfg = DetectConfig()
    assert cfg.optim.lr == 1e-4 and cfg.optim.schedule == "step" and OptimConfig().lr == 1.5e-3
    assert isinstance(cfg.optim, OptimConfig) and isinstance(cfg.train, TrainConfig)
    docs = {f.name: f.metadata["help"] for f in dataclasses.fields(type(cfg.optim))}
    assert docs == {f.name: f.metadata["help"] for f in dataclasses.fields(OptimConfig)}
    assert [f.name for f in dataclasses.fields(type(cfg.train))][-2:] == ["eval_only", "eval_every"]
    assert cfg.train is not DetectConfig().train
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    tok = {f.name: f.metadata["help"] for f in dataclasses.fields(type(TokenizerConfig().optim))}
    assert tok["lr"].startswith("Adam learning rate (paper") and tok["eps"] == docs["eps"]
    with pytest.raises(TypeError, match="has no field nope"):
        with_defaults(OptimConfig, "Bad", nope=1)
    text = "\n".join(describe(DetectConfig))
    assert "optim: Optimizer" in text and "--optim.lr (0.0001)" in text and "model: Backbone (patch 16)" in text
