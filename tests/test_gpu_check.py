"""The prepared GPU check (launch/gpu_check.sh, python -m peco_scale.gpu_check) and its preparation
(launch/gpu_wheels.sh), exercised on CPU so that they cannot rot between sessions that have a GPU:
the dry run goes through every section's code path at tiny shapes and its results are checked
against each other; the time caps, the batch search and the size check against hand-made cases."""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

from peco_scale import gpu_check
from peco_scale.tools.bench_step import fit_batch


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_dry_run_goes_through_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PECO_SITE": str(tmp_path / "site"),
           "PECO_GPU_CHECK_WORK": str(tmp_path / "work")}
    env.pop("OUT", None)
    # a wide budget: the caps are tested on their own below; here a loaded machine must not cut a section.
    # Another job listens on the rendezvous ports the check once fixed (29652-29653): it picks free ones.
    with contextlib.ExitStack() as held:
        for port in (29652, 29653):
            sock = held.enter_context(socket.socket())
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
            except OSError:  # already held by something else: just as good
                pass
        res = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), "--dry_run", "--out", str(out),
                              "--budget_s", "1500"], env=env, capture_output=True, text=True, timeout=1700)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["sections"]) == list(gpu_check.SECTIONS)
    assert all(s["ok"] for s in summary["sections"].values()), summary["sections"]
    # what the device tool brings back: at most 8 plain files with plain names, no folders
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "kernel_tests.txt", "kernels.jsonl", "main.jsonl", "step.jsonl", "summary.json"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)

    import torch

    env_info = summary["env"]
    assert env_info["torch"] == torch.__version__.split("+")[0] and env_info["cuda"] is False
    peak = env_info["matmul_peak_tflops"]
    assert peak > 0
    assert re.search(r"\b3 passed, 1 skipped\b|\b4 passed\b", (out / "kernel_tests.txt").read_text())

    kernels = _rows(out / "kernels.jsonl")
    assert not [r for r in kernels if "error" in r]
    for kernel in ("masked_linear_ce", "vq_nearest"):  # the Triton rows ran (interpreted) beside the torch ones
        assert {r["variant"] for r in kernels if r["kernel"] == kernel} >= {"triton", "torch_eager" if
                                                                           kernel == "masked_linear_ce" else
                                                                           "torch_cdist_argmin"}

    steps = _rows(out / "step.jsonl")
    assert [r["task"] for r in steps][-3:] == ["peco", "mae", "perceptual_mae"]  # the targets' run, one batch
    assert len({r["batch_size"] for r in steps[-3:]}) == 1 and "perceptual_mae/peco" in (out / "gpu_check.log").read_text()
    steps = steps[:-3]
    assert {(r["task"], r["kernels"], r["grad_checkpointing"]) for r in steps} == {
        ("peco", k, c) for k in ("triton", "torch") for c in (False, True)}
    for r in steps:
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["step_s"])
        assert r["matmul_peak_tflops"] == peak  # MFU against section 1's peak
        assert r["mfu"] == pytest.approx(r["tflops"] / peak)

    main = _rows(out / "main.jsonl")
    assert [(r["zero_stage"], r["step"]) for r in main] == [(3, 1), (3, 2), (2, 1), (2, 2)]
    assert all(r["images_per_s"] > 0 and r["tflops_per_gpu"] > 0 and r["mem_gb"] > 0 for r in main)
    # the same batch and seed under ZeRO-3 and ZeRO-2: the same first loss (one rank, fp32)
    assert main[0]["loss"] == pytest.approx(main[2]["loss"], rel=1e-5)
    assert "ds_configs/zero3_vith.json" in summary["sections"]["main"]["runs"][2]["cmd"]


