"""harness/fixtures/hosts.py reachable: the dom0-to-dom0 step peer_host and the cross-version
pair (harness/fixtures/pair.py) both take before a migration; dom0's shell is faked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness import timeouts as t
from harness.fixtures import hosts, pair
from harness.remote import CommandResult


def host(rc: int, seen: list):
    def run(command, timeout):
        seen.append((command, timeout))
        return CommandResult(command, rc, "", "ssh: connect to host 10.99.0.2 port 22: No route to host\n"
                             if rc else "", "l1", 0.1)
    return SimpleNamespace(name="bookworm-main-0", remote=SimpleNamespace(run=run))


@pytest.mark.parametrize("transport, probe", [
    ("ssh", f"ssh -o ConnectTimeout={t.PEER_CONNECT_S} root@10.99.0.2 true"),
    ("tcp", "socket.create_connection((\"10.99.0.2\", 22)"),
])
def test_the_probe_is_the_transports_own(transport, probe) -> None:
    seen: list = []
    hosts.reachable(host(0, seen), "10.99.0.2", transport)
    assert len(seen) == 1 and probe in seen[0][0] and seen[0][1] == t.PEER_REACH_S


def test_an_unreachable_dom0_is_an_error_naming_both_ends() -> None:
    with pytest.raises(RuntimeError) as exc:
        hosts.reachable(host(255, []), "10.99.0.2", "ssh")
    assert str(exc.value).startswith("dom0 of bookworm-main-0 cannot reach the other dom0 at 10.99.0.2 "
                                     "over the private link: ssh: connect to host")


def test_the_pair_uses_the_same_step() -> None:
    assert pair.reachable is hosts.reachable
