"""The offloaded executor: core parameters on the device, routed experts apart."""

from ktjax.runtime.offload.executor import OffloadedExecutor

__all__ = ["OffloadedExecutor"]
