"""The README and docs/ as a reader uses them: every link lands, every command parses with the script's own argparse,
the cheap ones run as written on the demo set, and every flag a script has is documented (and no other)."""
import argparse
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision
from warm_runner import WarmRunner

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
# every script a reader is told to run, by the path they type
SCRIPTS = ["train.py", "evaluate.py", "plot.py", "export.py", "bench.py", "dataloader.py", "models.py", "synthetic.py",
           "data/prepare.py", "benchmarks/quality_check.py", "benchmarks/recipes.py"]
# flags of other programs the docs mention: torchrun's, pip's
FOREIGN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--max-restarts", "--no-deps",
                 "--config-settings", "--quiet", "--progress-bar"}
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
BLOCK = re.compile(r"(?:^(<!--[^\n]*-->)\n)?^```(\w*)\n(.*?)^```", re.M | re.S)


def blocks(page: Path):
    """(the block's marker or None, its language, its lines) of every fenced block of a page."""
    for marker, language, body in BLOCK.findall(page.read_text()):
        yield marker or None, language, body


def shell_blocks():
    for page in PAGES:
        for marker, language, body in blocks(page):
            if language in ("", "sh", "bash"):
                yield page, marker, [line for line in body.splitlines() if line.strip()]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def links(page: Path):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_link_resolves_to_a_file_and_a_heading():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 8, "README.md and the docs/ pages"
    broken = []
    for page in PAGES:
        for target in links(page):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no file)")
            elif anchor and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no heading)")
    assert not broken, broken


def test_a_broken_link_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A section: the one\n\n"
                    "[ok](#a-section-the-one) [gone](#nowhere) [file](missing.md)\n")
    assert slug("A section: the one") == "a-section-the-one"
    assert "nowhere" not in anchors(page) and links(page) == ["#a-section-the-one", "#nowhere", "missing.md"]


def test_every_docs_page_opens_with_its_summary():
    for page in sorted((ROOT / "docs").glob("*.md")):
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), page.name
        first = next(i for i, line in enumerate(lines[1:], 1) if line.strip())
        paragraph = " ".join(lines[first:lines.index("", first)])
        assert not paragraph.startswith(("#", "|", "```", "-", "!")) and len(paragraph) > 200, page.name


def test_the_readme_is_a_short_path():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    for command in ("python train.py --model resnet50 --pretrained", "python evaluate.py checkpoints/",
                    "python plot.py logs/"):
        assert command in readme, command
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"the README links docs/{page.name}"


class Parsed(BaseException):
    pass


_parsers: dict[str, argparse.ArgumentParser] = {}


def parser_of(script: str) -> argparse.ArgumentParser:
    """The argparse parser a script's main() builds, caught as it parses (nothing else of main runs)."""
    if script not in _parsers:
        caught = []

        def catch(self, args=None, namespace=None):
            caught.append(self)
            raise Parsed

        path = ROOT / script
        if "/" in script:
            spec = importlib.util.spec_from_file_location(f"docs_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(path.stem)
        with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), \
                mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch):
            with pytest.raises(Parsed):
                module.main([])
        _parsers[script] = caught[0]
    return _parsers[script]


