"""
taskoffload: run heavy work on a supervised pool of worker processes, and tell the
caller when it is done.

Call tasks from any Twisted program with :class:`taskoffload.client.TaskClient`;
write them with :func:`taskoffload.registry.task`.
"""

from taskoffload.registry import task

__version__ = "0.1.0.dev0"

__all__ = ["__version__", "task"]
