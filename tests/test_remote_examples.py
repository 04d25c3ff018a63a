"""examples/remote_llm.py and examples/remote_diffusion.py against a real daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from remote_helpers import LINUX_ONLY, ROOT, daemon

pytestmark = [LINUX_ONLY, pytest.mark.real_processes]


def test_llm_process_preempts_diffusion_process(tmp_path: Path) -> None:
    sock = tmp_path / "ex.sock"
    with daemon(sock, vram_gb=24):
        diffusion = subprocess.Popen(
            [sys.executable, "examples/remote_diffusion.py", "--socket", str(sock),
             "--jobs", "1", "--seconds", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        try:
            assert diffusion.stdout is not None
            assert diffusion.stdout.readline().startswith("image 1: running")
            llm = subprocess.run(
                [sys.executable, "examples/remote_llm.py", "--socket", str(sock),
                 "--chats", "2", "--seconds", "0.1"],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            out, err = diffusion.communicate(timeout=60)
        finally:
            diffusion.kill()
            diffusion.wait(timeout=10)
    assert llm.returncode == 0, llm.stderr
    assert diffusion.returncode == 0, err
    assert "chat 2: 12 GiB" in llm.stdout
    # A render runs 2 s unless preempted: longer than the LLM process takes to start.
    assert "image 1: preempted by a higher priority" in out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"diffusion: 1 images, [1-9]\d* preempted", last), last
