"""docs/guide.md stays true: its Python examples run, its links resolve, and its troubleshooting
tables list every error message the library raises.

Each ```python block is executed in order; the blocks of one ``##`` section share a namespace, and
each section runs in a fresh temporary folder (examples save files). A block fenced as
```python no-run is skipped.
"""

from __future__ import annotations

import ast
import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide.md"
# Packages whose error messages the troubleshooting tables must list.
MESSAGE_PACKAGES = ("annlib", "datasets", "accel")
# Messages not written as one string literal: the text the guide must show for them instead.
DYNAMIC_MESSAGES = {
    ("datasets/loader.py", "load"): "not found. Looked for:",
}


def _guide_blocks() -> list[dict]:
    """Every fenced block of the guide: section title, first line number, info string, code."""
    blocks, section, fence = [], "(top)", None
    for number, line in enumerate(GUIDE.read_text(encoding="utf-8").splitlines(), start=1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence = {"section": section, "line": number + 1, "info": line[3:].strip(), "code": []}
        elif line.startswith("```"):
            blocks.append({**fence, "code": "\n".join(fence["code"]) + "\n"})
            fence = None
        else:
            fence["code"].append(line)
    assert fence is None, f"docs/guide.md: the block opened at line {fence['line'] - 1} is never closed"
    return blocks


def _python_sections() -> dict[str, list[dict]]:
    sections: dict[str, list[dict]] = {}
    for block in _guide_blocks():
        if block["info"].split()[:1] == ["python"]:
            sections.setdefault(block["section"], []).append(block)
    return sections


SECTIONS = _python_sections()


def test_the_guide_has_examples_and_few_skipped_ones():
    blocks = [b for bs in SECTIONS.values() for b in bs]
    skipped = [b for b in blocks if "no-run" in b["info"].split()[1:]]
    assert len(blocks) >= 10
    assert len(skipped) <= 2, f"python no-run blocks at lines {[b['line'] for b in skipped]}: use them sparingly"


@pytest.fixture
def thread_settings_restored():
    """Examples may call annlib.set_num_threads; put the process setting back afterwards."""
    import annlib
    from annlib import config

    before, process = annlib.get_num_threads(), config._process_threads
    yield
    if config._process_threads != process:
        annlib.set_num_threads(before)
        config._process_threads = process


@pytest.mark.parametrize("section", list(SECTIONS))
def test_python_examples_run(section, tmp_path, monkeypatch, thread_settings_restored):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "guide_example"}
    for number, block in enumerate(SECTIONS[section], start=1):
        if "no-run" in block["info"].split()[1:]:
            continue
        where = f"docs/guide.md, section {section!r}, block {number} (line {block['line']})"
        try:
            exec(compile(block["code"], f"docs/guide.md:{block['line']}", "exec"), namespace)
        except Exception:
            pytest.fail(f"{where} raised:\n{traceback.format_exc()}", pytrace=False)


# ----------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, in_fence = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def test_links_and_anchors_resolve():
    text = GUIDE.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target:
            continue
        page, _, anchor = target.partition("#")
        path = GUIDE if not page else GUIDE.parent / page
        assert path.exists(), f"docs/guide.md links to missing {page}"
        if anchor:
            assert anchor in _anchors(path), f"docs/guide.md links to {target}: no such heading"


def test_the_guide_is_linked_from_the_index_and_the_readme():
    assert "(guide.md)" in (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert "(docs/guide.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- error messages
def _pattern(node: ast.expr) -> tuple[str, str] | None:
    """(regular expression, longest literal piece) for the message built by ``node`` (a str or
    an f-string), or None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.escape(node.value), node.value
    if isinstance(node, ast.JoinedStr):
        parts, pieces = [], []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(re.escape(value.value))
                pieces.append(value.value)
            elif not parts or parts[-1] != ".+?":
                parts.append(".+?")
        return "".join(parts), max(pieces, key=len, default="")
    return None


def _raised_messages() -> list[tuple[str, str, tuple[str, str] | None, ast.expr]]:
    """(file, enclosing function, pattern, message node) of every exception built with a message."""
    found = []
    for package in MESSAGE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(encoding="utf-8"))
            owner = {}  # node -> name of the innermost function holding it
            for func in ast.walk(tree):
                if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(func):
                        owner[id(node)] = func.name
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                    continue
                if node.func.id.endswith(("Error", "Exception")) and node.args:
                    message = node.args[0]
                elif rel == "annlib/_state.py" and node.func.id == "bad_field" and len(node.args) == 2:
                    message = node.args[1]  # the generic problems of a file's field, listed too
                else:
                    continue
                if isinstance(message, ast.Name):
                    continue  # passes on a message built elsewhere (and scanned there)
                found.append((rel, owner.get(id(node), "<module>"), _pattern(message), message))
    return found


def test_every_error_message_is_in_the_troubleshooting_tables():
    text = GUIDE.read_text(encoding="utf-8")
    rows = [line.replace("\\|", "|") for line in text[text.index("## Troubleshooting"):].splitlines()
            if line.startswith("|")]
    messages = _raised_messages()
    assert len(messages) > 100  # the scan itself works
    missing = []
    for rel, func, pattern, node in messages:
        if pattern is None:
            literal = DYNAMIC_MESSAGES.get((rel, func))
            if literal is None or not any(literal in row for row in rows):
                missing.append(f"{rel}:{node.lineno} ({func}): a message the scan cannot read; "
                               f"add it to the guide and to DYNAMIC_MESSAGES")
            continue
        regex, piece = pattern
        if not any(piece in row and re.search(regex, row) for row in rows):
            missing.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not missing, "messages missing from docs/guide.md#troubleshooting:\n" + "\n".join(missing)
