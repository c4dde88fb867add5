"""dvc.yaml's dependencies: each stage lists exactly the project modules its stage module
imports, so that `dvc repro` neither leaves a stale result nor redoes a stage for nothing."""
import ast
from pathlib import Path

import yaml

import weclip

ROOT = Path(__file__).resolve().parent.parent
# The module that holds each stage's logic (pipeline/flows.py and pipeline/cli.py only run
# and report it).
STAGE_MODULES = {"prepare": "pipeline.prepare", "cache": "pipeline.cache",
                 "train": "pipeline.train", "upper-bound": "pipeline.train",
                 "infer": "pipeline.infer", "evaluate": "pipeline.evaluate"}


def module_file(name: str) -> Path | None:
    """The project file of module ``name``, or None for a module outside the project."""
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(name: str) -> set[str]:
    """Project modules that ``name`` imports, at any depth and in any function, itself included
    (with the packages they sit in, whose __init__ runs first)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or module_file(current) is None:
            continue
        seen.add(current)
        parts = current.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        is_package = module_file(current).name == "__init__.py"
        package = parts if is_package else parts[:-1]
        for node in ast.walk(ast.parse(module_file(current).read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                todo.append(target)
                todo += [f"{target}.{_EXPORTS.get(target, {}).get(alias.name, alias.name)}"
                         for alias in node.names]
    return seen


# Names a package imports only when first used (PEP 562): the module each one comes from.
_EXPORTS = {"weclip": weclip._EXPORTS}


def covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT).as_posix()
    return any(relative == d or relative.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES)
    for stage, module in STAGE_MODULES.items():
        deps = [d for d in stages[stage]["deps"] if not d.startswith("$")]
        files = {module_file(m) for m in imported(module)}
        missing = sorted(str(f.relative_to(ROOT)) for f in files if not covered(f, deps))
        assert not missing, f"dvc.yaml: stage {stage} does not depend on {missing}"
        listed = [d for d in deps if d.endswith(".py")]
        extra = sorted(d for d in listed if ROOT / d not in files)
        assert not extra, f"dvc.yaml: stage {stage} depends on {extra}, which it does not import"


def test_the_import_walk_follows_relative_imports_and_packages():
    found = imported("pipeline.infer")
    assert {"pipeline.infer", "pipeline.distributed", "weclip", "weclip.crf",
            "weclip.model"} <= found
    assert "pipeline.train" not in found


def test_every_stage_is_named_as_the_command_it_runs():
    """One name per stage everywhere: the DVC stage, the `weclip` command, the Prefect flow
    and its tag `stage:<name>`."""
    from pipeline import cli

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    commands = {c.name or c.callback.__name__.replace("_", "-")
                for c in cli.app.registered_commands}
    for name, stage in stages.items():
        assert stage["cmd"].split()[:2] == ["weclip", name]
        assert name in commands
