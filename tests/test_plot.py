"""python -m peco_scale.tools.plot: metrics.jsonl -> PNG."""

import json

import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from peco_scale.tools.plot import main, plot_run, read_series  # noqa: E402


def _run(tmp_path, rows, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


def test_panels_follow_the_logged_metrics_and_values(tmp_path):
    rows = [{"step": s, "epoch": 0, "loss": 3.0 / s, "rec_loss": 1.0 / s, "codebook_usage": s / 10,
             "images_per_s": 100.0 + s, "codebook_in_sync": True} for s in range(1, 11)]
    rows.append({"step": 11, "loss": float("nan"), "images_per_s": 111.0})
    rows.append({"step": 10, "epoch": 1.0, "eval_top1": 42.0, "eval_loss": 1.5})
    run = _run(tmp_path, rows)
    series = read_series(run / "metrics.jsonl")
    assert series["loss"] == ([float(s) for s in range(1, 11)], [3.0 / s for s in range(1, 11)])  # NaN row dropped
    assert "codebook_in_sync" not in series and series["eval_top1"] == ([10.0], [42.0])
    path, panels = plot_run(run)
    assert panels == {"loss": ["loss", "rec_loss", "eval_loss"], "accuracy": ["eval_top1"],
                      "codebook": ["codebook_usage"], "throughput (images/s)": ["images_per_s"]}
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (800, 4 * 260)
    assert not list(run.glob(".*tmp*"))
    other = _run(tmp_path, [{**r, "loss": r.get("loss", 0) * 2} for r in rows], name="other")
    assert plot_run(other)[0].read_bytes() != path.read_bytes()  # the picture follows the data


def test_bad_runs_are_one_clear_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = _run(tmp_path, [{"step": 1, "loss": 1.0}], name="bad")
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert main([str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    empty = _run(tmp_path, [{"step": 1, "lr": 0.1}], name="empty")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none of the plotted metrics" in err
