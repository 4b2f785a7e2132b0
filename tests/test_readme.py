"""Every fenced Python and shell example of README.md, run against the test Redis.

One test per fenced block, named ``readme-L<line of its opening fence>-<language>``,
so a snippet that no longer runs as written fails the suite.

How a block runs, by the language of its fence:

* ``python``: saved to a file, run as ``[sys.executable, file]``; must exit 0.
* ``sh``, ``bash``, ``shell``: saved to a file, run as ``bash -euo pipefail file``;
  must exit 0.
* ``console``: the lines starting with ``$ `` are commands (a trailing ``\\``
  continues one on the next line), the other lines the output shown for the
  command above them. The commands run in order in one ``bash -uo pipefail``
  (so ``export`` and ``cd`` carry over); each must exit 0, except one whose
  shown output starts with ``error:``, which must exit non-zero. Shown output is
  not compared (jids, times and pids differ), unless the block says ``expect``.
* Any other language is reported as skipped; a fence without a language fails
  (tag it: ``console``, ``text``, ...), so no example is left out silently.

Every block runs in a fresh temporary directory as its working directory, with
``REDIS_URL`` = the test Redis, ``EXQ_NAMESPACE`` = a fresh namespace (its keys
deleted afterwards), no other ``EXQ_*`` variable, ``PYTHONUNBUFFERED=1`` and the
venv's ``bin`` first on ``PATH`` (``exq-fast`` is the project's console script).
A runnable block that picks its own Redis or namespace (``Config(...)`` rather
than ``Config.from_env(...)``, ``namespace=``, ``--namespace``,
``EXQ_NAMESPACE=``...) fails: it would touch keys outside the test's namespace.

Annotations: an HTML comment (invisible on GitHub) on the line right before the
fence, ``<!-- readme: KEY=VALUE KEY="VALUE WITH SPACES" FLAG -->``:

* ``skip="WHY"``: not run; reported as skipped with WHY (a reason is required).
* ``session=NAME``: the blocks of session NAME share one directory and one
  namespace. A block's test first runs the earlier blocks of its session that
  have not run yet, so each test also passes alone (``-k``).
* ``file=NAME`` (with ``session=``): written to NAME in the session's directory
  instead of being run (``compile``/``bash -n`` checked), for a later block to use.
* ``background until="TEXT"``: a block that runs until stopped (``exq-fast run``,
  a node): started, then awaited until TEXT appears in its output (30 s at
  most); then SIGTERM (to the Python process, or to the commands the shell is
  running) and it must exit with status 0 within 20 s. Outside a session that
  happens in its own test; in a session, after the session's last block.
* ``prints="TEXT"``: the block's output (stdout and stderr) must contain TEXT.
* ``expect`` (console): each command's output must equal the output shown
  (trailing spaces ignored).
* ``cwd=repo``: run in the checkout's root instead of a temporary directory
  (the README's ``make`` targets are run there).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from exq_fast.embedded import delete_namespace
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent
"""The venv's bin directory: ``exq-fast`` there is the project's console script."""

MIN_BLOCKS = 5
"""Runnable (Python, shell, console) blocks README.md has today: an extractor that
finds fewer is broken, whatever the other tests say."""

RUN_TIMEOUT = 60.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

LANGUAGES = {"python": "python", "sh": "shell", "bash": "shell", "shell": "shell",
             "console": "console"}
"""Fence language -> how the block runs."""

NAMESPACE_ESCAPES = {
    "python": (r"\bConfig\(", r"\bnamespace\s*=", r"\bredis_url\s*="),
    "shell": (r"\bEXQ_NAMESPACE=", r"\bREDIS_URL=", r"\bEXQ_REDIS_\w+=", r"--namespace\b",
              r"--redis-url\b"),
}
NAMESPACE_ESCAPES["console"] = NAMESPACE_ESCAPES["shell"]

_FLAGS = frozenset({"background", "expect"})
_VALUED = frozenset({"skip", "session", "file", "until", "prints", "cwd"})
_ANNOTATION = re.compile(r"^\s*<!--\s*readme:(?P<body>.*?)-->\s*$")
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class ReadmeError(ValueError):
    """README.md has an annotation or fence this harness cannot understand."""


class BlockFailed(AssertionError):
    """A block did not run as written."""


@dataclass(frozen=True)
class Block:
    """One fenced block and its annotation."""

    line: int  # the opening fence's line number, 1-based
    lang: str
    code: str
    skip: str | None = None
    session: str | None = None
    file: str | None = None
    background: bool = False
    until: str | None = None
    prints: str | None = None
    expect: bool = False
    cwd_repo: bool = False

    @property
    def kind(self) -> str | None:
        """``python``, ``shell``, ``console``, or None (not run)."""
        return LANGUAGES.get(self.lang)

    @property
    def id(self) -> str:
        return f"readme-L{self.line}-{self.lang or 'untagged'}"


def parse_annotation(body: str, line: int) -> dict[str, str | bool]:
    """``KEY=VALUE KEY="..." FLAG`` of one ``<!-- readme: ... -->`` comment."""
    try:
        tokens = shlex.split(body)
    except ValueError as exc:
        raise ReadmeError(f"line {line}: bad annotation {body!r}: {exc}") from None
    values: dict[str, str | bool] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if key in values:
            raise ReadmeError(f"line {line}: {key!r} given twice")
        if sep and key in _VALUED and value:
            values[key] = value
        elif not sep and key in _FLAGS:
            values[key] = True
        else:
            raise ReadmeError(
                f"line {line}: {token!r}: expected one of {sorted(_FLAGS)} or "
                f"{sorted(k + '=VALUE' for k in _VALUED)}")
    return values


def _block(line: int, lang: str, code: str, notes: dict[str, str | bool]) -> Block:
    def text(key: str) -> str | None:
        value = notes.get(key)
        return value if isinstance(value, str) else None

    block = Block(line=line, lang=lang, code=code, skip=text("skip"),
                  session=text("session"), file=text("file"),
                  background=bool(notes.get("background")), until=text("until"),
                  prints=text("prints"), expect=bool(notes.get("expect")),
                  cwd_repo=text("cwd") == "repo")
    problems = []
    if "cwd" in notes and not block.cwd_repo:
        problems.append("cwd= takes only 'repo'")
    if block.background != (block.until is not None):
        problems.append('background needs until="TEXT", and until= needs background')
    if block.file is not None and (block.session is None or block.background or block.prints
                                   or block.expect or block.cwd_repo):
        problems.append("file= needs session= and takes no background, prints, expect or cwd")
    if block.expect and block.kind != "console":
        problems.append("expect is for console blocks")
    if notes and block.kind is None and not block.skip:
        problems.append(f"an annotated block must be {sorted(LANGUAGES)}")
    if problems:
        raise ReadmeError(f"line {line}: " + "; ".join(problems))
    return block


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of a Markdown text, with its annotation."""
    lines = text.splitlines()
    blocks: list[Block] = []
    notes: dict[str, str | bool] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        number = index + 1
        annotation = _ANNOTATION.match(line)
        fence = _FENCE.match(line)
        if notes is not None and fence is None:
            raise ReadmeError(f"line {index}: a readme annotation must be right before a fence")
        if annotation is not None:
            notes = parse_annotation(annotation["body"], number)
        elif "<!-- readme" in line:
            raise ReadmeError(f"line {number}: a readme annotation is one line: {line!r}")
        elif fence is not None and not (fence["fence"][0] == "`" and "`" in fence["info"]):
            marker, indent = fence["fence"], len(fence["indent"])
            close = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
            end = next((i for i in range(index + 1, len(lines)) if close.match(lines[i])), None)
            if end is None:
                raise ReadmeError(f"line {number}: fence never closed")
            body = [re.sub(rf"^ {{0,{indent}}}", "", raw) for raw in lines[index + 1:end]]
            lang = (fence["info"].split() or [""])[0].lower()
            blocks.append(_block(number, lang, "\n".join(body) + "\n", notes or {}))
            notes = None
            index = end
        index += 1
    if notes is not None:
        raise ReadmeError("the last readme annotation is not followed by a fence")
    return blocks


