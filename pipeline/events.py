"""The events a run's processes post beside their progress lines (`pipeline.relay`), which a live
display (`pipeline.display`) shows in place of the line. A leaf: the stages post them, the driver
shows them, and neither imports the other's side."""

from __future__ import annotations

from typing import Any

EPOCH, SEARCH = "epoch", "search"  # event kinds (the `kind` key of an event)
Event = dict[str, Any]
