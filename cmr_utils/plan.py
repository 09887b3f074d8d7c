"""The study's plan for one (profile, data): which runs exist and where they live.

``python -m cmr_utils.plan --profile default --data "" --make`` prints Make variables; the Makefile
includes them, so the sweep's targets come from the parameter file and from ``cmr_utils.paths``.

**Label budgets the data cannot hold are dropped when the plan is made.** Before any stage runs, the plan
counts the slices the training split will have, without preparing data: the labelled (first) source's
patients are split exactly as stage 01 splits them (``cmr_utils.prepare.split_patients`` with the profile's
``data.split`` and the source's pathology groups), and each training patient contributes the Z of its
labelled volumes (ACDC: ED + ES), read from file headers / HDF5 shapes only (``Source.n_slices``). Then:

* a numeric budget **greater than or equal to** that count is dropped from the sweep (it would be the same
  slices as ``all``, or more than there are), with one line on stderr::

      plan: budget 1200 dropped: the training split of <folder> has 1020 slices (<= 1200: the budget would be
      'all' or more); budgets kept: all, 700, 500, 150

  (several dropped budgets share one line: ``plan: budgets 2000, 1200 dropped: ...``). A sweep left with
  ``all`` only is fine; a sweep left with no budget at all is an error.
* a kept budget smaller than ``finetune.batch_size_budget`` is kept, with a note on stderr: stage 03's loader
  (``cmr_utils.finetune.train_segmentation``) drops the last, short batch only when the budget is larger
  than the batch size, so such a run trains on one batch of all its slices per epoch (a budget larger than
  the batch size trains on ``budget // batch`` full batches per epoch, a different remainder left out each
  epoch).

Every caller gets the same list from the same function: the Makefile (through ``make_variables``) and the
notebooks call ``plan_runs(profile, data)``. Nothing is cached here: each call re-reads the headers (well
under a second for ACDC's 80 patients). With an empty ``data`` the built-in phantom is generated on first
use (``cmr_utils.prepare.data_sources``), as stage 01 would.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .budgets import patient_count
from .params import load_profile
from .paths import run_name, workspace


def kept_budgets(budgets: list, n_train_slices: int | None, n_train_patients: int | None = None) -> tuple[list, list]:
    """``(kept, dropped)``: slice budgets ``>= n_train_slices`` and patient budgets ``>= n_train_patients`` are
    dropped; ``all`` is always kept."""
    if n_train_slices is None:
        return list(budgets), []

    def fits(b):
        if b == "all":
            return True
        k = patient_count(b)
        return b < n_train_slices if k is None else n_train_patients is None or k < n_train_patients

    kept = [b for b in budgets if fits(b)]
    return kept, [b for b in budgets if b not in kept]


def finetune_runs(params: dict, n_train_slices: int | None = None, n_train_patients: int | None = None) -> list[dict]:
    """Every fine-tuning run of the sweep: init x budget (and its ``-trained`` variant, see ``budget_variants``)
    x seed (``finetune.seeds_all`` for the all-label runs, ``finetune.seeds`` for the others). ``slices`` names the
    run's labelled slices (``cmr_utils.finetune.sample_budgets``' key): a ``150-trained`` run trains on the slices of
    ``150`` of its seed, so the two are paired.

    With ``n_train_slices`` (the training split's slice count), the budgets the data cannot hold are left out
    (see the module docstring); without it, every budget of the profile is listed. The study's runs come from
    ``plan_runs(profile, data)``, which passes the count.
    """
    ft = params["finetune"]
    budgets, _ = kept_budgets(ft["budgets"], n_train_slices, n_train_patients)
    return [{"init": i, "budget": label, "seed": s, "name": run_name(i, label, s), "slices": str(b),
             "encoder": encoder}
            for i in ft["inits"] for b in budgets for label, encoder in budget_variants(b, ft)
            for s in (ft["seeds_all"] if b == "all" else ft["seeds"])]


TRAINED = "-trained"  # the budget label of a run below freeze_below whose encoder is trained, e.g. ``150-trained``


def budget_variants(budget, ft: dict) -> list[tuple[str, str]]:
    """``(budget label, encoder)`` of the runs of one budget: ``encoder`` is ``rule`` (frozen below
    ``finetune.freeze_below`` slices, as in the study) or ``trained`` (the ``<budget>-trained`` run that
    ``budgets_below_freeze: frozen_and_trained`` adds: the same slices, the encoder trained). A patient budget
    (``p3``: every slice of 3 training patients, as the semi-supervised benchmarks count labels) always trains the
    encoder."""
    if patient_count(budget) is not None:
        return [(budget, "trained")]
    out = [(str(budget), "rule")]
    if budget != "all" and budget < ft["freeze_below"] and ft["budgets_below_freeze"] == "frozen_and_trained":
        out.append((f"{budget}{TRAINED}", "trained"))
    return out


def train_counts(source, fractions: tuple[float, float, float], seed: int) -> tuple[int, int]:
    """(slices, patients) of the training split that stage 01 (``prepare_dataset``) will write for ``source``."""
    from .prepare import split_patients

    patients = source.patients()
    split = split_patients(patients, fractions, seed, {p: source.group(p) for p in patients})
    return sum(source.n_slices(p) for p in split["train"]), len(split["train"])


def external_sources(external: str | None) -> dict:
    """``EXTERNAL=`` (comma-separated labelled folders, any layout) -> ``{dataset name: source}``; the name is
    the folder's (``<name>-2`` ... where two folders share one)."""
    from .paths import parse_data
    from .readers import open_source

    out: dict = {}
    for folder in parse_data(external, "EXTERNAL"):
        name, n = folder.name, 1
        while name in out:
            n += 1
            name = f"{folder.name}-{n}"
        out[name] = open_source(folder)
    return out


@dataclass(frozen=True)
class Plan:
    """The runs of one (profile, data), with what was dropped and why."""

    profile: str
    data: str
    folder: Path  # the labelled source
    n_train_slices: int
    budgets: list  # kept, in the profile's order
    dropped: list  # numeric budgets >= n_train_slices
    runs: list[dict]
    messages: list[str] = field(default_factory=list)  # the lines the plan prints to stderr
    external: dict[str, str] = field(default_factory=dict)  # EXTERNAL=: {dataset name: layout}

    def refuse(self, run: str) -> str:
        """Why ``run`` is not in the plan (for stage 03's error)."""
        why = "".join(f"; {m.removeprefix('plan: ')}" for m in self.messages if " dropped: " in m)
        return (f"run {run!r} is not in the plan of profile {self.profile!r} on {self.folder}{why}; "
                f"expected one of {sorted(r['name'] for r in self.runs)}")


def plan_runs(profile: str, data: str | None = "", external: str | None = "") -> Plan:
    """The plan the Makefile and the notebooks share: every run whose budget the data can hold; ``external``
    (``EXTERNAL=``, labelled folders that stage 04 also scores every run on) is checked here, before any stage
    runs: each folder must hold a known layout."""
    from .prepare import data_sources

    params = load_profile(profile)
    ft = params["finetune"]
    split = params["data"]["split"]
    labelled = data_sources(data, params["data"]["phantom"])[0]
    n_train, n_patients = train_counts(labelled, (split["train"], split["val"], split["test"]), split["seed"])
    budgets, dropped = kept_budgets(ft["budgets"], n_train, n_patients)
    messages = []
    if dropped:
        nums = ", ".join(str(b) for b in dropped)
        slices = [b for b in dropped if patient_count(b) is None]
        holds = (f"{n_train} slices (<= {min(slices)}" if slices else f"{n_patients} patients (<= "
                 f"{min(map(patient_count, dropped))}") + ": the budget would be 'all' or more"
        messages.append(f"plan: budget{'s' if len(dropped) > 1 else ''} {nums} dropped: the training split of "
                        f"{labelled.folder} has {holds}); budgets kept: {', '.join(map(str, budgets)) or 'none'}")
    if not budgets:
        raise ValueError(f"profile {profile!r}: no label budget left for {labelled.folder} ({n_train} training "
                         f"slices): every budget of finetune.budgets {ft['budgets']} is >= {n_train}; "
                         f"add 'all' or a smaller budget")
    small = [b for b in budgets if b != "all" and patient_count(b) is None and b < ft["batch_size_budget"]]
    if small:
        messages.append(f"plan: note: budget{'s' if len(small) > 1 else ''} {', '.join(map(str, small))} "
                        f"below finetune.batch_size_budget {ft['batch_size_budget']}: such a run trains on one "
                        f"batch of all its slices per epoch")
    external_layouts = {name: source.layout for name, source in external_sources(external).items()}
    if external_layouts:
        messages.append("plan: external validation on " + ", ".join(f"{name} ({layout})" for name, layout
                                                                     in external_layouts.items()))
    return Plan(profile, data or "", labelled.folder, n_train, budgets, dropped,
                finetune_runs(params, n_train, n_patients), messages, external_layouts)


def make_variables(profile: str, data: str, plan: Plan | None = None, external: str = "") -> str:
    params = load_profile(profile)
    ws = workspace(profile, data)
    plan = plan or plan_runs(profile, data, external)
    lines = [
        f"TAG := {ws.tag}",
        f"OUTPUT_ROOT := {ws.root}",
        f"RUNS_DIR := {ws.runs}",
        f"REPORTS_DIR := {ws.reports}",
        f"METHODS := {' '.join(params['pretrain']['methods'])}",
        f"N_TRAIN_SLICES := {plan.n_train_slices}",
        f"BUDGETS := {' '.join(map(str, plan.budgets))}",
        f"RUNS := {' '.join(r['name'] for r in plan.runs)}",
        f"EXTERNAL_SETS := {' '.join(plan.external)}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", default="")
    parser.add_argument("--external", default="", help="EXTERNAL=: labelled folders for external validation")
    parser.add_argument("--make", action="store_true", help="print Make variables")
    args = parser.parse_args(argv)
    try:
        plan = plan_runs(args.profile, args.data, args.external)
        text = make_variables(args.profile, args.data, plan, args.external)
    except (ValueError, FileNotFoundError) as err:  # DataError and ParameterError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    for message in plan.messages:
        print(message, file=sys.stderr)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
