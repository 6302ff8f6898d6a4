"""The GPU check in one call: what only a GPU shows, each section under its own time cap.

    bash launch/gpu_check.sh                          # on a GPU machine; results under $OUT
    python -m peco_scale.gpu_check --out DIR [--only step,main] [--budget_s 420]
    python -m peco_scale.gpu_check plan --carry .whl     # what travels, and the device call
    python -m peco_scale.gpu_check --out DIR --dry_run   # tiny shapes on CPU, same code path

Sections, in order (``--only`` picks some, e.g. to rerun one that failed):

1. ``env``: GPU, driver, Python, torch/triton/deepspeed/timm/Liger versions, whether this torch has
   the fp32-output 16-bit matmul and ``F.linear_cross_entropy``, a measured bf16 matmul peak.
2. ``kernel_tests``: ``tests/test_kernel_*.py`` with ``-x`` (compiled by Triton on CUDA: the test
   conftest turns the interpreter off there), less the benchmark's tests and the CPU-rank runs.
3. ``kernel_bench``: ``python -m peco_kernels.bench`` at the real shapes, ending with the goal table.
4. ``step``: ``python -m peco_scale.tools.bench_step`` at ViT-L/16-448 and ViT-H/14-448, bf16,
   kernels triton vs torch, activation checkpointing off and on, the largest micro-batch that fits;
   MFU against the peak measured in ``env``; then the three pre-training targets (peco, mae,
   perceptual_mae) at ViT-L/16-448, batch 32, and their step-time ratios.
5. ``main``: ``deepspeed --num_gpus 1 launch/pretrain.py --deepspeed_config
   ds_configs/zero3_vith.json`` on a generated 448-px image folder with a random-weight tokenizer
   of the default preset, then the same with ZeRO-2 at the same batch; their metrics rows.

Section i must end by start + the sum of the first i caps, so time a section leaves unused goes
to the next, and the whole stays inside ``--budget_s`` (the caps are scaled to it). Each section
writes its files under --out as soon as it ends and ``summary.json`` is rewritten after every
section, so a run cut short still returns what was done. Files (at most 8, for the device tool):
summary.json, gpu_check.log (every command and its output), kernel_tests.txt, kernels.jsonl,
step.jsonl, main.jsonl. This module imports no torch itself: each section is a child process, so
the check holds no GPU memory of its own while the step runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "kernel_tests", "kernel_bench", "step", "main")
# nominal caps in seconds (full run), scaled to --budget_s
CAPS = {"env": 30, "kernel_tests": 70, "kernel_bench": 120, "step": 120, "main": 120}
STEP_MODELS = (("vit_large_patch16", 448, 128), ("vit_huge_patch14", 448, 64))  # model, size, batch cap
STEP_TARGETS = ("vit_large_patch16", 448, 32, "vit_base_patch16")  # model, size, batch, perceptual network
MAIN_STEPS = 20


class Check:
    """The run: output folder, log, deadlines and the summary rewritten after each section."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool, only: tuple[str, ...]):
        self.out, self.dry_run, self.only = out, dry_run, only
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "gpu_check.log"
        self.t0 = time.monotonic()
        scale = budget_s / sum(CAPS[s] for s in only)
        self.deadline, total = {}, 0.0
        for s in only:
            total += CAPS[s] * scale
            self.deadline[s] = total
        self.summary = {"date": dt.datetime.now().isoformat(timespec="seconds"), "dry_run": dry_run,
                        "budget_s": budget_s, "sections": {}, "command": " ".join(sys.argv)}
        self.python = sys.executable
        if dry_run:  # CPU: the Triton kernels run under the interpreter (set before any child imports triton)
            os.environ.setdefault("TRITON_INTERPRET", "1")

    def left(self, section: str) -> float:
        return self.deadline[section] - (time.monotonic() - self.t0)

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(text, flush=True)

    def run(self, section: str, cmd: list[str], *, env: dict | None = None, out_file: Path | None = None,
            cap: float | None = None) -> dict:
        """Run one command of a section in its own process group, killed at the section's deadline
        (or ``cap``); its output goes to the log (and to ``out_file``)."""
        limit = max(1.0, min(self.left(section), cap or float("inf")))
        self.log(f"$ {' '.join(cmd)}    # cap {limit:.0f}s")
        t = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        res = {"cmd": " ".join(cmd), "rc": proc.returncode, "seconds": round(time.monotonic() - t, 1),
               "timed_out": timed_out}
        with self.log_path.open("a") as f:
            f.write(output or "")
        if out_file is not None:
            with out_file.open("a") as f:
                f.write(output or "")
        tail = (output or "").strip().splitlines()[-15:]
        print("\n".join(tail), flush=True)
        self.log(f"# rc {proc.returncode}{' (cut at the cap)' if timed_out else ''} after {res['seconds']}s")
        return res

    def record(self, section: str, started: float, runs: list[dict], **extra) -> None:
        ok = all(r["rc"] == 0 and not r["timed_out"] for r in runs)
        self.summary["sections"][section] = {"ok": ok, "seconds": round(time.monotonic() - started, 1),
                                             "runs": runs, **extra}
        self.summary["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.out / ".summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1) + "\n")
        os.replace(tmp, self.out / "summary.json")


