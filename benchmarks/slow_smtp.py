"""An aiosmtpd sink that answers each DATA only after a delay: a slow provider on loopback.

    python benchmarks/slow_smtp.py PORT [DELAY_SECONDS]

Postfix's smtp-sink can delay only in whole seconds, so the 50 ms server of the delivery
benchmark is this one. It discards every message.
"""

import asyncio
import sys
from typing import Any

from aiosmtpd.controller import Controller


class SlowSink:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay)
        return "250 2.0.0 Ok: discarded"


def main() -> None:
    port = int(sys.argv[1])
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.05
    controller = Controller(SlowSink(delay), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        asyncio.run(asyncio.Event().wait())  # until SIGTERM
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
