"""Run every sample of README.md and of the docs pages, and write their real output back.

    python tools/readme_samples.py                    # rewrite README.md and docs/ in place
    python tools/readme_samples.py docs/guides/shell.md   # only these pages
    python tools/readme_samples.py --check            # exit 1 naming the samples whose shape changed

A sample is a fenced block whose first line starts with ``$ ``. Each page is one session:
every ``$`` command of its samples runs in page order, ``sh -c COMMAND`` in a fresh directory
of its own, so the database is the default ``data/queue.db`` there, in an environment of its
own (no ``QUEUECTL_DB``, ``COLUMNS=100``, this interpreter's ``bin`` first on ``PATH``). A page
therefore shows every command its output depends on, and a reader can replay it from an
empty directory. A command may end with a directive that the shell reads as a comment and
the reader as an explanation:

    $ queuectl worker -v -c 2 -s 1          # stopped with Ctrl-C after 9 s

sends SIGINT to the command's process group after 9 s, as a terminal's Ctrl-C would, and
waits for it to exit.

A sample whose output starts with ``Error:`` must fail, every other must exit 0; a page is
not rewritten while one does otherwise. The check compares shapes, not text: timestamps,
durations, made ids and numbers change from run to run, and a table may wrap a cell elsewhere
(see ``shape``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PROMPT = "$ "
CTRL_C = re.compile(r"#\s*stopped with Ctrl-C after (\d+(?:\.\d+)?) s\s*$")
WORKERS = re.compile(r"queuectl worker\b.*\s(?:-c|--concurrency)[\s=]*(\d+)")
TIMEOUT = 60.0  # no sample runs this long; a command that does is hung, not slow

# Applied in this order: a timestamp holds digit runs. Made ids are digit runs too (a job's
# 1042, a worker's w17).
SHAPES = (
    # Who did it (history's By): user@host differs from machine to machine.
    (re.compile(r"[\w.-]+@[\w.-]+"), "<user@host>"),
    # A session's own directory (the samples' default --cwd) is fresh each run.
    (re.compile(re.escape(tempfile.gettempdir().rstrip("/")) + r"/[^\s\"',)]+"), "<dir>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?Z?"), "<time>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "<time>"),
    (re.compile(r"\b\d+(\.\d+)?s\b"), "<duration>"),
    (re.compile(r"\d+"), "<n>"),
    # Table rules (rich's and sqlite-utils') are as wide as the values they sit under.
    (re.compile(r"[─-]{2,}"), "<rule>"),
    (re.compile(r"\s+"), ""),
)


@dataclass(frozen=True)
class Sample:
    command: str  # as written after the prompt, directive included
    output: str
    line: int  # 1-based, in its page

    @property
    def expects_failure(self) -> bool:
        return self.output.startswith("Error:")

    @property
    def interleaved(self) -> bool:
        """Workers of one process write in whatever order their threads run."""
        match = WORKERS.match(self.command)
        return match is not None and int(match.group(1)) > 1


@dataclass(frozen=True)
class Block:
    first: int  # index of the block's first line inside the fence (0-based)
    last: int  # index of its closing fence
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Result:
    command: str
    output: str
    status: int
    seconds: float


def find_blocks(text: str) -> list[Block]:
    """Every fenced block whose first line is a ``$`` command; other blocks are left alone."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].lstrip().startswith("```"):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if lines[i + 1].startswith(PROMPT):
            blocks.append(Block(i + 1, end, tuple(_samples(lines, i + 1, end))))
        i = end + 1
    return blocks


def _samples(lines: list[str], first: int, end: int) -> Iterable[Sample]:
    starts = [j for j in range(first, end) if lines[j].startswith(PROMPT)]
    for start, stop in zip(starts, starts[1:] + [end], strict=True):
        output = "\n".join(lines[start + 1:stop])
        yield Sample(lines[start][len(PROMPT):], output, start + 1)


def session_env(home: Path) -> dict[str, str]:
    """Only what the samples need, so the output does not depend on who runs them."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    env = {"PATH": path, "HOME": str(home), "LC_ALL": "C.UTF-8", "TZ": "UTC",
           "COLUMNS": "100", "PYTHONUNBUFFERED": "1"}
    if "PYTHONPATH" in os.environ:  # which checkout's code the samples run
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def run_session(commands: Iterable[str], cwd: Path) -> list[Result]:
    """Run ``commands`` one after the other in ``cwd``, as one user's shell session."""
    env = session_env(cwd)
    return [run(command, cwd, env) for command in commands]


def run(command: str, cwd: Path, env: dict[str, str]) -> Result:
    start = time.monotonic()
    # A session of its own, so that SIGINT reaches everything the command started, as a
    # terminal's Ctrl-C reaches its foreground process group. The trap keeps ``sh -c`` itself
    # alive until the command has exited, as an interactive shell would be, so its status is
    # the command's; the command's own processes still get the default SIGINT.
    with subprocess.Popen(["sh", "-c", f"trap : INT; {command}"], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                          errors="replace", start_new_session=True) as proc:
        output = _wait(proc, command, ctrl_c_after(command))
    return Result(command, tidy(output), proc.returncode, time.monotonic() - start)


def ctrl_c_after(command: str) -> float | None:
    match = CTRL_C.search(command)
    return float(match.group(1)) if match else None


def _wait(proc: subprocess.Popen[str], command: str, ctrl_c: float | None) -> str:
    """The command's output, once it has exited (after a Ctrl-C, if it asks for one)."""
    try:
        return proc.communicate(timeout=TIMEOUT if ctrl_c is None else ctrl_c)[0]
    except subprocess.TimeoutExpired:
        if ctrl_c is None:
            raise _hung(proc, command) from None
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.communicate(timeout=TIMEOUT)[0]
    except subprocess.TimeoutExpired:
        raise _hung(proc, command) from None


def _hung(proc: subprocess.Popen[str], command: str) -> RuntimeError:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return RuntimeError(f"still running after {TIMEOUT:.0f} s, killed: {command}")


def tidy(output: str) -> str:
    """Output as a page shows it: no trailing spaces, no trailing blank lines."""
    return "\n".join(line.rstrip() for line in output.rstrip().split("\n"))


def rewrite(text: str, blocks: list[Block], results: list[Result]) -> str:
    """``text`` with every sample block holding its commands and their real output."""
    lines = text.split("\n")
    remaining = iter(results)
    bodies = [_body(block, remaining) for block in blocks]
    for block, body in reversed(list(zip(blocks, bodies, strict=True))):
        lines[block.first:block.last] = body
    return "\n".join(lines)


def _body(block: Block, results: Iterator[Result]) -> list[str]:
    body = []
    for sample in block.samples:
        body.append(PROMPT + sample.command)
        output = next(results).output
        body.extend(output.split("\n") if output else [])
    return body


def shape(output: str) -> str:
    """What must stay the same from run to run: the text with timestamps, durations, made ids
    and numbers replaced by placeholders, table rules shortened, and whitespace removed (so
    that a cell wrapped at another place still matches)."""
    for pattern, placeholder in SHAPES:
        output = pattern.sub(placeholder, output)
    return output


def shapes(sample: Sample, output: str) -> list[str]:
    if sample.interleaved:
        return sorted(shape(line) for line in output.split("\n"))
    return [shape(output)]


def problems(sample: Sample, result: Result, compare_shapes: bool = True) -> list[str]:
    """How a command's real run disagrees with its sample; empty when it does not. A sample
    whose output starts with ``Error:`` is expected to fail, every other to exit 0."""
    found = []
    if (result.status != 0) != sample.expects_failure:
        expected = "a failure" if sample.expects_failure else "exit status 0"
        found.append(f"expected {expected}, got exit status {result.status}:\n"
                     + _indent(result.output))
    elif compare_shapes and shapes(sample, sample.output) != shapes(sample, result.output):
        found.append("output changed shape:\n" + _difference(sample.output, result.output))
    return found


def _difference(page: str, real: str) -> str:
    """The lines one side has and the other lacks, by shape; the whole output when the lines
    are the same but wrapped or ordered otherwise."""
    only_page, only_real = _unmatched(page, real), _unmatched(real, page)
    if not only_page and not only_real:
        return _indent(real)
    return "\n".join([f"  only in the page:\n{_indent(only_page or '(none)')}",
                      f"  only in the real output:\n{_indent(only_real or '(none)')}"])


def _unmatched(text: str, other: str) -> str:
    left = Counter(shape(line) for line in other.split("\n"))
    unmatched = []
    for line in text.split("\n"):
        if left[shape(line)] > 0:
            left[shape(line)] -= 1
        else:
            unmatched.append(line)
    return "\n".join(unmatched)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.split("\n"))


def commands(blocks: list[Block]) -> list[str]:
    return [sample.command for block in blocks for sample in block.samples]


def report(blocks: list[Block], results: list[Result], name: str,
           compare_shapes: bool = True) -> list[str]:
    """One entry per sample block whose commands disagree with their real run."""
    remaining = iter(results)
    found = []
    for block in blocks:
        lines = [f"{name}:{sample.line}: $ {sample.command}\n" + _indent(problem)
                 for sample in block.samples
                 for problem in problems(sample, next(remaining), compare_shapes)]
        if lines:
            found.append("\n".join(lines))
    return found


def pages() -> list[Path]:
    """README.md and every page of the docs site: the files whose samples must stay real."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def page_name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


@dataclass(frozen=True)
class Session:
    """One page's samples and what their commands really did."""
    page: Path
    text: str
    blocks: list[Block]
    results: list[Result]
    seconds: float


def run_page(page: Path, cwd: Path | None = None) -> Session:
    """Run ``page``'s samples as one session: in ``cwd``, else in a fresh directory."""
    text = page.read_text(encoding="utf-8")
    blocks = find_blocks(text)
    start = time.monotonic()
    if cwd is not None:
        results = run_session(commands(blocks), cwd)
    else:
        with tempfile.TemporaryDirectory(prefix="samples-session-") as fresh:
            results = run_session(commands(blocks), Path(fresh))
    return Session(page, text, blocks, results, time.monotonic() - start)


@click.command()
@click.option("--check", is_flag=True,
              help="Compare the output's shape instead of rewriting; exit 1 on a change.")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(check: bool, files: tuple[Path, ...]) -> None:
    """Run the samples of FILES (default: README.md and every docs page), one session a page."""
    sessions = [s for s in (run_page(page.resolve()) for page in files or pages()) if s.blocks]
    found = {s.page: report(s.blocks, s.results, page_name(s.page), check) for s in sessions}
    for entry in (entry for entries in found.values() for entry in entries):
        click.echo(entry, err=True)
    blocks = sum(len(s.blocks) for s in sessions)
    seconds = sum(s.seconds for s in sessions)
    pages_run = f"{len(sessions)} page{'' if len(sessions) == 1 else 's'}"
    if check:
        changed = sum(len(entries) for entries in found.values())
        click.echo(f"{changed} of {blocks} sample blocks changed, in {pages_run} "
                   f"({seconds:.1f} s).")
        sys.exit(1 if changed else 0)
    _write(sessions, found)
    commands_run = sum(len(s.results) for s in sessions)
    click.echo(f"Ran {commands_run} commands in {blocks} sample blocks of {pages_run} in "
               f"{seconds:.1f} s.")


def _write(sessions: list[Session], found: dict[Path, list[str]]) -> None:
    """Each page with its real output, but for the pages whose commands went wrong."""
    for session in sessions:
        if not found[session.page]:
            session.page.write_text(rewrite(session.text, session.blocks, session.results),
                                    encoding="utf-8")
    broken = [page_name(s.page) for s in sessions if found[s.page]]
    if broken:
        # A sample declares a failure by starting its output with "Error:"; anything else
        # that fails is a broken command, not new output.
        raise click.ClickException(f"not rewritten: {', '.join(broken)}: commands exited "
                                   "otherwise than their samples say")


if __name__ == "__main__":
    main()
