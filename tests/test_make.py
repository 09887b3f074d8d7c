"""Make re-runs only what an edit touches: on a copy of the project, every target made up to date with `make -t`
(nothing runs), then one edit at a time, asked of Make with `-q` (is it up to date?) and `-n` (what would run?)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cmr_utils.paths import PROJ_ROOT

PAPERMILL = re.compile(r"-m papermill \S+/(\d\d_[a-z_]+)\.ipynb (\S+)\.tmp\.ipynb")


class Project:
    """A copy of the project's files (the venv linked) whose outputs live in ``out/``."""

    def __init__(self, tmp_path: Path):
        if shutil.which("make") is None or shutil.which("git") is None:
            pytest.skip("needs make and git")
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=PROJ_ROOT, capture_output=True, text=True)
        if listed.returncode:
            pytest.skip(f"not a git checkout: {listed.stderr.strip()}")
        self.root = tmp_path / "project"
        for name in filter(None, listed.stdout.split("\0")):
            if (PROJ_ROOT / name).is_file() and not name.startswith(".venv"):
                (self.root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(PROJ_ROOT / name, self.root / name)
        (self.root / ".venv").symlink_to((PROJ_ROOT / ".venv").resolve())
        # the venv is built (its .installed stamp, which Make would touch under -t, stays in the shared venv)
        self.installed = tmp_path / "installed"
        self.installed.touch()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        self.env.update(CMR_OUTPUT_ROOT=str(tmp_path / "out"), JOBS="1")

    def make(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["make", "--no-print-directory", *args, "PROFILE=default", f"STAMP={self.installed}"],
                              cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300)

    def touch_all(self) -> None:
        """Every target up to date, nothing run (`make -t`, which makes no folders: those made first)."""
        done = self.make("-n", "report")  # makes the plan
        assert done.returncode == 0, done.stderr
        for folder in (self.root / ".make" / "notebooks", Path(self.variables()["REPORTS_DIR"]) / "executed"):
            folder.mkdir(parents=True, exist_ok=True)
        done = self.make("-t", "report")
        assert done.returncode == 0, done.stderr
        assert self.up_to_date([f"{self.variables()['REPORTS_DIR']}/report.html"])  # nothing left to do

    def variables(self) -> dict[str, str]:
        plan = next((self.root / ".make").glob("plan-default-*.mk"))
        return dict(line.split(" := ", 1) for line in plan.read_text().splitlines())

    def targets(self) -> dict[str, list[str]]:
        """Every stage's executed notebooks: {stage: [paths]}."""
        v = self.variables()
        exe = f"{v['REPORTS_DIR']}/executed"
        return {"01": [f"{exe}/01_prepare_data.ipynb"],
                "02": [f"{exe}/02_pretrain-{m}.ipynb" for m in v["METHODS"].split()],
                "03": [f"{exe}/03_finetune-{r}.ipynb" for r in v["RUNS"].split()],
                "04": [f"{exe}/04_evaluate.ipynb"], "05": [f"{exe}/05_explain.ipynb"], "06": [f"{exe}/06_report.ipynb"]}

    def up_to_date(self, paths: list[str]) -> bool:
        done = self.make("-q", *paths)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode == 0

    def would_run(self) -> set[str]:
        """The executed notebooks `make report` would write now (from `make -n`)."""
        done = self.make("-n", "report")
        assert done.returncode == 0, done.stderr
        return {m.group(2) for m in PAPERMILL.finditer(done.stdout)}

    def edit(self, name: str, old: str | None = None, new: str | None = None) -> None:
        """Replace ``old`` by ``new`` in file ``name`` (once, as a regular expression), or add a comment line."""
        path = self.root / name
        text = path.read_text()
        if old is None:
            path.write_text(text + "# an edit\n")
            return
        changed, n = re.subn(old, new, text, count=1, flags=re.M)
        assert n == 1 and changed != text, (name, old)
        path.write_text(changed)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return Project(tmp_path_factory.mktemp("make"))


def test_edits_that_touch_no_model_leave_every_run_up_to_date(project):
    """A docstring of the viewer or the report, and the number of slices explained: no fine-tuning run re-runs;
    the explanation (and the report) do."""
    project.touch_all()
    project.edit("cmr_utils/viewer.py")
    project.edit("cmr_utils/report.py")
    project.edit("params/default.yaml", r"^(\s*max_slices:) *(\d+)", r"\g<1> 7")
    t = project.targets()
    assert len(t["03"]) == 4 * (1 + 2) and len(t["02"]) == 2  # every init: all labels with one seed, 60 with two
    assert project.up_to_date(t["01"] + t["02"] + t["03"])
    assert project.up_to_date(t["04"])  # the evaluation reads no explain.* and neither module
    assert not project.up_to_date(t["05"]) and not project.up_to_date(t["06"])
    assert project.would_run() == set(t["05"] + t["06"])


def test_a_fine_tuning_parameter_reruns_fine_tuning_and_what_follows(project):
    project.touch_all()
    project.edit("params/default.yaml", r"^(\s*lr:) *\S+", r"\g<1> 2.0e-3")
    t = project.targets()
    assert project.up_to_date(t["01"] + t["02"])
    assert project.would_run() == set(t["03"] + t["04"] + t["05"] + t["06"])


def test_the_fine_tuning_module_reruns_fine_tuning_and_what_follows(project):
    project.touch_all()
    project.edit("cmr_utils/finetune.py")
    t = project.targets()
    assert project.up_to_date(t["01"] + t["02"])
    assert project.would_run() == set(t["03"] + t["04"] + t["05"] + t["06"])


def test_a_new_seed_trains_only_its_runs_and_a_method_block_only_its_method(project):
    """The lists that name the runs (finetune.seeds) are the plan's: runs already made stay up to date; a method's
    own block (pretrain.swav) re-runs that method's pretraining and the runs it initialises, not simsiam's."""
    project.touch_all()
    project.edit("params/default.yaml", r"^(\s*seeds:) *\[0, 1\]", r"\g<1> [0, 1, 2]")
    project.edit("params/default.yaml", r"^(\s*)seed: 0\nfinetune:", r"\g<1>seed: 0\n\g<1>swav: {lr: 2.0e-3}\nfinetune:")
    run = project.would_run()  # (the plan made again: its runs are read below)
    t = project.targets()
    new = {p for p in t["03"] if p.endswith("-s2.ipynb")} | {p for p in t["02"] + t["03"] if "-swav" in p}
    assert len(new) == 4 + 3 + 1  # seed 2 of each init's 60-slice runs (the all-label runs keep seeds_all), swav's
    # other three runs, swav's pretraining
    assert project.up_to_date(t["01"] + sorted(set(t["02"] + t["03"]) - new))
    assert run == new | set(t["04"] + t["05"] + t["06"])


def test_each_stage_lists_the_parameter_sections_its_notebook_reads():
    """Every params["<section>"] of a notebook is among its stage's stamps (profile: all of them); the notebooks of
    one run (02, 03) never read the lists that name the runs, which their stamps leave out."""
    from cmr_utils.dependencies import STAGE_PARAMETERS, SWEEP_KEYS, stages
    from cmr_utils.paths import NOTEBOOKS_DIR

    assert set(STAGE_PARAMETERS) == set(stages())
    for stage, stamps in STAGE_PARAMETERS.items():
        text = (NOTEBOOKS_DIR / f"{stage}.py").read_text()
        read = set(re.findall(r"""params\[["'](\w+)["']\]""", text))
        assert read, stage
        covered = {s.split("-")[0] for s in stamps}
        assert "profile" in covered or read <= covered, (stage, read - covered)
        if stage in ("02_pretrain", "03_finetune"):
            keys = {k for ks in SWEEP_KEYS.values() for k in ks}
            assert not {k for k in keys if re.search(rf"""\[["']{k}["']\]""", text)}, stage


def test_a_stage_depends_on_the_producers_of_the_figures_it_makes_and_no_others():
    """``figures.make(ws, "<file>", ...)`` runs the file's registered producer (named, not imported, by the
    registry): stage 01 depends on plots.py (data_samples.png) but not on the evaluation's tables, stage 04 on them."""
    from cmr_utils.dependencies import modules_of
    from cmr_utils.paths import NOTEBOOKS_DIR

    def modules(stage):
        return {p.relative_to(PROJ_ROOT).as_posix() for p in modules_of(NOTEBOOKS_DIR / f"{stage}.py")}

    prepare, pretrain, evaluate = modules("01_prepare_data"), modules("02_pretrain"), modules("04_evaluate")
    assert {"cmr_utils/plots.py", "cmr_utils/figures.py", "cmr_utils/prepare.py"} <= prepare
    assert not {"cmr_utils/tables.py", "cmr_utils/evaluate.py", "cmr_utils/report.py", "cmr_utils/viewer.py",
                "cmr_utils/explain/views.py"} & (prepare | pretrain)
    assert {"cmr_utils/tables.py", "cmr_utils/label_efficiency.py", "cmr_utils/framing.py"} <= evaluate
