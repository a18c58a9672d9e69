"""Prompt -> token groups: subjects named by words resolve to token indices of the prompt.

A *subject* is named by words, never by token indices. The simplest spec is a string: its words
belong to the subject's group and its **last word is the head noun** whose map stands for the
subject, e.g. ``"dog"``, ``"red circle"`` (attribute + noun), ``"hot dog"`` (multi-word noun),
``"sks dog"`` (identifier + class noun). A :class:`Subject` spells the same out and adds aliases
(``Subject("dog", aliases=("puppy",))`` for "a puppy ... the dog").

How words are found in the prompt (as the pipeline's own tokenizer splits it):

1. A multi-word string is first looked for as a contiguous phrase ("red circle" in "a red circle
   and a red square" takes only the first "red"); if it does not occur as a phrase, each word is
   looked for on its own.
2. Every occurrence of a word belongs to the group (repeated mentions), and every sub-word piece
   of it ("hippopotamus" is 3 CLIP tokens). Matches start at word boundaries only ("cat" does
   not match inside "bobcat").
3. The main token is the first piece of the first occurrence of the head noun; every other index
   is a member (aggregated onto the main token's peak).

A word that is not in the prompt, lies past the tokenizer's window (77 tokens), or is claimed by
two groups raises a ``ValueError`` naming the word and the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TokenGroup:
    """Everything in one prompt that names one subject, as token indices of the tokenized prompt.

    Args:
        name: the subject's label (its head noun as the user wrote it, e.g. ``"dog"``).
        main: index of the token whose map stands for the subject (first piece of the head noun).
        members: indices of the other tokens of the group: attributes, aliases, a personalisation
            identifier, other sub-word pieces and other words of a multi-word subject.
        box: optional layout box ``(x0, y0, x1, y1)`` normalised to [0, 1].
    """

    name: str
    main: int
    members: tuple[int, ...] = ()
    box: Box | None = None

    @property
    def indices(self) -> tuple[int, ...]:
        return (self.main, *self.members)


@dataclass(frozen=True)
class Subject:
    """One subject of the prompt, by words.

    Args:
        noun: the subject's noun, possibly several words (``"teddy bear"``); its last word is the
            head whose map stands for the subject.
        attributes: words that describe it (``("red", "striped")``).
        aliases: other words the prompt uses for the same subject (``("puppy",)``).
        identifier: a personalisation token (``"sks"``) learned for this subject.
        box: optional layout box ``(x0, y0, x1, y1)`` normalised to [0, 1].
    """

    noun: str
    attributes: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    identifier: str | None = None
    box: Box | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.noun, str) or not self.noun.strip():
            raise ValueError(f"Subject noun={self.noun!r} is invalid: expected a non-empty word")
        for name in ("attributes", "aliases"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not all(isinstance(w, str) and w.strip() for w in value):
                raise ValueError(f"Subject {name}={value!r} is invalid: expected non-empty words")
        if self.box is not None:
            object.__setattr__(self, "box", validate_box(self.box, self.noun))

    @property
    def head(self) -> str:
        return self.noun.split()[-1]

    @classmethod
    def parse(cls, spec: SubjectSpec) -> Subject:
        """A :class:`Subject` from a string (``"red circle"``: last word is the noun), a mapping with
        the same fields, or a :class:`Subject`."""
        if isinstance(spec, Subject):
            return spec
        if isinstance(spec, str):
            words = spec.split()
            if not words:
                raise ValueError(f"subject {spec!r} is empty: expected one or more words")
            return cls(noun=words[-1], attributes=tuple(words[:-1]))
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"noun", "attributes", "aliases", "identifier", "box"}
            if unknown:
                raise ValueError(
                    f"subject {dict(spec)!r} has unknown keys {sorted(unknown)}: expected noun, "
                    "attributes, aliases, identifier, box"
                )
            if "noun" not in spec:
                raise ValueError(f"subject {dict(spec)!r} has no 'noun'")
            kwargs = dict(spec)
            for key in ("attributes", "aliases"):
                if key in kwargs:
                    kwargs[key] = (kwargs[key],) if isinstance(kwargs[key], str) else tuple(kwargs[key])
            if kwargs.get("box") is not None:
                kwargs["box"] = tuple(kwargs["box"])
            return cls(**kwargs)
        raise ValueError(f"subject {spec!r} is invalid: expected a string, a mapping or a Subject")

    def phrase(self) -> str:
        """The words in prompt order as a user would write them: identifier, attributes, noun."""
        return " ".join([*([self.identifier] if self.identifier else []), *self.attributes, self.noun])


SubjectSpec = str | Subject | Mapping


def validate_box(box: Sequence[float], name: str = "") -> Box:
    """Check a normalised ``(x0, y0, x1, y1)`` box; raise naming the box and what was expected."""
    label = f" for {name!r}" if name else ""
    try:
        values = tuple(float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box{label} {box!r} is invalid: expected 4 numbers x0,y0,x1,y1") from None
    if len(values) != 4:
        raise ValueError(f"box{label} {box!r} is invalid: expected 4 numbers x0,y0,x1,y1")
    x0, y0, x1, y1 = values
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"box{label} {box!r} is outside [0, 1]: coordinates are fractions of the image side")
    if x0 >= x1 or y0 >= y1:
        raise ValueError(f"box{label} {box!r} is empty: expected x0 < x1 and y0 < y1")
    return values  # type: ignore[return-value]


# --- finding words among tokens -------------------------------------------------------------


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)


def _prompt_ids(tokenizer, prompt: str) -> tuple[list[int], int]:
    """Token ids of the prompt with BOS/EOS, untruncated, and the tokenizer's window length."""
    ids = list(tokenizer(prompt, truncation=False).input_ids)
    return ids, int(tokenizer.model_max_length)


