"""Every figure and table of the report, by file name: the stage that makes it, the package function that computes
it (its *producer*) and the caption the report gives it.

The stages make them through ``make`` (or ``save``, for a producer that returns several), which saves a figure with
its alternative text (``plots.save_figure``) or writes a table's CSV atomically; the report shows them through
``show``, which adds the caption and names the producer. The code behind any file of
``reports/<data>/<profile>/{figures,tables}/`` is ``item(file name).producer`` (its dotted name; ``.function`` the
function). A name with ``{field}`` is a family of files, one per method, initialisation or slice
(``pretrain_loss_{method}.png``). Producers are named, not imported, so that a stage depends on the producers it
makes and no other (``cmr_utils.dependencies`` follows each ``figures.make(ws, "<file>", ...)`` to its producer).
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import plots
from .files import atomic_write


def resolve(dotted: str):
    """The function a dotted name (``cmr_utils.plots.loss_curves``, ``pandas.DataFrame.transpose``) names."""
    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        owner, _, cls = module.rpartition(".")
        return getattr(getattr(importlib.import_module(owner), cls), attr)


@dataclass(frozen=True)
class ReportItem:
    name: str  # file name under figures/ (.png) or tables/ (.csv); `{field}` for a family of files
    stage: str  # the notebook that makes it
    producer: str  # dotted name of a function returning a plots.Drawn (figure and alt text) or a DataFrame
    caption: str  # what the report says under it; `{field}`s are filled from the file name
    index: bool = False  # a table whose index is a column of the CSV (read back as the index)
    header_rows: int = 1  # a table with a (measure, statistic) header
    view: str | None = None  # dotted name of how the report shows a table (default: as written)
    dpi: int = 120

    @property
    def function(self):
        """The producer itself."""
        return resolve(self.producer)

    @property
    def kind(self) -> str:
        return "figure" if self.name.endswith(".png") else "table"

    def fields(self, name: str) -> dict[str, str] | None:
        """The ``{field}`` values of file ``name`` when it is this item's (None when it is not)."""
        pattern = "".join(f"(?P<{part[1:-1]}>[^/]+?)" if part.startswith("{") else re.escape(part)
                          for part in re.split(r"(\{\w+\})", self.name))
        match = re.fullmatch(pattern, name)
        return match.groupdict() if match else None


REPORT_ITEMS = (
    ReportItem("data_summary.csv", "01_prepare_data", "cmr_utils.prepare.summary_table",
               "Patients, slices and class pixel fractions per split.", index=True),
    ReportItem("data_samples.png", "01_prepare_data", "cmr_utils.plots.sample_slices",
               "Sample slices of each data source, ground truth overlaid."),
    ReportItem("pretrain_loss_all.png", "06_report", "cmr_utils.plots.loss_curves",
               "Pretraining loss per epoch of every method, training solid and validation dashed."),
    ReportItem("pretrain_loss_{method}.png", "02_pretrain", "cmr_utils.plots.loss_curves",
               "Pretraining loss per epoch of {method}, training solid and validation dashed."),
    ReportItem("headline.csv", "04_evaluate", "cmr_utils.tables.headline",
               "Test scores per initialisation and label budget: the study's IoU (whole test split, model grid; mean "
               "over seeds) and the 3D Dice per patient and phase (original grid; mean over RV, MYO and LV) with its "
               "95 % patient-level bootstrap interval.", view="cmr_utils.tables.headline_view"),
    ReportItem("iou_by_init.csv", "04_evaluate", "cmr_utils.tables.iou_by_init",
               "The study's table in detail: one column per initialisation; per measure its mean and range over "
               "seeds (one number per run) or its 95 % patient-level bootstrap interval.", index=True, header_rows=2,
               view="pandas.DataFrame.transpose"),
    ReportItem("health_checks.csv", "04_evaluate", "cmr_utils.evaluate.health_checks",
               "Runs whose training loss stayed flat or that never predict a structure."),
    ReportItem("validation_curves.png", "04_evaluate", "cmr_utils.plots.validation_curves",
               "Validation loss and IoU per fine-tuning epoch with all labels, mean over seeds."),
    ReportItem("iou_by_budget.csv", "04_evaluate", "cmr_utils.tables.iou_by_budget",
               "Test IoU per slice (model grid) per initialisation and label budget."),
    ReportItem("budget_curve.png", "04_evaluate", "cmr_utils.plots.budget_curve",
               "Test IoU per slice (model grid) against labelled training slices."),
    ReportItem("paired_comparisons.csv", "04_evaluate", "cmr_utils.tables.paired_comparisons",
               "Paired differences of the patient-phase 3D Dice between initialisations, per budget."),
    ReportItem("dice_by_budget.csv", "04_evaluate", "cmr_utils.label_efficiency.dice_by_budget",
               "Test Dice (3D, original grid) per initialisation and budget."),
    ReportItem("gains_over_random.csv", "04_evaluate", "cmr_utils.label_efficiency.gains_over_random",
               "Each initialisation minus random initialisation, paired on seed, test patient and phase."),
    ReportItem("gains_by_structure.csv", "04_evaluate", "cmr_utils.label_efficiency.gains_by_structure",
               "Where the gains come from: each initialisation minus random initialisation per structure (3D Dice of "
               "RV, MYO and LV), paired on seed, test patient and phase."),
    ReportItem("label_efficiency.png", "04_evaluate", "cmr_utils.plots.label_efficiency",
               "Test Dice against labelled training patients."),
    ReportItem("acdc_metrics.csv", "04_evaluate", "cmr_utils.tables.acdc_metrics",
               "ACDC's metrics per initialisation, phase and structure: Dice (mean, SD) and HD95."),
    ReportItem("ef_agreement.csv", "04_evaluate", "cmr_utils.evaluate.ef_agreement_table",
               "Ejection fraction, predicted versus true: bias, limits of agreement and Pearson r."),
    ReportItem("ef_agreement.png", "04_evaluate", "cmr_utils.plots.ef_scatter",
               "Predicted against true ejection fraction."),
    ReportItem("sample_prediction.png", "04_evaluate", "cmr_utils.plots.sample_prediction",
               "A test slice and each initialisation's prediction."),
    ReportItem("external_cross_dataset.csv", "04_evaluate", "cmr_utils.evaluate.external_tables",
               "Mean 3D Dice of the all-label runs per initialisation and external dataset."),
    ReportItem("external_drop.csv", "04_evaluate", "cmr_utils.evaluate.external_tables",
               "External minus internal test Dice per initialisation and dataset."),
    ReportItem("framing_by_init.csv", "04_evaluate", "cmr_utils.framing.framing_by_init",
               "Mean 3D Dice per initialisation and framing of the test volumes."),
    ReportItem("explain_{init}_best_median_worst.png", "05_explain", "cmr_utils.explain.views.best_median_worst",
               "Seg-Grad-CAM of the {init} model on its best, median and worst test slices.", dpi=100),
    ReportItem("explain_across_inits_slice{index}.png", "05_explain", "cmr_utils.explain.views.across_initialisations",
               "Test slice {index} explained by every initialisation.", dpi=100),
    ReportItem("explain_viewer_montage.png", "05_explain", "cmr_utils.explain.views.viewer_montage",
               "The slice viewer drawn statically for each initialisation's best slice.", dpi=100),
    ReportItem("xai_summary.csv", "05_explain", "cmr_utils.explain.summarise_numbers",
               "Numbers for the explanations: localisation, faithfulness and sanity, mean and SD over seeds."),
)


