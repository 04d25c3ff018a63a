"""Turn the public traces into ``arbiter simulate`` traces of one shared card.

    python benchmarks/convert_traces.py RAW_DIR OUT_DIR

``RAW_DIR`` holds the unmodified public files (see its ``PROVENANCE.md``: the Azure
LLM inference 2023 conversation and code traces, Mooncake's FAST'25 conversation
trace, Alibaba's GenTD26 diffusion request trace); they are read in place and never
copied into this repository. Each LLM trace is combined with the densest hour of
the diffusion trace into ``OUT_DIR/<name>.jsonl``: an LLM server and a diffusion
server sharing one GPU for an hour.

The model (numbers a reader can check against their own deployment):

* LLM server: an 8B model with grouped-query attention (Llama-3-8B shape: 32 layers,
  8 KV heads of 128) in 8-bit, so 8 GiB of weights, resident for the whole trace,
  ``HIGH``, ``preemptible: false`` (the chats run on it) and ``resumable``. Its KV
  cache is fp16: 2 x 32 x 8 x 128 x 2 bytes = 128 KiB per token, allocated in
  paged blocks of 16 tokens.
* A request of the LLM trace is a ``USER_FACING`` row holding the KV cache of its
  context plus generated tokens for as long as it runs: prefill at 4,000 tokens/s,
  then decode at 40 tokens/s per sequence (a batched server on one card); a user
  gives up after 30 s of waiting. Mooncake's requests are 7k-token contexts served
  by a fleet: one card gets every 8th request.
* Diffusion server: an SDXL-class pipeline of 7 GiB (UNet, two text encoders, VAE in
  fp16), resident, ``NORMAL``, ``preemptible: false``, ``resumable``.
* A request of the diffusion trace (text-to-image, image-to-image, inpainting) is a
  ``NORMAL`` row holding activations of 1 GiB per image in its batch at full
  resolution plus 256 MiB per LoRA, for the ``exec_time_seconds`` the trace measured;
  it is elastic down to half of that (a lower resolution: the quality floor), it
  loses its progress when preempted (a diffusion job restarts), and a user gives up
  after 300 s. Rows that failed in the trace are kept: the GPU did the work.
* The densest hour of the diffusion trace is the hour (sliding, from any arrival)
  with the most arrivals; its times are shifted to start with the LLM trace's.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

GIB = 1 << 30
KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
KV_BLOCK_TOKENS = 16
PREFILL_TOKENS_PER_S = 4000.0
DECODE_TOKENS_PER_S = 40.0
LLM_WEIGHTS_GB = 8.0
CHAT_TIMEOUT_S = 30.0
DIFFUSION_WEIGHTS_GB = 7.0
IMAGE_ACTIVATION_GB = 1.0
LORA_GB = 0.25
IMAGE_TIMEOUT_S = 300.0
MOONCAKE_SHARE = 8  # one card of the fleet: every 8th request
HOUR = 3600.0

LLM_TRACES = {
    "azure-conv": "AzureLLMInferenceTrace_conv.csv",
    "azure-code": "AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake_conversation_trace.jsonl",
}
DIFFUSION_TRACE = "alibaba_GenTD26_lora_request_trace.csv"


def _gb(size: float) -> float:
    return round(size / GIB, 6)


def _chat(at: float, context: int, generated: int) -> dict[str, Any]:
    tokens = math.ceil((context + generated) / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    duration = context / PREFILL_TOKENS_PER_S + generated / DECODE_TOKENS_PER_S
    return {
        "at": round(at, 3),
        "workload": "llm_inference",
        "priority": "user_facing",
        "memory_gb": _gb(max(1, tokens) * KV_BYTES_PER_TOKEN),
        "duration": round(max(duration, 0.01), 3),
        "timeout": CHAT_TIMEOUT_S,
    }


def _azure(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(newline="") as file:
        start: datetime | None = None
        for record in csv.DictReader(file):
            # Seven decimals of seconds: more than datetime parses.
            when = datetime.fromisoformat(record["TIMESTAMP"][:26])
            start = start or when
            at = (when - start).total_seconds()
            if at >= HOUR:
                return
            yield _chat(at, int(record["ContextTokens"]), int(record["GeneratedTokens"]))


def _mooncake(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as file:
        for index, line in enumerate(file):
            if index % MOONCAKE_SHARE:
                continue
            record = json.loads(line)
            at = record["timestamp"] / 1000.0
            if at >= HOUR:
                return
            yield _chat(at, int(record["input_length"]), int(record["output_length"]))


def _number(text: str, default: float) -> float:
    try:
        value = float(text)
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


def densest_diffusion_hour(path: Path) -> list[dict[str, Any]]:
    """The rows of the diffusion trace's densest hour, times from 0."""
    with path.open(newline="") as file:
        records = [
            (datetime.strptime(r["gmt_create"], "%Y-%m-%d %H:%M:%S"), r)
            for r in csv.DictReader(file)
        ]
    records.sort(key=lambda item: item[0])
    times = [(when - records[0][0]).total_seconds() for when, _ in records]
    best = max(range(len(times)), key=lambda i: bisect.bisect_left(times, times[i] + HOUR) - i)
    rows = []
    for i in range(best, bisect.bisect_left(times, times[best] + HOUR)):
        record = records[i][1]
        images = _number(record["num_images_per_prompt"], 1.0)
        loras = _number(record["num_lora"], 0.0) if record["num_lora"] else 0.0
        memory = images * IMAGE_ACTIVATION_GB + loras * LORA_GB
        rows.append(
            {
                "at": round(times[i] - times[best], 3),
                "workload": "image_generation",
                "priority": "normal",
                "memory_gb": round(memory, 3),
                "min_memory_gb": round(memory / 2, 3),
                "duration": _number(record["exec_time_seconds"], 1.0),
                "timeout": IMAGE_TIMEOUT_S,
            }
        )
    return rows


def _residents() -> list[dict[str, Any]]:
    resident = {"at": 0.0, "duration": HOUR, "preemptible": False, "resumable": True}
    return [
        {**resident, "workload": "llm_inference", "priority": "high", "memory_gb": LLM_WEIGHTS_GB},
        {
            **resident,
            "workload": "image_generation",
            "priority": "normal",
            "memory_gb": DIFFUSION_WEIGHTS_GB,
        },
    ]


def build_traces(raw: Path) -> dict[str, list[dict[str, Any]]]:
    """Every combined trace, by name: rows as ``arbiter simulate`` reads them."""
    diffusion = densest_diffusion_hour(raw / DIFFUSION_TRACE)
    traces = {}
    for name, file in LLM_TRACES.items():
        chats = list((_mooncake if file.endswith(".jsonl") else _azure)(raw / file))
        rows = _residents() + chats + diffusion
        rows.sort(key=lambda row: row["at"])
        traces[name] = rows
    return traces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, help="folder of the unmodified public traces")
    parser.add_argument("out", type=Path, help="folder to write <name>.jsonl into")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_traces(args.raw).items():
        path = args.out / f"{name}.jsonl"
        with path.open("w") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
