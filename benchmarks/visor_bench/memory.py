"""Memory readings: peak memory during a block (CUDA allocator, glibc heap counter or resident set) and the bytes
of a KV cache."""

from __future__ import annotations

import ctypes
import os
import threading
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use_reader():
    """glibc's `mallinfo2`: bytes of heap in use (arenas + mmapped chunks), which falls when memory is freed (unlike
    the resident set, which keeps freed heap pages). None where glibc >= 2.33 is not there."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


class PeakMemory:
    """Peak memory allocated during the block, above the level at entry. CUDA: `max_memory_allocated`. CPU: the
    heap bytes in use (glibc `mallinfo2`: what PyTorch's CPU allocator holds, freed memory excluded) polled every
    1 ms, so a peak shorter than the poll interval can be missed; without glibc's `mallinfo2`, the resident set
    (which never shrinks after a free, so an earlier, larger run hides a later peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "mallinfo2"
        self._read = _heap_in_use_reader() if device.type != "cuda" else None
        if device.type != "cuda" and self._read is None:
            self.method, self._read = "rss", self._rss

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self._read()
        self.high = self.base
        self.stop = threading.Event()

        def poll():
            while not self.stop.is_set():
                self.high = max(self.high, self._read())
                time.sleep(0.001)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.high = max(self.high, self._read())
        self.stop.set()
        self.thread.join()
        self.peak = self.high - self.base


def cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):  # VisorCache
        return int(cache.memory_bytes())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
