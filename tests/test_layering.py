"""The layers hold: no import circle among cortexcraft/, tasks/ and flows/ (imports inside functions
included), the library works without Prefect, only the Hugging Face modules import transformers,
and each stage's cache key covers exactly the code that stage runs."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.stage import code_modules

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("cortexcraft", "tasks", "flows")
HF_MODULES = {"cortexcraft.pretrained", "cortexcraft.export"}


def module_files(root: Path = REPO) -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function: project modules by name
    (``from cortexcraft import registry`` is the module cortexcraft.registry), others by their top name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {node.module})
    return {name if name in known else name.split(".")[0] for name in found}


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, set(files)) & set(files) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return path[path.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_among_the_packages_lazy_imports_included():
    graph = import_graph()
    assert "cortexcraft.train" in graph and "cortexcraft.tokenizer" in graph["cortexcraft.parts"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_library_never_imports_prefect_tasks_or_flows():
    for name, imported in import_graph().items():
        if name.startswith("cortexcraft"):
            assert not {m for m in imported if m.split(".")[0] in ("tasks", "flows")}, name
    files = module_files()
    for name, path in files.items():
        if name.startswith("cortexcraft"):
            assert "prefect" not in imports_of(path, set(files)), name


def test_every_library_module_imports_with_prefect_blocked():
    library = [name for name in module_files() if name.split(".")[0] == "cortexcraft" and not name.endswith("__main__")]
    code = ("import importlib, sys\nsys.modules['prefect'] = None\n"
            f"for name in {library!r}:\n    importlib.import_module(name)\n"
            "print('imported', len(sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_only_the_hugging_face_modules_import_transformers():
    files = module_files()
    importers = {name for name, path in files.items() if "transformers" in imports_of(path, set(files))}
    assert importers and importers <= HF_MODULES, importers
    # The library CLI, and everything but the export command, work without transformers installed.
    code = ("import sys\nsys.modules['transformers'] = None\n"
            "from cortexcraft.cli import main\nsys.exit(main(['presets']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "shakespeare-char" in result.stdout, result.stderr[-2000:]


# What each stage must never run: training, model, report or export code before training;
# report or export code in training.
NEVER = {
    "download": {"cortexcraft.tokenizer", "cortexcraft.shards", "cortexcraft.train", "cortexcraft.model",
                 "cortexcraft.threads"},
    "vocab": {"cortexcraft.train", "cortexcraft.model", "cortexcraft.report", "cortexcraft.export",
              "cortexcraft.checkpoint", "cortexcraft.evaluate", "cortexcraft.generate", "cortexcraft.optim",
              "cortexcraft.threads"},
    "shards": {"cortexcraft.train", "cortexcraft.model", "cortexcraft.report", "cortexcraft.export",
               "cortexcraft.pretrained", "cortexcraft.checkpoint", "cortexcraft.generate", "cortexcraft.threads"},
    "train": {"cortexcraft.report", "cortexcraft.export", "cortexcraft.markdown", "cortexcraft.generate",
              "cortexcraft.registry"},
    "report": {"cortexcraft.export", "cortexcraft.train", "cortexcraft.optim"},
}
MUST = {
    "download": {"cortexcraft.sources"},
    "vocab": {"cortexcraft.tokenizer", "cortexcraft.sources", "cortexcraft.pretrained"},
    "shards": {"cortexcraft.shards", "cortexcraft.parts", "cortexcraft.tokenizer"},
    "train": {"cortexcraft.train", "cortexcraft.model", "cortexcraft.optim", "cortexcraft.evaluate"},
    "report": {"cortexcraft.report", "cortexcraft.generate", "cortexcraft.markdown"},
}


@pytest.mark.parametrize("stage", list(NEVER))
def test_a_stage_key_covers_the_code_it_runs_and_nothing_downstream(stage):
    modules = set(code_modules(f"tasks.{stage}"))
    assert MUST[stage] <= modules
    assert not modules & NEVER[stage], sorted(modules & NEVER[stage])


KEYS_PROBE = """
import json, sys
from tasks.stage import code_version
print(json.dumps({stage: code_version(f"tasks.{stage}") for stage in sys.argv[1:]}))
"""


def stage_code_versions(src: Path) -> dict[str, str]:
    """The code part of every stage key, computed by the copy of the project in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run([sys.executable, "-c", KEYS_PROBE, *NEVER], cwd=src, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    return json.loads(result.stdout)


def copy_project(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize("edited, changed", [
    ("cortexcraft/report.py", {"report"}),
    ("cortexcraft/export.py", set()),
    ("cortexcraft/train.py", {"train"}),
    ("cortexcraft/optim.py", {"train"}),
    ("cortexcraft/generate.py", {"report"}),
    ("cortexcraft/model.py", {"train", "report"}),
    ("cortexcraft/tokenizer.py", {"vocab", "shards", "train", "report"}),
    ("cortexcraft/shards.py", {"vocab", "shards", "train"}),
    ("cortexcraft/sources.py", {"download", "vocab", "shards", "train", "report"}),
    ("tasks/vocab.py", {"vocab"}),
])
def test_editing_code_changes_exactly_the_keys_of_the_stages_that_run_it(tmp_path, edited, changed):
    src = copy_project(tmp_path / "src")
    before = stage_code_versions(src)
    with open(src / edited, "a", encoding="utf-8") as handle:
        handle.write("\n# a comment is not code: no key changes\n")
    assert stage_code_versions(src) == before
    with open(src / edited, "a", encoding="utf-8") as handle:
        handle.write("\nEDITED_BY_TEST = True\n")
    after = stage_code_versions(src)
    assert {stage for stage in before if before[stage] != after[stage]} == changed
