"""Knative's network probe (`K-Network-Probe`): the activator answers it itself with the probe's
hash (`K-Network-Hash`), never forwards it (Knative's network.NewProbeHandler)."""

from __future__ import annotations

from activator.handlers import Exchange, Handler
from activator.respond import send_whole


class ProbeHandler:
    def __init__(self, next_handler: Handler) -> None:
        self.next = next_handler

    async def __call__(self, ex: Exchange) -> None:
        if ex.head.probe:
            await send_whole(ex.send, 200, [(b"k-network-hash", ex.head.probe_hash)], b"activator")
            return
        await self.next(ex)