def parse_console(code: str) -> list[tuple[str, list[str]]]:
    """``(command, output shown)`` pairs of a console block."""
    commands: list[tuple[str, list[str]]] = []
    continued = False
    for line in code.splitlines():
        if continued:
            command, shown = commands[-1]
            commands[-1] = (command + "\n" + line, shown)
        elif line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
        elif line.strip():
            raise ReadmeError(f"console block: output before the first '$ ' command: {line!r}")
        continued = bool(commands) and line.endswith("\\") and not commands[-1][1]
    if not commands:
        raise ReadmeError("console block without a '$ ' command")
    return commands


def namespace_escape(block: Block) -> str | None:
    """Why ``block`` would leave the test's Redis or namespace, or None."""
    for pattern in NAMESPACE_ESCAPES.get(block.kind or "", ()):
        found = re.search(pattern, block.code)
        if found:
            return (f"{block.id} picks its own Redis or namespace ({found[0]!r}); it would touch "
                    "keys outside the test's namespace: honour REDIS_URL and EXQ_NAMESPACE "
                    "(Config.from_env()), or skip it with a reason")
    return None


def block_env(redis_url: str, namespace: str) -> dict[str, str]:
    """The environment of a block: the test Redis and namespace, the venv's bin first."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("EXQ_") and name not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env.update(REDIS_URL=redis_url, EXQ_NAMESPACE=namespace, PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', os.defpath)}")
    return env


@dataclass
class Background:
    """A block running until stopped, its output collected by a thread."""

    block: Block
    proc: subprocess.Popen[bytes]
    chunks: list[bytes] = field(default_factory=list)
    reader: threading.Thread | None = None

    def start_reading(self) -> None:
        stream = self.proc.stdout
        assert stream is not None

        def read() -> None:
            with contextlib.suppress(OSError):  # closed by kill() after a 5 s join at most
                for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
                    self.chunks.append(chunk)

        self.reader = threading.Thread(target=read, name=f"read-{self.block.id}", daemon=True)
        self.reader.start()

    def output(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def kill(self) -> None:
        """Kill whatever of its process group still runs; close its pipe."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.reader is not None:
            self.reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Session:
    """The directory and namespace one block, or the blocks of one session, share."""

    name: str | None
    directory: Path
    namespace: str
    done: set[int] = field(default_factory=set)
    backgrounds: list[Background] = field(default_factory=list)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _stale_venv(block: Block) -> str | None:
    """A reason not to run ``make`` in the checkout: it would reinstall the venv."""
    for target in re.findall(r"^\s*make\s+([\w.-]+)", block.code, re.MULTILINE):
        dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True,
                             check=False, timeout=30)
        if "pip" in dry.stdout:
            return (f"`make {target}` would reinstall the venv under the running suite (its "
                    "install stamp is older than pyproject.toml): run it by hand first")
    return None


