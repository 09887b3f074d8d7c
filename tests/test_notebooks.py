"""The notebooks: paired and clean, and the whole compendium executed headless through `make report` with the
tiny profile on the phantom (Papermill, the registered kernel, the dependency graph)."""
import json
import os
import re
import subprocess
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pandas as pd
import pytest

from cmr_utils.paths import NOTEBOOKS_DIR, PROJ_ROOT, workspace

PY_FILES = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def test_every_notebook_is_paired_in_sync_and_without_outputs():
    assert [p.stem[:2] for p in PY_FILES] == ["01", "02", "03", "04", "05", "06"]
    for py in PY_FILES:
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb} missing: run `make sync`"
        stored = nbformat.read(ipynb, as_version=4)
        for cell in stored.cells:
            assert cell.get("outputs", []) == [] and cell.get("execution_count") is None, f"{ipynb} has outputs"
        from_py = jupytext.read(py)
        assert [(c.cell_type, c.source) for c in from_py.cells] == [(c.cell_type, c.source) for c in stored.cells], \
            f"{py.name} and {ipynb.name} differ: run `make sync`"
        tags = [c.metadata.get("tags", []) for c in from_py.cells]
        assert sum("parameters" in t for t in tags) == 1, f"{py.name}: exactly one 'parameters' cell"


