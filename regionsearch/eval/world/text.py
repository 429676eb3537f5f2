"""Captions and referring expressions for world scenes.

Referring expressions are the evaluation's ground truth for "find the region matching this
text", so each one must pick out exactly one object. Every expression is generated from a
rule whose truth is checked on the object records with a safety *margin* (an object must be
clearly the leftmost, clearly above its landmark, clearly larger), so the referent is the
only object satisfying the expression even under strict, margin-free reading.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from regionsearch.eval.world.scene import ObjectRecord

#: Spatial relations: name -> predicate(a, b, margin) "a is <rel> b" on centres (y grows down).
RELATIONS: dict[str, Callable[[ObjectRecord, ObjectRecord, float], bool]] = {
    "left of": lambda a, b, m: a.centre[0] + m < b.centre[0],
    "right of": lambda a, b, m: a.centre[0] > b.centre[0] + m,
    "above": lambda a, b, m: a.centre[1] + m < b.centre[1],
    "below": lambda a, b, m: a.centre[1] > b.centre[1] + m,
}

#: Superlatives: word -> key whose *smallest* value wins.
SUPERLATIVES: dict[str, Callable[[ObjectRecord], float]] = {
    "leftmost": lambda o: o.centre[0],
    "rightmost": lambda o: -o.centre[0],
    "topmost": lambda o: o.centre[1],
    "bottommost": lambda o: -o.centre[1],
}

_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


def article(phrase: str) -> str:
    """``"a"`` or ``"an"`` for the phrase that follows it (by its first letter)."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def plural(name: str) -> str:
    """Plural of a class name: ``"red cross"`` -> ``"red crosses"``."""
    return name + "es" if name.endswith(("s", "x", "sh", "ch")) else name + "s"


def list_caption(names: list[str]) -> str:
    """``["red circle", "orange star"]`` -> ``"a red circle and an orange star"``."""
    phrases = [f"{article(n)} {n}" for n in names]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def counted_caption(names: list[str]) -> str:
    """Like :func:`list_caption` but repeated classes are counted: ``"two red circles and a star"``."""
    counts = Counter(names)
    phrases = []
    for name in dict.fromkeys(names):  # first-appearance order
        k = counts[name]
        phrases.append(
            f"{article(name)} {name}" if k == 1 else f"{_NUMBERS.get(k, str(k))} {plural(name)}"
        )
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def scene_caption(
    objects: Sequence[ObjectRecord],
    rng: np.random.Generator,
    canvas: tuple[int, int],
    relation_prob: float = 0.4,
) -> str:
    """A caption listing the scene's objects (left to right), sometimes with one spatial relation.

    The relation is only used between two objects whose classes are unique in the scene and
    whose positions differ clearly (by 10% of the canvas), so it is never wrong.
    """
    ordered = sorted(objects, key=lambda o: o.centre[0])
    names = [o.name for o in ordered]
    if len(objects) >= 2 and rng.random() < relation_prob:
        counts = Counter(names)
        unique = [o for o in ordered if counts[o.name] == 1]
        margin = 0.1 * min(canvas)
        pairs = [
            (a, rel, b)
            for a in unique
            for b in unique
            if a is not b
            for rel, pred in RELATIONS.items()
            if pred(a, b, margin)
        ]
        if pairs:
            a, rel, b = pairs[int(rng.integers(len(pairs)))]
            head = f"{article(a.name)} {a.name} {rel} {article(b.name)} {b.name}"
            rest = [o.name for o in ordered if o is not a and o is not b]
            if not rest:
                return head
            return head + ", with " + counted_caption(rest)
    return counted_caption(names)


