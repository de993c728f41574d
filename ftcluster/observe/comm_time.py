"""Time spent in collectives, when trainer.profile_comms asks for it.

DeepSpeed's communication logger times every deepspeed.comm collective on this rank (ZeRO's gradient
reduce-scatters and all-reduces, ZeRO-3's parameter all-gathers), synchronizing the device after each:
that blocking is what makes the figure a measurement, and also why it is off unless asked for (it stops
communication from overlapping computation). Its per-op records keep running totals, so the total is
read from its timers, whose intervals are each op's own duration.
"""

from __future__ import annotations

LOGGER_CONFIG = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}


def seconds_so_far() -> float:
    """Seconds this rank has spent inside timed collectives since the engine was built."""
    from deepspeed.comm import comm  # not at the top: the driver imports this module and needs no DeepSpeed

    if not comm.comms_logger.enabled:
        return 0.0
    return sum(timer.elapsed(reset=False) for timer in comm.timers.get_timers().values()) / 1000.0
