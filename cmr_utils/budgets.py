"""Label budgets as profiles write them: ``all``, a number of labelled slices (the study's ``150``) or a number of
labelled patients (``p3``: every slice of 3 training patients, as the semi-supervised ACDC benchmarks count), with
the ``-trained`` label of a slice budget whose encoder is trained (``150-trained``)."""
from __future__ import annotations


def patient_count(budget) -> int | None:
    """The number of labelled patients of a patient budget (``"p3"`` -> 3); ``None`` for ``all`` and slice budgets."""
    if isinstance(budget, str) and budget[:1] == "p" and budget[1:].isdigit() and int(budget[1:]) > 0:
        return int(budget[1:])
    return None


def budget_order(budget) -> tuple:
    """Sort key: patient budgets by patients, then slice budgets by slices (``-trained`` after its budget), ``all``
    last."""
    text = str(budget)
    k = patient_count(text)
    if k is not None:
        return (0, k, "")
    if text == "all":
        return (2, 0, "")
    number, _, rest = text.partition("-")
    return (1, int(number), rest) if number.isdigit() else (3, 0, text)


def budget_label(budget, freeze_below: int | None = None) -> str:
    """A budget in words for the report: ``p3`` -> "3 labelled patients"; ``150`` -> "150 slices with the encoder
    frozen" where the study's rule froze it (fewer than ``freeze_below`` slices); ``150-trained`` -> "150 slices with
    the encoder trained"; ``all`` -> "all labels"."""
    text = str(budget)
    k = patient_count(text)
    if k is not None:
        return f"{k} labelled patient{'s' if k > 1 else ''}"
    if text == "all":
        return "all labels"
    number, _, rest = text.partition("-")
    if not number.isdigit():
        return text
    if rest == "trained":
        return f"{number} slices with the encoder trained"
    frozen = freeze_below is not None and int(number) < freeze_below
    return f"{number} slices{' with the encoder frozen' if frozen else ''}"
