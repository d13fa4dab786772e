"""The documentation still matches the code: every `lenx ...` command shown in README.md and docs/*.md names a
command that exists and only flags that its `--help` lists; every benchmark script shown is there and takes the
flags shown; every relative link resolves; every registered scheme has its row in docs/schemes.md."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# an option's names start its line in help output: 2 spaces in (click, argparse), or inside a box (rich); the
# lines of a wrapped help text are indented further
OPTION_LINE = re.compile(r"^(?:\W )? {0,2}(-\S.*?)(?:\s{2,}|$)")
FLAG = re.compile(r"--?[A-Za-z][\w-]*")


def _fenced(text: str) -> list[str]:
    """The shell lines of a page's fenced code blocks (Python blocks left out), continuation lines joined."""
    lines = []
    for block in FENCE.finditer(text):
        if text[block.start():block.start() + 12].startswith(("```python", "```py\n")):
            continue
        lines += block.group(1).replace("\\\n", " ").splitlines()
    return lines


def _inline(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks that are a command (`lenx train --pe alibi`,
    `python scripts/bench_eval.py --json`)."""
    prose = FENCE.sub("", text)
    shown = re.compile(r"(lenx |python3? -m lenx |torchrun |(python3?|bash) scripts/)")
    return [s for s in INLINE.findall(prose) if shown.match(s)]


def _segments(line: str) -> list[list[str]]:
    """A shell line's simple commands (split at &&, ||, ;, | and &), each as words, the comment dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split, lexer.commenters = True, ""  # `#` starts a comment only as a word's first character
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote in a prose example: split plainly
        words = line.split()
    words = words[:next((i for i, w in enumerate(words) if w.startswith("#")), len(words))]
    out, cur = [], []
    for w in words:
        if w in ("&&", "||", ";", "|", "&"):
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    return [c for c in out + [cur] if c]


def lenx_args(words: list[str]) -> list[str] | None:
    """The arguments lenx gets from one simple command (`lenx ...`, `python -m lenx ...`, `torchrun ... -m lenx
    ...`, with VAR=value prefixes), or None when the command is not lenx."""
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        words = words[1:]
    if not words:
        return None
    if words[0] == "lenx":
        return words[1:]
    if words[0] in ("python", "python3", "torchrun"):
        for i in range(1, len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "lenx":
                return words[i + 2:]
    return None


def script_args(words: list[str]) -> tuple[str, list[str]] | None:
    """(script, arguments) of `python scripts/X.py ...` / `bash scripts/X.sh ...`, or None."""
    if len(words) >= 2 and words[0] in ("python", "python3", "bash") and words[1].startswith("scripts/"):
        return words[1], words[2:]
    return None


def flags(args: list[str]) -> list[str]:
    """The option names among a command's words: `--flag value`, `--flag=value`, `--no-x`, `[--flag]`."""
    out = []
    for a in args:
        a = a.strip("[]")
        if a.startswith("--") and len(a) > 2:
            out.append(a.split("=", 1)[0])
    return out


def shown(pick) -> list[tuple[str, object]]:
    """(where, pick(words)) of every simple command shown in the pages that `pick` does not answer None for."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for line in _fenced(text) + _inline(text):
            found += [(f"{page.relative_to(ROOT)}: {line.strip()}", hit) for hit in map(pick, _segments(line))
                      if hit is not None]
    return found


def commands() -> list[tuple[str, list[str]]]:
    """(where, lenx arguments) of every lenx command shown in the pages."""
    return shown(lenx_args)


def option_names(help_text: str) -> set[str]:
    """The flags an option list in click's help offers (`--compile / --no-compile` gives both)."""
    names = set()
    for line in help_text.splitlines():
        m = OPTION_LINE.match(line)
        if m:
            names.update(FLAG.findall(m.group(1)))
    return names


@functools.lru_cache(maxsize=None)
def lenx_help(sub: str) -> tuple[int, str]:
    """`lenx SUB --help`, in process: its exit code and output (stdout and stderr)."""
    from lenx.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([sub, "--help"])
    return code, out.getvalue() + err.getvalue()


@functools.lru_cache(maxsize=None)
def script_help(script: str) -> str:
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{script} --help failed:\n{done.stderr}"
    return done.stdout


def problems(args: list[str]) -> list[str]:
    """What is wrong with one lenx command line as documented: an unknown command, or flags its help lacks."""
    if not args:
        return ["no command named"]
    sub = args[0]
    if re.fullmatch(r"<[^>]*>|\.\.\.|[A-Z_]+", sub):  # a placeholder: `lenx <command> --help`
        return []
    code, text = lenx_help(sub)
    if code != 0:
        return [f"no command '{sub}': {text.strip()}"]
    known = option_names(text)
    return [f"'lenx {sub}' has no option {f}" for f in flags(args[1:]) if f not in known]


def test_pages_show_lenx_commands():
    shown = commands()
    assert len(shown) > 40, shown  # the extraction finds the commands the pages show
    readme = [args for where, args in shown if where.startswith("README.md")]
    assert ["sweep", "--config", "configs/quick.yaml"] in readme


def test_every_documented_command_parses():
    bad = [f"{where}\n    {p}" for where, args in commands() for p in problems(args)]
    assert not bad, "\n".join(bad)


def test_a_misspelt_flag_or_command_is_caught():
    assert problems(["train", "--pe", "alibi", "--train-len", "64"]) == []
    assert problems(["train", "--pe", "alibi", "--trian-len", "64"]) == ["'lenx train' has no option --trian-len"]
    assert problems(["eval", "--rope-factor=4", "--no-such-flag"]) == ["'lenx eval' has no option --no-such-flag"]
    assert problems(["train", "--no-compile"]) == []
    assert problems(["trian", "--pe", "alibi"])[0].startswith("no command 'trian'")


def test_flag_extraction():
    line = 'PYTHONPATH=$PWD python -m lenx eval runs/x --tokens=65536 --no-hf   # a comment with --not-this'
    (words,) = _segments(line)
    assert flags(lenx_args(words)) == ["--tokens", "--no-hf"]
    first, second, third = _segments("lenx train --pe alibi && lenx eval --max-len 64; echo --x")
    assert third == ["echo", "--x"] and lenx_args(third) is None
    assert (lenx_args(first), lenx_args(second)) == (["train", "--pe", "alibi"], ["eval", "--max-len", "64"])
    assert _segments("lenx report a#b  # c --x") == [["lenx", "report", "a#b"]]
    (words,) = _segments("torchrun --nnodes 2 --nproc-per-node 8 -m lenx train --batch-size 8")
    assert lenx_args(words) == ["train", "--batch-size", "8"]
    assert flags(["RUN_DIR", "--out", "DIR", "[--overwrite]"]) == ["--out", "--overwrite"]
    assert _fenced("```bash\nlenx eval \\\n  --stride 8\n```\n") == ["lenx eval    --stride 8"]
    assert option_names("Options:\n  --compile / --no-compile  Compile.\n                 --max-len)\n") == {
        "--compile", "--no-compile"}
    assert "exporting-a-run-lenx-export" in anchors(ROOT / "docs" / "hf-models.md")
    assert option_names("│ --pe        TEXT  Scheme.      │\n│             --max-len)        │") == {"--pe"}


def test_documented_files_exist():
    """Configs and scripts named in the commands shown are in the repository."""
    bad = []
    for where, args in commands():
        bad += [f"{where}\n    no file {a}" for a in args if re.match(r"(configs|scripts)/", a) and not (ROOT / a).is_file()]
    assert not bad, "\n".join(bad)


def test_documented_scripts_exist_and_take_their_flags():
    bad = []
    for where, (script, args) in shown(script_args):
        if not (ROOT / script).is_file():
            bad.append(f"{where}\n    no file {script}")
        elif script.endswith(".py"):
            known = option_names(script_help(script))
            bad += [f"{where}\n    {script} has no option {f}" for f in flags(args) if f not in known]
    assert not bad, "\n".join(bad)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)}: links to missing files or headings: {bad}"


def test_every_page_is_linked_from_readme():
    readme = ROOT / "README.md"
    linked = {(readme.parent / t.split("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages README.md does not link: {missing}"


def test_results_readme_points_to_the_results_page():
    text = (ROOT / "results" / "README.md").read_text()
    assert "../docs/results.md" in LINK.findall(text)
    assert (ROOT / "docs" / "results.md").is_file()


def test_every_scheme_has_its_row_in_schemes_page():
    from lenx.positional import SCHEMES

    text = (ROOT / "docs" / "schemes.md").read_text()
    rows = set(re.findall(r"^\| `([\w-]+)` \|", text, re.M))
    assert rows == set(SCHEMES), f"docs/schemes.md rows {sorted(rows)} != registered {sorted(SCHEMES)}"
