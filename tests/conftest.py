"""Shared fixtures: a small demo dataset and a runner for the real launch scripts."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Triton kernels are tested on CPU tensors through Triton's interpreter when there is no GPU; the
# variable must be set before triton is first imported, so it is set here, before any test module.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    os.environ["TRITON_INTERPRET"] = "0" if torch.cuda.is_available() else "1"


def _interpreter_index_fix() -> None:
    """Triton <= 3.6's interpreter turns a runtime scalar (a 1-element array) into a Python int with
    ``int(array)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so any
    ``range(runtime_bound)`` in a kernel fails there; triton 3.8 squeezes first. Apply that same fix to
    the older interpreter (CPU tests only; compiled kernels never take this path)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import inspect

        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "int(self.handle.data))" not in inspect.getsource(original):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


_interpreter_index_fix()

ROOT = Path(__file__).resolve().parents[1]


def flags(defaults: dict, over: dict) -> list[str]:
    """``--key value`` flags of ``defaults`` updated by ``over``."""
    return [x for k, v in {**defaults, **over}.items() for x in (f"--{k}", str(v))]


def dense_args(data: Path, out: Path, recipe: str, stage: dict, over: dict) -> list[str]:
    """Flags of a tiny dense-transfer run (pico ViT, 64 px) on the dense demo data with ``recipe``
    (a ds_configs/ file), ``stage``'s own settings and the test's ``over``."""
    return flags({"deepspeed_config": str(ROOT / "ds_configs" / recipe), "model": "vit_pico_patch16",
                  "data": str(data), "output_dir": str(out), "workers": 0, "train.log_every": 1,
                  "optim.warmup_steps": 2, "lr": 1e-3, **stage}, over)


def demo_tree(tmp_path_factory, name: str, per_class: int, seed: int) -> Path:
    from peco_scale.data import make_demo_dataset

    root = tmp_path_factory.mktemp(name)
    make_demo_dataset(root, images_per_class=per_class, seed=seed)
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The embedded demo dataset at 30 images per class (300 images)."""
    return demo_tree(tmp_path_factory, "demo_data", 30, 0)


@pytest.fixture(scope="session")
def val_data(tmp_path_factory) -> Path:
    """Held-out demo images: the same ten classes drawn with another seed (20 per class)."""
    from peco_scale.data import make_demo_dataset

    root = tmp_path_factory.mktemp("val")
    make_demo_dataset(root, images_per_class=20, seed=1, max_size=128)
    return root


@pytest.fixture(scope="session")
def dense_data(tmp_path_factory) -> Path:
    """The dense demo (segmentation maps and COCO instances): 32 training and 6 validation scenes
    of 64-96 px."""
    from peco_scale.data.dense_demo import make_dense_demo

    root = tmp_path_factory.mktemp("dense")
    make_dense_demo(root, train_images=32, val_images=6, min_size=64, max_size=96)
    return root


def tiny_args(data: Path, out: Path, **over) -> list[str]:
    """Flags of a tiny, fast stage-1 run; ``over`` adds/replaces --key value pairs."""
    return flags({
        "config": str(ROOT / "configs/demo_tokenizer.yaml"), "data": str(data), "output_dir": str(out),
        "data.img_size": 32, "train.batch_size": 8, "train.max_steps": 6, "train.log_every": 1,
        "train.ckpt_every": 3, "data.workers": 0, "perceptual.arch": "resnet_tiny",
        "optim.warmup_steps": 2,
    }, over)


def worker_port(port: int) -> int:
    """``port`` moved into this pytest-xdist worker's own range (gw1: +200, gw2: +400, ...): test files
    that run side by side (``make test`` runs two at once) never share a rendezvous port. Where
    something else listens on it, a free port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    port += 200 * int(worker.removeprefix("gw") or 0)
    with socket.socket() as s:  # held by another job on a busy machine: any free port instead
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            from peco_scale.engine.dist import free_port
            return free_port()
    return port


def run_launch(script: str, args: list[str], *, ranks: int = 0, timeout: int = 1200, port: int = 29531):
    """Run a launch/ script as a user would: plain python, or `deepspeed --num_gpus N` (rendezvous on
    ``port``, moved into this test worker's range). ``timeout`` is there to catch a hung launch: these runs
    take seconds to a few minutes alone and several times that on a busy 2-core machine. A launch
    that runs out of time fails with the tail of what it had printed, so the test says where it stopped."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    if ranks:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
               str(worker_port(port)),
               str(ROOT / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / script), *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = [(x if isinstance(x, str) else (x or b"").decode(errors="replace"))[-3000:] for x in (e.stdout, e.stderr)]
        pytest.fail(f"{script} still running after {timeout} s, killed; its stdout ends:\n{tail[0]}\nits stderr ends:\n{tail[1]}")


def ok(res):
    """A finished launch (``run_launch`` / ``subprocess.run``) that exited 0; else fail with its output."""
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def resolve_argv(resolve, config_cls, argv: list[str]):
    """A stage's resolved values for command-line flags (``resolve``: its resolve function)."""
    from peco_scale.train.config import config_from_argv

    return resolve(config_from_argv(argv, config_cls)[0])


