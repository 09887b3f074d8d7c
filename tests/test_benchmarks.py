"""The benchmarks run against the current package (a renamed API otherwise breaks `make bench` unseen): each one
for one tiny step, its rows checked. Speed itself is never asserted here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cmr_utils import ssl

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_pretrain_times_every_registered_method_and_both_glcl_stages():
    out = run_benchmark("bench_pretrain.py", "--sizes", "32", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                        "--n-local", "2", "--threads", "1")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:] if line.strip()}
    expected = [f"{name}:{stage}" for name, m in ssl.METHODS.items() for stage in m.model.stages] + [
        name for name, m in ssl.METHODS.items() if not m.model.stages]
    assert sorted(rows) == sorted(expected) and {"glcl:global", "glcl:local", "simsiam"} <= set(rows)
    views = {"simsiam": 2, "swav": 4, "mim": 1, "glcl:global": 2, "glcl:local": 2}  # swav: 2 global + 2 local crops
    for label, row in rows.items():
        assert row[1] == "32" and int(row[2]) == views.get(label, int(row[2]))
        assert float(row[3]) > 0
    assert rows["simsiam"][-1] == "1.00"  # the ratio column is relative to SimSiam's step