# ----------------------------------------------------------------------------- sections


def section_env(c: Check) -> None:
    started = time.monotonic()
    env_file = c.out / ".env.json"
    res = c.run("env", [c.python, "-m", "peco_scale.gpu_check", "env", "--out", str(env_file)])
    extra = json.loads(env_file.read_text()) if env_file.is_file() else {}
    env_file.unlink(missing_ok=True)
    c.summary["env"] = extra
    c.record("env", started, [res])


def section_kernel_tests(c: Check) -> None:
    started = time.monotonic()
    if c.dry_run:  # the interpreter runs the whole files in make test already: two tests here
        tests = ["tests/test_kernel_vq.py::test_duplicates_go_to_lowest_index_across_tiles_and_splits",
                 "tests/test_kernel_linear_ce.py::test_dw_product_is_fp32_on_both_paths"]
    else:  # the benchmark's own tests are the next section's work; "slow" ones are CPU-rank DeepSpeed runs
        tests = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_kernel_*.py"))
                 if p.name != "test_kernel_bench.py"] + ["-m", "not slow"]
    res = c.run("kernel_tests", [c.python, "-m", "pytest", "-x", "-q", "-rs", "-p", "no:cacheprovider", *tests],
                out_file=c.out / "kernel_tests.txt")
    c.record("kernel_tests", started, [res])


def section_kernel_bench(c: Check) -> None:
    started = time.monotonic()
    cmd = [c.python, "-m", "peco_kernels.bench", "--results", str(c.out / "kernels.jsonl")]
    if c.dry_run:
        cmd += ["--scale", "0.0005", "--reps", "1", "--cpu_triton", "--shape", "vit_h14_448,224_d32"]
    else:  # the goal shapes first: a run cut at the cap keeps them
        cmd += ["--shape", "vit_h14_448,448_d32,224_d32,vit_l16_448,448_d256,224_d256,vit_b16_224"]
    res = c.run("kernel_bench", cmd)
    c.record("kernel_bench", started, [res])


def section_step(c: Check) -> None:
    started = time.monotonic()
    peak = c.summary.get("env", {}).get("matmul_peak_tflops")
    models = [("vit_pico_patch16", 64, 2)] if c.dry_run else STEP_MODELS
    common = ["--results", str(c.out / "step.jsonl")] + (["--peak_tflops", str(peak)] if peak else [])
    common += ["--steps", "1", "--warmup", "0", "--tokenizer_preset", "tiny"] if c.dry_run else ["--steps", "4",
                                                                                                 "--warmup", "2"]
    jobs = [[c.python, "-m", "peco_scale.tools.bench_step", "--model", model, "--img_size", str(size), "--batch_size",
             "0", "--max_batch", str(cap_batch), "--kernels", "triton,torch", "--checkpointing", "off,on", *common]
            for model, size, cap_batch in models]
    # the three pre-training targets at one backbone and batch: their step-time ratios
    model, size, batch, arch = ("vit_pico_patch16", 64, 2, "vit_tiny_patch16") if c.dry_run else STEP_TARGETS
    jobs.append([c.python, "-m", "peco_scale.tools.bench_step", "--model", model, "--img_size", str(size),
                 "--batch_size", str(batch), "--task", "peco,mae,perceptual_mae", "--kernels", "triton",
                 "--perceptual_arch", arch, *common])
    runs = []
    for i, cmd in enumerate(jobs):  # the runs share the section's time: each gets its part of what is left
        runs.append(c.run("step", cmd, cap=c.left("step") / (len(jobs) - i)))
    c.record("step", started, runs)


