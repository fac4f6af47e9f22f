"""Inference speed benchmark; same as `revgan-med benchmark speed`.

Examples:
  python benchmarks/speed.py
  python benchmarks/speed.py --shape 96,96,48 --batch-size 4 --json speed.json
"""

from __future__ import annotations

import sys

from revgan_med.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "speed", *sys.argv[1:]]))
