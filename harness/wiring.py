"""The one place a ``Provisioner`` is wired (pytest fixtures, bench, cli).

A ``Provisioner`` (harness/provision.py) boots hosts from images; what it needs
from the layers above it is given here: the guest payload built for each image
and, when the run keeps shared guests in its snapshot, the step that starts
them on a new host (harness/guests.py: ``attach_pool``).
"""

from __future__ import annotations

from collections.abc import Callable

from .config import RunConfig
from .host import XenHost
from .provision import Provisioner


def provisioner_for(cfg: RunConfig, progress: Callable[[str], None] | None = None, *,
                    guest_payload: bool = True, shared_guests: bool = False,
                    before_guests: Callable[[XenHost], XenHost] | None = None) -> Provisioner:
    """A ``Provisioner`` for ``cfg``: with the guest payload (unless ``guest_payload`` is
    false, e.g. to time an image build alone) and, with ``shared_guests``, creating the
    run's shared guests on each new host (after ``before_guests(host)``, if given)."""
    from .guest_payload import guest_payload_for
    from .guests import attach_pool

    setup_guests = None
    if shared_guests:
        def setup_guests(host: XenHost) -> object:
            return attach_pool(before_guests(host) if before_guests else host, cfg, create=True)
    return Provisioner(cfg, progress, guest_payload=guest_payload_for(cfg) if guest_payload else None,
                       setup_guests=setup_guests)
