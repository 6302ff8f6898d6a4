"""Plan rule: box AP at step 300 per backbone and seed, against random init (mean of two runs per seed)."""
import json, math, sys
E = "benchmarks/results/dense_demo_2026-12-07_e2e_cpu"
C = "benchmarks/results/dense_demo_2026-12-07_cluttered_e2e_cpu"
def ap300(path):
    try:
        rows = [json.loads(l) for l in open(path)]
    except FileNotFoundError:
        return None
    r = [x for x in rows if x.get("step") == 300 and "eval_bbox_AP" in x]
    return r[-1]["eval_bbox_AP"] if r else None
rnd = [(ap300(f"{E}/f50rnd_s{s}.metrics.jsonl") + ap300(f"{C}/ddc_detect_random_s{s}.metrics.jsonl")) / 2 for s in range(3)]
bb = {"b10": [f"{E}/f50b10_s{s}.metrics.jsonl" for s in range(3)],
      "b11": [f"{E}/f50b11_s{s}.metrics.jsonl" for s in range(3)],
      "b12": [f"{C}/ddc_detect_pretrained_s{s}.metrics.jsonl" for s in range(3)],
      "b13": [f"benchmarks/results/dense_demo_2026-12-07_cluttered_backbones_cpu/b13_detect_s{s}.metrics.jsonl" for s in range(3)],
      "b14": [f"benchmarks/results/dense_demo_2026-12-07_cluttered_backbones_cpu/b14_detect_s{s}.metrics.jsonl" for s in range(3)]}
print("random init per seed (mean of two runs):", " / ".join(f"{x:.3f}" for x in rnd), f"mean {sum(rnd)/3:.3f}")
diffs, ok = [], True
for name, paths in bb.items():
    v = [ap300(p) for p in paths]
    if None in v:
        print(name, "incomplete:", v); ok = False; continue
    d = [a - b for a, b in zip(v, rnd)]
    diffs += d
    m = sum(v) / 3 - sum(rnd) / 3
    ok &= m > 0
    print(f"{name}: {' / '.join(f'{x:.2f}' for x in v)}  mean {sum(v)/3:.2f}  minus random {m:+.2f}  per seed {' '.join(f'{x:+.2f}' for x in d)}")
n = len(diffs); mu = sum(diffs) / n; sd = math.sqrt(sum((x - mu) ** 2 for x in diffs) / (n - 1))
print(f"{n} per-seed differences: {sum(x > 0 for x in diffs)} above 0, mean {mu:+.2f}, standard error {sd/math.sqrt(n):.2f}")
print("rule 1 (every backbone's 3-seed mean above random init's):", "MET" if ok and len(diffs) == 15 else "NOT MET")
