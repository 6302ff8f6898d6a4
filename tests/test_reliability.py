"""Stop signals, unwritable output folders and full disks, with real processes and real file systems.

- SIGTERM or SIGINT mid-run: the run saves a checkpoint at the next step boundary and exits 75;
  ``--resume auto`` then finishes with the same weights as an uninterrupted run.
- An unwritable output folder (a read-only mount) and a checkpoint folder too small for one
  checkpoint (a tiny tmpfs) are one line at start, exit 2, before training.
- A disk that fills up during the run (a tmpfs filled by another writer): the run stops with one
  line and exit 4 at its next save, the previous checkpoint stays the newest complete one, and
  after space is freed ``--resume auto`` finishes with the uninterrupted weights.

The mounts need root (as CI has); elsewhere those tests say so and skip, except under PECO_CI=1
(set by .ci/run), where they fail instead.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_metrics, tiny_args

STEPS = 40


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch/train_tokenizer.py"), *args], cwd=ROOT,
                            env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    p = _start(args)
    out, err = p.communicate(timeout=600)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _args(data: Path, out: Path, **over) -> list[str]:
    return tiny_args(data, out, **{"train.max_steps": STEPS, "train.ckpt_every": 1000, **over})


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(run)


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory) -> Path:
    """The tokenizer run without interruption."""
    out = tmp_path_factory.mktemp("reference") / "run"
    res = _run(_args(demo_data, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def _assert_same_tokenizer(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "tokenizer.safetensors")), load_file(str(b / "tokenizer.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-6), x["step"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_checkpoints_exits_75_and_resumes(sig, reference, demo_data, tmp_path):
    out = tmp_path / "run"
    proc = _start(_args(demo_data, out))
    _wait_for_step(out, proc, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted:")]
    assert len(lines) == 1 and f"stopped by {sig.name} after step " in lines[0], err[-3000:]
    k = int(lines[0].split("after step ")[1].split()[0])
    assert 3 <= k < STEPS
    from peco_scale.engine.checkpoint import find_resume

    assert find_resume(out / "checkpoints") == out / "checkpoints" / f"step_{k:08d}"
    assert not (out / "tokenizer.safetensors").exists()  # no artifact from an unfinished run
    res = _run(_args(demo_data, out, **{"train.resume": "auto"}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{k:08d}'} at step {k}" in res.stdout + res.stderr
    _assert_same_tokenizer(reference, out)


def _wandb_record_kinds(run_file: Path) -> list[str]:
    """The record types in a wandb transaction log (``run-<id>.wandb``): a 7-byte header, then
    LevelDB-style 32 KiB blocks of chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4
    last), each whole record one ``wandb_internal_pb2.Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, kinds, rec = run_file.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B", run_file
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        rec = (b"" if kind in (1, 2) else rec) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(rec)
            kinds.append(r.WhichOneof("record_type"))
    return kinds


