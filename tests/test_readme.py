"""The README is a user's guide that stays true: the commands in its fenced shell blocks exist, the
quick ones run, its links resolve, and it stays short.

Rule: every `mixserve <command> [<mode>]` named in a shell block of README.md or docs/*.md is a
command of the CLI parser (cluster/cli.py `build_parser`) and every `--flag` after it is one of that
command's options; every `make <target>` is a Makefile target. Every command and bench mode of the
parser is named in the README. The quick commands (help, a Serve config, a tiny checkpoint) run as a
user would run them, each bounded by a timeout. README.md has at most MAX_README_LINES lines (as
`wc -l` counts them).
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mixserve.cluster.cli import build_parser
from tests.helpers import REPOSITORY

README = REPOSITORY / "README.md"
DOCS = sorted((REPOSITORY / "docs").glob("*.md"))
MAX_README_LINES = 250
CLI = Path(sys.executable).parent / "mixserve"
RUN_TIMEOUT_S = 120
SHELL_LANGS = {"", "sh", "bash", "shell", "console"}
OPERATORS = {"|", "||", "&&", ";", "&"}
RUNS_BY_NAME = re.compile(r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|this|last|next|earlier|previous) "
                          r"session\b", re.IGNORECASE)


def shell_lines(markdown: Path) -> list[str]:
    """The logical lines of the shell-fenced code blocks of `markdown` (backslash continuations joined)."""
    lines, block, lang = [], None, ""
    for line in markdown.read_text(encoding="utf-8").splitlines():
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            if block is None:
                block, lang = [], fence.group(1).lower()
            else:
                if lang in SHELL_LANGS:
                    lines += _joined(block)
                block = None
            continue
        if block is not None:
            block.append(line)
    return lines


def _joined(block: list[str]) -> list[str]:
    out, pending = [], ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    return out + ([pending] if pending else [])


def _tokens(line: str) -> list[str]:
    """Shell words of `line`, comments dropped; a quoted word that holds a command (`ray exec "..."`)
    is split again in place."""
    out = []
    for word in shlex.split(line, comments=True):
        out += _tokens(word) if " " in word else [word]
    return out


def commands(markdown: Path, program: str) -> list[list[str]]:
    """Every invocation of `program` in the shell blocks: its arguments up to a shell operator."""
    found = []
    for line in shell_lines(markdown):
        words = _tokens(line)
        for i, word in enumerate(words):
            if os.path.basename(word) == program:
                args = []
                for w in words[i + 1:]:
                    if w in OPERATORS:
                        break
                    args.append(w)
                found.append(args)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parser_for(args: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (sub)parser that `mixserve args...` reaches, and the command words that led there."""
    parser, path = build_parser(), []
    for word in args:
        subs = _subparsers(parser)
        if not subs or word.startswith("-"):
            break
        assert word in subs, f"`mixserve {' '.join(path + [word])}`: no such command (has: {sorted(subs)})"
        parser, path = subs[word], path + [word]
    return parser, path


def makefile_targets() -> set[str]:
    text = (REPOSITORY / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.MULTILINE))


@pytest.mark.parametrize("markdown", [README, *DOCS], ids=lambda p: p.name)
def test_every_mixserve_command_and_flag_in_the_shell_blocks_exists(markdown):
    for args in commands(markdown, "mixserve"):
        parser, path = _parser_for(args)
        options = {opt for action in parser._actions for opt in action.option_strings}
        for word in args[len(path):]:
            if word.startswith("--"):
                flag = word.split("=", 1)[0]
                assert flag in options, f"{markdown.name}: `mixserve {' '.join(path)}` has no option {flag}"


@pytest.mark.parametrize("markdown", [README, *DOCS], ids=lambda p: p.name)
def test_every_make_target_in_the_shell_blocks_exists(markdown):
    targets = makefile_targets()
    for args in commands(markdown, "make"):
        named = [w for w in args if not w.startswith("-") and "=" not in w]
        for target in named:
            assert target in targets, f"{markdown.name}: `make {target}`: no such target (has: {sorted(targets)})"


def test_the_readme_names_every_command_and_bench_mode_and_the_two_set_up_targets():
    named = {tuple(args[:2]) if args[:1] == ["bench"] else tuple(args[:1]) for args in commands(README, "mixserve")}
    top = _subparsers(build_parser())
    expected = {(name,) for name in top if name != "bench"} | {("bench", mode) for mode in _subparsers(top["bench"])}
    assert expected <= named, f"README's shell blocks do not name: {sorted(expected - named)}"
    make_named = {w for args in commands(README, "make") for w in args}
    assert {"serve", "test"} <= make_named


QUICK = [  # (how the README names it, argv to run, what its output or result shows)
    (["--help"], ["--help"], "usage: mixserve"),
    (["config", "--preset", "tiny-cpu"], ["config", "--preset", "tiny-cpu"],
     "import_path: mixserve.cluster.app:app_builder"),
    (["checkpoint", "--preset", "tiny", "--out"], ["checkpoint", "--preset", "tiny", "--out", "{tmp}/tiny"], "wrote tiny"),
]


@pytest.mark.parametrize("named, argv, shows", QUICK, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_the_quick_readme_commands_run(named, argv, shows, tmp_path):
    assert any(args[:len(named)] == named for args in commands(README, "mixserve")), \
        f"README names no `mixserve {' '.join(named)}`"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    # run where a user would, outside the repository (its root must not come first on sys.path)
    done = subprocess.run([str(CLI), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shows in done.stdout, done.stdout[-2000:]
    if argv[0] == "checkpoint":
        assert (tmp_path / "tiny" / "config.json").is_file()


def test_the_readme_is_at_most_250_lines():
    lines = README.read_text(encoding="utf-8").count("\n")  # as `wc -l` counts
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; the guide's bound is {MAX_README_LINES}"


@pytest.mark.parametrize("markdown", [README, REPOSITORY / "HISTORY.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(markdown):
    for target in re.findall(r"\]\(([^)\s]+)\)", markdown.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (markdown.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{markdown.name} links to {target}, which does not exist"


def test_runs_are_named_by_date_and_cpu_class_not_by_session():
    texts = [README, REPOSITORY / "HISTORY.md", *DOCS, *sorted((REPOSITORY / "benchmarks").glob("*.md"))]
    for path in texts:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not RUNS_BY_NAME.search(line), f"{path.name}:{n}: {line.strip()}"
