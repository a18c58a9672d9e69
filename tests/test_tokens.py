import os

import pytest

from ait2i_ext.tokens import Subject, describe, eot_index, infer_subjects, resolve_groups, validate_box


def test_real_clip_ids(tokenizer):
    assert tokenizer("a cat and a dog").input_ids == [49406, 320, 2368, 537, 320, 1929, 49407]


def test_words_resolve_to_indices(tokenizer):
    cat, dog = resolve_groups(tokenizer, "a cat and a dog", ["cat", "dog"])
    assert (cat.main, cat.members, dog.main, dog.members) == (2, (), 5, ())


def test_subword_pieces_and_multiword_subjects(tokenizer):
    hippo, dog = resolve_groups(tokenizer, "a hippopotamus and a hot dog", ["hippopotamus", "hot dog"])
    assert len(tokenizer.tokenize("hippopotamus")) == 3
    assert hippo.indices == (2, 3, 4)
    assert dog.main == 8 and dog.members == (7,)  # head noun "dog" is main, "hot" a member


def test_repeated_mentions_and_aliases(tokenizer):
    (dog,) = resolve_groups(tokenizer, "a dog runs, the dog barks", ["dog"])
    assert dog.main == 2 and len(dog.members) == 1
    prompt = "a puppy playing, the dog is happy and a cat"
    dog, cat = resolve_groups(tokenizer, prompt, [Subject("dog", aliases=("puppy",)), "cat"])
    assert dog.main == 6 and dog.members == (2,) and cat.main == 11


def test_identifier_and_mapping_spec(tokenizer):
    dog, cat = resolve_groups(tokenizer, "a sks dog and a cat", [{"noun": "dog", "identifier": "sks"}, "cat"])
    assert dog.main == 3 and dog.members == (2,)


def test_phrase_binds_attribute_to_its_own_noun(tokenizer):
    circle, square = resolve_groups(tokenizer, "a red circle and a red square", ["red circle", "red square"])
    assert circle.members == (2,) and square.members == (6,)


def test_word_boundaries(tokenizer):
    with pytest.raises(ValueError, match="'cat' is not in the prompt"):
        resolve_groups(tokenizer, "a bobcat", ["cat"])


INFERENCE_CASES = [
    ("a red circle and a blue square", ["red circle", "blue square"]),
    ("a cat with a hat", ["cat", "hat"]),
    ("a red circle, a blue square and a green triangle", ["red circle", "blue square", "green triangle"]),
    ("a photo of a cat and a dog", ["cat", "dog"]),
    ("a cat sitting on a mat", ["cat", "mat"]),
    ("a dog running in the park, high quality", ["dog", "park"]),
    ("a dog. a cat.", ["dog", "cat"]),
    ("a dog chasing a cat", ["dog", "cat"]),
    ("masterpiece, best quality, a fox in the snow, 8k", ["fox", "snow"]),
    ("a king and a wedding ring", ["king", "wedding ring"]),
    ("a hippopotamus and a hot dog", ["hippopotamus", "hot dog"]),
]


def _spacy_or_skip():
    from ait2i_ext.tokens import spacy_pipeline

    if spacy_pipeline() is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs the [nlp] extra: spaCy or its English model is missing")
        pytest.skip('spaCy with an English model is not installed (pip install -e ".[nlp]")')


@pytest.mark.parametrize("parser", ["rule", "spacy"])
@pytest.mark.parametrize("prompt, expected", INFERENCE_CASES)
def test_inference(prompt, expected, parser):
    if parser == "spacy":
        _spacy_or_skip()
    assert infer_subjects(prompt, parser=parser) == expected


def test_inference_auto_uses_spacy_when_installed(monkeypatch):
    from ait2i_ext import tokens

    monkeypatch.setattr(tokens, "spacy_pipeline", lambda: None)
    assert infer_subjects("a cat sitting on a mat") == ["cat", "mat"]  # the rule
    with pytest.raises(ValueError, match="needs spaCy"):
        infer_subjects("a cat", parser="spacy")
    with pytest.raises(ValueError, match="parser='nltk' is invalid"):
        infer_subjects("a cat", parser="nltk")


def test_rule_keeps_nouns_ending_in_ing_and_splits_at_verbs():
    assert infer_subjects("a building behind a swing", parser="rule") == ["building", "swing"]
    assert infer_subjects("a cat sits on a red mat", parser="rule") == ["cat", "red mat"]


def test_inferred_groups(tokenizer):
    groups = resolve_groups(tokenizer, "a red circle, a blue square and a green triangle")
    assert [g.name for g in groups] == ["circle", "square", "triangle"]
    assert all(len(g.members) == 1 for g in groups)


def test_describe_names_tokens(tokenizer):
    text = describe(
        tokenizer,
        "a hippopotamus and a hot dog",
        resolve_groups(tokenizer, "a hippopotamus and a hot dog", ["hippopotamus", "hot dog"]),
    )
    assert "hippo@2" in text and "potam@3" in text and "dog@8" in text and "hot@7" in text


def test_eot_index(tokenizer):
    assert eot_index(tokenizer, "a cat and a dog") == 6
    assert eot_index(tokenizer, "word " * 100) == 76


@pytest.mark.parametrize(
    "prompt, subjects, message",
    [
        ("a cat", ["dog"], r"'dog' is not in the prompt 'a cat'"),
        ("word " * 80 + "cat", ["cat"], r"'cat' lies past the tokenizer's 77-token window"),
        ("a cat and a dog", ["cat", "cat"], r"'cat' .* is in two groups"),
        ("a cat", [], r"subjects=\[\] for prompt 'a cat'"),
        ("a cat", [""], r"subject '' is empty"),
        ("a cat", [{"noun": "cat", "colour": "red"}], r"unknown keys \['colour'\]"),
        ("a cat", [3], r"subject 3 is invalid"),
    ],
)
def test_bad_subjects_raise(tokenizer, prompt, subjects, message):
    with pytest.raises(ValueError, match=message):
        resolve_groups(tokenizer, prompt, subjects)


@pytest.mark.parametrize(
    "box, message",
    [((0.5, 0.2, 0.4, 0.9), "empty"), ((-0.1, 0, 0.5, 0.5), r"outside \[0, 1\]"), ((0, 0, 1), "4 numbers")],
)
def test_bad_boxes(box, message):
    with pytest.raises(ValueError, match=message):
        validate_box(box, "cat")


def test_identifier_joins_the_subject_it_precedes(tokenizer):
    from ait2i_ext.tokens import with_identifier

    subjects = with_identifier(["sks dog", "cat"], "sks", "a sks dog and a cat")
    dog, cat = resolve_groups(tokenizer, "a sks dog and a cat", subjects)
    assert subjects[0].identifier == "sks" and dog.members == (2,) and cat.members == ()
    with pytest.raises(ValueError, match="identifier 'zzz' is not in the prompt"):
        with_identifier(["dog"], "zzz", "a dog")