def _word_starts(tokenizer, ids: Sequence[int]) -> set[int]:
    """Positions where a word starts (CLIP marks word ends with ``</w>``)."""
    toks = tokenizer.convert_ids_to_tokens(list(ids))
    starts = {1}
    for i, tok in enumerate(toks[:-1]):
        if tok is None or tok.endswith("</w>") or i == 0:
            starts.add(i + 1)
    return starts


def _find(seq: Sequence[int], sub: Sequence[int], starts: set[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if i in starts and list(seq[i : i + n]) == list(sub)]


def _locate(tokenizer, ids, starts, words: str, prompt: str, window: int) -> list[list[int]]:
    """Token positions of each occurrence of ``words`` (a word or a phrase): a list of spans."""
    sub = _ids(tokenizer, words)
    if not sub:
        raise ValueError(f"word {words!r} is empty after tokenization of prompt {prompt!r}")
    spans = [list(range(i, i + len(sub))) for i in _find(ids, sub, starts)]
    if not spans:
        raise ValueError(f"word {words!r} is not in the prompt {prompt!r}")
    inside = [s for s in spans if s[-1] < window - 1]
    if not inside:
        raise ValueError(
            f"word {words!r} lies past the tokenizer's {window}-token window of prompt {prompt!r}: "
            "shorten the prompt or move the word earlier"
        )
    return inside


def resolve_subject(tokenizer, prompt: str, subject: SubjectSpec) -> TokenGroup:
    """Token indices of one subject in ``prompt`` (see the module docstring for the rules)."""
    subject = Subject.parse(subject)
    ids, window = _prompt_ids(tokenizer, prompt)
    starts = _word_starts(tokenizer, ids)
    phrase = subject.phrase()
    head_spans: list[list[int]]
    other: list[int] = []
    try:
        spans = _locate(tokenizer, ids, starts, phrase, prompt, window) if len(phrase.split()) > 1 else []
    except ValueError:
        spans = []
    if spans:
        head_len = len(_ids(tokenizer, subject.head))
        head_spans = [s[-head_len:] for s in spans]
        other = [i for s in spans for i in s[:-head_len]]
    else:
        head_spans = _locate(tokenizer, ids, starts, subject.head, prompt, window)
        words = subject.noun.split()[:-1] + list(subject.attributes)
        words += [subject.identifier] if subject.identifier else []
        for word in words:
            other += [i for s in _locate(tokenizer, ids, starts, word, prompt, window) for i in s]
    for alias in subject.aliases:
        other += [i for s in _locate(tokenizer, ids, starts, alias, prompt, window) for i in s]
    main = head_spans[0][0]
    members = [i for s in head_spans for i in s if i != main] + other
    members = tuple(sorted(set(members) - {main}))
    return TokenGroup(name=subject.noun, main=main, members=members, box=subject.box)


def resolve_groups(
    tokenizer, prompt: str, subjects: Sequence[SubjectSpec] | None = None
) -> tuple[TokenGroup, ...]:
    """Resolve ``subjects`` (or, with ``None``, :func:`infer_subjects`) to token groups of ``prompt``.

    Args:
        tokenizer: the pipeline's (first) tokenizer.
        prompt: the prompt as it will be encoded.
        subjects: subject specs (strings, mappings or :class:`Subject`); ``None`` infers them.

    Returns:
        One :class:`TokenGroup` per subject, in the order given.

    Raises:
        ValueError: a word not in the prompt or past the token window, an empty spec, no subject
            found, or one token claimed by two groups.
    """
    if subjects is None:
        subjects = infer_subjects(prompt)
        if not subjects:
            raise ValueError(f"no subject could be inferred from prompt {prompt!r}: pass subjects=[...]")
    if isinstance(subjects, (str, Subject, Mapping)):
        subjects = [subjects]
    if len(subjects) == 0:
        raise ValueError(f"subjects=[] for prompt {prompt!r}: expected at least one subject")
    groups = tuple(resolve_subject(tokenizer, prompt, s) for s in subjects)
    owner: dict[int, str] = {}
    for g in groups:
        for i in g.indices:
            if i in owner:
                word = tokenizer.convert_ids_to_tokens(_prompt_ids(tokenizer, prompt)[0][i]).replace(
                    "</w>", ""
                )
                raise ValueError(
                    f"word {word!r} (token {i}) is in two groups, {owner[i]!r} and {g.name!r}, "
                    f"in prompt {prompt!r}: each word belongs to one subject"
                )
            owner[i] = g.name
    return groups


# --- inferring subjects ---------------------------------------------------------------------

_SEPARATORS = re.compile(
    r"\s*(?:,|;|&|\+|\band\b|\bwith\b|\bnext to\b|\bbeside\b|\bnear\b|\bplus\b|\bon top of\b|\bon\b|\bin\b|"
    r"\bunder\b|\babove\b|\bbelow\b|\bbehind\b|\bholding\b)\s*",
    flags=re.IGNORECASE,
)
_LEADING = re.compile(
    r"^(?:(?:a|an|the|one|two|three|some|this|that|his|her|its|their)\s+)*"
    r"(?:(?:photo|picture|image|painting|drawing|rendering|illustration|sketch)\s+of\s+)?"
    r"(?:(?:a|an|the|one|some)\s+)*",
    flags=re.IGNORECASE,
)


def infer_subjects(prompt: str) -> list[str]:
    """Guess the subjects of a prompt (used when none are given).

    Rule: split the prompt at ",", ";", "&", "+", "and", "with", "next to", "beside", "near",
    "plus", "on (top of)", "in", "under", "above", "below", "behind", "holding"; strip leading
    articles/numbers and a leading "photo/picture/image/painting ... of"; each remaining chunk is
    one subject whose last word is the head noun and whose other words are its attributes.
    "a red circle and a blue square" -> ["red circle", "blue square"]; "a cat with a hat" ->
    ["cat", "hat"]; "a red circle, a blue square and a green triangle" -> three subjects.
    """
    chunks = [c for c in _SEPARATORS.split(prompt.strip().rstrip(".!")) if c and c.strip()]
    subjects = []
    for chunk in chunks:
        words = re.findall(r"[\w'-]+", _LEADING.sub("", chunk.strip()))
        if words:
            subjects.append(" ".join(words))
    return subjects


def with_identifier(subjects: Sequence[SubjectSpec], identifier: str, prompt: str) -> list[Subject]:
    """Put a personalisation ``identifier`` ("sks") into the group of the subject it precedes.

    "a sks dog and a cat" with subjects ``["dog", "cat"]`` (or inferred ``["sks dog", "cat"]``)
    gives ``[Subject("dog", identifier="sks"), Subject("cat")]``.

    Raises:
        ValueError: the identifier is not a word of the prompt, or no subject follows it.
    """
    words = re.findall(r"[\w'-]+", prompt.lower())
    ident = identifier.strip().lower()
    if ident not in words:
        raise ValueError(f"identifier {identifier!r} is not in the prompt {prompt!r}")
    following = words[words.index(ident) + 1 : words.index(ident) + 4]
    parsed = [Subject.parse(s) for s in subjects]
    for i, subject in enumerate(parsed):
        own = [w.lower() for w in subject.phrase().split() if w.lower() != ident]
        if own and any(w in own for w in following):
            attributes = tuple(a for a in subject.attributes if a.lower() != ident)
            parsed[i] = Subject(subject.noun, attributes, subject.aliases, identifier, subject.box)
            return parsed
    raise ValueError(
        f"identifier {identifier!r} precedes none of the subjects {[s.noun for s in parsed]} in prompt {prompt!r}"
    )


def describe(tokenizer, prompt: str, groups: Sequence[TokenGroup] | None = None) -> str:
    """A readable table of the groups, their tokens and indices, e.g. for ``--describe``.

    ``groups=None`` resolves the inferred subjects first.
    """
    if groups is None:
        groups = resolve_groups(tokenizer, prompt)
    ids, _ = _prompt_ids(tokenizer, prompt)
    toks = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids)]
    lines = [f"prompt: {prompt!r} ({len(ids)} tokens with BOS/EOS)"]
    for g in groups:
        box = f"  box={g.box}" if g.box else ""
        members = ", ".join(f"{toks[i]}@{i}" for i in g.members) or "-"
        lines.append(f"  {g.name}: main {toks[g.main]}@{g.main}; members {members}{box}")
    return "\n".join(lines)


def eot_index(tokenizer, prompt: str) -> int:
    """Index of the end-of-text token of ``prompt`` after truncation to the tokenizer's window."""
    ids, window = _prompt_ids(tokenizer, prompt)
    return min(len(ids), window) - 1