def code_lines(py: Path) -> list[str]:
    """The non-blank, non-comment lines of a notebook's code cells."""
    return [line for cell in jupytext.read(py).cells if cell.cell_type == "code"
            for line in cell.source.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_analysis_notebooks_are_as_thin_as_the_training_ones():
    """Stages 04-06 call cmr_utils (tables, figures, report); they define nothing and hold no more code than
    stages 01-03's largest plus 20 lines."""
    lines = {py.stem[:2]: code_lines(py) for py in PY_FILES}
    limit = max(len(lines[s]) for s in ("01", "02", "03")) + 20
    for stage in ("04", "05", "06"):
        assert len(lines[stage]) <= limit, f"{stage}: {len(lines[stage])} code lines, at most {limit}"
        defined = [line for line in lines[stage] if re.search(r"^\s*(async\s+)?def |^\s*class |\blambda\b", line)]
        assert not defined, f"{stage} defines code that belongs in cmr_utils: {defined}"


def make(*args, env=None, check=True):
    cmd = ["make", "--no-print-directory", *args]
    done = subprocess.run(cmd, cwd=PROJ_ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def tiny_report():
    make("report", "PROFILE=tiny")
    return workspace("tiny", "")


def test_make_report_tiny_produces_every_output(tiny_report):
    ws = tiny_report
    executed = sorted(p.name for p in ws.executed.glob("*.ipynb"))
    assert executed[:5] == ["01_prepare_data.ipynb", "02_pretrain-glcl.ipynb", "02_pretrain-mim.ipynb",
                            "02_pretrain-simsiam.ipynb", "02_pretrain-swav.ipynb"]
    # the whole-network methods export a decoder; the encoder-only ones do not
    assert [ws.decoder_path(m).exists() for m in ("simsiam", "swav", "mim", "glcl")] == [False, False, True, True]
    # a patient budget: every slice of one training patient, the same one for every initialisation, the encoder trained
    p1 = {init: pd.read_csv(ws.finetune_dir(f"{init}-p1-s0") / "labelled_slices.csv") for init in ("random", "glcl")}
    assert p1["random"]["patient"].nunique() == 1 and p1["random"].equals(p1["glcl"])
    assert json.loads((ws.finetune_dir("mim-p1-s0") / "result.json").read_text())["frozen_encoder"] is False
    # every encoder exported for other libraries; every trained run carries what it needs to predict
    assert all(ws.encoder_export_path(m).is_file() and ws.model_card_path(m).is_file()
               for m in ("simsiam", "swav", "mim", "glcl"))
    plans = json.loads((ws.finetune_dir("glcl-p1-s0") / "plans.json").read_text())
    assert plans["model"]["init"] == "glcl" and plans["predict"]["test_time_flips"] is True
    assert not (ws.finetune_dir("imagenet-all-s0") / "plans.json").exists()  # unavailable: no model, no plans
    assert "03_finetune-simsiam-8-s0.ipynb" in executed and "05_explain.ipynb" in executed
    # tiny runs budget 8 both ways (budgets_below_freeze: frozen_and_trained): the same slices, frozen and trained
    frozen, trained = (json.loads((ws.finetune_dir(f"random-{b}-s0") / "result.json").read_text()) for b in ("8", "8-trained"))
    assert (frozen["frozen_encoder"], trained["frozen_encoder"], trained["budget"]) == (True, False, "8-trained")
    assert ((ws.finetune_dir("random-8-s0") / "labelled_slices.csv").read_text()
            == (ws.finetune_dir("random-8-trained-s0") / "labelled_slices.csv").read_text())
    by_budget = pd.read_csv(ws.tables / "iou_by_budget.csv")
    assert set(by_budget[by_budget["init"] == "random"]["budget"]) == {"all", "8", "8-trained", "p1"}
    assert not [n for n in executed if n.endswith((".tmp.ipynb", ".failed.ipynb", ".src.ipynb"))]
    for name in ("data_samples.png", "pretrain_loss_simsiam.png", "pretrain_loss_all.png", "validation_curves.png",
                 "budget_curve.png", "ef_agreement.png", "sample_prediction.png", "label_efficiency.png"):
        assert (ws.figures / name).stat().st_size > 1000, name
    for name in ("data_summary.csv", "iou_by_init.csv", "iou_by_budget.csv", "acdc_metrics.csv",
                 "ef_agreement.csv", "paired_comparisons.csv", "xai_summary.csv", "dice_by_budget.csv",
                 "gains_over_random.csv", "gains_by_structure.csv"):
        assert (ws.tables / name).exists(), name
    by_structure = pd.read_csv(ws.tables / "gains_by_structure.csv")
    assert set(by_structure["structure"]) == {"RV", "MYO", "LV"} and not by_structure.empty
    html = ws.report_html.read_text()
    for text in ("Colophon", "imagenet: unavailable", "resnet18-f37072fd.pth", "Seg-Grad-CAM", "Label budgets",
                 "Does pretraining pay with few labels?", "Masked image modelling"):
        assert text in html, text
    assert (ws.root / "reports" / "report.html").resolve() == ws.report_html.resolve()


def test_second_make_report_does_nothing(tiny_report):
    outputs = sorted(tiny_report.reports.rglob("*")) + sorted(tiny_report.runs.rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    again = make("report", "PROFILE=tiny")
    assert "ipynb" not in again.stdout, again.stdout  # no stage ran
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
    assert not (PROJ_ROOT / "runs" / "phantom" / "tiny").exists()  # nothing written into the project


def test_make_run_builds_the_named_runs_only(tiny_report):
    # as if the fine-tuning notebook had changed: every run is out of date, `make run` redoes the one it names
    dry = make("-n", "-W", "notebooks/03_finetune.py", "run", "PROFILE=tiny", "RUN=random-8-s0").stdout
    assert sorted(set(re.findall(r"03_finetune-[\w-]+?(?=\.ipynb)", dry))) == ["03_finetune-random-8-s0"], dry
    assert "04_evaluate" not in dry and "01_prepare_data" not in dry
    unknown = make("-n", "run", "PROFILE=tiny", "RUN=random-8-s0 nope-8-s0", check=False)
    assert unknown.returncode != 0 and "RUN: nope-8-s0 not in the plan of PROFILE=tiny" in unknown.stderr
    assert "random-8-trained-s0" in unknown.stderr  # the message lists the runs that exist
    empty = make("-n", "run", "PROFILE=tiny", check=False)
    assert empty.returncode != 0 and "make run needs RUN=" in empty.stderr
    # a plan older than its profile (as if a budget had just been added) is remade before RUN is checked against it
    key = "|".join(os.environ.get(v, "") for v in ("DATA", "CMR_OUTPUT_ROOT", "EXTERNAL"))  # as the Makefile names it
    cksum = subprocess.run(["cksum"], input=key, capture_output=True, text=True, check=True).stdout.split()[0]
    plan = PROJ_ROOT / ".make" / f"plan-tiny-{cksum}.mk"
    assert plan.is_file(), f"{plan}: not the plan the dry runs above made"
    fresh = plan.read_text()
    try:
        plan.write_text(fresh.replace(" random-8-s0", ""))
        os.utime(plan, (0, 0))
        remade = make("-n", "run", "PROFILE=tiny", "RUN=random-8-s0", check=False)
        assert remade.returncode == 0 and "not in the plan" not in remade.stderr, remade.stderr
        assert plan.read_text() == fresh
    finally:
        plan.write_text(fresh)


def test_parallel_runs_share_the_cores_and_the_serial_stages_take_them_all():
    # two at a time: each run of stages 02-03 gets half the cores; 01, 04, 05 and 06, which never run beside
    # another stage, get all of them
    dry = make("-n", "-W", "notebooks/01_prepare_data.py", "JOBS=2", "report",
               "PROFILE=tiny").stdout
    found = re.findall(r"OMP_NUM_THREADS=\$\{OMP_NUM_THREADS:-(\d+)\}.*?papermill \S+ \S*/(\d\d_[\w-]+)\.ipynb\.tmp\.ipynb", dry)
    threads = {stage: int(n) for n, stage in found}
    cores = len(os.sched_getaffinity(0))  # what `nproc` counts
    assert {s for s in threads if s.startswith("03_")}, dry
    assert {"01_prepare_data", "04_evaluate", "05_explain", "06_report"} <= set(threads), dry
    for stage, n in threads.items():
        expected = cores if stage[:2] in ("01", "04", "05", "06") else max(1, cores // 2)
        assert n == expected, (stage, n, expected)


def test_an_unreadable_data_folder_stops_at_the_plan(tmp_path):
    (tmp_path / "notes.txt").write_text("not cardiac MRI")
    done = make("prepare", "PROFILE=tiny", f"DATA={tmp_path}", check=False)
    assert done.returncode != 0 and "unrecognised data layout" in done.stdout + done.stderr
    ws = workspace("tiny", str(tmp_path))
    assert not ws.executed.exists() and not ws.prepared.exists()  # no stage ran


def test_a_failed_stage_leaves_no_finished_output(tmp_path):
    """Files whose headers are fine (so the plan is made) but whose voxels are broken fail inside stage 01."""
    import h5py

    for k in range(1, 5):
        for frame in (1, 12):
            image = np.random.default_rng(k).random((3, 32, 32)).astype(np.float32)
            image[0, 0, 0] = np.nan
            with h5py.File(tmp_path / f"patient{k:03d}_frame{frame:02d}.h5", "w") as f:
                f["image"], f["label"] = image, np.zeros((3, 32, 32), np.uint8)
    done = make("prepare", "PROFILE=tiny", f"DATA={tmp_path}", check=False)
    assert done.returncode != 0
    ws = workspace("tiny", str(tmp_path))
    assert not (ws.executed / "01_prepare_data.ipynb").exists() and not ws.prepared.exists()
    failed = ws.executed / "01_prepare_data.failed.ipynb"
    assert failed.exists() and "NaN or infinite" in failed.read_text()


def test_imagenet_runs_once_the_weights_are_cached(tiny_report):
    """The unavailable ImageNet runs re-run when a torchvision-format file appears in the hub cache."""
    import json

    import torch
    import torchvision

    assert json.loads((tiny_report.finetune_dir("imagenet-all-s0") / "result.json").read_text())["status"] == \
        "unavailable"
    cache = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), cache / "resnet18-f37072fd.pth")
    again = make("report", "PROFILE=tiny")
    assert "03_finetune-imagenet-all-s0" in again.stdout and "03_finetune-random-all-s0" not in again.stdout
    result = json.loads((tiny_report.finetune_dir("imagenet-all-s0") / "result.json").read_text())
    assert result["status"] == "ok" and (tiny_report.finetune_dir("imagenet-all-s0") / "model.pt").exists()
    assert (tiny_report.finetune_dir("imagenet-all-s0") / "plans.json").exists()
    assert "imagenet: unavailable" not in tiny_report.report_html.read_text()
