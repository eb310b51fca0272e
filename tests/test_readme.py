"""The README and the usage pages say what the software does: CI runs the README's test command, every `collm`
command line they show names a real command with real options, and the cheapest one runs as written."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "usage").glob("*.md"))]


def _command_lines(page: Path) -> list[str]:
    """`collm ...` lines inside the page's bash blocks (continuations joined, comments cut)."""
    lines, text = [], page.read_text(encoding="utf-8")
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line).strip()
            for part in re.split(r"&&|\|\||;", line):
                part = part.strip()
                if part.startswith("collm "):
                    lines.append(part)
    return lines


def test_ci_runs_the_readme_s_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).splitlines()
    test_command = first[1].split("#")[0].strip()
    assert test_command == "bash scripts/install.sh --test && python -m pytest -q"
    assert (ROOT / ".ci" / "run").read_text().strip().endswith(test_command)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_collm_line_names_real_commands_and_options(page):
    from collm.cli import app

    root = typer.main.get_command(app)
    lines = _command_lines(page)
    assert lines or page.name != "README.md"
    for line in lines:
        words = shlex.split(line.replace("$", ""), posix=True)[1:]
        command = root
        while words and hasattr(command, "commands") and words[0] in command.commands:
            command = command.commands[words.pop(0)]
        assert not hasattr(command, "commands"), f"{page.name}: {line!r} names no command"
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
        used = {w.split("=")[0] for w in words if w.startswith("--")}
        assert used <= known, f"{page.name}: {line!r} uses {sorted(used - known)}"


def test_the_readme_quick_start_line_runs_as_written():
    """The first `collm generate` of the quick start, shortened to a few tokens: the shipped run answers."""
    from typer.testing import CliRunner

    from collm.cli import app

    line = next(line for line in _command_lines(ROOT / "README.md") if line.startswith("collm generate "))
    args = shlex.split(line)[1:] + ["--max-new-tokens", "8", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert '"texts"' in result.output
