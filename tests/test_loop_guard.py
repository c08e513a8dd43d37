"""The loop guard of tests/conftest.py catches what it is there for (a guard that never fires
would let every test pass)."""

from __future__ import annotations

import asyncio
import gc
import time

from tests import conftest


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_step_that_computes_on_the_loop_is_caught() -> None:
    """150 ms of CPU in one loop step is recorded; a 10 ms step and a full gc.collect() are not."""
    async def main() -> None:
        _burn(0.01)
        await asyncio.sleep(0)
        gc.collect()
        await asyncio.sleep(0)
        _burn(0.15)

    asyncio.run(main())
    found, conftest._slow_steps[:] = list(conftest._slow_steps), []
    assert len(found) == 1 and "ms of CPU" in found[0], found


def test_a_step_that_blocks_the_loop_is_caught() -> None:
    """A blocking call (a 1.2 s sleep) in a loop step is recorded on the wall clock."""
    async def main() -> None:
        time.sleep(1.2)

    asyncio.run(main())
    found, conftest._slow_steps[:] = list(conftest._slow_steps), []
    assert len(found) == 1, found
