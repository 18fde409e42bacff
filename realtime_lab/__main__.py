"""``python -m realtime_lab`` is the same as the ``realtime-lab`` console script."""

from __future__ import annotations

from realtime_lab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
