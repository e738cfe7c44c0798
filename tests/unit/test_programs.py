"""Every external program the product, the lab, the benchmarks and the scripts execute is
listed in :mod:`plugin.programs`, and each comes from a Debian package that the set-up
installs: a fresh Debian 12 machine runs ``make test`` (and ``make bench``) with nothing
missing (issue 12: ``nft`` was used by the lab but ``nftables`` was never installed).

The scan reads the code, it does not run it: argv literals (``["nft", "-f", "-"]``), the
first argument of exec-like calls (``run_tool("qemu-img", ...)``, ``posix_spawnp``),
``shutil.which("x")``, Python code kept in strings (the lab host's init), and the shell
scripts' commands. A false hit is cheap (list it or name it in :data:`NOT_PROGRAMS`);
a miss is what this test is for.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from plugin import programs

ROOT = Path(__file__).resolve().parents[2]
#: The lab's PATH (tests/lab/host.py LAB_PATH): sbin included, as for root.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PY_TREES = ("plugin", "qemu_blockdev", "tests", "bench", "scripts")
PY_FILES = ("hooks/qemu",)
#: Shell scripts run on the host (tests/lab/guest/init.sh runs inside the guest on busybox).
SHELL_SCRIPTS = ("scripts/setup.sh", "scripts/build-guest.sh", "bench/setup.sh")
#: Calls whose first positional argument (a string, or an argv list) names the program run.
EXEC_CALLS = {"run", "Popen", "check_output", "check_call", "call", "create_subprocess_exec", "run_tool",
              "posix_spawnp", "posix_spawn", "execvp", "execv", "execlp", "spawn", "netns_run", "_run"}
#: Programs that run another program named later in their argv.
WRAPPERS = {"nsenter", "unshare", "timeout", "env", "nice", "setsid", "taskset", "chroot", "ip"}
#: Shell words that are not programs: builtins, keywords.
SHELL_BUILTINS = {"set", "cd", "echo", "printf", "exit", "return", "local", "export", "trap", "exec", "[", "[[",
                  "test", "read", "shift", "eval", "command", "true", "false", "if", "then", "else", "elif",
                  "fi", "for", "while", "until", "do", "done", "case", "esac", "in", "function", "!", "{", "}",
                  "compgen", "wait", "break", "continue", "unset", "readonly", "shopt", "source", ".", ":"}
#: Strings the scan would take for a program but are not run as one.
NOT_PROGRAMS: dict[str, str] = {
    "ruff": "run as `python -m ruff` from .venv (setup.cfg's test extra), not from a Debian package",
    "mypy": "run as `python -m mypy` from .venv (setup.cfg's test extra), not from a Debian package",
}


def python_sources() -> Iterator[tuple[str, str]]:
    for tree in PY_TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()
    for name in PY_FILES:
        yield name, (ROOT / name).read_text()


def _callee(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def _constants(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = "text"`` (``QEMU = "qemu-system-x86_64"``)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


@cache
def on_path(name: str) -> str | None:
    return shutil.which(name, path=PATH)


def _looks_like_program(text: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", text))


def _argv_programs(elts: list[ast.expr], consts: dict[str, str]) -> Iterator[str]:
    """The program of an argv literal, and those its wrappers run (``ip netns exec NS prog``)."""
    words = [e.value if isinstance(e, ast.Constant) and isinstance(e.value, str)
             else consts.get(e.id) if isinstance(e, ast.Name) else None for e in elts]
    first = words[0] if words else None
    if first is None or not _looks_like_program(first.rsplit("/", 1)[-1]):
        return
    name = first.rsplit("/", 1)[-1]
    yield name
    if name == "ip" and words[1:3] != ["netns", "exec"]:
        return   # ``ip route ...``, ``ip link ...``: ip itself, no program after it
    if name in WRAPPERS:
        # Every later word that is itself a program on PATH: wrappers' options rarely are.
        for word in words[1:]:
            if word and _looks_like_program(word) and on_path(word) and word not in ("netns", "exec"):
                yield word


def _argv_lists(tree: ast.AST) -> Iterator[ast.List | ast.Tuple]:
    """List literals used as an argv: given to a call that runs things, or kept in a name that says argv."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _callee(node)
            runs = name in EXEC_CALLS or bool(re.search(r"run|cmd|exec|spawn|virsh", name))
            for arg in node.args:
                if runs and isinstance(arg, (ast.List, ast.Tuple)):
                    yield arg
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if isinstance(node.value, (ast.List, ast.Tuple)) and any(
                    isinstance(t, ast.Name) and re.search(r"argv|cmd|command", t.id, re.I) for t in targets):
                yield node.value


