"""The diffusion side of two processes sharing one GPU through ``arbiter serve``.

Each image job holds 16 GiB at BACKGROUND priority; when the LLM process needs the
memory the daemon preempts the job (its body is cancelled) and the job runs again::

    arbiter serve --vram-gb 24 &
    python examples/remote_diffusion.py --jobs 3 &
    python examples/remote_llm.py --chats 2
    arbiter status
"""

from __future__ import annotations

import argparse

import anyio

from arbiter import GiB, Preempted, RemoteArbiter


async def make_images(socket: str | None, jobs: int, seconds: float) -> None:
    async with RemoteArbiter(socket) as arbiter:
        done = preempted = 0
        while done < jobs:
            try:
                async with arbiter.allocate(
                    "image_generation", "background", memory=16 * GiB, label="sdxl"
                ) as alloc:
                    print(f"image {done + 1}: running on {alloc.memory / GiB:.0f} GiB", flush=True)
                    await anyio.sleep(seconds)  # the denoising steps
                done += 1
                print(f"image {done}: done", flush=True)
            except Preempted:
                preempted += 1
                print(f"image {done + 1}: preempted by a higher priority, again", flush=True)
        print(f"diffusion: {done} images, {preempted} preempted", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=None, help="the daemon's socket (default: GPU 0)")
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per image")
    parser.add_argument("--backend", default="trio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    anyio.run(make_images, args.socket, args.jobs, args.seconds, backend=args.backend)


if __name__ == "__main__":
    main()
