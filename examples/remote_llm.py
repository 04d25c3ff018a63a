"""The LLM side of two processes sharing one GPU through ``arbiter serve``.

Each chat turn asks for 12 GiB at USER_FACING priority: if a diffusion job in another
process holds the memory, the daemon preempts it and the chat is served at once.
See ``remote_diffusion.py`` for the commands.
"""

from __future__ import annotations

import argparse

import anyio

from arbiter import GiB, RemoteArbiter


async def serve_chats(socket: str | None, chats: int, seconds: float) -> None:
    async with RemoteArbiter(socket) as arbiter:
        for turn in range(1, chats + 1):
            started = anyio.current_time()
            async with arbiter.allocate(
                "llm_inference", "user_facing", memory=12 * GiB, timeout=30, label="chat"
            ) as alloc:
                waited = anyio.current_time() - started
                print(
                    f"chat {turn}: {alloc.memory / GiB:.0f} GiB after {waited * 1000:.0f} ms, "
                    f"quality {alloc.quality:.2f}",
                    flush=True,
                )
                await anyio.sleep(seconds)  # generating tokens
        await arbiter.refresh()
        stats = arbiter.stats()
        print(f"llm: {chats} chats; the daemon preempted {stats.preemptions} so far", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default=None, help="the daemon's socket (default: GPU 0)")
    parser.add_argument("--chats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.3, help="per chat turn")
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    anyio.run(serve_chats, args.socket, args.chats, args.seconds, backend=args.backend)


if __name__ == "__main__":
    main()