def item(name: str) -> ReportItem:
    """The registered item of file ``name`` (an exact name before a family's pattern)."""
    for candidate in sorted(REPORT_ITEMS, key=lambda i: "{" in i.name):
        if candidate.fields(name) is not None:
            return candidate
    raise KeyError(f"{name!r} is not a registered figure or table of the report; registered: "
                   f"{', '.join(i.name for i in REPORT_ITEMS)} (cmr_utils.figures.REPORT_ITEMS)")


def path(ws, name: str) -> Path:
    """Where file ``name`` lives in workspace ``ws`` (``cmr_utils.paths.Workspace``)."""
    return (ws.figures if item(name).kind == "figure" else ws.tables) / name


def save(ws, name: str, made):
    """Write what a producer ``made`` as file ``name``: a ``plots.Drawn`` as a PNG with its alternative text (returns
    the path), a DataFrame as CSV (returns the DataFrame). Both are written atomically."""
    entry = item(name)
    if entry.kind == "figure":
        if not isinstance(made, plots.Drawn):
            raise TypeError(f"{name}: a figure is saved from a plots.Drawn (figure, alt), got {type(made).__name__}")
        return plots.save_figure(made.figure, ws.figure(name), made.alt, dpi=entry.dpi)
    if not isinstance(made, pd.DataFrame):
        raise TypeError(f"{name}: a table is saved from a DataFrame, got {type(made).__name__}")
    atomic_write(ws.table(name), lambda temp: made.to_csv(temp, index=entry.index))
    return made


def make(ws, name: str, *args, **kwargs):
    """Make file ``name`` with its registered producer (``producer(*args, **kwargs)``) and ``save`` it."""
    return save(ws, name, item(name).function(*args, **kwargs))


def read(ws, name: str) -> pd.DataFrame:
    """A table as written by ``save``."""
    entry = item(name)
    return pd.read_csv(path(ws, name), header=list(range(entry.header_rows)) if entry.header_rows > 1 else 0,
                       index_col=0 if entry.index else None)


def caption(name: str) -> str:
    """The report's caption of file ``name``, with the file and the code that makes it."""
    entry = item(name)
    return (f"*{entry.caption.format(**entry.fields(name))}* `{name}`: `{entry.producer}`, "
            f"stage {entry.stage.split('_')[0]}.")


def existing(ws, name: str) -> list[str]:
    """The files of a family (``explain_{init}_best_median_worst.png``) that its stage wrote, sorted; a plain name
    gives itself where it exists."""
    entry = item(name)
    folder = path(ws, name).parent
    glob = re.sub(r"\{\w+\}", "*", name)
    return sorted(p.name for p in folder.glob(glob) if entry.fields(p.name) is not None and item(p.name) is entry)


def show(ws, name: str, empty: str | None = None) -> None:
    """Display file ``name`` in the report with its caption: a figure with the alternative text stored in it, a table
    (through the item's ``view``); a table with no rows is replaced by ``empty``, the reason it has none."""
    from IPython.display import Markdown, display

    entry = item(name)
    if entry.kind == "figure":
        plots.show_figure(path(ws, name))
        display(Markdown(caption(name)))
        return
    df = read(ws, name)
    display(Markdown(caption(name)))
    if df.empty:
        display(Markdown(f"> **No rows** in `{name}`: {empty or 'the stage that writes it found nothing to list'}."))
        return
    shown = resolve(entry.view)(df) if entry.view else df
    style = shown.style.format(precision=3, na_rep="–")
    display(style if entry.index else style.hide(axis="index"))
