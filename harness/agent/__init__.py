"""The dom0 agent.

``nxagent.py`` is a single stdlib-only file copied into dom0 and run over SSH;
``client.py`` is the host-side wrapper that installs it, sends it JSON requests
and parses its answers.
"""
