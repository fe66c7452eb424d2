"""The dom0 agent.

``nxagent/`` is a stdlib-only package that ``build.py`` zips into one file
(``nxagent.py``, a zipapp) copied into dom0 and run over SSH; ``client.py`` is the
host-side wrapper that installs it, sends it JSON requests and parses its answers.
"""
