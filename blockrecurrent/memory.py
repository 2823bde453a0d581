"""Peak memory of a piece of work, measured rather than guessed.

Peak memory is the high-water mark of resident memory *above the resident memory at the start of
the stream* (model, optimizer state and torch itself excluded), measured in a separate, untimed
pass of each model and length before any timed work. On CPU the kernel's per-process peak
(VmHWM) is reset before the pass (write "5" to /proc/self/clear_refs, Linux >= 4.0) after glibc's
free heap is returned to the system (malloc_trim), and during the pass glibc serves blocks of
16 KiB and more by mmap, so that freed tensors go back to the system at once and the peak is that
of live data. (With glibc's
default heap, fragments left over the passes add a few MiB that grow slowly with the number of
segments: not memory the model keeps, but a length-dependent figure all the same.) On CUDA it is
the caching allocator's max_memory_allocated above the allocation at the start. Where neither is
available the figure is reported as missing rather than guessed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc

import torch

__all__ = ["MIB", "PeakMemory", "proc_status_kib"]

MIB = 2 ** 20


def _malloc_trim() -> None:
    """Return glibc's free heap pages to the system, so a new RSS baseline counts live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _mallopt(param: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


def proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory above the level at start() (bytes), or None where it cannot be measured."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "unavailable"
        if device.type == "cpu" and self._reset_hwm() and proc_status_kib("VmHWM") is not None:
            self.method = "rss_hwm_reset"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5": reset the peak resident set size to the current one
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def exact(self):
        """On CPU with glibc: for the duration, blocks of 16 KiB and more are mmapped, so that
        freed tensors leave the resident set at once (run before any timed work: blocks already
        in the heap would be reused). Afterwards large blocks come from the heap again."""
        exact = self.method == "rss_hwm_reset" and _mallopt(_M_MMAP_THRESHOLD, 16 * 1024)
        try:
            yield
        finally:
            if exact:
                _mallopt(_M_MMAP_THRESHOLD, 32 * MIB)

    def measure(self, fn) -> int | None:
        """Run fn() and return the peak memory it used above the level before it."""
        self.start()
        fn()
        return self.peak()

    def start(self) -> None:
        gc.collect()
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss_hwm_reset":
            _malloc_trim()
            self.base = proc_status_kib("VmRSS") * 1024
            self._reset_hwm()

    def peak(self) -> int | None:
        if self.method == "cuda_max_memory_allocated":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        if self.method == "rss_hwm_reset":
            return max(0, proc_status_kib("VmHWM") * 1024 - self.base)
        return None
