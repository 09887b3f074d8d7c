"""What each stage depends on, so that Make re-runs only what an edit touches.

A stage's targets depend on the stages before it, on its notebook, on the package modules the notebook imports
(found by reading the import statements of the notebook and then of each module, transitively: ``modules_of``)
and on the parameters the stage reads (``STAGE_PARAMETERS``). Each group of parameters is a small JSON file, a
*stamp*, under the workspace's ``runs/.../params/``, rewritten only when its content changes (``write_stamps``),
so an edit of ``explain.max_slices`` touches ``explain.json`` and ``profile.json`` and nothing a fine-tuning run
depends on. Make writes the stamps each time it reads the Makefile, before it decides anything, so that
``make -n``, ``-q`` and ``-t`` see the same graph as ``make``.

``python -m cmr_utils.dependencies --profile P --make`` prints the Make variables (the Makefile includes them):
``MODULES_<stage>`` (module files, relative to the project), ``PARAMETERS_<stage>`` (stamp names) and
``PROFILE_FILES`` (the profile's file and those it extends). ``--stamps FOLDER`` writes the stamps.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
from pathlib import Path

from .params import SCHEMA, read_profile
from .paths import NOTEBOOKS_DIR, PROJ_ROOT

PACKAGE = "cmr_utils"

# The lists that say which runs exist (the plan reads them); a run is named by its own method, or init, budget and seed,
# so adding a seed or a method trains only the new runs.
SWEEP_KEYS = {"pretrain": ("methods",), "finetune": ("inits", "budgets", "seeds")}

# The parameter stamps each stage's notebook reads, directly or through the package (plan_runs reads data and
# finetune); tests/test_dependencies.py checks each notebook's params["..."] against this.
#   <section>            a section of the profile, whole
#   pretrain-%           one pretraining run: the pretrain section less its method list and the other methods' blocks
#   finetune-run         one fine-tuning run: the finetune section less its lists of inits, budgets and seeds
#   profile              the whole profile;  study: the study's protocol (params/paper.yaml), which 06 compares with
STAGE_PARAMETERS = {
    "01_prepare_data": ("data",),
    "02_pretrain": ("pretrain-%", "trainer"),
    "03_finetune": ("data", "finetune-run", "evaluate", "trainer"),  # evaluate: the test-time flips plans.json records
    "04_evaluate": ("data", "pretrain", "finetune", "evaluate", "trainer"),
    "05_explain": ("profile",),
    "06_report": ("profile", "study"),
}


# ------------------------------------------------------------------------------------------ modules
def module_file(name: str) -> Path | None:
    """The file of module ``name`` (``cmr_utils.ssl`` -> cmr_utils/ssl/__init__.py) or None if there is none."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = PROJ_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJ_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


