"""Every command shown in README.md and docs/*.md runs as written on a fresh machine with the bundled data, or its
page says why it cannot (a GPU, the Hub, ...).

The pages' conventions (also in README.md, "Tests and benchmarks"):
- Commands are the lines of fenced ```bash blocks; a line ending in `\\` continues on the next; lines starting with
  `#` are comments. Python belongs in ```python blocks.
- `needs: WHAT[, WHAT]` marks what a command needs that a fresh machine with the bundled data does not have, as a
  trailing shell comment on the command (`... --preset mscoco   # needs: hub`) or, for a whole block, in an HTML
  comment on the line(s) just above the fence (`<!-- needs: gpu -->`). WHAT is one of NEEDS below. Such commands
  are not run.
- The same HTML comment can tell the test how to run the block, `;`-separated:
  `test-args: ARGS` appends ARGS to every command of the block (tiny sizes: `--max_steps 2`),
  `test-fixture: outputs/alip-demo` puts a tiny trained model there first (for a page whose commands use a model
  that an earlier page or the README's first command trains), `test: slow` marks the block's commands slow.
- The commands of a page run in order, in one scratch directory per page that mirrors the checkout (links to its
  files), offline (`HF_HUB_OFFLINE=1`), so a command may use what an earlier one of the same page wrote.

A failure names the page and line of the command and shows the end of its output.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO_ROOT

NEEDS = {
    "gpu": "a CUDA GPU",
    "hub": "the Hugging Face Hub (a model or data set downloaded, or a push)",
    "network": "a download from elsewhere (wget, apt-get, an image URL)",
    "data": "your own data or model: the command is a template (DIR, DATA, `...` stand for your paths)",
    "install": "changes the Python environment (pip install); .ci/run runs the README's two commands in a fresh venv",
}
PAGES = ["README.md", *sorted(str(path.relative_to(REPO_ROOT)) for path in (REPO_ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
COMMAND_TIMEOUT_S = 600
_FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
_HTML_COMMENT = re.compile(r"^\s*<!--(.*?)-->\s*$")
_TRAILING_COMMENT = re.compile(r"\s#\s.*$")
_TRAILING_NEEDS = re.compile(r"\s#\s.*?\bneeds:\s*([\w\s,-]+)")


@dataclass
class Command:
    page: str
    line: int  # 1-based line of the command's first line in the page
    text: str
    needs: list[str] = field(default_factory=list)
    test_args: str = ""
    fixtures: list[str] = field(default_factory=list)
    slow: bool = False

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _parse_directives(comments: list[str]) -> dict[str, list[str]]:
    """`<!-- needs: hub; test-args: --max_steps 2 -->` -> {"needs": ["hub"], "test-args": ["--max_steps 2"]}."""
    directives: dict[str, list[str]] = {}
    for comment in comments:
        for part in comment.split(";"):
            key, sep, value = part.partition(":")
            if sep:
                directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def _split_needs(value: str) -> list[str]:
    return [word for word in re.split(r"[,\s]+", value) if word]


def extract_commands(page: str, text: str) -> list[Command]:
    """The commands of the page's fenced shell blocks, with what the page says about them."""
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        language, start = match.group(1).lower(), i
        end = next((j for j in range(i + 1, len(lines)) if _FENCE.match(lines[j])), len(lines))
        i = end + 1
        if language not in SHELL_FENCES:
            continue
        comments, k = [], start - 1
        while k >= 0 and _HTML_COMMENT.match(lines[k]):
            comments.insert(0, _HTML_COMMENT.match(lines[k]).group(1))
            k -= 1
        directives = _parse_directives(comments)
        block_needs = [need for value in directives.get("needs", []) for need in _split_needs(value)]
        j = start + 1
        while j < end:
            first, parts = j, [lines[j]]
            while parts[-1].rstrip().endswith("\\") and j + 1 < end:
                j += 1
                parts.append(lines[j])
            j += 1
            joined = " ".join(part.rstrip().removesuffix("\\").strip() for part in parts).strip()
            if not joined or joined.startswith("#"):
                continue
            trailing = _TRAILING_NEEDS.search(joined)
            commands.append(Command(
                page=page, line=first + 1, text=joined,
                needs=block_needs + (_split_needs(trailing.group(1)) if trailing else []),
                test_args=" ".join(directives.get("test-args", [])),
                fixtures=directives.get("test-fixture", []),
                slow="slow" in directives.get("test", [])))
    return commands


