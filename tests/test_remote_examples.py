"""examples/remote_llm.py and examples/remote_diffusion.py against a real daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from remote_helpers import LINUX_ONLY, ROOT, daemon

pytestmark = LINUX_ONLY


def test_llm_process_preempts_diffusion_process(tmp_path: Path) -> None:
    sock = tmp_path / "ex.sock"
    with daemon(sock, vram_gb=24):
        diffusion = subprocess.Popen(
            [sys.executable, "examples/remote_diffusion.py", "--socket", str(sock),
             "--jobs", "2", "--seconds", "0.5"],
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
    # Which image the chats catch depends on how soon the LLM process is up (under load
    # image 1 may be done first); that one of them is preempted does not.
    assert re.search(r"^image \d: preempted by a higher priority", out, re.MULTILINE), out
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"diffusion: 2 images, [1-9]\d* preempted", last), last
