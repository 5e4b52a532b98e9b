"""StopStringMatcher: streamed output equals the text cut before the first stop string, however the
text is split into deltas."""

from __future__ import annotations

import random

import pytest

from maverick.engine.stop import StopStringMatcher


def reference(text: str, stop: tuple[str, ...], include: bool) -> tuple[str, str | None]:
    """Independent oracle on the whole text: cut at the earliest start of any stop string (the
    shortest one there is the match)."""
    hits = [(text.find(s), len(s), s) for s in stop if s in text]
    if not hits:
        return text, None
    i, n, s = min(hits)
    return text[: i + n] if include else text[:i], s


def stream(
    deltas: list[str], stop: tuple[str, ...], include: bool = False
) -> tuple[list[str], str, str | None]:
    """Feed deltas until stopped, then flush if not. Returns (emits per feed, whole output, match)."""
    m = StopStringMatcher(stop, include_stop_str_in_output=include)
    emits = []
    for d in deltas:
        emit, stopped, matched = m.feed(d)
        emits.append(emit)
        assert stopped == m.stopped and matched == m.matched
        if stopped:
            break
    else:
        emits.append(m.flush())
    return emits, "".join(emits), m.matched


@pytest.mark.parametrize(
    ("deltas", "stop", "include", "emits", "matched"),
    [
        # no stop strings: everything passes straight through
        (["Hello", " world"], (), False, ["Hello", " world", ""], None),
        # a stop inside one delta
        (["Hello END world"], ("END",), False, ["Hello "], "END"),
        (["Hello END world"], ("END",), True, ["Hello END"], "END"),
        # split across 2 and 3 deltas: the partial is held, never emitted
        (["Hello E", "ND!"], ("END",), False, ["Hello ", ""], "END"),
        (["Hi E", "N", "D"], ("END",), False, ["Hi ", "", ""], "END"),
        (["Hi E", "N", "D"], ("END",), True, ["Hi ", "", "END"], "END"),
        # a held partial that does not complete is released
        (["Hi E", "N", "x"], ("END",), False, ["Hi ", "", "ENx", ""], None),
        (["Hi EN"], ("END",), False, ["Hi ", "EN"], None),  # flush returns the held text
        # stop at the very start
        (["END", "more"], ("END",), False, [""], "END"),
        (["E", "ND"], ("END",), True, ["", "END"], "END"),
        # multiple stops: the earliest position wins, whatever their order in the list
        (["a b c"], ("c", "b"), False, ["a "], "b"),
        # overlapping "ab" / "bc": "ab" starts first
        (["xabc"], ("bc", "ab"), False, ["x"], "ab"),
        (["xa", "bc"], ("bc", "ab"), False, ["x", ""], "ab"),
        # same start: the shortest stop string is the match
        (["xabcd"], ("abc", "ab"), True, ["xab"], "ab"),
        # "c" completes while "bcd" (earlier start) may still follow: wait for the next delta
        (["abc", "d"], ("bcd", "c"), False, ["a", ""], "bcd"),
        (["abc", "x"], ("bcd", "c"), False, ["a", "b"], "c"),
        (["abc", "x"], ("bcd", "c"), True, ["a", "bc"], "c"),
        # the request ends while "bc" is held: flush cuts at the stop inside it
        (["abc"], ("bcd", "c"), False, ["a", "b"], "c"),
        # a stop string repeated inside itself
        (["aaa", "ab"], ("aab",), False, ["a", "a"], "aab"),
        # empty deltas (an incomplete UTF-8 character) change nothing
        (["", "E", "", "ND"], ("END",), False, ["", "", "", ""], "END"),
        # non-ASCII
        (["é 停", "止"], ("停止",), False, ["é ", ""], "停止"),
    ],
)
def test_cases(deltas, stop, include, emits, matched):
    got_emits, text, got_matched = stream(deltas, stop, include)
    assert (got_emits, got_matched) == (emits, matched)
    assert (text, got_matched) == reference("".join(deltas), stop, include)


def test_after_stop_and_flush_nothing_more():
    m = StopStringMatcher(("X",))
    assert m.feed("aXb") == ("a", True, "X")
    assert m.feed("more") == ("", True, "X")
    assert m.flush() == ""
    m = StopStringMatcher(("X",))
    assert m.feed("ab") == ("ab", False, None)
    assert m.flush() == ""
    assert m.feed("c") == ("", False, None)


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(("a", ""))


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = (
        sorted(rng.sample(range(1, len(text)), rng.randint(0, min(6, len(text) - 1))))
        if len(text) > 1
        else []
    )
    bounds = [0, *cuts, len(text)]
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    for _ in range(rng.randint(0, 2)):  # the odd empty delta
        deltas.insert(rng.randint(0, len(deltas)), "")
    return deltas


@pytest.mark.parametrize("seed", range(5))
def test_random_splits_match_reference(seed):
    rng = random.Random(seed)
    alphabet = "abc"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        stop = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 4))
        )
        include = rng.random() < 0.5
        expected = reference(text, stop, include)
        deltas = random_split(text, rng)
        emits, out, matched = stream(deltas, stop, include)
        assert (out, matched) == expected, (text, stop, include, deltas, emits)
        # what was emitted never contains the start of a stop string, unless included on purpose
        if not include:
            assert not any(s in out for s in stop)
