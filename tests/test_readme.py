"""The samples of README.md and of every docs page stay real: every ``$`` command in them
still runs, in one session a page as ``tools/readme_samples.py`` runs them, exits as its
sample says and prints output of the same shape (timestamps, durations, made ids and numbers
aside)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.stores("sqlite")  # no store of its own to test


def _load_tool() -> ModuleType:
    # tools/ is not a package: load the script from its path.
    path = Path(__file__).resolve().parent.parent / "tools" / "readme_samples.py"
    spec = importlib.util.spec_from_file_location("readme_samples", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


samples = _load_tool()


def _pages_with_samples() -> list[Path]:
    return [page for page in samples.pages()
            if samples.find_blocks(page.read_text(encoding="utf-8"))]


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with_samples(), ids=samples.page_name)
def test_every_sample_runs_with_the_shape_its_page_shows(page: Path, tmp_path: Path) -> None:
    # In tmp_path, so the conftest checks that the session's database replays.
    session = samples.run_page(page, tmp_path)
    changed = samples.report(session.blocks, session.results, samples.page_name(page))
    if changed:
        pytest.fail("\n\n".join(changed) + "\n\n(python tools/readme_samples.py rewrites them)",
                    pytrace=False)


def test_every_docs_page_is_a_samples_page() -> None:
    """A page the tool skipped could drift: the docs are found by walking docs/, so a new
    page is run without anyone listing it."""
    docs = set(samples.DOCS.rglob("*.md"))
    assert docs and docs <= set(samples.pages())
    assert samples.README in samples.pages()
    assert samples.DOCS / "guides" / "shell.md" in _pages_with_samples()


def sample(command: str, output: str) -> object:
    return samples.Sample(command, output, 1)


def result(output: str, status: int = 0) -> object:
    return samples.Result("", output, status, 0.0)


def test_times_durations_ids_numbers_and_wrapping_are_not_shape() -> None:
    readme = """  18   2026-11-27 21:58:10.349   failed   w3   attempt 1: exit status 1 after
                                                    0.001s; output: trying
 ──────────────
=== attempt 1 on worker w4 at 2026-11-30 03:39:51: timed-out after 5.022s ==="""
    real = """  117   2027-01-02 09:01:59.1   failed   w117   attempt 1: exit status 1
                                                     after 12.5s; output: trying
 ────────────────────────
=== attempt 1 on worker w2041 at 2027-01-02 10:00:00: timed-out after 5s ==="""
    assert samples.problems(sample("queuectl history", readme), result(real)) == []


def test_a_changed_word_or_a_lost_line_is_a_changed_shape() -> None:
    readme = "Jobs  pending: 0  scheduled: 2\nWorkers: none active"
    for real in ("Jobs  pending: 0  scheduled: 2", "Jobs  pending: 0  waiting: 2\nWorkers: none active"):
        assert samples.problems(sample("queuectl status", readme), result(real))


def test_interleaved_workers_are_compared_line_by_line_in_any_order() -> None:
    readme = "Worker started: w3\nWorker started: w4\n[w3] stopped (signal)"
    real = "Worker started: w12\n[w12] stopped (signal)\nWorker started: w13"
    assert samples.problems(sample("queuectl worker -v -c 2", readme), result(real)) == []
    assert samples.problems(sample("queuectl worker -v -c 1", readme), result(real))


def test_a_sample_that_shows_an_error_must_fail_and_every_other_must_not() -> None:
    error = "Error: Job job1 is completed"
    assert samples.problems(sample("queuectl cancel job1", error), result(error, 1)) == []
    assert samples.problems(sample("queuectl cancel job1", error), result(error, 0))
    assert samples.problems(sample("queuectl list", "Jobs"), result("Jobs", 1))


def test_rewriting_fills_in_outputs_and_leaves_other_blocks_alone() -> None:
    text = "```sh\n$ not a sample, no prompt first\n```\n\n```\n$ echo a   # why\nold\n$ true\n```\n"
    text = text.replace("```sh\n$", "```sh\nmake\n$")
    blocks = samples.find_blocks(text)
    assert [s.command for b in blocks for s in b.samples] == ["echo a   # why", "true"]
    written = samples.rewrite(text, blocks, [result("a\nb"), result("")])
    assert written == text.replace("old\n", "a\nb\n")


def _quick_start() -> list[str]:
    """The two commands of the README's quick start, as written."""
    text = samples.README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in section.split("```sh\n")[1:]
            for block in [block.split("```", 1)[0]]]


def test_the_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    install_and_run, install_and_test = _quick_start()
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
    # The name on the package index is another project's.
    for page in samples.pages():
        assert "pip install queuectl" not in page.read_text(encoding="utf-8"), page


@pytest.mark.slow
def test_the_first_quick_start_command_runs_a_job_with_the_systems_own_python(
        tmp_path: Path) -> None:
    """As written, in a fresh copy of the repository, with the system's own Python first on
    PATH (Debian's refuses ``pip install`` outside a virtual environment, PEP 668)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True,
                             check=True).stdout.decode().split("\0")
    clone = tmp_path / "clone"
    for name in filter(None, tracked):
        if (root / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, clone / name)
    command = _quick_start()[0]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8"}
    done = subprocess.run(["sh", "-c", command], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Job added successfully with ID: hello" in done.stdout
    assert "Job hello state: completed" in done.stdout
    assert "output: Hello World" in done.stdout