def section_main(c: Check) -> None:
    started = time.monotonic()
    work = Path(os.environ.get("PECO_GPU_CHECK_WORK", "/tmp/peco-gpu-check"))
    if work.exists():
        shutil.rmtree(work)
    data, tok = work / "data", work / "tokenizer.safetensors"
    if c.dry_run:
        demo = ["--images_per_class", "2", "--min_size", "64", "--max_size", "80"]
        over = ["--model", "vit_pico_patch16", "--img_size", "64", "--batch_size", "2", "--global_batch", "2",
                "--max_steps", "2", "--train.log_every", "1", "--data.workers", "0"]
        preset, env = "tiny", {"DS_ACCELERATOR": "cpu"}
    else:
        demo = ["--images_per_class", "20", "--min_size", "448", "--max_size", "640"]
        over = ["--global_batch", "32", "--max_steps", str(MAIN_STEPS), "--train.log_every", "5",
                "--data.workers", "8"]
        preset, env = "default", {}
    runs = [c.run("main", [c.python, "-m", "peco_scale.data", "demo", "--out", str(data), *demo]),
            c.run("main", [c.python, "-m", "peco_scale.gpu_check", "tokenizer", "--preset", preset, "--out",
                           str(tok)])]
    from .engine.dist import free_port  # a fixed port fails where another job holds it

    launcher = shutil.which("deepspeed") or str(Path(c.python).parent / "deepspeed")
    launcher_cmd = [launcher] if Path(launcher).is_file() else [c.python, "-m", "deepspeed.launcher.runner"]
    rows = []
    for i, stage in enumerate((3, 2)):
        run_dir = work / f"zero{stage}"
        cmd = [*launcher_cmd, "--num_gpus", "1", "--master_port", str(free_port()), "launch/pretrain.py",
               "--deepspeed_config", "ds_configs/zero3_vith.json", "--data", str(data), "--tokenizer", str(tok),
               "--output_dir", str(run_dir), "--train.ckpt_every", "1000000", *over]
        if stage != 3:
            cmd += ["--train.zero_stage", str(stage)]
        runs.append(c.run("main", cmd, env=env, cap=c.left("main") / (2 - i)))
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            rows += [{"zero_stage": stage, **json.loads(line)} for line in metrics.read_text().splitlines() if line]
        with (c.out / "main.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    c.record("main", started, runs, rows=len(rows))


RUNNERS = {"env": section_env, "kernel_tests": section_kernel_tests, "kernel_bench": section_kernel_bench,
           "step": section_step, "main": section_main}


# ----------------------------------------------------------------------------- helpers run as children


def write_env(out: Path) -> dict:
    """The environment facts of section 1, measured in this (child) process."""
    from importlib import metadata

    import torch
    import torch.nn.functional as F

    from peco_kernels.bench import matmul_peak_tflops
    from peco_kernels.linear_ce import fp32_out_mm_supported

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    info: dict = {"python": platform.python_version(), "machine": platform.machine(), "cuda": cuda,
                  "torch_cuda": torch.version.cuda}
    for pkg in ("torch", "triton", "deepspeed", "timm", "liger-kernel", "numpy", "pydantic"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(dev)
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu_memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    info["fp32_out_mm"] = fp32_out_mm_supported(dev)
    info["native_linear_cross_entropy"] = hasattr(F, "linear_cross_entropy")
    dtype = torch.bfloat16 if cuda else torch.float32
    info["matmul_peak_dtype"] = str(dtype).replace("torch.", "")
    info["matmul_peak_tflops"] = max(matmul_peak_tflops(dev, dtype) for _ in range(2 if cuda else 1))
    out.write_text(json.dumps(info, indent=1) + "\n")
    return info


def random_tokenizer(preset: str, vocab: int = 0):
    """A VQTokenizer of ``preset`` (``vocab`` codes if given) with random weights, frozen, its codebook
    marked initialised so no k-means runs: for timing only."""
    from .config import apply_overrides
    from .train.tokenizer_config import TokenizerConfig
    from .models.tokenizer import TOKENIZER_PRESETS, VQTokenizer

    cfg = TokenizerConfig()
    apply_overrides(cfg, dict(TOKENIZER_PRESETS[preset]), f"preset {preset}")
    if vocab:
        cfg.quantizer.codebook_size = vocab
    tok = VQTokenizer(cfg.model, cfg.quantizer)
    tok.quantizer.initialized.fill_(True)
    return tok.requires_grad_(False).eval()


def write_random_tokenizer(preset: str, out: Path) -> None:
    """The artifact of ``random_tokenizer(preset)``, for the main command's stage 2."""
    from .models.artifact import save_tokenizer

    save_tokenizer(random_tokenizer(preset), out, extra={"note": "random weights, for timing only (gpu_check)"})


TRAVEL_LIMIT = 64 * 2**20  # what one device call may carry: the working tree plus the carried paths
DEVICE_TIMEOUT_S = 480  # the call's limit: the check's budget plus installing the wheels


def travel_bytes(root: Path, carry: list[str]) -> tuple[int, int]:
    """(bytes of the working tree that travels: tracked and untracked-not-ignored files, bytes of the
    carried paths)."""
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True,
                           check=True).stdout.split(b"\0")
    tree = sum((root / f.decode()).stat().st_size for f in files if f and (root / f.decode()).is_file())
    carried = 0
    for c in carry:
        path = root / c
        carried += sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else (
            path.stat().st_size if path.is_file() else 0)
    return tree, carried


def device_call(carry: list[str]) -> str:
    """The device tool's call that runs the whole check."""
    return json.dumps({"command": "bash launch/gpu_check.sh", "carry": carry, "timeout_s": DEVICE_TIMEOUT_S})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        ap = argparse.ArgumentParser(prog="python -m peco_scale.gpu_check plan",
                                     description="what a device call would carry, and the call to make")
        ap.add_argument("--carry", action="append", default=[], help="a path that travels besides the tree")
        a = ap.parse_args(argv[1:])
        if missing := [c for c in a.carry if not (ROOT / c).exists()]:
            print(f"error: --carry {' '.join(missing)} does not exist; build it first (make gpu-wheels)",
                  file=sys.stderr)
            return 2
        tree, carried = travel_bytes(ROOT, a.carry)
        total = tree + carried
        print(f"travels: working tree {tree / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB "
              f"({', '.join(a.carry) or 'nothing'}) = {total / 2**20:.1f} MiB of {TRAVEL_LIMIT / 2**20:.0f} MiB")
        if total > TRAVEL_LIMIT:
            print(f"error: {total / 2**20:.1f} MiB would travel, over the {TRAVEL_LIMIT / 2**20:.0f} MiB a device call "
                  f"carries; ignore or carry less", file=sys.stderr)
            return 1
        print(f"the device call (device tool, verb run): {device_call(a.carry)}")
        return 0
    if argv[:1] == ["env"]:
        ap = argparse.ArgumentParser(prog="python -m peco_scale.gpu_check env")
        ap.add_argument("--out", required=True)
        info = write_env(Path(ap.parse_args(argv[1:]).out))
        print(json.dumps(info))
        return 0
    if argv[:1] == ["tokenizer"]:
        ap = argparse.ArgumentParser(prog="python -m peco_scale.gpu_check tokenizer")
        ap.add_argument("--preset", default="default")
        ap.add_argument("--out", required=True)
        a = ap.parse_args(argv[1:])
        write_random_tokenizer(a.preset, Path(a.out))
        print(f"random-weight tokenizer ({a.preset}) written to {a.out}")
        return 0
    ap = argparse.ArgumentParser(prog="python -m peco_scale.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="results folder (default $OUT)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, in order: {', '.join(SECTIONS)}")
    ap.add_argument("--budget_s", type=float, default=420.0, help="wall time of all sections together")
    ap.add_argument("--dry_run", action="store_true", help="tiny shapes on CPU (the same code path; make test runs it)")
    args = ap.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    if not only or any(s not in SECTIONS for s in only):
        print(f"error: --only {args.only!r}: choose from {', '.join(SECTIONS)}, comma-separated", file=sys.stderr)
        return 2
    if args.budget_s <= 0:
        print(f"error: --budget_s {args.budget_s} must be > 0, e.g. 450", file=sys.stderr)
        return 2
    out = Path(args.out)
    check = Check(out, args.budget_s, args.dry_run, tuple(s for s in SECTIONS if s in only))
    env = json.loads((out / "summary.json").read_text()).get("env", {}) if (out / "summary.json").is_file() else {}
    if env and "env" not in check.only:  # a rerun of later sections keeps the measured peak
        check.summary["env"] = env
    for section in check.only:
        check.log(f"== {section} (until +{check.deadline[section]:.0f}s)")
        RUNNERS[section](check)
    failed = [s for s, r in check.summary["sections"].items() if not r["ok"]]
    check.log(f"== done in {time.monotonic() - check.t0:.0f}s; "
              + (f"failed or cut: {', '.join(failed)}" if failed else "every section ran to the end"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
