"""One line naming the machine a benchmark ran on, for its printout and JSON."""

from __future__ import annotations

import os
import platform


def describe(device: str = "cpu") -> str:
    """CPU model, core count, memory and (for ``cuda``) the GPU, e.g. for a results table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        text += f", {pages * page_size / 2**30:.0f} GiB"
    except (OSError, ValueError, AttributeError):
        pass
    if device.startswith("cuda"):
        import torch

        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text
