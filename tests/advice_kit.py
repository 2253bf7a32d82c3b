"""Whether a sentence a script ends with names only flags that script has (issue 31: evaluate.py advised
--skip-bad-images, a flag of train.py alone). The script's flags are read from its own --help."""
from __future__ import annotations

import contextlib
import functools
import io
import re

FLAG = re.compile(r"(?<![\w/.-])--[a-z][a-z0-9-]*")
SCRIPT = re.compile(r"\b([\w-]+)\.py\b")


@functools.cache
def script_flags(main) -> frozenset[str]:
    """Every option string of the script whose main() this is, as its --help lists them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    return frozenset(FLAG.findall(out.getvalue()))


def foreign_flags(main, sentence: str) -> list[str]:
    """The flags a sentence names that the script lacks. A flag after another script's name in the same
    clause ("resume with python train.py --resume ...", "data/prepare.py --ben-graham") is that script's."""
    own = main.__module__.rsplit(".", 1)[-1]
    foreign = []
    for clause in sentence.split(";"):
        for match in FLAG.finditer(clause):
            named = SCRIPT.findall(clause[:match.start()])
            if named and named[-1] != own:
                continue
            if match.group() not in script_flags(main):
                foreign.append(match.group())
    return foreign


def raised_sentences(path) -> list[tuple[int, str]]:
    """The literal text of every UserError and RunFailed a source file raises, by line (an f-string's
    fixed parts joined by a space where its values were), and every module-level string constant whose name
    ends in ADVICE (advice passed to where the sentence is made)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(path).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("UserError", "RunFailed"):
            parts = [sub.value for sub in ast.walk(node) if isinstance(sub, ast.Constant) and isinstance(sub.value, str)]
            found.append((node.lineno, " ".join(parts)))
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                and any(getattr(t, "id", "").endswith("ADVICE") for t in node.targets)):
            found.append((node.lineno, node.value.value))
    return found