def _unique_descriptions(target: ObjectRecord, objects: Sequence[ObjectRecord]) -> list[str]:
    """Noun phrases that only ``target`` satisfies: class, shape alone, colour alone."""
    out = []
    if sum(o.name == target.name for o in objects) == 1:
        out.append(f"the {target.name}")
    if sum(o.shape == target.shape for o in objects) == 1:
        out.append(f"the {target.shape}")
    # "the red object" only when no other object shows red at all (v2 stripes and halves count).
    if sum(target.colour in (o.colour, o.secondary_colour) for o in objects) == 1:
        out.append(f"the {target.colour} object")
    return out


def _landmark_names(landmark: ObjectRecord, objects: Sequence[ObjectRecord]) -> list[str]:
    """Names that pick out ``landmark`` alone: its class, and its shape if no other has it."""
    names = []
    if sum(o.name == landmark.name for o in objects) == 1:
        names.append(landmark.name)
    if sum(o.shape == landmark.shape for o in objects) == 1:
        names.append(landmark.shape)
    return names


def _ordinal_expressions(
    target: ObjectRecord,
    rivals: list[ObjectRecord],
    noun: str,
    group_size: int,
    margin: float,
    size_ratio: float,
) -> list[str]:
    """Superlative position and relative size of ``target`` within its group of ``noun``."""
    out = [
        f"the {word} {noun}"
        for word, key in SUPERLATIVES.items()
        if all(key(target) + margin < key(o) for o in rivals)
    ]
    big, small = ("larger", "smaller") if group_size == 2 else ("largest", "smallest")
    if all(target.area > size_ratio * o.area for o in rivals):
        out.append(f"the {big} {noun}")
    if all(target.area * size_ratio < o.area for o in rivals):
        out.append(f"the {small} {noun}")
    return out


def referring_expressions(
    target: ObjectRecord,
    objects: Sequence[ObjectRecord],
    canvas: tuple[int, int],
    margin_frac: float = 0.08,
    size_ratio: float = 1.4,
    context_relations: bool = False,
) -> list[str]:
    """All expressions (of the kinds below) that refer to ``target`` and to no other object.

    Kinds: unique attribute ("the red circle", "the circle", "the red object"); superlative
    position within the target's class or shape ("the leftmost square"); relation to a uniquely
    named landmark ("the star above the green cross"); relative size within the shape
    ("the larger triangle", "the smallest red ring"). With ``context_relations`` (world v2) a
    target with a unique class name also gets its relations to landmarks ("the red star left of
    the ring"): true and unambiguous, and they need the context around the region.
    """
    margin = margin_frac * min(canvas)
    others = [o for o in objects if o is not target]
    out = list(_unique_descriptions(target, objects))

    # Groups the target belongs to, named by the noun phrase that selects them.
    groups: list[tuple[str, list[ObjectRecord]]] = []
    same_class = [o for o in objects if o.name == target.name]
    same_shape = [o for o in objects if o.shape == target.shape]
    if len(same_class) >= 2:
        groups.append((target.name, same_class))
    if len(same_shape) >= 2 and len(same_shape) != len(same_class):
        groups.append((target.shape, same_shape))
    if context_relations and len(same_class) == 1:
        groups.append((target.name, same_class))

    for noun, group in groups:
        rivals = [o for o in group if o is not target]
        if rivals:
            out.extend(_ordinal_expressions(target, rivals, noun, len(group), margin, size_ratio))
        # Relations to a landmark named by its class, or by its shape alone when that shape is
        # unique in the scene ("the star left of the ring"); context relations of a uniquely
        # named target use the shape only, so each object gets a few, not dozens.
        for landmark in others:
            if landmark in group:
                continue
            names = _landmark_names(landmark, objects)
            if not rivals:
                names = [n for n in names if n == landmark.shape]
            for rel, pred in RELATIONS.items():
                # Target clearly satisfies it; every rival clearly does not (not even loosely).
                if pred(target, landmark, margin) and not any(
                    pred(o, landmark, -margin) for o in rivals
                ):
                    out.extend(f"the {noun} {rel} the {name}" for name in names)
    return list(dict.fromkeys(out))
