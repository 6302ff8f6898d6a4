"""A data folder in which no image decodes: real runs exit 2 with one `error:` line naming the folder,
on 1 and 2 ranks and on the folder and dali backends; the ffcv converter refuses it with one line;
a worker that finds nothing readable mid-run ends the run instead of hanging it."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, tiny_args, worker_port

TIMEOUT = 300  # a healthy failing run takes ~10 s on 1 rank, ~25 s on 2 (CPU); a hang never ends


def _garbage_tree(root: Path, per_class: int = 12) -> Path:
    """root/<class>/img_<i>.jpg|png whose bytes are no image at all."""
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            ext = "png" if i % 3 == 0 else "jpg"
            (root / c / f"img_{i}.{ext}").write_bytes(os.urandom(1500) if i % 2 else b"\xff\xd8\xff garbage")
    return root


def _run(cmd: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole session (launcher, ranks, workers)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout} s (hang); stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _launch(args: list[str], ranks: int, port: int) -> subprocess.CompletedProcess:
    """launch/train_tokenizer.py as conftest.run_launch starts it, with the session killed on a hang."""
    script = str(ROOT / "launch/train_tokenizer.py")
    if ranks:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(worker_port(port)),
               script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return _run(cmd)


def _error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("backend", ["folder", "dali"])
@pytest.mark.parametrize("ranks", [0, 2])
def test_run_on_a_folder_of_unreadable_images_exits_2_with_one_line(backend, ranks, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    data = _garbage_tree(tmp_path / "data")
    out = tmp_path / "run"
    port = 29571 + 2 * ranks + (backend == "dali")
    # workers=1: the folder backend's DataLoader workers are what used to keep the process alive
    res = _launch(tiny_args(data, out, **{"data.backend": backend, "data.workers": 1}), ranks, port)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    errors = _error_lines(res)
    # each rank that gets there reports it (as for a missing folder), the same one line
    assert 1 <= len(errors) <= max(1, ranks) and len(set(errors)) == 1, res.stderr[-3000:]
    assert f"none of the 24 images under '{data}'" in errors[0]
    assert "check the files" in errors[0] and "point --data elsewhere" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_ffcv_converter_refuses_a_folder_of_unreadable_images(tmp_path):
    pytest.importorskip("ffcv")
    data = _garbage_tree(tmp_path / "data")
    out = tmp_path / "d.beton"
    res = _run([sys.executable, "-m", "peco_scale.data", "convert", "--to", "ffcv", "--data", str(data),
                "--out", str(out), "--workers", "1"], timeout=600)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and f"none of the 24 images under '{data}'" in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not out.exists() and not Path(str(out) + ".json").exists() and not Path(str(out) + ".parts").exists()


WORKER_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from peco_scale.data import AugmentSpec, DataError, make_loader

    root = Path(sys.argv[1])
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(root / c / f"{i}.png")
    loader = make_loader("folder", root, AugmentSpec(16, "tokenizer"), batch_size=4, workers=1, seed=0)
    for p in root.rglob("*.png"):  # every file turns unreadable after the loader checked the folder
        p.write_bytes(b"garbage")
    loader.set_epoch(0)
    try:
        next(iter(loader))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
""")


def test_nothing_readable_in_a_worker_ends_the_process(tmp_path):
    """The DataError raised in a DataLoader worker reaches the caller as one line, and the process
    exits (its workers ignore SIGTERM, so a worker left running kept the interpreter from exiting)."""
    res = _run([sys.executable, "-c", WORKER_SCRIPT, str(tmp_path / "data")], timeout=600)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = _error_lines(res)
    assert len(errors) == 1 and "none of the 16 images under" in errors[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "worker process" not in res.stderr
