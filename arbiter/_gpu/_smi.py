"""Detection through the vendors' command-line tools: ``nvidia-smi`` and ``rocm-smi``.

Each tool runs once with a timeout, in its own session so that a hung tool is killed
with everything it started. Output is parsed defensively: anything not understood
yields no GPUs (the caller falls through to the next method), never an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from .._types import GiB, KiB, MiB
from ._info import GpuInfo, GpuVendor

__all__ = [
    "NVIDIA_SMI_ARGS",
    "ROCM_SMI_ARGS",
    "parse_nvidia_smi",
    "parse_rocm_smi",
    "run_tool",
]

NVIDIA_SMI_ARGS = (
    "--query-gpu=index,name,memory.total,memory.used,uuid",
    "--format=csv,noheader,nounits",
)
ROCM_SMI_ARGS = ("--showmeminfo", "vram", "--showproductname", "--showuniqueid", "--json")

_POSIX = os.name == "posix"
# After a timeout kill, how long to wait for the tool to be reaped.
_REAP_TIMEOUT = 1.0

_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kib": KiB, "kb": KiB, "mib": MiB, "mb": MiB, "gib": GiB, "gb": GiB}
_INDEX = re.compile(r"[0-9]{1,4}")
_CARD = re.compile(r"card([0-9]{1,4})")


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        if _POSIX:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    try:
        process.communicate(timeout=_REAP_TIMEOUT)
    except (subprocess.TimeoutExpired, OSError, ValueError):
        # A grandchild in another session may keep the pipe open; stop reading it.
        if process.stdout is not None:
            process.stdout.close()


def run_tool(name: str, args: tuple[str, ...], timeout: float) -> str | None:
    """The tool's standard output as text, or ``None`` when it is missing, fails
    (non-zero exit), runs past ``timeout`` seconds, or prints something that is not text.
    """
    path = shutil.which(name)
    if path is None or timeout <= 0:
        return None
    # A fixed locale keeps numbers and messages in the format the parsers expect.
    env = {**os.environ, "LC_ALL": "C"}
    try:
        process = subprocess.Popen(
            [path, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=_POSIX,
        )
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        return None
    except BaseException:
        _kill(process)
        raise
    if process.returncode != 0:
        return None
    try:
        text = output.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "\x00" in text:
        return None
    return text


def _size(text: str, default_unit: int) -> int | None:
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        return None
    number, unit = match.groups()
    scale = _UNITS.get(unit.lower()) if unit else default_unit
    if scale is None:
        return None
    return int(float(number) * scale)


def _known(text: str) -> str | None:
    # nvidia-smi writes "[N/A]", "[Not Supported]" or "[Unknown Error]" for a missing value.
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in {"N/A", "NA", "NONE"}:
        return None
    return text


def _free(total: int, used: int | None) -> int | None:
    return None if used is None else min(max(total - used, 0), total)


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.used,uuid``
    CSV output without header, sizes in MiB with or without units (``24576 MiB``).

    A line not in that shape (or a repeated index) means the output is not understood:
    the result is then empty. A GPU whose total is not reported is left out.
    """
    gpus: dict[int, GpuInfo] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) < 5:
            return []
        # A product name could hold a comma; the other four fields cannot.
        index_text, name = fields[0].strip(), ",".join(fields[1:-3]).strip()
        total_text, used_text, uuid_text = fields[-3], fields[-2], fields[-1]
        if _INDEX.fullmatch(index_text) is None:
            return []
        index = int(index_text)
        if index in gpus:
            return []
        total = _size(total_text, MiB) if _known(total_text) else None
        if _known(total_text) and total is None:
            return []
        if total is None or total <= 0:
            continue
        used = _size(used_text, MiB) if _known(used_text) else None
        gpus[index] = GpuInfo(
            index=index,
            name=_known(name) or "NVIDIA GPU",
            vendor=GpuVendor.NVIDIA,
            total_vram_bytes=total,
            free_vram_bytes=_free(total, used),
            uuid=_known(uuid_text),
        )
    return [gpus[i] for i in sorted(gpus)]


def _byte_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None


_ROCM_NAME_KEYS = ("card series", "device name", "market name", "card sku", "card model")


def parse_rocm_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``rocm-smi --showmeminfo vram --showproductname --showuniqueid --json``.

    Reads ``{"card0": {"VRAM Total Memory (B)": "…", "VRAM Total Used Memory (B)": "…",
    "Card series": "…", "Unique ID": "…"}, …}``; key case varies between releases, and
    warnings printed before the JSON are skipped. Anything else yields no GPUs.
    """
    start = text.find("{")
    if start < 0:
        return []
    try:
        data, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    gpus: dict[int, GpuInfo] = {}
    for key, entry in data.items():
        match = _CARD.fullmatch(key.strip().lower()) if isinstance(key, str) else None
        if match is None or not isinstance(entry, dict):
            continue
        fields = {str(k).strip().lower(): v for k, v in entry.items()}
        total = _byte_count(fields.get("vram total memory (b)"))
        if total is None or total <= 0:
            continue
        used = _byte_count(fields.get("vram total used memory (b)"))
        names = (fields.get(k) for k in _ROCM_NAME_KEYS)
        name = next((n.strip() for n in names if isinstance(n, str) and _known(n)), "AMD GPU")
        uuid = fields.get("unique id")
        index = int(match.group(1))
        gpus[index] = GpuInfo(
            index=index,
            name=name,
            vendor=GpuVendor.AMD,
            total_vram_bytes=total,
            free_vram_bytes=_free(total, used),
            uuid=_known(uuid) if isinstance(uuid, str) else None,
        )
    return [gpus[i] for i in sorted(gpus)]


def tool_gpus(name: str, timeout: float) -> list[GpuInfo]:
    """Run ``nvidia-smi`` or ``rocm-smi`` and parse what it printed; ``[]`` on any failure."""
    args: tuple[str, ...]
    parse: Callable[[str], list[GpuInfo]]
    if name == "nvidia-smi":
        args, parse = NVIDIA_SMI_ARGS, parse_nvidia_smi
    elif name == "rocm-smi":
        args, parse = ROCM_SMI_ARGS, parse_rocm_smi
    else:
        raise ValueError(f"unknown tool {name!r}")
    text = run_tool(name, args, timeout)
    if text is None:
        return []
    try:
        return parse(text)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return []
