"""The offloaded executor: core parameters on the device, routed experts apart."""

from ktjax.runtime.offload.executor import DECODE_FORMS, OffloadedExecutor

__all__ = ["DECODE_FORMS", "OffloadedExecutor"]
