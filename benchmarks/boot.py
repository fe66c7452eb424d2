#!/usr/bin/env python3
"""Boot benchmark: image build (cold and warm cache), cold boot and snapshot restore.

Same as `nested-xen bench boot`; prints JSON (keys carry their unit, e.g.
cold_boot_s, restore_s). Example: python3 benchmarks/boot.py --runs 3 --json boot.json
"""

import sys

from harness.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "boot", *sys.argv[1:]]))