class _Module:
    """One parsed file: its top-level functions and classes (a node each), its import-time code (node None: every
    other statement, and the decorators, defaults and bases of the functions and classes) and the names it imports."""

    def __init__(self, path: Path, name: str | None):
        self.path, self.name = path, name
        self.package = (name if path.name == "__init__.py" else name.rpartition(".")[0]) if name else ""
        tree = ast.parse(path.read_text(), filename=str(path))
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        self.defs = {n.name: n for n in tree.body if isinstance(n, kinds)}
        self.top = [n for n in tree.body if not isinstance(n, kinds)]
        for node in self.defs.values():
            self.top += node.decorator_list
            if isinstance(node, ast.ClassDef):
                self.top += node.bases + [k.value for k in node.keywords]
            else:
                self.top += [d for d in node.args.defaults + node.args.kw_defaults if d is not None]
        self.aliases: dict[str, tuple[str, str | None]] = {}  # local name -> (module, its name, or None: the module)
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.aliases.update(self._imports(node)[0])

    def _imports(self, node) -> tuple[dict[str, tuple[str, str | None]], set[str]]:
        """``({local name: (module, name or None)}, {modules it runs})`` of one import statement, the package's only."""
        aliases, runs = {}, set()
        if isinstance(node, ast.Import):
            for a in node.names:
                if module_file(a.name):
                    runs.add(a.name)
                    aliases[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
            return aliases, runs
        if node.level:
            if not self.name:
                return aliases, runs
            parts = self.package.split(".")
            module = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module_file(module):
            runs.add(module)
            for a in node.names:
                sub = f"{module}.{a.name}"
                if module_file(sub):
                    runs.add(sub)
                aliases[a.asname or a.name] = (sub, None) if module_file(sub) else (module, a.name)
        return aliases, runs

    def refers(self, node: str | None) -> set[tuple[str, str | None]]:
        """The nodes ``(module, name)`` that node ``node`` of this module reaches: the modules its imports run (their
        import-time code, name None), the package's functions and classes it names, directly or as a module's
        attribute (``plots.loss_curves``), and a whole module (name ``*``) it uses otherwise."""
        trees = self.top if node is None else [self.defs[node]]
        aliases = dict(self.aliases)
        found: set[tuple[str, str | None]] = set()
        walked = [sub for tree in trees for sub in ast.walk(tree)]
        for sub in walked:
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                imported, runs = self._imports(sub)
                aliases.update(imported)
                found.update((m, None) for m in runs)
        bases = set()
        for sub in walked:
            if isinstance(sub, ast.Attribute):
                chain, base = [sub.attr], sub.value
                while isinstance(base, ast.Attribute):
                    chain.insert(0, base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases and aliases[base.id][1] is None:
                    bases.add(id(base))
                    module = aliases[base.id][0]
                    for attr in chain:  # through submodules: cmr_utils.ssl.swav.SwAVModule
                        if not module_file(f"{module}.{attr}"):
                            found.add((module, attr))
                            break
                        module = f"{module}.{attr}"
                        found.add((module, None))
        for sub in walked:  # figures.make(ws, "<file>", ...) runs the file's producer, figures.show its view
            found.update(_registered_functions(sub, aliases))
        for sub in walked:
            if isinstance(sub, ast.Name) and id(sub) not in bases:
                if sub.id in aliases:
                    module, name = aliases[sub.id]
                    found.add((module, "*" if name is None else name))
                elif self.name and sub.id in self.defs:
                    found.add((self.name, sub.id))
        return found


FIGURES = f"{PACKAGE}.figures"


def _registered_functions(node, aliases) -> set[tuple[str, str]]:
    """The producer (``make``) or table view (``show``) that a call ``figures.make(ws, "<file>", ...)`` or
    ``figures.show(ws, "<file>")`` runs, through the registry of ``cmr_utils.figures`` (which names them, not imports
    them); an f-string file name matches its family (``f"pretrain_loss_{method}.png"``)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and len(node.args) >= 2
            and node.func.attr in ("make", "show") and isinstance(node.func.value, ast.Name)
            and aliases.get(node.func.value.id) == (FIGURES, None)):
        return set()
    arg = node.args[1]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        name = arg.value
    elif isinstance(arg, ast.JoinedStr):
        name = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in arg.values)
    else:
        return set()
    from .figures import REPORT_ITEMS

    same = re.compile(r"\{\w*\}")
    entries = [i for i in REPORT_ITEMS if i.name == name] or [
        i for i in REPORT_ITEMS if same.sub("{}", i.name) == name or ("{}" not in name and i.fields(name) is not None)]
    found = set()
    for entry in entries:
        dotted = entry.producer if node.func.attr == "make" else entry.view
        if dotted and dotted.startswith(PACKAGE + "."):
            module, _, function = dotted.rpartition(".")
            found.add((module, function))
    return found


def modules_of(path: Path, parsed: dict | None = None) -> list[Path]:
    """The package's module files that running ``path`` (a notebook, or a module run whole) may execute, sorted: its
    imports followed name by name, transitively. A module counts when any of its functions or classes is reached
    (and then its import-time code and its parent packages' too): the functions a stage never calls do not bring
    in what they import."""
    path = Path(path).resolve()
    inside = path.is_relative_to(PROJ_ROOT / PACKAGE)
    parsed = {} if parsed is None else parsed  # {module name: _Module}, shared by the calls of one run
    parsed.pop(None, None)

    def module(name):
        if name not in parsed:
            parsed[name] = _Module(module_file(name) if name else path, name)
        return parsed[name]

    start = _module_name(path) if inside else None
    todo: list[tuple[str | None, str | None]] = [(start, "*")]
    seen: set = set()
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.add(key)
        name, node = key
        if node == "*":  # the whole module
            todo += [(name, None)] + [(name, d) for d in module(name).defs]
            continue
        mod = module(name)
        if node is not None and node not in mod.defs:
            if node in mod.aliases:  # a name the module imports: ``from .registry import get_method`` in ssl/__init__
                target, inner = mod.aliases[node]
                todo.append((target, "*" if inner is None else inner))
            node = None  # and a name assigned at import time is the module's import-time code
        if name:
            parts = name.split(".")
            todo += [(".".join(parts[:k]), None) for k in range(1, len(parts) + 1)]  # parent packages' __init__
        todo += sorted(mod.refers(node), key=str)
    return sorted({parsed[n].path for n, _ in seen if n} | ({path} if inside else set()))


def stages() -> list[str]:
    """The stages: the notebooks' names (``01_prepare_data`` ...), in order."""
    return sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


# ------------------------------------------------------------------------------------------ parameters
def parameter_stamps(params: dict, study: dict) -> dict[str, object]:
    """``{stamp name: content}`` of a profile's merged parameters (``read_profile``): every section, each pretraining
    method's (``pretrain-<method>``), one fine-tuning run's (``finetune-run``), the whole profile and the study's."""
    stamps: dict[str, object] = {name: value for name, value in params.items()}
    pretrain = params.get("pretrain") or {}
    common = {k: v for k, v in pretrain.items() if k in SCHEMA["pretrain"] and k not in SWEEP_KEYS["pretrain"]}
    for method in pretrain.get("methods") or []:
        stamps[f"pretrain-{method}"] = {**common, **({method: pretrain[method]} if method in pretrain else {})}
    finetune = params.get("finetune") or {}
    stamps["finetune-run"] = {k: v for k, v in finetune.items() if k not in SWEEP_KEYS["finetune"]}
    stamps["profile"] = params
    stamps["study"] = study
    return stamps


def write_if_different(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` (atomically) unless it already holds it, so that its time changes only with it."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def write_stamps(profile: str, folder: Path) -> list[str]:
    """Write the stamps of ``profile`` into ``folder`` (``<name>.json``), each only where its content changed; return
    the names rewritten."""
    params, _ = read_profile(profile)
    study, _ = read_profile("paper")
    changed = []
    for name, content in parameter_stamps(params, study).items():
        if write_if_different(Path(folder) / f"{name}.json", json.dumps(content, sort_keys=True, indent=1) + "\n"):
            changed.append(name)
    return changed


# ------------------------------------------------------------------------------------------ Make
def make_variables(profile: str) -> str:
    """The Make variables of the stages' prerequisites (paths relative to the project root)."""
    def rel(paths):
        return " ".join(str(p.relative_to(PROJ_ROOT)) for p in paths)

    _, files = read_profile(profile)
    parsed: dict = {}
    lines = [f"PROFILE_FILES := {rel(files)}",
             f"MODULES_plan := {rel(modules_of(PROJ_ROOT / PACKAGE / 'plan.py', parsed))}"]
    for stage in stages():
        lines.append(f"MODULES_{stage} := {rel(modules_of(NOTEBOOKS_DIR / f'{stage}.py', parsed))}")
        if stage not in STAGE_PARAMETERS:
            raise ValueError(f"notebooks/{stage}.py: a stage without an entry in STAGE_PARAMETERS "
                             f"(cmr_utils/dependencies.py): say which parameters it reads")
        lines.append(f"PARAMETERS_{stage} := {' '.join(STAGE_PARAMETERS[stage])}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--make", action="store_true", help="print the Make variables")
    parser.add_argument("--stamps", metavar="FOLDER", help="write the parameter stamps into FOLDER")
    args = parser.parse_args(argv)
    try:
        if args.stamps:
            write_stamps(args.profile, Path(args.stamps))
        if args.make:
            sys.stdout.write(make_variables(args.profile))
    except (ValueError, SyntaxError) as err:  # ParameterError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
