"""Registers ``twistd taskoffload``."""

from twisted.application.service import ServiceMaker

taskoffload = ServiceMaker(
    "taskoffload",
    "taskoffload.tap",
    "Run a pool of worker processes for offloaded tasks, and its WebSocket gateway.",
    "taskoffload",
)
