"""Tests of cmr_utils.figures, the registry of the report's figures and tables (file name -> stage, producer,
caption), and of the alternative text the figure functions of cmr_utils.plots write."""
from __future__ import annotations

import os
import re

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from cmr_utils import figures, plots, tables
from cmr_utils.paths import NOTEBOOKS_DIR, Workspace


@pytest.fixture
def ws(tmp_path):
    return Workspace(profile="tiny", tag="phantom", root=tmp_path)


def test_every_item_has_a_unique_name_a_stage_and_a_package_producer():
    names = [i.name for i in figures.REPORT_ITEMS]
    assert len(names) == len(set(names))
    stages = {p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py")}
    for entry in figures.REPORT_ITEMS:
        assert entry.stage in stages, entry
        assert entry.producer.startswith("cmr_utils.") and entry.function.__module__.startswith("cmr_utils."), entry
        assert entry.name.endswith((".png", ".csv")) and len(entry.caption.split()) >= 4, entry


def test_a_file_name_finds_its_item_exact_names_before_families():
    assert figures.item("pretrain_loss_all.png").stage == "06_report"
    assert figures.item("pretrain_loss_swav.png").stage == "02_pretrain"
    entry = figures.item("explain_simsiam_best_median_worst.png")
    assert entry.fields("explain_simsiam_best_median_worst.png") == {"init": "simsiam"}
    assert figures.item("iou_by_init.csv").function is tables.iou_by_init
    with pytest.raises(KeyError, match="'nope.png' is not a registered figure or table.*budget_curve.png"):
        figures.item("nope.png")
    assert figures.caption("explain_across_inits_slice12.png") == (
        "*Test slice 12 explained by every initialisation.* `explain_across_inits_slice12.png`: "
        "`cmr_utils.explain.views.across_initialisations`, stage 05.")


def test_every_name_the_notebooks_make_or_show_is_registered():
    called = set()
    for py in sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py")):
        text = py.read_text()
        assert ".savefig(" not in text, f"{py.name}: figures are saved through cmr_utils.figures / plots.save_figure"
        called |= {m.group(1) for m in re.finditer(r"figures\.(?:make|save|show|read|existing)\(ws, f?\"([^\"]+)\"",
                                                   text)}
    assert len(called) >= 20
    for name in called:
        figures.item(re.sub(r"\{[^}]+\}", "x", name))  # f-string fields stand for any value


def test_a_table_is_written_by_its_producer_and_read_back(ws):
    runs = pd.DataFrame({"init": ["random", "random"], "seed": [0, 1], "budget": ["all", "all"],
                         "best_train_iou": [0.5, 0.7], "best_val_iou": [0.4, 0.6], "test_iou_model_grid": [0.3, 0.5]})
    slices = pd.DataFrame({"init": "random", "budget": "all", "seed": 0, "patient": ["a", "b"], "iou": [0.2, 0.4]})
    volumes = pd.DataFrame({"init": "random", "budget": "all", "seed": 0, "patient": ["a", "b"], "phase": "ED",
                            "structure": "LV", "dice": [0.6, 0.8]})
    made = figures.make(ws, "iou_by_init.csv", runs, slices, volumes)
    back = figures.read(ws, "iou_by_init.csv")  # (measure, statistic) header, initialisations as the index
    assert back.loc["random", ("test_iou_model_grid", "mean")] == pytest.approx(0.4)
    assert back.loc["random", ("test_dice", "mean")] == pytest.approx(0.7)
    pd.testing.assert_frame_equal(back, made, check_dtype=False)
    assert [p.name for p in ws.tables.iterdir()] == ["iou_by_init.csv"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert (ws.tables / "iou_by_init.csv").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plainly written file
    with pytest.raises(TypeError, match="acdc_metrics.csv: a table is saved from a DataFrame"):
        figures.save(ws, "acdc_metrics.csv", [1, 2])


def test_a_figure_is_saved_with_its_alternative_text(ws):
    summary = pd.DataFrame([{"init": "random", "budget": b, "n_labelled": n, "frozen_encoder": b != "all",
                             "mean": m, "ci_low": m - 0.1, "ci_high": m + 0.1, "n_patients": 4}
                            for b, n, m in (("all", 100, 0.8), ("20", 20, 0.5))])
    path = figures.make(ws, "budget_curve.png", summary, "test IoU")
    assert path == ws.figures / "budget_curve.png" and not plt.get_fignums()
    assert plots.figure_alt(path) == ("Line chart of the test IoU against the number of labelled training slices "
                                      "(log scale), one line per initialisation with its 95 % bootstrap band: random "
                                      "20 (20 slices) 0.50, all (100 slices) 0.80.")
    fig, _ = plt.subplots()
    with pytest.raises(TypeError, match="validation_curves.png: a figure is saved from a plots.Drawn"):
        figures.save(ws, "validation_curves.png", fig)
    plt.close(fig)


def test_figure_functions_say_what_they_show():
    history = pd.DataFrame({"epoch": [0, 1, 2], "val_loss": [0.9, 0.5, 0.4], "val_iou": [0.2, 0.55, 0.5],
                            "train_loss": [1.0, 0.6, 0.5]})
    drawn = plots.validation_curves({"random": history})
    assert drawn.alt.endswith("best validation IoU random 0.55.")
    losses = plots.loss_curves({"simsiam": history}, "loss")
    assert "simsiam over 3 epoch(s), training loss 1.000 to 0.500, validation loss 0.900 to 0.400" in losses.alt
    ef = pd.DataFrame({"init": "random", "structure": ["LV", "LV", "RV"], "ef_true": [50, 60, None],
                       "ef_pred": [52, 58, 40]})
    assert "(LV, RV)" in plots.ef_scatter(ef).alt and "; 2 points over seeds" in plots.ef_scatter(ef).alt
    plt.close("all")


def test_families_list_only_their_own_files(ws):
    ws.figures.mkdir(parents=True)
    for name in ("pretrain_loss_all.png", "pretrain_loss_simsiam.png", "pretrain_loss_swav.png",
                 "explain_random_best_median_worst.png", "explain_viewer_montage.png", "stray.png"):
        (ws.figures / name).write_bytes(b"")
    assert figures.existing(ws, "pretrain_loss_{method}.png") == ["pretrain_loss_simsiam.png", "pretrain_loss_swav.png"]
    assert figures.existing(ws, "explain_{init}_best_median_worst.png") == ["explain_random_best_median_worst.png"]
    assert figures.existing(ws, "label_efficiency.png") == []


def test_show_gives_a_table_its_caption_or_the_reason_it_is_empty(ws, monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    figures.save(ws, "health_checks.csv", pd.DataFrame(columns=["run", "problem", "detail"]))
    figures.show(ws, "health_checks.csv", empty="every run learned")
    assert [s.data for s in shown] == [
        "*Runs whose training loss stayed flat or that never predict a structure.* `health_checks.csv`: "
        "`cmr_utils.evaluate.health_checks`, stage 04.",
        "> **No rows** in `health_checks.csv`: every run learned."]
    shown.clear()
    headline = pd.DataFrame([{"init": "random", "budget": "all", "labelled_slices": 100, "seeds": 2, "iou": 0.71,
                              "dice": 0.8, "dice_ci_low": 0.75, "dice_ci_high": 0.85}])
    figures.save(ws, "headline.csv", headline)
    figures.show(ws, "headline.csv")
    table = shown[1].data
    assert list(table.columns) == ["initialisation", "budget", "labelled slices", "IoU (study, test split)",
                                   "3D Dice [95 % CI]"]
    assert table.iloc[0, 4] == "0.800 [0.750, 0.850]"
