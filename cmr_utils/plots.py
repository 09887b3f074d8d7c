"""Figures of the compendium (matplotlib; headless-safe). Each figure function returns a ``Drawn``: the Figure and
its alternative text, which ``save_figure`` stores in the PNG (``cmr_utils.figures`` names every figure file of the
report and the function here that draws it)."""
from __future__ import annotations

from typing import NamedTuple

import matplotlib

matplotlib.rcParams.setdefault("figure.dpi", 100)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .plan import TRAINED  # noqa: E402
from .prepare import normalise_volume  # noqa: E402
from .structures import STRUCTURES  # noqa: E402

LABEL_COLOURS = {1: (0.90, 0.10, 0.10), 2: (0.10, 0.75, 0.20), 3: (0.15, 0.35, 0.95)}
BUILT_IN_COLOURS = {"random": "tab:gray", "imagenet": "tab:orange"}


class Drawn(NamedTuple):
    """A figure and the words that say what it shows (its alternative text)."""

    figure: object
    alt: str


def init_colour(init: str) -> str | None:
    """The colour of an initialisation in every figure: built-in ones here, pretraining methods from the registry."""
    if init in BUILT_IN_COLOURS:
        return BUILT_IN_COLOURS[init]
    from .ssl import METHODS

    return METHODS[init].colour if init in METHODS else None


def label_cmap(n_classes: int = 4) -> ListedColormap:
    colours = [(0, 0, 0, 0)] + [(*LABEL_COLOURS.get(k, (0.95, 0.85, 0.1)), 0.45) for k in range(1, n_classes)]
    return ListedColormap(colours)


