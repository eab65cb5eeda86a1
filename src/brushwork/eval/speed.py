"""Speed and memory of a generation call: latency, throughput, peak memory, FLOPs and share of machine peak."""

import platform
import resource
import statistics
import sys
import threading
import time
from typing import Callable

import psutil
import torch
from rich.progress import track
from torch.utils.flop_counter import FlopCounterMode


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul on this machine now: the practical peak a model could reach."""
    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def count_flops(call: Callable[[], object]) -> int:
    """FLOPs (multiply-add = 2) of the matmuls and convolutions one call runs, by torch's flop counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


class PeakRSS:
    """Samples the process's resident memory in a thread while the block runs; `.peak` in bytes."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure_speed(generate: Callable[[int], object], batch_sizes: tuple[int, ...] = (1, 4, 16), repeats: int = 3,
                  device: str = "cpu", dtype: torch.dtype = torch.float32, label: str = "measuring speed") -> dict:
    """Time `generate(batch_size)` (one pipeline call making batch_size images).

    Per batch size: one warm-up call, then `repeats` timed calls; the median is kept. FLOPs come from one
    more call at batch 1 under the flop counter (not timed: the counter slows the call down).
    """
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    throughput = {}
    with PeakRSS() as rss:
        for batch_size in track(batch_sizes, description=label):
            generate(batch_size)
            times = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                generate(batch_size)
                _sync(device)
                times.append(time.perf_counter() - start)
            throughput[batch_size] = {"seconds_per_call": statistics.median(times),
                                      "images_per_second": batch_size / statistics.median(times)}
    latency = throughput[batch_sizes[0]]["seconds_per_call"] / batch_sizes[0]
    flops = count_flops(lambda: generate(1))
    peak = peak_matmul_flops(device, dtype)
    return {
        "device": device_name(device),
        "latency_seconds_per_image": latency,
        "latency_batch_size": batch_sizes[0],
        "throughput": {str(b): v for b, v in throughput.items()},
        "peak_rss_bytes": rss.peak,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "flops_per_image": flops,
        "achieved_flops_per_second": flops / latency,
        "machine_peak_flops_per_second": peak,
        "peak_dtype": str(dtype).removeprefix("torch."),
        "fraction_of_peak": flops / latency / peak,
    }