def config_line(resolve, config_cls, argv: list[str], *words: str) -> str:
    """Resolving ``argv`` into ``config_cls`` raises a one-line ConfigError holding ``words``."""
    from peco_scale.config import ConfigError

    with pytest.raises(ConfigError) as e:
        resolve_argv(resolve, config_cls, argv)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def folder_files(path: Path) -> dict[str, bytes]:
    """The top-level files of a folder and their bytes (to check that nothing changed)."""
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def export_cli(*args: str):
    """``python -m peco_scale.tools.export ARGS`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "peco_scale.tools.export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rows_match(run: Path, other: Path, keys: tuple[str, ...]) -> None:
    """Two runs' metrics.jsonl hold the same steps and, where a row has them, the same ``keys``
    (to float32 rounding: a resumed run against the uninterrupted one)."""
    a, b = read_metrics(run), read_metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-6), (ra["step"], key)


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_data, tmp_path_factory) -> Path:
    """A tiny stage-1 tokenizer (1024 codes, 16x downsample) trained briefly (40 steps at lr 1e-2)
    on the demo data: enough for its codewords to carry class information (test_probe), too noisy
    a run to show learning on every CPU (test_train_tokenizer trains its own at the demo's lr)."""
    out = tmp_path_factory.mktemp("tokenizer")
    res = run_launch("launch/train_tokenizer.py",
                     tiny_args(demo_data, out, **{"data.img_size": 64, "train.batch_size": 16, "train.max_steps": 40,
                                                  "train.log_every": 5, "train.ckpt_every": 1000,
                                                  "optim.warmup_steps": 5, "optim.lr": 1e-2}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "tokenizer.safetensors"


@pytest.fixture(scope="session")
def pretrain_run(demo_data, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny stage-2 run (pico ViT at 64 px, 6 steps, checkpoints at 3 and 6, ZeRO-3 recipe, one
    process). Tests that change a run folder work on a copy."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    res = run_launch("launch/pretrain.py", pretrain_args(demo_data, tiny_tokenizer, out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def rewound_copy(run: Path, dest: Path, step: int) -> Path:
    """A copy of the finished run folder ``run`` as a run stopped right after its checkpoint at
    ``step`` leaves it: the later checkpoints, metrics rows and final artifacts gone, ``latest``
    naming that checkpoint. Resuming it must give back the rest of ``run``."""
    dest.mkdir(parents=True)
    shutil.copytree(run / "checkpoints", dest / "checkpoints")
    shutil.copy2(run / "config.json", dest / "config.json")
    ckpts = dest / "checkpoints"
    assert (ckpts / f"step_{step:08d}" / "COMPLETE").is_file(), sorted(p.name for p in ckpts.iterdir())
    for folder in ckpts.glob("step_*"):
        if int(folder.name.split("_")[1]) > step:
            shutil.rmtree(folder)
    (ckpts / "latest").write_text(f"step_{step:08d}\n")
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))
    return dest


def pretrain_args(data: Path, tokenizer: Path, out: Path, **over) -> list[str]:
    """Flags of a tiny stage-2 run on the ViT-H recipe with a pico backbone."""
    return flags({
        "deepspeed_config": str(ROOT / "ds_configs/zero3_vith.json"), "model": "vit_pico_patch16",
        "img_size": 64, "data": str(data), "tokenizer": str(tokenizer), "output_dir": str(out),
        "batch_size": 8, "global_batch": 16, "max_steps": 6, "train.log_every": 1, "train.ckpt_every": 3,
        "workers": 0, "lr": 2e-3, "optim.base_batch": 16, "optim.warmup_steps": 2,
    }, over)


def picture_cli(run, data, png):
    """``python -m peco_scale.visualize RUN --data DATA --out PNG --num 3`` -> the grid as a PIL image."""
    res = subprocess.run([sys.executable, "-m", "peco_scale.visualize", str(run), "--data", str(data), "--out",
                          str(png), "--num", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"wrote {png}" in res.stdout, res.stderr[-2000:]
    assert res.stdout.count("PSNR") == 3  # one caption per row
    from PIL import Image

    return Image.open(png)