def flags_of(script: str) -> set[str]:
    return {flag for action in parser_of(script)._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def commands():
    """(page, marker, the script, its arguments) of every line of a shell block that runs one of the scripts."""
    for page, marker, lines in shell_blocks():
        for line in lines:
            words = shlex.split(line, comments=True)
            if not words or words[0] not in ("python", "torchrun"):
                continue
            script = next(w for w in words if w.endswith(".py"))
            yield page, marker, line, script, words[words.index(script) + 1:]


def as_written(words: list[str]) -> list[str]:
    """The arguments, with the docs' notation read: [--optional] kept, a|b the first, ... dropped."""
    out = []
    for word in words:
        if word == "...":
            continue
        word = word.strip("[]")
        out.append(word.split("|")[0] if "|" in word and not word.startswith("-") else word)
    return out


def test_every_command_in_the_docs_parses_with_its_script():
    found = list(commands())
    assert len(found) >= 20
    for page, marker, line, script, words in found:
        assert script in SCRIPTS, f"{page.name}: {line} (a script the docs do not know)"
        try:
            parser_of(script).parse_args(as_written(words))
        except SystemExit as stop:
            pytest.fail(f"{page.name}: `{line}` does not parse with {script}'s flags (exit {stop.code})")


def test_a_misspelt_flag_does_not_parse(capsys):
    with pytest.raises(SystemExit):
        parser_of("train.py").parse_args(["--model", "resnet50", "--pretrianed"])
    assert as_written(["[--tta]", "[--split", "test|val]", "..."]) == ["--tta", "--split", "test"]


def mentioned_flags() -> set[str]:
    text = "\n".join(page.read_text() for page in PAGES if page.name != "BENCHMARKS.md")
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*", text))


def test_every_flag_of_every_script_is_documented_and_no_other():
    every = set().union(*(flags_of(script) for script in SCRIPTS))
    mentioned = mentioned_flags()
    undocumented = {script: sorted(flags_of(script) - mentioned) for script in SCRIPTS}
    assert not any(undocumented.values()), {s: f for s, f in undocumented.items() if f}
    # --help: argparse gives every script one, and the docs name it as the list of every flag
    assert not mentioned - every - FOREIGN_FLAGS - {"--help"}, sorted(mentioned - every - FOREIGN_FLAGS)


def test_a_flag_the_scripts_lost_is_found(monkeypatch):
    monkeypatch.setitem(_parsers, "plot.py", argparse.ArgumentParser())  # as if plot.py lost --out
    assert "--out" in mentioned_flags() and "--out" not in flags_of("plot.py")


def test_every_block_that_is_not_run_says_why():
    for page, marker, lines in shell_blocks():
        if marker is not None:
            assert NOT_RUN.fullmatch(marker), f"{page.name}: {marker}"


def fake_imagenet_files(hub: Path) -> None:
    """Random weights in torchvision's format, where torch hub's cache keeps ImageNet's (no network here)."""
    hub.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), hub / "resnet18-f37072fd.pth")
    torch.save(torchvision.models.resnet50().state_dict(), hub / "resnet50-11ad3fa6.pth")


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    """An empty folder as a newcomer's clone has it, but for a small demo set in data/demo (24 + 16 photos at 32 px,
    so that ten epochs take seconds) and ImageNet files of random weights in torch hub's cache."""
    import synthetic

    folder = tmp_path_factory.mktemp("reader")
    synthetic.generate_demo(folder / "data" / "demo", n_train=24, n_test=16, size=32, seed=0, quiet=True)
    fake_imagenet_files(folder / "torch" / "hub" / "checkpoints")
    return folder


def reader_env(demo_folder) -> dict:
    return {**os.environ, "TORCH_HOME": str(demo_folder / "torch"), "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def runner(demo_folder):
    """Each command a process of its own, as typed, without importing torch for each (tests/warm_runner.py)."""
    warm = WarmRunner(reader_env(demo_folder))
    yield warm
    warm.close()


def test_the_commands_run_as_written_on_the_demo_set(demo_folder, runner):
    """Every line of every block not marked 'not run', in the order a reader meets them (README, then docs/),
    run as typed in one folder, so that evaluate.py finds the checkpoint train.py wrote."""
    env = reader_env(demo_folder)
    ran = []
    out, err = demo_folder / "command.out", demo_folder / "command.err"
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for marker, language, body in blocks(page):
            if language not in ("", "sh", "bash") or marker is not None:
                continue
            for line in filter(str.strip, body.splitlines()):
                words = shlex.split(line, comments=True)
                assert words[0] == "python" and words[1] in SCRIPTS, f"{page.name}: `{line}` is no command to run"
                rc = runner.run(ROOT / words[1], words[2:], demo_folder, env, out, err, timeout=300)
                assert rc == 0, f"{page.name}: `{line}` exited {rc}:\n{err.read_text()[-3000:]}"
                ran.append(line)
    assert len(ran) >= 8, ran
    assert (demo_folder / "figures" / "comparison_resnet50.png").is_file()  # the README's lab runs, as written


def test_a_command_that_fails_fails_the_test(demo_folder, runner):
    # and the warm runner the commands run through answers as the interpreter does: the same status and words
    env = reader_env(demo_folder)
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "checkpoints/none/best.pt"], cwd=demo_folder,
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    out, err = demo_folder / "failing.out", demo_folder / "failing.err"
    assert runner.run(ROOT / "evaluate.py", ["checkpoints/none/best.pt"], demo_folder, env, out, err) == 2
    assert err.read_text() == result.stderr and out.read_text() == result.stdout
    assert runner.run(ROOT / "plot.py", ["--no-such-flag"], demo_folder, env, out, err) == 2
    assert runner.run(ROOT / "models.py", ["--help"], demo_folder, env, out, err) == 0
    assert out.read_text().startswith("usage: models.py")


def test_make_is_in_no_block_the_test_would_run():
    # `make demo` and `make test` are CI's (.ci/run runs both); a block holding them must say it is not run here
    for page, marker, lines in shell_blocks():
        if any(line.startswith("make ") for line in lines):
            assert marker is not None, page.name