def _all_commands() -> list[Command]:
    return [command for page in PAGES for command in extract_commands(page, (REPO_ROOT / page).read_text())]


def _with_test_args(command: Command) -> str:
    """The command with the block's test-args placed before its trailing comment (if any)."""
    if not command.test_args:
        return command.text
    body = _TRAILING_COMMENT.sub("", command.text).rstrip()
    return f"{body} {command.test_args}"


# ---- the parser's own rules ----------------------------------------------------------------------------------------


def test_extract_commands_reads_blocks_continuations_and_markers():
    page = "\n".join([
        "text", "```bash", "# a comment", "python a.py \\", "    --flag 1", "python b.py   # needs: hub, gpu", "```",
        "<!-- needs: data -->", "```bash", "python c.py", "```",
        "<!-- test-args: --max_steps 2; test-fixture: outputs/m; test: slow -->", "```sh", "python d.py  # x", "```",
        "```python", "print(1)", "```"])
    a, b, c, d = extract_commands("p.md", page)
    assert (a.line, a.text, a.needs) == (4, "python a.py --flag 1", [])
    assert (b.line, b.needs) == (6, ["hub", "gpu"])
    assert (c.line, c.needs) == (10, ["data"])
    assert (d.test_args, d.fixtures, d.slow, d.needs) == ("--max_steps 2", ["outputs/m"], True, [])
    assert _with_test_args(d) == "python d.py --max_steps 2"


def test_every_marker_names_a_known_need():
    unknown = [f"{c.where}: needs {need!r}" for c in _all_commands() for need in c.needs if need not in NEEDS]
    assert not unknown, f"known needs: {sorted(NEEDS)}\n" + "\n".join(unknown)


def test_ci_runs_the_readmes_two_commands_in_a_venv_it_makes():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "bin/activate" in ci
    readme_first_block = extract_commands("README.md", (REPO_ROOT / "README.md").read_text())[:2]
    assert [c.needs for c in readme_first_block] == [["install"], ["install"]]
    assert "pytest" in readme_first_block[1].text and "train.py" in readme_first_block[0].text


# ---- running them --------------------------------------------------------------------------------------------------


_PAGE_DIRS: dict[str, Path] = {}


@pytest.fixture(scope="module")
def scratch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("documented-commands")


@pytest.fixture(scope="module")
def tiny_trained_model(scratch_root) -> Path:
    """A 2-step run of the packaged `tiny` config: the model a page's `test-fixture` stands in for."""
    out = scratch_root / "_tiny_model"
    subprocess.run([sys.executable, "-m", "alip_hf.train", "tiny", "--max_steps", "2", "--output_dir", str(out),
                    "--report_to", "none", "--eval_data", "none"], cwd=scratch_root, env=_env(), check=True,
                   capture_output=True, timeout=COMMAND_TIMEOUT_S)
    return out


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _page_dir(scratch_root: Path, page: str) -> Path:
    """One scratch directory per page, mirroring the checkout by links, so relative paths in the commands
    (train.py, alip_hf/configs/tiny.yaml, scripts/...) resolve and their outputs stay out of the checkout."""
    if page not in _PAGE_DIRS:
        work = scratch_root / page.replace("/", "_")
        work.mkdir()
        for entry in REPO_ROOT.iterdir():
            if entry.name not in {".git", "outputs", "runs", "build", "dist"} and not entry.name.endswith(".egg-info"):
                (work / entry.name).symlink_to(entry)
        _PAGE_DIRS[page] = work
    return _PAGE_DIRS[page]


def _runnable_params():
    params = []
    for command in _all_commands():
        if command.needs:
            continue
        marks = [pytest.mark.slow] if command.slow else []
        params.append(pytest.param(command, id=command.where, marks=marks))
    return params


@pytest.mark.parametrize("command", _runnable_params())
def test_documented_command_runs(command: Command, scratch_root, request):
    work = _page_dir(scratch_root, command.page)
    for fixture in command.fixtures:
        target = work / fixture
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(request.getfixturevalue("tiny_trained_model"), target)
    script = _with_test_args(command)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=_env(), capture_output=True,
                            text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, (
        f"{command.where}: `{command.text}` failed (exit {result.returncode}); run as `{script}` in {work}.\n"
        f"Either fix it or mark it in the page (`# needs: {'|'.join(NEEDS)}`).\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}")
