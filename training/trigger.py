"""When to train: the trigger policy, a pure function of what arrived and when.

A snapshot is due when ``every_conversations`` new trainable conversations have
arrived since the last snapshot, or when ``every_minutes`` have passed since it and
at least ``min_conversations`` new ones are waiting (a timer with nothing new to
learn from does not train). The clock starts at the last snapshot's creation time,
read from its manifest, so a restarted trainer keeps the schedule; before the first
snapshot it starts when the trainer starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from corpusfactory.settings import TriggerSettings


@dataclass(frozen=True)
class TriggerPolicy:
    every_conversations: int | None
    every_minutes: float | None
    min_conversations: int = 1

    @classmethod
    def from_settings(cls, s: TriggerSettings) -> TriggerPolicy:
        return cls(s.every_conversations, s.every_minutes, s.min_conversations)

    def due(self, new_conversations: int, seconds_since_last: float) -> str | None:
        """``"count"`` or ``"time"`` when a snapshot should start now, else None."""
        if self.every_conversations is not None and new_conversations >= self.every_conversations:
            return "count"
        if (
            self.every_minutes is not None
            and seconds_since_last >= self.every_minutes * 60.0
            and new_conversations >= self.min_conversations
        ):
            return "time"
        return None

    def seconds_until_time_trigger(self, seconds_since_last: float) -> float | None:
        """How long the timer still runs (None without a timer); lets the loop sleep."""
        if self.every_minutes is None:
            return None
        return max(0.0, self.every_minutes * 60.0 - seconds_since_last)
