"""The commands in README.md and docs/*.md are the ones CI and users run: every `ait2i ...` line
parses with the real parser, and those that need nothing but this repository run."""

import json
import re
import shlex
from pathlib import Path

import pytest

from ait2i_ext.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _readme_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def _shell_lines(text: str) -> list[str]:
    """Command lines of the fenced code blocks (continuations joined) and inline `ait2i ...` spans."""
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("python", "json", "text"):
            continue
        lines += body.replace("\\\n", " ").splitlines()
    spans = re.findall(r"(?<!`)`(ait2i [^`]+)`", text)
    lines += [span.replace("\n", " ") for span in spans if " -" in span]  # not a bare `ait2i generate`
    return lines


def ait2i_commands(text: str) -> list[list[str]]:
    """Every ``ait2i`` invocation in ``text`` as an argv (after ``&&`` / ``;`` and env assignments)."""
    commands = []
    for line in _shell_lines(text):
        for part in re.split(r"&&|;", line):
            words = shlex.split(part.strip().removeprefix("$ "), comments=True)
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words = words[1:]
            if words and words[0] == "ait2i":
                commands.append(words[1:])
    return commands


ALL = [(doc.name, argv) for doc in DOCS for argv in ait2i_commands(doc.read_text())]


def test_docs_have_commands_to_check():
    names = {name for name, _ in ALL}
    assert {"README.md", "layout.md", "personalization.md"} <= names and len(ALL) >= 6


@pytest.mark.parametrize("doc, argv", ALL, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in ALL])
def test_every_command_parses(doc, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as stop:  # argparse's way of refusing (0: --help, --version)
        if stop.code != 0:
            pytest.fail(f"{doc}: `ait2i {' '.join(argv)}` does not parse (exit {stop.code})")


def _offline(argv: list[str]) -> bool:
    """Needs nothing but this repository: the shipped or tiny model, no hub ids or user files."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help, --version, or a line test_every_command_parses reports
        return False
    if args.command == "describe":
        return args.model is None
    if args.command == "ui":  # a server: tests/test_ui.py starts it and drives it
        return False
    return args.model in (None, "tiny") and not (args.gligen or args.controlnet or args.lora or args.control)


MAIN_JOB = ait2i_commands(f"```bash\n{_readme_commands()[0]}\n```")
# README command 1 runs in test_readme_names_the_files_command_one_writes
RUNNABLE = [(doc, argv) for doc, argv in ALL if _offline(argv) and argv not in MAIN_JOB]


@pytest.mark.parametrize("doc, argv", RUNNABLE, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in RUNNABLE])
def test_offline_commands_run(doc, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = []
    if argv[0] == "generate":  # the same options, fewer steps and seeds
        extra = ["--steps", "2", "--quiet", *(["--num-images", "2"] if "--num-images" in argv else [])]
    assert main([*argv, *extra]) == 0, f"{doc}: `ait2i {' '.join(argv)}` failed"


def test_readme_names_the_files_command_one_writes(tmp_path, monkeypatch):
    (argv,) = MAIN_JOB
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--steps", "2", "--num-images", "2", "--quiet"]) == 0
    out = tmp_path / build_parser().parse_args(argv).out
    written = {p.name for p in out.iterdir()}
    named = re.findall(r"`\*(_[a-z_]+\.png)`", (ROOT / "README.md").read_text())
    assert named, "README names the output files"
    for suffix in named:
        assert any(name.endswith(suffix) for name in written), f"README names *{suffix}; written: {written}"
    assert "run.json" in written and json.loads((out / "run.json").read_text())["status"] == "done"


def test_docs_cite_the_projects_own_method():
    for path in [
        *DOCS,
        *ROOT.glob("ait2i_ext/**/*.py"),
        *ROOT.glob("adapters/*.py"),
        *ROOT.glob("training/*.py"),
    ]:
        text = path.read_text()
        assert "METHOD.md" not in text and "METHOD's" not in text, path
    assert (ROOT / "docs" / "method.md").exists()


def test_readme_has_two_setup_commands():
    main_job, tests = _readme_commands()
    assert "ait2i generate" in main_job and "pip install" in main_job
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.replace("pip install ", "pip install -q ") in ci
