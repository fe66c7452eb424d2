"""The harness's timeouts live in harness/timeouts.py, each with its reason; a literal timeout
anywhere else in harness/ or plugins/ has its reason written beside it (a comment on its
line or on the comment line just above), and the run config's `timeouts:` still sets them."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

from harness import timeouts as t
from harness.config import Timeouts

ROOT = Path(__file__).resolve().parents[2]
LEAF = "harness/timeouts.py"
# Tools that run in dom0 on their own (they cannot import the harness), with their own
# defaults; nxchannel.py and nxwatch.py are also bytes of every L1 snapshot key.
DOM0_TOOLS = ("harness/agent/nxagent/", "harness/agent/nxchannel.py", "harness/agent/nxwatch.py",
              "harness/agent/nxstream.py")
TIMEOUT_NAME = re.compile(r"timeout|deadline|patience|grace", re.I)
SHELL_TIMEOUT = re.compile(r"\btimeout (?:-k \S+ )?\d")


def _number(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and isinstance(node.value, int | float)
            and not isinstance(node.value, bool))


def _numbers_in(node: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(node) if _number(n)]


def _defaults(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, ast.AST]]:
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    with_default = positional[len(positional) - len(args.defaults):]
    out = list(zip([a.arg for a in with_default], args.defaults, strict=True))
    out += [(a.arg, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
    return out


def literal_timeouts(source: str) -> list[tuple[int, str]]:
    """(line, what) of each timeout given as a number: a ``timeout=``-like keyword, a
    timeout-named parameter's default or assignment, ``settimeout(N)``, ``wait(N)``,
    ``monotonic() + N`` and a shell ``timeout N``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            found += [(n.lineno, f"{k.arg}=") for k in node.keywords
                      if k.arg and TIMEOUT_NAME.search(k.arg) for n in _numbers_in(k.value)]
            name = node.func.attr if isinstance(node.func, ast.Attribute) else ""
            if name in ("settimeout", "wait", "join") and node.args and _number(node.args[0]):
                found.append((node.args[0].lineno, f"{name}()"))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [(d.lineno, f"{arg} default") for arg, d in _defaults(node)
                      if TIMEOUT_NAME.search(arg) and _number(d)]
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None and _number(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(node.lineno, f"{tg.id} =") for tg in targets
                      if isinstance(tg, ast.Name) and TIMEOUT_NAME.search(tg.id)]
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and _number(node.right):
            left = node.left
            if isinstance(left, ast.Call) and getattr(left.func, "attr", "") == "monotonic":
                found.append((node.lineno, "monotonic() + N"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SHELL_TIMEOUT.search(
                node.value):
            found.append((node.lineno, "shell timeout N"))
    return sorted(set(found))


def _reasoned_lines(source: str) -> set[int]:
    """Lines with a comment, and the line after a comment-only line."""
    out = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out.add(tok.start[0])
            if not tok.line[:tok.start[1]].strip():
                out.add(tok.start[0] + 1)
    return out


def unreasoned(source: str) -> list[tuple[int, str]]:
    reasoned = _reasoned_lines(source)
    return [(line, what) for line, what in literal_timeouts(source) if line not in reasoned]


def _checked_files() -> list[tuple[str, Path]]:
    out = []
    for d in ("harness", "plugins"):
        for src in sorted((ROOT / d).rglob("*.py")):
            rel = src.relative_to(ROOT).as_posix()
            if rel != LEAF and not rel.startswith(DOM0_TOOLS):
                out.append((rel, src))
    return out


def test_no_timeout_literal_without_its_reason():
    bare = [f"{rel}:{line}: {what}" for rel, src in _checked_files()
            for line, what in unreasoned(src.read_text())]
    assert not bare, ("timeouts given as a bare number (name it in harness/timeouts.py with its reason, "
                      "or write the reason beside it):\n" + "\n".join(bare))


@pytest.mark.parametrize("source, expected", [
    ("remote.run('true', timeout=30)", [(1, "timeout=")]),
    ("remote.run('true', timeout=30)  # a reason", []),
    ("# a reason\nremote.run('true', timeout=30)", []),
    ("remote.run('true', timeout=t.QUICK_COMMAND_S)", []),
    ("def f(x, timeout: float = 5.0): pass", [(1, "timeout default")]),
    ("def f(x, timeout: float = t.SSH_PROBE_S): pass", []),
    ("sock.settimeout(1.0)", [(1, "settimeout()")]),
    ("proc.wait(timeout=10)", [(1, "timeout=")]),
    ("deadline = time.monotonic() + 120", [(1, "monotonic() + N")]),
    ("x = f'nohup timeout 600 {cmd}'", [(1, "shell timeout N")]),
    ("RESTORE_TIMEOUT = 20.0", [(1, "RESTORE_TIMEOUT =")]),
    ("run(cmd, timeout=timeout_s + GRACE + 60)", [(1, "timeout=")]),
    ("time.sleep(1.0); count = 30; ', '.join(x[-5:]); stop.wait(POLL_S / 2)", []),
    ("thread.join(5)", [(1, "join()")]),
])
def test_the_scan_finds_bare_timeouts_and_only_them(source, expected):
    assert unreasoned(source) == expected


def test_the_scan_catches_a_bare_literal_put_back():
    """Negative control: a named timeout in a real module turned back into its number is caught."""
    src = (ROOT / "harness/xen.py").read_text()
    assert unreasoned(src) == []
    bare = src.replace("timeout: float = t.XL_DESTROY_S", "timeout: float = 120.0", 1)
    assert bare != src and unreasoned(bare) == [(bare.splitlines().index(
        next(line for line in bare.splitlines() if "timeout: float = 120.0" in line)) + 1, "timeout default")]


def test_every_named_timeout_says_why():
    """Each timeout in harness/timeouts.py has a comment on its line or just above."""
    source = (ROOT / LEAF).read_text()
    reasoned = _reasoned_lines(source)
    names = [n for n in ast.parse(source).body if isinstance(n, ast.Assign) and _number(n.value)]
    assert names and all(n.lineno in reasoned for n in names), [
        n.targets[0].id for n in names if n.lineno not in reasoned]  # type: ignore[attr-defined]


def test_the_leaf_imports_nothing():
    tree = ast.parse((ROOT / LEAF).read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert all(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in imports)


def test_run_config_defaults_are_the_named_ones_and_still_override(tmp_path):
    from harness.config import load_run_config

    assert Timeouts() == Timeouts(t.XEN_BANNER_S, t.DOM0_KERNEL_S, t.DOM0_SSH_S, t.COMMAND_S,
                                  t.GUEST_READY_S, t.WORKLOAD_S)
    assert (Timeouts().xen_banner, Timeouts().dom0_ssh, Timeouts().guest_ready) == (90.0, 420.0, 600.0)
    config = tmp_path / "run.yaml"
    config.write_text("timeouts:\n  guest_ready: 1234\n  command: 7\n")
    loaded = load_run_config(config).timeouts
    assert (loaded.guest_ready, loaded.command, loaded.dom0_ssh) == (1234.0, 7.0, t.DOM0_SSH_S)


def test_the_agent_client_hosts_and_migration_defaults_are_the_named_ones(monkeypatch):
    import inspect

    from harness.agent.client import Agent
    from harness.fixtures import hosts
    from plugins import _migration_stream as stream

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    assert (default(Agent, "overhead_s"), default(Agent.p2m, "timeout_s"),
            default(Agent.dirty_scan, "timeout_s"), default(Agent.write_page, "timeout_s")) == (
        t.AGENT_OVERHEAD_S, t.AGENT_P2M_S, t.AGENT_DIRTY_SCAN_S, t.AGENT_WRITE_PAGE_S)
    migrate_defaults = {default(stream.migrate_counted, "timeout"), default(stream.migrate_tcp, "timeout")}
    assert migrate_defaults == {t.MIGRATION_XL_S}
    # ssh's ConnectTimeout takes whole seconds: "ConnectTimeout=20.0" would fail every ssh probe.
    assert isinstance(t.PEER_CONNECT_S, int) and not isinstance(t.PEER_CONNECT_S, bool)
    # healthy() reads the patience from its own module at each call (tests and runs set it there;
    # tests/unit/test_plugin_runs.py's in-process runs set it for the whole process).
    monkeypatch.setattr(hosts, "HEALTH_PATIENCE_S", 0.0)
    tries: list[float] = []

    class Remote:
        def run(self, command, timeout):
            tries.append(timeout)
            raise OSError("no answer")

    class Host:
        name, remote, machine = "h", Remote(), None

    assert hosts.healthy(Host()) is False and tries == [t.HEALTH_TRY_S]
