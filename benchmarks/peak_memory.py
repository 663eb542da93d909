"""Peak resident memory of this process, restartable: the memory benchmarks' subprocesses import it; and the
runner that starts each of those subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent


def run_case(case: str, spec: dict, label: str) -> dict | None:
    """Run `case` (Python source) in a fresh interpreter, so each measurement starts from its own peak; its argv
    is the src folder, `spec` as JSON and this folder. Returns its last stdout line as JSON, or None after
    printing its error under `label`."""
    argv = [sys.executable, "-c", case, str(BENCHMARKS.parent / "src"), json.dumps(spec), str(BENCHMARKS)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"  {label:<14} failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def reset_peak() -> int:
    """Start a new peak (Linux resets VmHWM when 5 is written to clear_refs); returns the resident KiB now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_kib()


def peak_kib() -> int:
    """The highest resident set size (KiB) since the process started or `reset_peak` was last called."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
