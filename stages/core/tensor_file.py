"""Reading files `torch.save` wrote, as tensors and plain values only: the one `torch.load` of exitflow.

`weights_only=True` always: a pickle that names Python callables (what a file crafted to run code on
load holds) is refused unread. torch's own message then advises re-running with
`weights_only=False`; that advice never reaches a user, so the reasons here are exitflow's own.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import IO, Any

import torch


class UnreadableTensors(ValueError):
    """A file that does not load as tensors and plain values; `runs_code` when it names Python
    callables that unpickling would call (refused unread)."""

    def __init__(self, reason: str, runs_code: bool) -> None:
        super().__init__(reason)
        self.runs_code = runs_code


def load_tensors(source: str | Path | IO[bytes]) -> Any:
    """`torch.load(source, weights_only=True)` on the CPU; UnreadableTensors, one line, otherwise."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the refusal below says enough
            return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's weights-only unpickler: a callable, or bytes it cannot parse
        callable_name = re.search(r"GLOBAL (\S+)", str(e))
        if callable_name:
            raise UnreadableTensors(f"it names Python code that loading would call ({callable_name[1]}): refused unread",
                                    runs_code=True) from None
        raise UnreadableTensors(f"corrupt, or not written by torch.save ({_detail(e)})", runs_code=False) from None
    except Exception as e:  # noqa: BLE001 - on bytes not in its format torch raises any type (IndexError, EOFError...)
        raise UnreadableTensors(f"corrupt, or not written by torch.save ({_detail(e, with_type=True)})", runs_code=False) from None


def _detail(e: BaseException, with_type: bool = False) -> str:
    """The first sentence of what torch found, without its advice (`Type: what` with `with_type`)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # "Weights only load failed. <advice> WeightsUnpickler error: <what>\n\n<more advice>"
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line]
    what = lines[0].split(". ", 1)[0].removesuffix(".") if lines else ""
    if with_type or not what:
        return f"{type(e).__name__}: {what}" if what else type(e).__name__
    return what