def show_slice(ax, image: np.ndarray, label: np.ndarray | None = None, title: str | None = None) -> None:
    """Grey image with the label map overlaid (0 transparent)."""
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if label is not None:
        n = max(4, int(label.max()) + 1)
        ax.imshow(np.ma.masked_equal(label, 0), cmap=label_cmap(n), vmin=0, vmax=n - 1, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def sample_slices(prepared, sources, per_source: int = 4):
    """For each source: ``per_source`` slices through one volume of its first patient, label overlaid."""
    fig, axes = plt.subplots(len(sources), per_source, figsize=(2.2 * per_source, 2.4 * len(sources)),
                             squeeze=False)
    for row, source in zip(axes, sources):
        vol = next(source.volumes(source.patients()[:1]))
        image = normalise_volume(vol.image)
        picks = np.linspace(0.2, 0.8, per_source) * (len(image) - 1)
        label = vol.label
        if label is not None and source.labels != STRUCTURES:
            label = np.where(label > 0, 4, 0)  # other structures (left atrium) drawn in yellow
        for ax, k in zip(row, picks.round().astype(int)):
            show_slice(ax, image[k], None if label is None else label[k],
                       f"{source.layout}: {vol.patient} {vol.phase} z={k}")
    fig.suptitle("Sample slices per source (RV red, MYO green, LV blue; LA yellow)", fontsize=10)
    fig.tight_layout()
    layouts = ", ".join(s.layout for s in sources)
    return Drawn(fig, f"Sample slices of each data source ({layouts}): {per_source} slices through one volume of the "
                      "source's first patient, with the ground truth overlaid (RV red, MYO green, LV blue; left atrium "
                      "yellow).")


def loss_curves(histories: dict[str, pd.DataFrame], title: str, columns=("train_loss", "val_loss")):
    """One line per (name, column): per-epoch curves, e.g. the pretraining losses of one or both methods."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, history in histories.items():
        for column, style in zip(columns, ("-", "--", ":")):
            if column in history:
                h = history.dropna(subset=[column])
                ax.plot(h["epoch"], h[column], style, marker=".", color=init_colour(name),
                        label=f"{name} {column.replace('_', ' ')}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss" if all("loss" in c for c in columns) else ", ".join(columns))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Drawn(fig, "Line chart of the pretraining loss per epoch, training solid and validation dashed: " + "; ".join(
        f"{m} over {len(h)} epoch(s), training loss {h['train_loss'].iloc[0]:.3f} to {h['train_loss'].iloc[-1]:.3f}, "
        f"validation loss {h['val_loss'].iloc[0]:.3f} to {h['val_loss'].iloc[-1]:.3f}" for m, h in histories.items()
        if len(h)) + ".")


def validation_curves(histories: dict[str, pd.DataFrame]):
    """Validation loss and IoU per epoch, one line per initialisation (the study's Fig. 4)."""
    fig, (ax_loss, ax_iou) = plt.subplots(1, 2, figsize=(10, 3.6))
    for init, h in histories.items():
        ax_loss.plot(h["epoch"], h["val_loss"], marker=".", color=init_colour(init), label=init)
        ax_iou.plot(h["epoch"], h["val_iou"], marker=".", color=init_colour(init), label=init)
    for ax, name in ((ax_loss, "validation Dice loss"), (ax_iou, "validation IoU")):
        ax.set_xlabel("epoch")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    ax_iou.legend(fontsize=8)
    fig.tight_layout()
    best = ", ".join(f"{init} {h['val_iou'].max():.2f}" for init, h in histories.items())
    return Drawn(fig, "Two line charts over the fine-tuning epochs with all labels, one line per initialisation (mean "
                      "over seeds): validation Dice loss (left) and validation IoU (right); best validation IoU "
                      f"{best}.")


def budget_curve(summary: pd.DataFrame, value: str = "test IoU"):
    """Mean (line) and 95% patient-level bootstrap interval (band) of ``value`` against labelled slices, one line
    per initialisation. ``summary`` has the columns of ``stats.bootstrap_mean_ci`` grouped by initialisation and
    budget (init, mean, ci_low, ci_high, n_patients, optionally n_seeds) and n_labelled. Where there are
    ``<budget>-trained`` runs (``cmr_utils.plan.budget_variants``) and a ``frozen_encoder`` column, each
    initialisation gets a second, dashed line through its runs whose encoder was trained."""
    from .budgets import patient_count

    summary = summary[summary["budget"].map(patient_count).isna()]  # patient budgets: ``label_efficiency``
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for init, runs in summary.groupby("init"):
        colour = init_colour(init)
        trained = runs["budget"].astype(str).str.endswith(TRAINED)
        lines = [(runs[~trained], "-", init)]  # the study's rule: the encoder frozen below freeze_below
        if trained.any() and "frozen_encoder" in runs:  # <budget>-trained runs: their line ends at the trained runs
            lines.append((runs[trained | (~trained & ~runs["frozen_encoder"].astype(bool))], "--",
                          f"{init}, encoder trained"))
        for g, style, label in lines:
            g = g.sort_values("n_labelled")
            ax.plot(g["n_labelled"], g["mean"], style, marker="o", color=colour, label=label)
            # the band is the patient-level bootstrap interval (none below 2 patients), drawn within [0, 1]
            ax.fill_between(g["n_labelled"], g["ci_low"].fillna(g["mean"]).clip(0, 1),
                            g["ci_high"].fillna(g["mean"]).clip(0, 1), color=colour, alpha=0.15 if style == "-"
                            else 0.07)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled training slices")
    ax.set_ylabel(value)
    patients = int(summary["n_patients"].max()) if len(summary) else 0
    seeds = f"; {int(summary['n_seeds'].max())} seeds pooled" if "n_seeds" in summary and len(summary) else ""
    ax.set_title(f"{value} by label budget\n(mean and 95% bootstrap interval over {patients} test patients{seeds})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    points = "; ".join(f"{init} " + ", ".join(f"{r.budget} ({r.n_labelled} slices) {r.mean:.2f}" for r in g.itertuples())
                       for init, g in summary.sort_values("n_labelled").groupby("init"))
    return Drawn(fig, f"Line chart of the {value} against the number of labelled training slices (log scale), one "
                      f"line per initialisation with its 95 % bootstrap band: {points or 'no runs'}.")


def label_efficiency(table: pd.DataFrame, n_train_patients: int | None = None, display: dict | None = None):
    """Test Dice against labelled training patients (log scale), one line per initialisation with its 95 %
    patient-bootstrap band: the patient budgets (``p1``, ``p3``, ``p7``) and, at ``n_train_patients``, ``all``.
    ``table``: ``label_efficiency.dice_by_budget``'s rows."""
    rows = table[table["labelled_patients"].notna()].copy()
    if n_train_patients is not None:
        rows = pd.concat([rows, table[table["budget"] == "all"].assign(labelled_patients=n_train_patients)])
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for init, g in rows.groupby("init", sort=False):
        g = g.sort_values("labelled_patients")
        colour = init_colour(init)
        ax.plot(g["labelled_patients"], g["mean"], marker="o", color=colour, label=(display or {}).get(init, init))
        ax.fill_between(g["labelled_patients"], g["ci_low"].fillna(g["mean"]).clip(0, 1),
                        g["ci_high"].fillna(g["mean"]).clip(0, 1), color=colour, alpha=0.12)
    ax.set_xscale("log")
    ticks = sorted(rows["labelled_patients"].unique())
    ax.set_xticks(ticks, [f"{int(t)}" + (" (all)" if t == n_train_patients else "") for t in ticks])
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled training patients (every slice of each)")
    ax.set_ylabel("test Dice (3D, native grid)")
    n = int(rows["n_patients"].max()) if len(rows) else 0
    ax.set_title(f"Label efficiency: mean and 95% bootstrap band over {n} test patients", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    points = "; ".join(f"{(display or {}).get(init, init)} " + ", ".join(f"{r.budget} {r.mean:.2f}" for r in g.itertuples())
                       for init, g in table.groupby("init", sort=False))
    return Drawn(fig, "Line chart of the test Dice against labelled training patients (log scale), one line per "
                      f"initialisation with its 95 % bootstrap band: {points}.")


def ef_scatter(ef: pd.DataFrame):
    """Predicted against true ejection fraction, per structure, one colour per initialisation."""
    structures = sorted(ef["structure"].unique()) or ["LV"]
    fig, axes = plt.subplots(1, len(structures), figsize=(4.2 * len(structures), 4), squeeze=False)
    for ax, structure in zip(axes[0], structures):
        g = ef[ef["structure"] == structure]
        for init, h in g.groupby("init"):
            ax.scatter(h["ef_true"], h["ef_pred"], s=14, color=init_colour(init), label=init, alpha=0.7)
        lims = [min(g[["ef_true", "ef_pred"]].min().min(), 0), max(g[["ef_true", "ef_pred"]].max().max(), 80)]
        ax.plot(lims, lims, "k--", lw=0.8)
        ax.set_xlabel(f"true {structure} EF (%)")
        ax.set_ylabel(f"predicted {structure} EF (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    points = ef.dropna(subset=["ef_true", "ef_pred"]).shape[0]
    return Drawn(fig, "Scatter plot of predicted against true ejection fraction (%), one panel per structure ("
                      f"{', '.join(sorted(ef['structure'].unique())) or 'none'}), one colour per initialisation, dashed "
                      f"identity line; {points} points over seeds and test patients.")


def sample_prediction(per_slice: pd.DataFrame, results: pd.DataFrame, images, truth, finetune_dir,
                      budget: str = "all"):
    """Image | ground truth | one prediction per initialisation, on the test slice of median IoU (the study's IoU
    per slice, model grid) of the initialisation with the best mean test IoU on the model grid
    (``results["test_iou_model_grid"]``; seed of its first run)."""
    from .inference import predict
    from .finetune import load_trained_model

    runs = results[results["budget"] == budget].sort_values(["init", "seed"])
    if runs.empty:
        runs = results.sort_values(["init", "seed"])
    best_init = runs.groupby("init")["test_iou_model_grid"].mean().idxmax()
    first = runs[runs["init"] == best_init].iloc[0]
    scores = per_slice[per_slice["run"] == first["name"]]["iou"].reset_index(drop=True).dropna()
    index = int(scores.index[np.argsort(scores.to_numpy(), kind="stable")[len(scores) // 2]])
    by_init = runs.groupby("init").first()
    fig, axes = plt.subplots(1, 2 + len(by_init), figsize=(2.6 * (2 + len(by_init)), 2.9))
    show_slice(axes[0], images[index], None, "image")
    show_slice(axes[1], images[index], truth[index], "ground truth")
    for ax, (init, run) in zip(axes[2:], by_init.iterrows()):
        pred = predict(load_trained_model(finetune_dir(run["name"])), images[index:index + 1])[0][0]
        show_slice(ax, images[index], pred, f"{init} ({run['name']})")
    fig.suptitle(f"test slice {index} (median IoU on the model grid of {best_init})", fontsize=10)
    fig.tight_layout()
    return Drawn(fig, f"Test slice {index} (the median by IoU of the best initialisation, {best_init}): the image, its "
                      f"ground truth and the prediction of each initialisation ({', '.join(by_init.index)}) overlaid (RV "
                      "red, MYO green, LV blue).")


# ------------------------------------------------------------------------------------------------------------
# figures with their alternative text
#
# A figure is shown through ``show_figure``, never by the inline backend: nbconvert's HTML template gives an
# ``image/png`` output no alt attribute (and warns), so the figure is shown as an HTML <img> with its alt text. A
# figure that one stage draws and another shows carries its alt text inside the PNG (the standard "Description"
# text chunk, written by ``save_figure``).

ALT_KEY = "Description"


def save_figure(fig, path, alt: str, dpi: int = 120):
    """Write ``fig`` as a PNG at ``path`` (atomically) with its alternative text ``alt`` stored in the file, and
    close it; returns ``path`` (for ``show_figure``). Every figure of the compendium is saved here (the report's
    through ``cmr_utils.figures.make_figure``)."""
    from .files import atomic_write

    alt = _checked_alt(alt, path)
    atomic_write(path, lambda temp: fig.savefig(temp, format="png", dpi=dpi, bbox_inches="tight",
                                                metadata={ALT_KEY: alt}))
    plt.close(fig)  # drawn and saved: JupyterLab's inline backend must not show it again without its alt text
    return path


def figure_alt(path) -> str | None:
    """The alternative text stored in a PNG by ``save_figure`` (None when it has none)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.info.get(ALT_KEY) or None


def figure_html(figure, alt: str | None = None, dpi: int = 120) -> str:
    """An HTML ``<img>`` of a matplotlib Figure, or of a PNG file, with alternative text.

    ``alt`` says what the figure shows (required for a Figure; for a file, the text stored in it by
    ``save_figure`` is used when ``alt`` is None). A Figure is closed once drawn, so that JupyterLab's inline
    backend does not show it a second time without its alt text.
    """
    import base64
    import html
    import io
    from pathlib import Path

    if isinstance(figure, (str, Path)):
        path = Path(figure)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such figure; the stage that draws it has not run")
        alt = alt if alt is not None else figure_alt(path)
        if alt is None:
            raise ValueError(f"{path}: no alternative text stored in the figure and none given; re-run the stage "
                             f"that draws it (figures are written with plots.save_figure)")
        png = path.read_bytes()
    else:
        alt = _checked_alt(alt, figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(figure)
        png = buffer.getvalue()
    alt = _checked_alt(alt, figure)
    data = base64.b64encode(png).decode("ascii")
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}" '
            f'style="max-width: 100%; height: auto;">')


def show_figure(figure, alt: str | None = None, dpi: int = 120) -> None:
    """Display a Figure or a PNG file with its alternative text (see ``figure_html``): nbconvert's HTML export
    keeps the alt text, which it cannot give an ``image/png`` output."""
    from IPython.display import HTML, display

    display(HTML(figure_html(figure, alt, dpi)))


def _checked_alt(alt, what) -> str:
    if not isinstance(alt, str) or len(alt.split()) < 4:
        raise ValueError(f"{what}: alternative text must say what the figure shows in words, got {alt!r}")
    return " ".join(alt.split())