@pytest.mark.slow
def test_stopped_run_marks_its_wandb_run_preempting(demo_data, tmp_path, monkeypatch):
    """On a stop signal the wandb run is marked preempting (so the UI shows it as requeued, not
    crashed); a run that finishes is not."""
    pytest.importorskip("wandb", reason="wandb is an optional extra (installed by `make test` through .[dev])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    monkeypatch.setattr(os, "environ", {**env, "WANDB_SILENT": "true"})
    done, stopped = tmp_path / "done", tmp_path / "stopped"
    res = _run(_args(demo_data, done, **{"train.max_steps": 3, "train.wandb": "true"}))
    assert res.returncode == 0, res.stderr[-3000:]
    proc = _start(_args(demo_data, stopped, **{"train.wandb": "true"}))
    _wait_for_step(stopped, proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    kinds = {}
    for run in (done, stopped):
        files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1, files
        kinds[run.name] = _wandb_record_kinds(files[0])
        assert "history" in kinds[run.name] and kinds[run.name][-1] == "exit", kinds[run.name]
    assert "preempting" in kinds["stopped"] and "preempting" not in kinds["done"]


# -- file systems -----------------------------------------------------------------------------


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    why = ""
    if os.geteuid() != 0:
        why = "mounting a small or read-only tmpfs needs root (CI has it)"
    else:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
        why = f"cannot mount a tmpfs here: {res.stderr.strip()}" if res.returncode else ""
    if why:
        (pytest.fail if os.environ.get("PECO_CI") else pytest.skip)(why)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


def _two_steps_on_mount(demo_data: Path, mount: Path, options: str, run: Path):
    """A 2-step run writing to ``run`` while ``mount`` is a tmpfs with ``options``, which must refuse
    with exit 2: (the result, its one error line)."""
    _mount_tmpfs(mount, options)
    try:
        res = _run(_args(demo_data, run, **{"train.max_steps": 2}))
    finally:
        _umount(mount)
    assert res.returncode == 2, res.stderr[-3000:]
    return res, _one_error_line(res)


def test_unwritable_output_folder_is_one_line_at_start(demo_data, tmp_path):
    out = tmp_path / "ro"
    res, line = _two_steps_on_mount(demo_data, out, "ro,size=1m", out / "run")
    assert f"output folder {out / 'run'} is not writable (Read-only file system)" in line, line
    assert "choose another --train.output_dir" in line
    assert "M params" not in res.stdout + res.stderr  # stopped before the model was built


def test_checkpoint_folder_without_room_is_one_line_at_start(demo_data, tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _, line = _two_steps_on_mount(demo_data, ckpts, "size=64k", tmp_path / "run")
    assert f"{ckpts} has " in line and "a checkpoint of this run needs about" in line, line
    assert "free space there or choose another --train.output_dir" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training


@pytest.mark.slow
def test_disk_full_at_save_keeps_previous_checkpoint_and_resume_finishes(reference, demo_data, tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    _mount_tmpfs(ckpts, "size=48m")
    try:
        proc = _start(_args(demo_data, out, **{"train.ckpt_every": 1}))
        # another writer fills the disk once the first checkpoint is complete
        deadline = time.monotonic() + 300
        while not any((p / "COMPLETE").exists() for p in ckpts.glob("step_*")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.005)
        filler = ckpts / "filler.bin"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError:
                pass
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 4, err[-3000:]
        from peco_scale.engine.checkpoint import find_resume

        kept = find_resume(ckpts)
        assert kept is not None and (kept / "COMPLETE").exists()
        line = _one_error_line(subprocess.CompletedProcess(proc.args, 4, "", err))
        assert "not written" in line or "failed on rank 0" in line, line
        assert f"the newest complete checkpoint {kept} is kept" in line, line
        assert not (out / "tokenizer.safetensors").exists()
        filler.unlink()
        res = _run(_args(demo_data, out, **{"train.ckpt_every": 1, "train.resume": "auto"}))
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resumed from {kept} at step " in res.stdout + res.stderr
    finally:
        _umount(ckpts)
    _assert_same_tokenizer(reference, out)


def test_stop_flag_handlers_in_process():
    """The flag is set by the signal, a second SIGINT interrupts at once, and the previous
    handlers come back afterwards; check() reports the signal (world of one, no process group)."""
    from peco_scale.engine import preempt

    before = signal.getsignal(signal.SIGTERM)
    with preempt.StopFlag() as flag:
        assert preempt.current() is flag
        assert flag.check(1.0, 1, "ckpts", torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert flag.check(1.0, 2, "ckpts", torch.device("cpu")) == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a later, different signal keeps the first name
        time.sleep(0.01)
        assert flag.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before
    assert preempt.current() is not flag and preempt.current().signum is None
    with preempt.StopFlag():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    from peco_scale.engine.common import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="non-finite loss nan at step 3"):
        preempt.StopFlag().check(float("nan"), 3, "ckpts", torch.device("cpu"))