def scan_python(text: str, where: str) -> Iterator[tuple[str, str]]:
    tree = ast.parse(text, where)
    consts = _constants(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name, arg = _callee(node), node.args[0]
        if name == "which" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            yield arg.value, f"{where}:{node.lineno}"
        # exec-style calls with the program as a string: run_tool("qemu-img", ...), and the
        # lab init's own run("mount", ...) (a bare name: cli.run("mark") is no exec).
        strict = name in EXEC_CALLS - {"run", "call", "spawn", "netns_run", "_run"}
        bare_run = name == "run" and isinstance(node.func, ast.Name)
        if strict or bare_run:
            text_arg = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else (
                consts.get(arg.id) if isinstance(arg, ast.Name) else None)
            if text_arg:
                yield text_arg.rsplit("/", 1)[-1], f"{where}:{node.lineno}"
    for lst in _argv_lists(tree):
        for prog in _argv_programs(lst.elts, consts):
            yield prog, f"{where}:{lst.lineno}"
    for node in ast.walk(tree):
        # Python kept in a string and run elsewhere (the lab host's init).
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            try:
                inner = ast.parse(node.value)
            except SyntaxError:
                continue
            yield from scan_python(ast.unparse(inner), f"{where}:{node.lineno}:<string>")


_SPLIT = re.compile(r"\|\||&&|[;|(){}\n]|\bthen\b|\bdo\b|\belse\b|\bif\b|\bwhile\b|\buntil\b|!")


def _shell_code(text: str) -> str:
    """The script with what is not run taken out: comments, quoted text (but the ``$(...)`` in
    double quotes), ``${...}``, ``$((...))``, array values; every command substitution is put
    on a line of its own, so its first word is a command's first word."""
    out: list[str] = []
    stack: list[str] = []   # '"' (in double quotes), '$(' (a command substitution), '(' (a subshell)
    i = 0
    while i < len(text):
        c = text[i]
        quoted = bool(stack) and stack[-1] == '"'
        if text.startswith("$((", i):
            i = text.index("))", i) + 2
            out.append("X")
        elif text.startswith("${", i):
            i = text.index("}", i) + 1
            out.append("X")
        elif text.startswith("$(", i):
            stack.append("$(")
            out.append("\n")
            i += 2
        elif quoted:
            if c == '"':
                stack.pop()
            i += 2 if c == "\\" else 1
        elif c == "'":
            i = text.index("'", i + 1) + 1
            out.append("X")
        elif c == '"':
            stack.append('"')
            out.append("X")
            i += 1
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;"):
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif text.startswith("\\\n", i):
            out.append(" ")
            i += 2
        elif text.startswith("=(", i):
            i = text.index(")", i) + 1
            out.append("=X")
        elif c == "(":
            stack.append("(")
            out.append(c)
            i += 1
        elif c == ")" and stack and stack[-1] in ("(", "$("):
            out.append("\n" if stack.pop() == "$(" else c)
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def scan_shell(text: str, where: str) -> Iterator[tuple[str, str]]:
    """The first word of every simple command (good enough for our plain scripts)."""
    functions = set(re.findall(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(\)", text, re.M))
    for line in _shell_code(text).splitlines():
        case_pattern = re.match(r"^\s*[^\s()]+\)", line)
        if case_pattern:  # `*.ko.xz) xz -dc ... ;;`
            line = line[case_pattern.end():]
        for part in _SPLIT.split(line):
            words = part.split()
            while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] in ("exec", "command")
                             or re.match(r"^\d*[<>]", words[0])):
                words.pop(0)
            if not words:
                continue
            word = words[0]
            if (word in SHELL_BUILTINS or word in functions or word.startswith(("$", "-", ".", "/", "X"))
                    or not _looks_like_program(word)):
                continue
            yield word, where


@cache
def executed() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for where, text in python_sources():
        for prog, line in scan_python(text, where):
            found.setdefault(prog, []).append(line)
    for name in SHELL_SCRIPTS:
        for prog, line in scan_shell((ROOT / name).read_text(), name):
            found.setdefault(prog, []).append(line)
    for prog in NOT_PROGRAMS:
        found.pop(prog, None)
    return found


def test_every_executed_program_is_listed() -> None:
    unlisted = {prog: where[:3] for prog, where in executed().items() if prog not in programs.PROGRAMS}
    assert not unlisted, f"executed but not in plugin/programs.py (add each with its Debian package): {unlisted}"


def test_every_listed_program_is_executed() -> None:
    """The list stays the truth: a program nobody runs any more leaves it."""
    stale = sorted(set(programs.PROGRAMS) - set(executed()))
    assert not stale, f"listed in plugin/programs.py but executed nowhere: {stale}"


def test_the_scan_finds_what_it_is_for() -> None:
    """The scan itself, on the shapes the code uses (so a blind scan cannot pass the test above)."""
    code = (
        'import subprocess\nQEMU = "qemu-system-x86_64"\n'
        'subprocess.run(["nft", "-f", "-"])\n'
        'host.netns_run(["ip", "netns", "exec", ns, "unshare", "--mount", "sh"])\n'
        'argv = [QEMU, "-m", "64"]\n'
        'await run_tool("qemu-img", "create")\n'
        'shutil.which("openssl")\n'
        'INIT = "import os\\nrun(\'virtlogd\', \'--daemon\')"\n'
        'cli.run("mark", "--wait")\n'                      # a CLI verb, not a program
        'if kind in ("file", "block"): pass\n'
    )
    found = {prog for prog, _ in scan_python(code, "x.py")}
    assert found == {"nft", "ip", "unshare", "sh", "qemu-system-x86_64", "qemu-img", "openssl", "virtlogd"}
    script = ('#!/bin/sh\nset -eu  # sed here is a comment\nx="$(dirname "$0")"\nif ! command -v nft >/dev/null; then\n'
              '  apt-get install -y "$p" | tee log\nfi\ncase "$f" in\n*.xz) xz -dc "$f" ;;\nesac\n'
              'die() { echo "cannot (not) run"; }\nPACKAGES="qemu-utils\nbusybox"\nlen=$((n + 1))\n')
    assert {prog for prog, _ in scan_shell(script, "x.sh")} == {"dirname", "apt-get", "tee", "xz"}


# -- packages ------------------------------------------------------------------------------

def setup_packages(script: str) -> list[str]:
    match = re.search(r'^PACKAGES="([^"]*)"', (ROOT / script).read_text(), re.M)
    assert match, f"{script} has no PACKAGES=\"...\" line"
    return match.group(1).split()


@cache
def installed() -> dict[str, tuple[str, list[list[str]]]]:
    """Installed package -> (priority, dependencies as lists of alternatives); provides included."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Priority}\t"
                          "${Pre-Depends}, ${Depends}\t${Provides}\n"], capture_output=True, text=True, check=True)
    pkgs: dict[str, tuple[str, list[list[str]]]] = {}
    provides: dict[str, str] = {}
    for line in out.stdout.splitlines():
        status, name, priority, depends, provided = line.split("\t")
        if not status.startswith("ii"):
            continue
        alternatives = [[re.sub(r"[\s(:].*", "", alt.strip()) for alt in dep.split("|")]
                        for dep in depends.split(",") if dep.strip()]
        pkgs[name] = (priority, alternatives)
        for virtual in provided.split(","):
            if virtual.strip():
                provides.setdefault(re.sub(r"[\s(].*", "", virtual.strip()), name)
    for virtual, real in provides.items():
        pkgs.setdefault(virtual, ("virtual", [[real]]))
    return pkgs


@cache
def closure(script: str) -> set[str]:
    """The packages that ``script`` installs: its PACKAGES and their dependencies (first installed
    alternative; an uninstalled package's dependencies are not known here)."""
    pkgs, seen, todo = installed(), set(), setup_packages(script)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in pkgs:
            continue
        for alternatives in pkgs[name][1]:
            todo.extend([alt for alt in alternatives if alt in pkgs][:1])
    return seen


def _candidates(path: str) -> set[str]:
    """``path`` as dpkg may know it: through alternatives' links, with and without merged /usr."""
    real = os.path.realpath(path)
    return {path, real} | {p.removeprefix("/usr") for p in (path, real) if p.startswith("/usr/")}


@cache
def owners() -> dict[str, set[str]]:
    """``dpkg -S`` of every listed program found on PATH, in one call: path -> packages."""
    paths = sorted({c for name in programs.PROGRAMS if (p := on_path(name)) for c in _candidates(p)})
    res = subprocess.run(["dpkg", "-S", *paths], capture_output=True, text=True)
    out: dict[str, set[str]] = {}
    for line in res.stdout.splitlines():
        if not line.startswith("diversion by") and ": " in line:
            pkgs, path = line.split(": ", 1)
            out.setdefault(path.strip(), set()).update(p.strip() for p in pkgs.split(","))
    return out


def owner(path: str) -> set[str]:
    return set().union(*(owners().get(c, set()) for c in _candidates(path)))


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg") is None, reason="checks Debian packages (dpkg)")


@needs_dpkg
@pytest.mark.parametrize("name", sorted(programs.PROGRAMS))
def test_listed_program_comes_from_a_package_the_setup_installs(name: str) -> None:
    prog = programs.PROGRAMS[name]
    base = {p for p, (priority, _) in installed().items() if priority == "required"}
    wanted = closure("scripts/setup.sh") | (closure("bench/setup.sh") if prog.used_by == programs.BENCH else set())
    assert prog.package in wanted | base, (
        f"{name}: package {prog.package} is not installed by scripts/setup.sh"
        + (" or bench/setup.sh" if prog.used_by == programs.BENCH else "") + ": add it to PACKAGES")
    path = on_path(name)
    if path is None:
        if prog.used_by == programs.BENCH and prog.package not in installed():
            return   # bench/setup.sh has not run here: that it installs the package is checked above
        pytest.fail(f"{name} not found on PATH: run scripts/setup.sh")
    assert prog.package in owner(path), f"{name} ({path}) comes from {owner(path) or 'no package'}, " \
        f"not {prog.package} as plugin/programs.py says"


def test_setup_installs_nftables() -> None:
    """Issue 12's miss, named: the lab's network faults run nft."""
    assert "nftables" in setup_packages("scripts/setup.sh")
