"""Know your machine: versions, the CPU, its SIMD features, threads, and what
``model.compute_dtype=auto`` resolves to (`fedprune env`, every run's environment.json and
every benchmark result). This project's machines differ: on an AMD EPYC with AVX2 only a
bf16 matmul is emulated (~100x slower than float32), on an Intel CPU with AMX it is ~7x
faster, so every figure must name the CPU it was measured on."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from fedprune.structure.compute import resolve_dtype

PACKAGES = ("fedprune", "torch", "transformers", "peft", "datasets", "flwr", "safetensors")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def simd_features() -> dict[str, bool]:
    """The SIMD features that decide fedprune's fast path, as torch detects them."""
    cpu = torch.cpu
    return {"avx2": cpu._is_avx2_supported(), "avx512": cpu._is_avx512_supported(),
            "avx512_bf16": cpu._is_avx512_bf16_supported(), "amx": cpu._is_amx_tile_supported()}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Everything above as one JSON-able dict."""
    return {"versions": versions(),
            "cpu": {"model": cpu_model(), "machine": platform.machine(),
                    "capability": torch.backends.cpu.get_cpu_capability(), **simd_features()},
            "threads": torch.get_num_threads(),
            "auto_compute_dtype": str(resolve_dtype("auto")).removeprefix("torch."),
            "cuda": torch.cuda.is_available()}
