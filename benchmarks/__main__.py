"""Run every ``benchmarks/bench_*.py`` module's ``main()``, in name order: ``python -m benchmarks``.

``python -m benchmarks client`` runs only ``bench_client``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys
from pathlib import Path


def _cpu() -> str:
    """The CPU model and core count, for the record next to the numbers."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str]) -> int:
    names = sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
    wanted = {f"bench_{a.removeprefix('bench_')}" for a in argv}
    if wanted - set(names):
        print(
            f"unknown benchmark(s): {', '.join(sorted(wanted - set(names)))}; have {', '.join(names)}"
        )
        return 2
    print(
        f"machine: {_cpu()} | {platform.system()} {platform.release()} "
        f"| Python {platform.python_version()}"
    )
    for name in names:
        if wanted and name not in wanted:
            continue
        print(f"\n=== {name} ===")
        importlib.import_module(f"benchmarks.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
