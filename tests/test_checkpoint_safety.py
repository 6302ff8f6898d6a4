"""Checkpoints from elsewhere, damaged checkpoints, shared run folders and shared memory, with real runs.

- A checkpoint file whose pickle would run code is refused with one line, by the export command
  and by ``--resume auto``, and the payload never runs.
- A newest checkpoint with a rank's shard missing is skipped with a warning; the run resumes from
  the previous complete checkpoint and redoes the same steps.
- A second run into a folder that a running run holds refuses to start; a killed run leaves no lock.
- 2-rank CPU runs leave no DeepSpeed shared-memory buffers behind, also when killed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, pretrain_args, read_metrics, rewound_copy, run_launch, tiny_args, worker_port

SHM = Path("/dev/shm")


class Payload:
    """Unpickling this runs ``exec``: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def _plant(path: Path, marker: Path) -> None:
    """Replace ``path`` by a pickle carrying :class:`Payload` and re-list the folder's COMPLETE
    marker, as a hostile checkpoint would be published."""
    torch.save({"module": Payload(marker)}, path)
    folder = next(p for p in [path.parent, path.parent.parent] if (p / "COMPLETE").is_file())
    listing = json.loads((folder / "COMPLETE").read_text())
    listing["files"] = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*")
                        if f.is_file() and f.name != "COMPLETE"}
    (folder / "COMPLETE").write_text(json.dumps(listing))


def _error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def _shm_files(port: int) -> list[str]:
    """DeepSpeed's shared-memory buffers left by a run launched on ``port`` (as run_launch moves it)."""
    port = worker_port(port)
    return [p.name for p in SHM.glob(f"deepspeed_allreduce_buffer_*_{port}_*")] if SHM.is_dir() else []


def test_crafted_pickles_are_refused_by_export_and_resume(demo_data, tiny_tokenizer, pretrain_run, tmp_path):
    from peco_scale.engine.checkpoint import UnsafeCheckpoint, safe_load

    run = rewound_copy(pretrain_run, tmp_path / "run", 3)
    args = pretrain_args(demo_data, tiny_tokenizer, run)
    step = run / "checkpoints" / "step_00000003"
    for f in step.rglob("*.pt"):  # everything the project itself writes passes the allow-list
        safe_load(f)

    marker = tmp_path / "payload_ran"
    # export: the model-states pickle of a copied checkpoint carries the payload
    evil = tmp_path / "evil_export"
    shutil.copytree(step, evil)
    _plant(next((evil / "model").glob("*model_states.pt")), marker)
    res = subprocess.run([sys.executable, "-m", "peco_scale.tools.export", str(evil), "--out",
                          str(tmp_path / "b.safetensors")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(_error_lines(res)) == 1 and "refusing to load" in _error_lines(res)[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr and not marker.exists()

    # resume: this rank's RNG file carries it
    _plant(step / "rng_rank0.pt", marker)
    with pytest.raises(UnsafeCheckpoint):
        safe_load(step / "rng_rank0.pt")
    res = run_launch("launch/pretrain.py", [*args, "--train.resume", "auto"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(_error_lines(res)) == 1 and "rng_rank0.pt" in _error_lines(res)[0], res.stderr[-3000:]
    assert not marker.exists()


def test_damaged_newest_checkpoint_falls_back_and_no_shared_memory_is_left(demo_data, tmp_path):
    port = 29571
    run = tmp_path / "run"
    args = tiny_args(demo_data, run, **{"train.max_steps": 4, "train.ckpt_every": 2})
    res = run_launch("launch/train_tokenizer.py", args, ranks=2, port=port)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _shm_files(port) == []
    first = {r["step"]: r for r in read_metrics(run)}

    newest = run / "checkpoints" / "step_00000004"
    shard = next((newest / "model").glob("zero_pp_rank_1_*optim_states.pt"))
    shard.unlink()
    res = run_launch("launch/train_tokenizer.py", [*args, "--train.resume", "auto"], ranks=2, port=port + 1)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "is damaged (model/" in log and "falling back to the previous complete checkpoint" in log, log[-3000:]
    assert "resumed from" in log and "step_00000002 at step 2" in log, log[-3000:]
    again = {r["step"]: r for r in read_metrics(run)}
    assert sorted(again) == [1, 2, 3, 4]
    for s in (3, 4):  # redone from step 2's weights, RNG and data position: the same steps again
        assert again[s]["loss"] == first[s]["loss"] and again[s]["rec_loss"] == first[s]["rec_loss"]
    assert shard.is_file()  # step 4 was written again, whole
    assert _shm_files(port + 1) == []


def test_second_run_into_a_held_folder_refuses_and_a_killed_run_leaves_no_lock(demo_data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(ROOT / "launch/train_tokenizer.py"),
                              *tiny_args(demo_data, run, **{"train.max_steps": 2000, "train.ckpt_every": 100000})],
                             cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and read_metrics(run)):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        rows = len(read_metrics(run))
        second = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, run, **{"train.max_steps": 2}))
        assert second.returncode == 2, second.stderr[-3000:]
        lines = _error_lines(second)
        assert len(lines) == 1 and "in use by another run" in lines[0] and f"pid {first.pid}" in lines[0], lines
        assert first.poll() is None  # the first run goes on, its metrics untouched by the second
        assert len(read_metrics(run)) >= rows and json.loads((run / "config.json").read_text())["train"]["max_steps"] == 2000
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    third = run_launch("launch/train_tokenizer.py", tiny_args(demo_data, run, **{"train.max_steps": 2}))
    assert third.returncode == 0, third.stderr[-3000:]


def test_killed_two_rank_run_leaves_no_shared_memory(demo_data, tmp_path):
    psutil = pytest.importorskip("psutil")
    port, run = 29575, tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(worker_port(port)),
           str(ROOT / "launch/train_tokenizer.py"), *tiny_args(demo_data, run, **{"train.max_steps": 2000})]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ((run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert _shm_files(port) == []
