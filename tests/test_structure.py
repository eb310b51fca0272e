"""The package's shape: no import cycle between its modules (lazy imports inside functions included), and the
linter clean (ruff, configured in pyproject.toml) where it is installed."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SRC = ROOT / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: Path, modules: dict) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collm"):
            for alias in node.names:  # `from collm.evaluation import plots` imports a module
                full = f"{node.module}.{alias.name}"
                found.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("collm")}
    return {m for m in found if m in modules}


def test_no_module_imports_itself_back_through_others():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        seen[name] = 1
        for dep in sorted(graph[name]):
            if seen.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in seen:
                visit(dep, path + [dep])
        seen[name] = 2

    for name in sorted(graph):
        if name not in seen:
            visit(name, [name])


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed (scripts/install.sh --test)")
def test_ruff_finds_nothing():
    run = subprocess.run(["ruff", "check", "src", "tests", "research", "bench"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.parametrize("command, configs", [
    ("train", ["collm.training.train:TrainConfig"]), ("reward", ["collm.training.reward:RewardConfig"]),
    ("score", ["collm.training.score:ScoreConfig"]),
    ("serve", ["collm.pair:PairSpec", "collm.serve.serving:ServeConfig"]),
    ("eval", ["collm.evaluation.evaluate:EvalRun", "collm.evaluation.evaluate:EvalConfig"]),
    ("calibrate", ["collm.evaluation.calibrate:CalibrateRun", "collm.evaluation.calibrate:CalibrateConfig"]),
    ("demo", ["collm.demo.command:DemoConfig"]),
    ("bench", ["collm.evaluation.bench:BenchConfig", "collm.evaluation.bench:BenchOutput"]),
    ("data gsm", ["collm.cli:DataOut", "collm.data.gsm:GsmConfig"]),
    ("data arithmetic", ["collm.cli:DataOut", "collm.data.arithmetic:ArithmeticConfig"]),
    ("data calc", ["collm.cli:DataOut", "collm.training.expert:CalcConfig"]),
    ("generate", ["collm.cli:GenerateConfig", "collm.pair:PairSpec"])])
def test_generated_commands_have_one_option_per_config_field(command, configs):  # all but seal (one argument)
    """Each option of these commands is a field of one config dataclass, with the field's docstring as help."""
    import dataclasses
    import importlib

    import typer

    from collm.cli import app, field_docs

    classes = [getattr(importlib.import_module(c.split(":")[0]), c.split(":")[1]) for c in configs]
    click_command = typer.main.get_command(app)
    for word in command.split():
        click_command = click_command.commands[word]
    options = {p.name: p for p in click_command.params if p.name != "config"}
    fields = [f.name for cls in classes for f in dataclasses.fields(cls)]
    assert sorted(options) == sorted(fields) and len(set(fields)) == len(fields)
    docs = {k: v for cls in classes for k, v in field_docs(cls).items()}
    assert all(docs.get(n) for n in options), [n for n in options if not docs.get(n)]
    assert click_command.help


def _private_uses(path: Path) -> list[str]:
    """`from collm... import _name`, and assignments to an attribute of an imported collm module or class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, collm_names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("collm"):
            for alias in node.names:
                collm_names.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            collm_names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("collm")}
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, (ast.Name, ast.Attribute)):
                root = target.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in collm_names:
                    found.append(f"{path.name}:{node.lineno} assigns {ast.unparse(target)}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in collm_names:
                found.append(f"{path.name}:{node.lineno} reads {ast.unparse(node)}")
    return found


def test_scripts_outside_the_package_use_only_its_public_names():
    """Research and benchmark scripts neither import nor replace a private name of collm: a renamed internal
    must not break them silently (tests may patch internals to simulate a kill or a full disk)."""
    scripts = [p for folder in ("research", "bench", "scripts") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert scripts
    assert [use for path in scripts for use in _private_uses(path)] == []


@pytest.mark.parametrize("path", sorted((ROOT / "research").rglob("configs/*.yaml")), ids=lambda p: p.name)
def test_research_recipes_name_only_options_of_their_command(path):
    """Each recipe under research/*/configs is read by one command (reward.yaml by collm reward, score.yaml by
    collm score, the rest by collm train): every key in it is an option there, so a renamed option fails here and
    not hours into a run."""
    from typer.testing import CliRunner

    from collm.cli import app

    command = {"reward.yaml": "reward", "score.yaml": "score"}.get(path.name, "train")
    result = CliRunner().invoke(app, [command, "--config", str(path)])
    assert "is not an option" not in result.output and "not valid" not in result.output, result.output
    assert "Missing option" in result.output  # the file was read; the paths qwen.sh adds are missing here
