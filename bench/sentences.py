"""Evaluation sentences for the MiniLM benchmarks (none of them is in MINILM_SENTENCES, which
are the calibration set): 200 short English sentences on varied topics, built
deterministically from 40 hand-written sentences and 5 rephrasings (``EVAL_SENTENCES``)."""

from __future__ import annotations

__all__ = ["EVAL_SENTENCES"]

_BASE = (
    "The train to the coast leaves every morning at seven.",
    "She planted tomatoes and basil along the garden fence.",
    "Our team fixed the memory leak in the image decoder.",
    "A heavy storm closed the mountain pass for two days.",
    "He reads a chapter of a mystery novel before sleeping.",
    "The museum opened a new exhibition of ancient maps.",
    "Fresh bread from the corner bakery sells out by noon.",
    "The children built a sandcastle with a deep moat.",
    "Battery life improved after the firmware update.",
    "The orchestra rehearsed the symphony late into the night.",
    "Prices of coffee beans rose sharply this winter.",
    "A small cat slept on the warm windowsill all afternoon.",
    "The hospital hired more nurses for the night shift.",
    "Satellites measure the temperature of the ocean surface.",
    "The recipe calls for two eggs and a cup of flour.",
    "Traffic on the bridge was slow because of road works.",
    "The startup raised money to build cheaper solar panels.",
    "Students presented their robotics project to the judges.",
    "The old lighthouse still guides ships into the harbour.",
    "My phone keeps losing its connection in the basement.",
    "Volunteers cleaned plastic waste from the river banks.",
    "The chess champion won the final game in forty moves.",
    "Rain is expected over the northern valleys tomorrow.",
    "The library extended its opening hours during exams.",
    "A new vaccine was approved after large clinical trials.",
    "The hikers reached the summit just before sunset.",
    "Engineers tested the bridge with heavy loaded trucks.",
    "The restaurant serves spicy noodles and grilled fish.",
    "Wind turbines turned slowly on the distant hills.",
    "The court postponed the hearing until next month.",
    "He learned to play the violin at the age of forty.",
    "The spacecraft sent back pictures of a distant moon.",
    "Our neighbours adopted a puppy from the shelter.",
    "The factory reduced its energy use by a third.",
    "A quiet café on the square serves excellent tea.",
    "The election results will be announced on Sunday.",
    "Bees are important for pollinating fruit trees.",
    "The software crashes when the disk is almost full.",
    "Farmers harvested the wheat before the first frost.",
    "The film won an award for its original soundtrack.",
)
_FORMS = (
    "{s}",
    "Yesterday I heard that {l}",
    "According to the news, {l}",
    "It is not true that {l}",
    "Many people say that {l}",
)


def _lower(s: str) -> str:
    return s[0].lower() + s[1:] if not s.startswith(("A ", "I ")) else \
        ("a " + s[2:] if s.startswith("A ") else s)


EVAL_SENTENCES: tuple[str, ...] = tuple(f.format(s=s, l=_lower(s)) for f in _FORMS
                                        for s in _BASE)
assert len(EVAL_SENTENCES) == 200