class Runner:
    """Runs blocks; keeps the sessions (and their background blocks) between tests."""

    def __init__(self, blocks: list[Block], redis_url: str, redis_client: redis.Redis,
                 make_dir: Callable[[str], Path]) -> None:
        self.blocks = blocks
        self.redis_url = redis_url
        self.redis_client = redis_client
        self.make_dir = make_dir
        self.sessions: dict[str, Session] = {}

    def close(self) -> None:
        """Kill what still runs (a session whose last test did not run), delete namespaces."""
        for session in self.sessions.values():
            for background in session.backgrounds:
                background.kill()
            delete_namespace(self.redis_client, session.namespace)
        self.sessions.clear()

    def run(self, block: Block, directory: Path, namespace: str) -> None:
        """Run ``block`` (in ``directory`` and ``namespace`` unless it is in a session);
        raise ``BlockFailed`` if it does not run as written, skip if it says so."""
        self._check_runnable(block)
        if block.session is None:
            session = Session(None, directory, namespace)
            try:
                self._execute(block, session)
            finally:
                self._finish(session)
            return
        session = self._session(block.session)
        members = [b for b in self.blocks if b.session == block.session]
        try:
            for earlier in members:
                if earlier.line >= block.line or earlier.line in session.done:
                    continue
                if earlier.skip:
                    pytest.skip(f"{block.id} needs {earlier.id}, skipped: {earlier.skip}")
                try:
                    self._execute(earlier, session)
                except BlockFailed as exc:
                    raise BlockFailed(f"{earlier.id}, which {block.id} needs, failed: "
                                      f"{exc}") from None
            self._execute(block, session)
        finally:
            if block is members[-1]:
                self._finish(session)

    @staticmethod
    def _check_runnable(block: Block) -> None:
        """Skip (with the reason) or fail a block that is not to be run."""
        if block.kind is None:
            if not block.lang:
                raise BlockFailed(f"{block.id}: a fence without a language: tag it "
                                  "(python, sh, console, text, ...)")
            pytest.skip(f"{block.id}: ```{block.lang} blocks are not run")
        if block.skip:
            pytest.skip(f"{block.id}: {block.skip}")
        escape = namespace_escape(block)
        if escape:
            raise BlockFailed(escape)
        stale = _stale_venv(block) if block.cwd_repo else None
        if stale:
            pytest.skip(f"{block.id}: {stale}")

    def _session(self, name: str) -> Session:
        if name not in self.sessions:
            self.sessions[name] = Session(name, self.make_dir(f"readme-{name}"),
                                          "t" + uuid.uuid4().hex[:12])
        return self.sessions[name]

    def _finish(self, session: Session) -> None:
        """Stop the session's background blocks: SIGTERM, then exit status 0."""
        backgrounds, session.backgrounds = session.backgrounds, []
        failures = []
        for background in backgrounds:
            try:
                self._stop(background)
            except BlockFailed as exc:
                failures.append(str(exc))
            finally:
                background.kill()
        if failures:
            raise BlockFailed("\n".join(failures))

    def _execute(self, block: Block, session: Session) -> None:
        env = block_env(self.redis_url, session.namespace)
        cwd = REPO if block.cwd_repo else session.directory
        if block.file is not None:
            self._write_file(block, session.directory / block.file)
        elif block.kind == "console":
            self._run_console(block, cwd, env)
        else:
            suffix = "py" if block.kind == "python" else "sh"
            script = session.directory / f"readme_L{block.line}.{suffix}"
            script.write_text(block.code)
            command = ([sys.executable, str(script)] if block.kind == "python"
                       else ["bash", "-euo", "pipefail", str(script)])
            if block.background:
                session.backgrounds.append(self._start(block, command, cwd, env))
            else:
                status, output = self._call(command, cwd, env)
                if status != 0:
                    raise BlockFailed(f"{block.id} exited with status {status}:\n{output}")
                self._check_prints(block, output)
        session.done.add(block.line)

    @staticmethod
    def _write_file(block: Block, path: Path) -> None:
        path.write_text(block.code)
        if block.kind == "python":
            try:
                compile(block.code, str(path), "exec")
            except SyntaxError as exc:
                raise BlockFailed(f"{block.id} ({block.file}) does not compile: {exc}") from None
        else:
            check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True,
                                   check=False)
            if check.returncode != 0:
                raise BlockFailed(f"{block.id} ({block.file}): bash -n: {check.stderr}")

    @staticmethod
    def _check_prints(block: Block, output: str) -> None:
        if block.prints is not None and block.prints not in output:
            raise BlockFailed(f"{block.id} did not print {block.prints!r}; its output:\n{output}")

    @staticmethod
    def _call(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
        """Run to completion in a process group of its own (killed whole on timeout)."""
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            raise BlockFailed(f"{shlex.join(command)} still running after {RUN_TIMEOUT:.0f} s "
                              f"(killed); its output:\n{out.decode('utf-8', 'replace')}") from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # nothing it started outlives it
        return proc.returncode, out.decode("utf-8", "replace")

    def _run_console(self, block: Block, cwd: Path, env: dict[str, str]) -> None:
        commands = parse_console(block.code)
        with tempfile.TemporaryDirectory(prefix="readme-console-") as tmp:
            results = Path(tmp)
            script = []
            for n, (command, shown) in enumerate(commands):
                expected = "-ne" if shown and shown[0].startswith("error:") else "-eq"
                script.append(f'{{ {command}\n}} >"{results}/{n}.out" 2>&1; rc=$?; '
                              f'echo "$rc" >"{results}/{n}.rc"; [ "$rc" {expected} 0 ] || exit 100')
            (results / "script.sh").write_text("\n".join(script) + "\n")
            status, output = self._call(["bash", "-uo", "pipefail", str(results / "script.sh")],
                                        cwd, env)
            outputs = []
            for n, (command, shown) in enumerate(commands):
                if not (results / f"{n}.rc").exists():
                    raise BlockFailed(f"{block.id}: stopped before `$ {command}` "
                                      f"(status {status}):\n{output}")
                rc = int((results / f"{n}.rc").read_text())
                out = (results / f"{n}.out").read_text(errors="replace")
                outputs.append(out)
                fails = bool(shown) and shown[0].startswith("error:")
                if (rc != 0) != fails:
                    wanted = "a non-zero status (its output shown is an error)" if fails else "0"
                    raise BlockFailed(f"{block.id}: `$ {command}` exited with status {rc}, "
                                      f"expected {wanted}; its output:\n{out}")
                if block.expect:
                    got = [line.rstrip() for line in out.rstrip("\n").splitlines()]
                    want = [line.rstrip() for line in shown]
                    if got != want:
                        raise BlockFailed(f"{block.id}: `$ {command}` printed\n{out}\n"
                                          "instead of\n" + "\n".join(shown))
            if status != 0:
                raise BlockFailed(f"{block.id}: the console script ended with status {status}:"
                                  f"\n{output}")
        self._check_prints(block, "".join(outputs))

    @staticmethod
    def _start(block: Block, command: list[str], cwd: Path, env: dict[str, str]) -> Background:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        background = Background(block, proc)
        background.start_reading()
        assert block.until is not None
        until = block.until
        try:
            wait_for(lambda: until in background.output() or proc.poll() is not None,
                     timeout=START_TIMEOUT, what=f"{block.id} to print {until!r}",
                     detail=background.output)
            if until not in background.output():
                raise BlockFailed(f"{block.id} exited with status {proc.returncode} before "
                                  f"printing {until!r}:\n{background.output()}")
        except BaseException:
            background.kill()
            raise
        return background

    def _stop(self, background: Background) -> None:
        block, proc = background.block, background.proc
        if proc.poll() is not None:
            raise BlockFailed(f"{block.id} (background) ended by itself with status "
                              f"{proc.returncode} before its SIGTERM:\n{background.output()}")
        if block.kind == "python":
            targets = [proc.pid]
        else:  # the commands the shell runs: the shell itself would die and orphan them
            targets = wait_for(lambda: _children(proc.pid), timeout=5,
                               what=f"the command {block.id}'s shell runs")
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        try:
            status = proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BlockFailed(f"{block.id} did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM:"
                              f"\n{background.output()}") from None
        background.kill()  # what the block started and left behind; joins the reader
        if status != 0:
            raise BlockFailed(f"{block.id} exited with status {status} after SIGTERM (expected "
                              f"0):\n{background.output()}")
        self._check_prints(block, background.output())


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runner(redis_url: str, redis_client: redis.Redis,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    assert (BIN / "exq-fast").exists(), f"no exq-fast in {BIN}: pip install -e . into the venv"
    runner = Runner(BLOCKS, redis_url, redis_client, tmp_path_factory.mktemp)
    yield runner
    runner.close()


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_readme_block(block: Block, runner: Runner, tmp_path: Path, namespace: str) -> None:
    runner.run(block, tmp_path, namespace)


def test_readme_block_count() -> None:
    runnable = [block for block in BLOCKS if block.kind is not None]
    assert len(runnable) >= MIN_BLOCKS, (
        f"found {len(runnable)} Python/shell/console blocks in README.md, expected at least "
        f"{MIN_BLOCKS}: {[block.id for block in runnable]}")


# The harness itself, on Markdown of its own: a broken harness must not pass.

SAMPLE = '''\
Text.

<!-- readme: session=node file=jobs.py -->
```python
from pathlib import Path

from exq_fast import worker

@worker("Readme.Touch")
def touch(name):
    Path(name).write_text("ran")
```

<!-- readme: session=node background until="consuming" prints="stopped (processed 1" -->
```sh
exq-fast run --queue default --workers jobs.py
```

<!-- readme: session=node -->
```console
$ exq-fast enqueue default Readme.Touch '["ran.txt"]'
0b2c6fa3-placeholder
$ exq-fast clear queue nope --yes
error: no queue named 'nope' (known: default)
```

<!-- readme: session=node prints="ran" -->
```bash
for _ in $(seq 100); do [ -e ran.txt ] && break; sleep 0.1; done
cat ran.txt
```

<!-- readme: skip="not today" -->
```sh
false
```

```text
plain text
```
'''


def test_harness_parses_annotations() -> None:
    blocks = parse_blocks(SAMPLE)
    assert [block.id for block in blocks] == [
        "readme-L4-python", "readme-L15-sh", "readme-L20-console", "readme-L28-bash",
        "readme-L34-sh", "readme-L38-text"]
    jobs, node, console, bash, skipped, text = blocks
    assert (jobs.session, jobs.file, jobs.kind) == ("node", "jobs.py", "python")
    assert (node.background, node.until, node.prints) == (True, "consuming",
                                                          "stopped (processed 1")
    assert parse_console(console.code)[1] == (
        "exq-fast clear queue nope --yes", ["error: no queue named 'nope' (known: default)"])
    assert (bash.kind, skipped.skip, text.kind) == ("shell", "not today", None)
    assert parse_console("$ echo a \\\n  b\na b\n") == [("echo a \\\n  b", ["a b"])]
    for bad in ('<!-- readme: skip -->\n```sh\ntrue\n```\n',
                '<!-- readme: background -->\n```sh\ntrue\n```\n',
                '<!-- readme: file=x.py -->\n```python\n```\n',
                '<!-- readme: expect -->\n```sh\ntrue\n```\n',
                '<!-- readme: colour=red -->\n```sh\ntrue\n```\n',
                '<!-- readme: session=a -->\n\n```sh\ntrue\n```\n',
                '```sh\ntrue\n'):
        with pytest.raises(ReadmeError):
            parse_blocks(bad)
    assert namespace_escape(Block(1, "python", 'Config(namespace="exq")\n'))
    assert namespace_escape(Block(1, "console", "$ export EXQ_NAMESPACE=x\n"))
    assert namespace_escape(Block(1, "python", "Config.from_env(queues=['a'])\n")) is None


def test_harness_runs_a_session(redis_url: str, redis_client: redis.Redis,
                                tmp_path_factory: pytest.TempPathFactory,
                                tmp_path: Path, namespace: str) -> None:
    """file=, a background node, a console block and a check, then the node's SIGTERM."""
    blocks = parse_blocks(SAMPLE)
    runner = Runner(blocks, redis_url, redis_client, tmp_path_factory.mktemp)
    try:
        runner.run(blocks[3], tmp_path, namespace)  # runs the three blocks before it first
        session = runner.sessions["node"]
        assert session.done == {4, 15, 20, 28}
        assert session.backgrounds == []  # the last block of the session stopped the node
        assert (session.directory / "ran.txt").read_text() == "ran"
        with pytest.raises(pytest.skip.Exception, match="not today"):
            runner.run(blocks[4], tmp_path, namespace)
        with pytest.raises(pytest.skip.Exception, match="not run"):
            runner.run(blocks[5], tmp_path, namespace)
    finally:
        runner.close()


def test_harness_fails_what_does_not_run(redis_url: str, redis_client: redis.Redis,
                                         tmp_path_factory: pytest.TempPathFactory,
                                         tmp_path: Path, namespace: str) -> None:
    sample = '''\
```python
raise SystemExit(3)
```
<!-- readme: prints="two" -->
```sh
echo one
```
```console
$ exq-fast clear queue nope --yes
cleared
```
<!-- readme: expect -->
```console
$ echo hello
goodbye
```
<!-- readme: background until="never printed" -->
```python
print("started")
```
<!-- readme: background until="up" -->
```python
import time
print("up")
time.sleep(60)
```
```
untagged
```
'''
    runner = Runner(parse_blocks(sample), redis_url, redis_client, tmp_path_factory.mktemp)
    expected = ["status 3", "did not print 'two'", "exited with status 1, expected 0",
                "instead of", "before printing 'never printed'",
                "exited with status -15 after SIGTERM", "without a language"]
    try:
        for block, message in zip(runner.blocks, expected, strict=True):
            with pytest.raises(BlockFailed, match=re.escape(message)):
                runner.run(block, tmp_path, namespace)
    finally:
        runner.close()
