"""harness/ownbuild.py run_as_build_error: a subcommand's own error reaches cli.main as a
BuildError (one line, exit 2), as `nested-xen bisect` and `nested-xen mutant` use it."""

from __future__ import annotations

import argparse

import pytest

from harness import bisect, mutants
from harness.ownbuild import BuildError, run_as_build_error


class OwnError(RuntimeError):
    pass


def test_the_commands_own_error_becomes_a_build_error_with_its_message() -> None:
    def fails(args):
        raise OwnError(f"bad {args.what}")

    with pytest.raises(BuildError) as exc:
        run_as_build_error(fails, argparse.Namespace(what="input"), OwnError)
    assert str(exc.value) == "bad input" and exc.value.__suppress_context__


def test_its_result_and_other_errors_pass_through() -> None:
    assert run_as_build_error(lambda args: 3, argparse.Namespace(), OwnError) == 3

    def breaks(args):
        raise KeyError("not the command's own")

    with pytest.raises(KeyError):
        run_as_build_error(breaks, argparse.Namespace(), OwnError)


def test_bisect_and_mutant_report_their_errors_as_build_errors(tmp_path) -> None:
    with pytest.raises(BuildError, match="does not exist: give a Xen git checkout"):
        bisect.cmd_bisect(argparse.Namespace(src=str(tmp_path / "nosuch")))
    with pytest.raises(BuildError, match="no \\*.patch mutants"):
        mutants.cmd_mutant(argparse.Namespace(mutants_dir=str(tmp_path), action="run", names=[], all=True))
