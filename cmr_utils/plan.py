"""The study's plan for one (profile, data): which runs exist and where they live.

``python -m cmr_utils.plan --profile default --data "" --make`` prints Make variables; the Makefile
includes them, so the sweep's targets come from the parameter file and from ``cmr_utils.paths``.
"""
from __future__ import annotations

import argparse
import sys

from .params import load_profile
from .paths import run_name, workspace


def finetune_runs(params: dict) -> list[dict]:
    """Every fine-tuning run of the sweep: init x budget x seed."""
    ft = params["finetune"]
    return [{"init": i, "budget": str(b), "seed": s, "name": run_name(i, b, s)}
            for i in ft["inits"] for b in ft["budgets"] for s in ft["seeds"]]


def make_variables(profile: str, data: str) -> str:
    params = load_profile(profile)
    ws = workspace(profile, data)
    runs = finetune_runs(params)
    lines = [
        f"TAG := {ws.tag}",
        f"OUTPUT_ROOT := {ws.root}",
        f"RUNS_DIR := {ws.runs}",
        f"REPORTS_DIR := {ws.reports}",
        f"METHODS := {' '.join(params['pretrain']['methods'])}",
        f"RUNS := {' '.join(r['name'] for r in runs)}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", default="")
    parser.add_argument("--make", action="store_true", help="print Make variables")
    args = parser.parse_args(argv)
    try:
        text = make_variables(args.profile, args.data)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
