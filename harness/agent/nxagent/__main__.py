"""``python3 -m harness.agent.nxagent COMMAND``: the agent run from the source tree."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
