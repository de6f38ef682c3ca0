"""The README's quick start, run as a user would (exports on the registry's tiny variant), and
every link of the README and docs/ pointing at a file that exists."""

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from turbo.cli.app import app

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"


def quick_start() -> list[list[str]]:
    """The `turbo` lines of the README's quick-start block, comments dropped."""
    section = README.read_text().split("## Quick start", 1)[1]
    block = section.split("\n\n", 2)[1]
    return [shlex.split(line.split("#", 1)[0])[1:] for line in block.splitlines() if line.strip().startswith("turbo ")]


def test_the_quick_start_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = quick_start()
    assert [command[0] for command in commands] == ["models", "plan", "export", "bench"]
    runner = CliRunner()
    for command in commands:
        if command[0] == "export":
            command = [*command, "--tiny"]  # the same architecture, 4 layers of width 32
        if command[0] == "bench":
            command = [*command, "--iters", "2", "--warmup", "0"]
        result = runner.invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "exports" / "vit-b16-r16" / "turbo.json").is_file()


def test_links_point_at_files():
    documents = [README, *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for document in documents:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text()):
            if "://" not in target and not (document.parent / target).exists():
                broken.append(f"{document.relative_to(ROOT)}: {target}")
    assert broken == []