def test_a_section_past_its_cap_is_cut_and_recorded(tmp_path):
    """0.3 s cannot start Python, import torch and time matmuls: the env section is killed at its cap,
    and the summary (written anyway) says so."""
    res = subprocess.run([sys.executable, "-m", "peco_scale.gpu_check", "--only", "env", "--budget_s", "0.3",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    env = json.loads((tmp_path / "summary.json").read_text())["sections"]["env"]
    assert env["ok"] is False and env["runs"][0]["timed_out"] is True
    assert "cut at the cap" in (tmp_path / "gpu_check.log").read_text()


@pytest.mark.parametrize("argv, expected", [
    (["--only", "env,gpu"], "--only 'env,gpu': choose from env, kernel_tests"),
    (["--budget_s", "0"], "--budget_s 0.0 must be > 0"),
])
def test_bad_flags_are_one_line(tmp_path, argv, expected):
    res = subprocess.run([sys.executable, "-m", "peco_scale.gpu_check", *argv, "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and expected in res.stderr, res.stderr


def test_fit_batch_takes_the_largest_batch_under_the_budget():
    """Peak memory 10 GB + 0.7 GB per image, budget 100 GB: the line gives 128 (multiple of 8 under
    128.6). Where the allocator's real limit is lower (over 104 images does not fit), the search
    shrinks by 15% steps: 128 -> 104 (int(108.8) = 108 -> 104 as a multiple of 8)."""
    def trial(limit):
        return lambda b: None if b > limit else 10 + 0.7 * b

    assert fit_batch(trial(10**6), probe=4, cap=256, budget_gb=100)[0] == 128
    b, tried = fit_batch(trial(104), probe=4, cap=256, budget_gb=100)
    assert b == 104 and [t["batch"] for t in tried] == [4, 8, 128, 104]
    assert fit_batch(trial(10**6), probe=4, cap=64, budget_gb=100)[0] == 64  # the cap wins
    assert fit_batch(trial(6), probe=4, cap=256, budget_gb=100)[0] == 4  # 8 does not fit: the probe stays
    assert fit_batch(trial(2), probe=4, cap=256, budget_gb=100)[0] == 0  # nothing fits


def test_plan_counts_what_travels(tmp_path):
    """Tracked and untracked-not-ignored files travel, ignored ones only when carried."""
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/big/\n")  # 6 bytes
    (repo / "tracked.txt").write_bytes(b"x" * 1000)
    (repo / "sub" / "new.txt").write_bytes(b"y" * 500)
    (repo / "big").mkdir()
    (repo / "big" / "w.whl").write_bytes(b"z" * 300)
    subprocess.run(["git", "add", "tracked.txt", ".gitignore"], cwd=repo, check=True)
    assert gpu_check.travel_bytes(repo, []) == (1506, 0)
    assert gpu_check.travel_bytes(repo, ["big"]) == (1506, 300)
    call = json.loads(gpu_check.device_call([".whl"]))
    assert call["command"] == "bash launch/gpu_check.sh" and call["carry"] == [".whl"]
    assert call["timeout_s"] <= 480  # the one call stays inside 8 minutes


def test_plan_refuses_a_missing_carry(tmp_path):
    res = subprocess.run([sys.executable, "-m", "peco_scale.gpu_check", "plan", "--carry", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "does not exist; build it first (make gpu-wheels)" in res.stderr


@pytest.mark.slow
def test_wheelhouse_builds_for_the_gpu_machine(tmp_path):
    """launch/gpu_wheels.sh (needs the package index): deepspeed built into a wheel, its missing needs and
    Liger-Kernel for CPython 3.12, checked to install there without an index, then the size and the call."""
    wheels = tmp_path / "whl"
    res = subprocess.run(["bash", str(ROOT / "launch/gpu_wheels.sh")], env={
        **os.environ, "PYTHON": sys.executable, "WHEEL_DIR": str(wheels)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = sorted(re.match(r"[A-Za-z0-9_]+", p.name).group(0).lower() for p in wheels.glob("*.whl"))
    assert names == ["annotated_types", "deepspeed", "hjson", "liger_kernel", "pydantic", "pydantic_core",
                     "typing_inspection"]
    assert all(("cp312" in p.name or "py3-none-any" in p.name) for p in wheels.glob("*.whl"))
    assert "of 64 MiB" in res.stdout and '"command": "bash launch/gpu_check.sh"' in res.stdout
