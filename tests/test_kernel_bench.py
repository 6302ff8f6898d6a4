"""The kernel benchmark runs (on CPU: the torch variants at reduced shapes, saying so) and writes rows."""

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_writes_rows_and_says_cpu_only(tmp_path):
    out = tmp_path / "k.jsonl"
    res = subprocess.run([sys.executable, "-m", "peco_kernels.bench", "--reps", "1", "--scale", "0.002",
                          "--results", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kernels = {(r["kernel"], r["variant"], r["shape"]) for r in rows}
    assert ("masked_linear_ce", "torch_eager", "vit_h14_448") in kernels
    assert ("vq_nearest", "torch_cdist_argmin", "448_d256") in kernels
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] >= 0 and r["matmul_peak_tflops"] > 0 and r["torch"] and r["date"]
        if r.get("tflops"):
            assert r["x_floor"] == __import__("pytest").approx(r["ms"] / r["floor_ms"]) and r["x_floor"] > 0
        if r["kernel"] == "masked_linear_ce" and r["variant"] == "torch_eager" and r["phase"] == "full":
            # measured by the live-bytes meter on CPU: fp32 logits, log-softmax and its gradient at once
            assert r["peak_mem_mb"] * 2**20 >= 3 * r["rows"] * 8192 * 4
        if r["kernel"] == "masked_linear_ce" and r["phase"] == "full":
            assert r["tflops"] == __import__("pytest").approx(6 * r["rows"] * r["hidden"] * 8192 / (r["ms"] * 1e-3) / 1e12)
    if "cuda" not in res.stdout.lower():
        assert "CPU only" in res.stdout and all("CPU only" in r["note"] for r in rows)


def test_live_bytes_meter_counts_allocations_not_views_or_inputs():
    """The CPU memory meter of the bench: known allocations give a known peak; views, ``out=`` and
    in-place results and pre-existing tensors add nothing; a freed tensor leaves the count."""
    import torch

    from peco_kernels.bench import LiveBytes

    x = torch.ones(1000)  # 4000 bytes, before the block: never counted
    meter = LiveBytes()
    with meter:
        y = x * 2                      # +4000
        v = y[10:20].view(2, 5)        # view: +0
        torch.mul(x, 3, out=y)         # out=: +0
        y.add_(1)                      # in place: +0
        z = torch.empty(500, dtype=torch.float64)  # +4000 -> 8000 live
        del y                          # v still holds y's storage
        peak_before = meter.peak
        del v                          # -4000
        w = torch.zeros(250)           # +1000 -> 5000 live
        del z, w
    assert peak_before == 8000 and meter.peak == 8000 and meter.live == 0


def test_goal_checks_and_floors_from_rows():
    """The goal table and the floor, on hand-made rows whose answers are worked out here."""
    from peco_kernels.bench import floor_ms, goal_checks

    def ce(variant, ms, mem):
        return {"kernel": "masked_linear_ce", "variant": variant, "shape": "vit_h14_448", "phase": "full",
                "ms": ms, "peak_mem_mb": mem}

    rows = [ce("torch_eager", 3.0, 1000.0), ce("triton", 2.0, 200.0), ce("torch_compile", 1.9, 400.0),
            {"kernel": "vq_nearest", "variant": "torch_cdist_argmin", "shape": "448_d32", "phase": "forward",
             "ms": 1.0},
            {"kernel": "vq_nearest", "variant": "triton", "shape": "448_d32", "phase": "forward", "ms": 0.1,
             "x_floor": 2.5, "floor_basis": "argmin epilogue"}]
    got = {what: (round(value, 6), met) for what, value, _, met in goal_checks(rows)}
    assert got == {
        "linear-CE ViT-H/14-448 speed-up over eager": (1.5, True),
        "linear-CE ViT-H/14-448 peak memory / eager's": (0.2, True),
        "linear-CE ViT-H/14-448 speed-up over torch_compile": (0.95, False),
        "nearest-code 448_d32 speed-up over cdist+argmin": (10.0, True),
        "nearest-code 448_d32 time / floor (argmin epilogue)": (2.5, False),
    }
    # a 32768 x 8192 x 32 search taking 0.1 ms: 2NKD = 1.718e10 FLOP; at 800 TFLOP/s 0.0215 ms;
    # the epilogue, 3NK = 8.05e8 instructions at 33.4e12/s, 0.0241 ms sets the floor
    row = {"kernel": "vq_nearest", "rows": 32768, "codes": 8192, "ms": 0.1,
           "tflops": 2 * 32768 * 8192 * 32 / 1e-4 / 1e12}
    ms, basis = floor_ms(row, 800.0, 33.4e12)
    assert basis == "argmin epilogue" and abs(ms - 3 * 32768 * 8192 / 33.4e12 * 1e3) < 1e-9
    ms, basis = floor_ms(row, 800.0, None)  # CPU: no CUDA-core rate, the matmul floor only
    assert basis == "matmul" and abs(ms - 2 * 32768 * 8192 * 32 / 800e12 * 1e3) < 1e-9
