"""Stop strings on streamed text: what is safe to emit now, and whether the request has stopped.

One `StopStringMatcher` per request. The caller feeds the text delta of each new token; the matcher
returns the part that can no longer become (part of) a stop string and holds back the rest.

The rule, independent of how the text is split into deltas: the output is
`text[:i]` (`text[:i + len(s)]` with include_stop_str_in_output), where i is the earliest position
of the generated text at which any stop string begins and s is the shortest stop string found
there. To keep that exact, the matcher decides a stop only once no earlier position can still
begin one: with stops "bcd" and "c", text "abc" is held at "bc" until the next delta shows whether
"bcd" follows (stop before "b") or not (stop before "c"). A request may therefore generate a few
tokens past a stop string that a later-completing, earlier-starting one could still precede.

Only the held-back suffix is searched: emitted text never contains the start of a stop string, so
each feed costs O(len(stop strings) * (held + delta)).
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stop: tuple[str, ...], include_stop_str_in_output: bool = False):
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {stop!r}")
        self.stop = tuple(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched: str | None = None  # the stop string that ended the text, once one has
        self._held = ""  # text fed but not yet emitted: it may begin a stop string
        self._done = False

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta_text: str) -> tuple[str, bool, str | None]:
        """Add the next text delta. Returns (text safe to emit now, stopped, matched stop string).

        After a stop (or a flush) every further call returns ("", stopped, matched).
        """
        if self._done:
            return "", self.stopped, self.matched
        if not self.stop:
            return delta_text, False, None
        text = self._held + delta_text
        start, match = self._first_match(text)
        partial = self._first_partial(text)
        if match is not None and start <= partial:  # no earlier position can still begin a stop
            return self._stop(text, start, match), True, match
        # emit up to the first position that may begin a stop string, hold the rest
        self._held = text[partial:]
        return text[:partial], False, None

    def flush(self) -> str:
        """The request ended for another reason (length, EOS, abort): the held text, cut before any
        stop string it contains (then `matched` is set). Further feeds return nothing."""
        if self._done:
            return ""
        self._done = True
        text, self._held = self._held, ""
        start, match = self._first_match(text)
        return text if match is None else self._stop(text, start, match)

    def _stop(self, text: str, start: int, match: str) -> str:
        self.matched = match
        self._done = True
        self._held = ""
        return text[: start + len(match)] if self.include_stop_str_in_output else text[:start]

    def _first_match(self, text: str) -> tuple[int, str | None]:
        """Earliest position where a whole stop string occurs, and the shortest one there."""
        best, best_stop = len(text), None
        for s in self.stop:
            i = text.find(s, 0, best + len(s))  # only an occurrence starting at <= best can win
            if i != -1 and (i < best or (i == best and len(s) < len(best_stop))):
                best, best_stop = i, s
        return best, best_stop

    def _first_partial(self, text: str) -> int:
        """Earliest position whose suffix is a proper prefix of a stop string (len(text) if none)."""
        longest = max(len(s) for s in self.stop)
        for i in range(max(0, len(text) - longest + 1), len(text)):
            tail = text[i:]
            if any(len(s) > len(tail) and s.startswith(tail) for s in self.stop):
                return i
        return len(text)
