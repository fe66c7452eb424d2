"""The plugin API: how a check declares what it needs.

A check is a pytest test in a plugin module, decorated with :func:`check`::

    @check(guests=["pvh", "hvm"], xen=">=4.17", kernel=">=6.1", caps=["hap"])
    def test_gfn_round_trip(guest, agent):
        ...

The harness parametrizes ``guest`` over the declared guest types (ids pv,
pvh, hvm, usable as ``-m hvm``), and skips with a sentence when the booted
host's Xen or dom0 kernel version, capabilities or dom0 mode are out of range.
Versions are PEP 440 specifiers compared against what the booted host reports
(`xl info`, `uname -r`), never against the recipe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

GUEST_TYPES = ("pv", "pvh", "hvm")
DOM0_MODES = ("pv", "pvh")
MARKER = "nx_check"

F = TypeVar("F", bound=Callable[..., Any])


class PluginError(ValueError):
    """A check declared something invalid; the message names the check."""


@dataclass(frozen=True)
class CheckSpec:
    guests: tuple[str, ...] = GUEST_TYPES
    xen: SpecifierSet | None = None
    kernel: SpecifierSet | None = None
    caps: tuple[str, ...] = ()
    dom0: tuple[str, ...] = DOM0_MODES
    fresh_host: bool = False
    # Capabilities needed for one guest type only: {"pv": ("shadow",)} (a PV guest's
    # log-dirty mode, which live migration needs, is shadow paging).
    guest_caps: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def skip_reason(self, facts: Any, guest_type: str | None = None) -> str | None:
        """None if the booted host satisfies this spec (for ``guest_type``, when the
        test has one); else why not, as a sentence."""
        if self.xen is not None and not self.xen.contains(version_of(facts.xen_version), True):
            return f"needs Xen {self.xen}, host runs {facts.xen_version}"
        if self.kernel is not None and not self.kernel.contains(
            version_of(facts.kernel_release), True
        ):
            return f"needs dom0 kernel {self.kernel}, host runs {facts.kernel_release}"
        missing = [c for c in self.caps if c not in facts.virt_caps]
        if missing:
            have = ", ".join(sorted(facts.virt_caps))
            return f"needs Xen capabilities {', '.join(missing)}; host has {have}"
        for guest, needed in self.guest_caps:
            missing = [c for c in needed if c not in facts.virt_caps]
            if guest == guest_type and missing:
                have = ", ".join(sorted(facts.virt_caps))
                return f"needs Xen capabilities {', '.join(missing)} for a {guest} guest; host has {have}"
        if facts.dom0_mode not in self.dom0:
            return f"needs a {' or '.join(self.dom0)} dom0, host has {facts.dom0_mode}"
        return None


def version_of(text: str) -> Version:
    """The leading dotted number of a version string: '6.1.0-50-amd64' -> 6.1.0."""
    match = re.match(r"\d+(\.\d+)*", text.strip())
    if not match:
        raise PluginError(f"cannot read a version from {text!r}")
    try:
        return Version(match.group(0))
    except InvalidVersion as exc:
        raise PluginError(str(exc)) from None


def _spec(name: str, value: str | None, where: str) -> SpecifierSet | None:
    if value is None:
        return None
    try:
        return SpecifierSet(value)
    except InvalidSpecifier:
        raise PluginError(
            f"{where}: {name}={value!r} is not a version specifier (e.g. '>=4.17,<4.21')"
        ) from None


def _subset(name: str, values: Iterable[str] | None, allowed: tuple[str, ...], where: str) -> tuple[str, ...]:
    if values is None:
        return allowed
    values = (values,) if isinstance(values, str) else tuple(values)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise PluginError(f"{where}: {name}={list(values)!r}: choose from {', '.join(allowed)}")
    return values


def make_spec(where: str = "check", *, guests: Iterable[str] | None = None, xen: str | None = None,
              kernel: str | None = None, caps: Iterable[str] = (), dom0: Iterable[str] | None = None,
              fresh_host: bool = False, guest_caps: dict[str, Iterable[str]] | None = None) -> CheckSpec:
    per_guest = tuple((guest, tuple(needed)) for guest, needed in (guest_caps or {}).items())
    _subset("guest_caps", [g for g, _ in per_guest] or None, GUEST_TYPES, where)
    return CheckSpec(
        guests=_subset("guests", guests, GUEST_TYPES, where),
        xen=_spec("xen", xen, where),
        kernel=_spec("kernel", kernel, where),
        caps=tuple(caps),
        dom0=_subset("dom0", dom0, DOM0_MODES, where),
        fresh_host=fresh_host,
        guest_caps=per_guest,
    )


def check(*, guests: Iterable[str] | None = None, xen: str | None = None, kernel: str | None = None,
          caps: Iterable[str] = (), dom0: Iterable[str] | None = None,
          fresh_host: bool = False, guest_caps: dict[str, Iterable[str]] | None = None) -> Callable[[F], F]:
    """Declare a plugin check's guest types, version ranges and needs (``caps`` for
    every guest type, ``guest_caps`` for some: ``{"pv": ["shadow"]}``)."""

    def decorate(func: F) -> F:
        spec = make_spec(func.__qualname__, guests=guests, xen=xen, kernel=kernel, caps=caps,
                         dom0=dom0, fresh_host=fresh_host, guest_caps=guest_caps)
        return pytest.mark.nx_check(spec=spec)(func)

    return decorate


def spec_of(item: pytest.Item) -> CheckSpec:
    """The CheckSpec of a collected test (module-level ``pytestmark`` counts too)."""
    marker = item.get_closest_marker(MARKER)
    return marker.kwargs["spec"] if marker else CheckSpec()
