"""The Python SDK in a few lines: a sweep as a job array, a job that runs
after it succeeded, and their output. Run it where leptonctl works (the same
LEPTON_ADDR, LEPTON_TOKEN or config file):

    python examples/sdk.py
"""

from __future__ import annotations

import asyncio
import sys

from leptond.client import AsyncClient, Client, LeptonError


def main() -> int:
    with Client() as c:
        print("nodes:", ", ".join(f"{n.name} ({n.gpus_free} GPUs free)" for n in c.nodes()))
        sweep = c.submit(
            ["sh", "-c", 'echo "trial $LEPTON_ARRAY_INDEX"'], array="0-3", max_running=2
        )
        report = c.submit(["echo", "all trials done"], after_ok=[sweep.id])
        info = sweep.wait(timeout_s=300)
        print(f"sweep {sweep.id}: {info.state} {info.task_states}")
        print("trial 2 said:", "".join(sweep.logs(index=2)).strip())
        for text in report.logs(follow=True):
            print(f"report {report.id}:", text.strip())
        try:
            c.status("j-000000000000")
        except LeptonError as exc:  # NotFound, a LeptonError like every SDK error
            print(f"{type(exc).__name__}: {exc.message}")
    return 0 if info.state == "succeeded" else 1


async def amain() -> None:
    """The same calls with asyncio."""
    async with AsyncClient() as c:
        job = await c.submit(["echo", "hello from asyncio"])
        async for text in job.logs(follow=True):
            print(text, end="")
        print((await job.wait()).state)


if __name__ == "__main__":
    code = main()
    asyncio.run(amain())
    sys.exit(code)
