"""Peak resident memory of this process, restartable: the memory benchmarks' subprocesses import it."""

from __future__ import annotations


def reset_peak() -> int:
    """Start a new peak (Linux resets VmHWM when 5 is written to clear_refs); returns the resident KiB now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_kib()


def peak_kib() -> int:
    """The highest resident set size (KiB) since the process started or `reset_peak` was last called."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
