"""Memory benchmark (thesis Table 7 in 3D); same as `revgan-med benchmark memory`.

Examples:
  python benchmarks/memory.py
  python benchmarks/memory.py --depths 2,4 --size 24 --width 4 --json memory.json
"""

from __future__ import annotations

import sys

from revgan_med.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", "memory", *sys.argv[1:]]))
