"""Every ```python block in README.md and docs/ runs as it stands: offline, on a CPU, in a fresh process.

Each block is written to a file in its own temporary directory and run there with `HF_HUB_OFFLINE=1` and one torch
thread; it must exit 0. A block that cannot run here (a multi-GPU launch, a Hub upload) is a ```bash block, or is
marked with `<!-- no-run: <reason> -->` on the line before its fence; the reason is required.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
NO_RUN = re.compile(r"<!--\s*no-run:(?P<reason>.*?)-->")
TIMEOUT_S = 180  # generous for a loaded machine; each block takes a few seconds


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, the no-run reason or None) for every ```python block of `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, lang, start = match["indent"], match["lang"], i
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang != "python":
            continue
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = NO_RUN.search(previous)
        reason = marker["reason"].strip() if marker else None
        blocks.append((start + 1, "\n".join(body) + "\n", reason))
    return blocks


# README.md's blocks run in the default test run; the docs pages' blocks are slow (RUN_SLOW=1).
BLOCKS = [
    pytest.param(code, reason, id=f"{path.relative_to(ROOT)}:{line}",
                 marks=() if path.name == "README.md" else pytest.mark.slow)
    for path in markdown_files()
    for line, code, reason in python_blocks(path)
]  # fmt: skip


def test_the_docs_have_python_blocks():
    assert len(BLOCKS) >= 10, [b.id for b in BLOCKS]


def test_the_block_parser(tmp_path):
    """The parser finds python blocks only, strips a list item's indent, and reads the no-run marker."""
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```bash\necho no\n```\n```python\nprint(1)\n```\n"
        "- item\n\n    ```python\n    print(2)\n    ```\n"
        "<!-- no-run: needs two GPUs -->\n```python\nprint(3)\n```\n",
        encoding="utf-8",
    )
    assert python_blocks(page) == [
        (5, "print(1)\n", None),
        (10, "print(2)\n", None),
        (14, "print(3)\n", "needs two GPUs"),
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_block(code: str, folder: Path) -> subprocess.CompletedProcess:
    """Run `code` as a script in `folder`, in a fresh process, offline, with one torch thread."""
    script = folder / "block.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),  # this checkout's hf_gr
        MASTER_PORT=str(free_port()),  # a block that starts a process group picks it up, not a port in use
    )
    return subprocess.run(
        [sys.executable, str(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def test_the_runner_reports_a_failing_block_and_runs_offline_in_the_folder(tmp_path):
    done = run_block("import os, sys\nprint(os.environ['HF_HUB_OFFLINE'], os.getcwd())\nsys.exit(3)\n", tmp_path)
    assert done.returncode == 3
    offline, cwd = done.stdout.split()
    assert offline == "1" and Path(cwd).resolve() == tmp_path.resolve()


@pytest.mark.parametrize(("code", "reason"), BLOCKS)
def test_python_block_runs(code: str, reason: str | None, tmp_path: Path):
    if reason is not None:
        assert reason, "a no-run marker must say why the block cannot run"
        pytest.skip(reason)
    done = run_block(code, tmp_path)
    assert done.returncode == 0, f"exit {done.returncode}\n--- code\n{code}\n--- stderr\n{done.stderr[-4000:]}"


def test_readme_links_point_into_the_repository():
    """README.md's relative links (into docs/ and elsewhere) name files that exist; mkdocs checks those of docs/."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [
        t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t and not t.startswith("#")
    ]
    assert targets, "README.md links into docs/"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, missing
