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
        if r["kernel"] == "masked_linear_ce" and r["phase"] == "full":
            assert r["tflops"] == __import__("pytest").approx(6 * r["rows"] * r["hidden"] * 8192 / (r["ms"] * 1e-3) / 1e12)
    if "cuda" not in res.stdout.lower():
        assert "CPU only" in res.stdout and all("CPU only" in r["note"] for r in rows)
