"""Personalisation: a LoRA/DreamBooth concept loaded into a pipeline, its identifier in its noun's group.

A learned concept is used as "a sks dog": the identifier ``sks`` joins the group of the class noun it
precedes, so aggregation pulls the identifier's map onto the noun's peak and isolation keeps the
concept apart from the other subjects (``docs/method.md``, Personalisation). Nothing else changes:
the LoRA-loaded pipeline is still a stock Stable Diffusion pipeline, and :func:`ait2i_ext.generate`
runs on it through the plain SD adapter.

    from ait2i_ext import generate
    from ait2i_ext.adapters.personalize import load_lora, personalized_subjects

    load_lora(pipe, "runs/sks-dog")                      # folder or .safetensors file
    prompt = "a sks dog and a cat"
    out = generate(pipe, prompt, personalized_subjects(prompt, "sks"))

Two concepts at once: both LoRAs active together (peft multi-adapter), each identifier in its own group:

    load_loras(pipe, ["runs/sks-star", "runs/xyz-heart"])
    prompt = "a sks star and a xyz heart"
    out = generate(pipe, prompt, personalized_subjects(prompt, ["sks", "xyz"]))

Only safetensors is loaded. A LoRA whose layers do not fit the pipeline's models is refused before
anything is injected, and a load that fails or injects less than the file holds is undone, so the
pipeline is left as it was.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ait2i_ext.capture import capture_attention
from ait2i_ext.tokens import Subject, SubjectSpec, infer_subjects, with_identifier

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers and training/train_lora.py write
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# A LoRA key in peft form: "<layer>.lora_A.weight", "<layer>.lora_B.weight" (+ bias), "<layer>.lora_magnitude_vector".
_PEFT_KEY = re.compile(
    r"^(?P<layer>.+?)\.(?:lora_(?P<side>[AB])\.(?:[\w-]+\.)?(?:weight|bias)|lora_embedding_(?P<embedding>[AB])"
    r"(?:\.[\w-]+)?|lora_magnitude_vector(?:\.[\w-]+)?)$"
)


def lora_file(path: str | Path) -> Path:
    """The safetensors file a LoRA ``path`` names: the file itself, or ``path/pytorch_lora_weights.safetensors``.

    Raises:
        ValueError: the path does not exist, is a pickle (``.bin``, ``.pt``, ``.ckpt``, ...), is not a
            ``.safetensors`` file, or is a folder without ``pytorch_lora_weights.safetensors``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(
            f"LoRA {str(path)!r} does not exist: expected a .safetensors file or a folder holding {LORA_WEIGHT_NAME}"
        )
    if path.is_dir():
        file = path / LORA_WEIGHT_NAME
        if file.is_file():
            return file
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"LoRA folder {str(path)!r} holds only pickle weights {pickles}: only safetensors is loaded "
                f"(expected {LORA_WEIGHT_NAME}; convert with safetensors.torch.save_file)"
            )
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f"; pass one of {found} as the path" if found else ""
        raise ValueError(f"LoRA folder {str(path)!r} has no {LORA_WEIGHT_NAME}{hint}")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(
            f"LoRA {str(path)!r} is a pickle ({path.suffix}): only safetensors is loaded "
            "(pickles can run code when loaded; convert with safetensors.torch.save_file)"
        )
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"LoRA {str(path)!r} is not a .safetensors file: only safetensors is loaded")
    return path


def _components(pipe) -> dict[str, torch.nn.Module]:
    """The models a LoRA state dict addresses by key prefix (``unet.``, ``text_encoder.``, ...)."""
    names = ("unet", "text_encoder", "text_encoder_2")
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def is_embedding_only(state: dict[str, torch.Tensor]) -> bool:
    """True for a text-encoder LoRA that adapts only the token embedding (``--text_encoder_targets
    token_embedding``): diffusers cannot infer its key format and refuses to load it."""
    return bool(state) and all(".lora_embedding_" in k for k in state)


def lora_state_to_peft(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's keys in peft form (``...lora_A.weight``), as diffusers converts them when loading."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if prefix == "unet":
        return convert_unet_state_dict_to_peft(state)
    if is_embedding_only(state) or any(".lora_A." in k or ".lora_B." in k for k in state):
        return state  # peft already (an embedding-only LoRA has nothing to convert)
    return convert_state_dict_to_peft(state)


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    get_base = getattr(module, "get_base_layer", None)  # a layer already wrapped by another adapter
    return get_base() if get_base is not None else module


def _layer_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(inputs, outputs)`` of a Linear, Conv or Embedding layer (vocabulary, width), ``None`` for
    anything a LoRA cannot wrap."""
    module = _base_layer(module)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return module.in_channels, module.out_channels
    return None


def check_lora_fits(pipe, state_dict: dict[str, torch.Tensor], source: str = "LoRA") -> dict[str, set[str]]:
    """Check that every key of a LoRA ``state_dict`` addresses a layer of ``pipe`` with matching shapes.

    diffusers/peft either raise deep in ``load_state_dict`` or, for keys naming no layer, log a warning
    and load the rest; this check runs first and touches nothing.

    Args:
        pipe: the pipeline the LoRA is meant for.
        state_dict: the LoRA as ``pipe.lora_state_dict`` returns it (keys prefixed ``unet.`` /
            ``text_encoder.``).
        source: how to name the LoRA in errors (its path).

    Returns:
        Per component (``"unet"``, ``"text_encoder"``, ...), the names of the layers the LoRA adapts.

    Raises:
        ValueError: keys that match no layer (naming a few and the count), a key whose shape does not
            fit its layer (naming the key and both shapes), or no UNet layer at all.
    """
    components = _components(pipe)
    by_prefix: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        prefix, _, rest = key.partition(".")
        if prefix in components and rest:
            by_prefix.setdefault(prefix, {})[rest] = value
        else:
            unmatched.append(key)
    layers: dict[str, set[str]] = {}
    for prefix, state in by_prefix.items():
        model = components[prefix]
        modules = dict(model.named_modules())
        for key, value in lora_state_to_peft(prefix, state).items():
            match = _PEFT_KEY.match(key)
            layer = modules.get(match["layer"]) if match else None
            shape = _layer_shape(layer) if layer is not None else None
            if shape is None:
                unmatched.append(f"{prefix}.{key}")
                continue
            layers.setdefault(prefix, set()).add(match["layer"])
            side = match["side"] or match["embedding"]
            if side is None or not (key.endswith(".weight") or match["embedding"]):
                continue
            dim, expected = (1, shape[0]) if side == "A" else (0, shape[1])
            if value.ndim < 2 or value.shape[dim] != expected:
                kind = "inputs" if side == "A" else "outputs"
                raise ValueError(
                    f"{source} does not fit this {type(pipe).__name__}: key {f'{prefix}.{key}'!r} has shape "
                    f"{tuple(value.shape)} but layer {prefix}.{match['layer']} ({type(_base_layer(layer)).__name__} "
                    f"{shape[0]} -> {shape[1]}) has {expected} {kind}: the LoRA was trained for another model"
                )
    if unmatched:
        raise ValueError(
            f"{source} does not match this {type(pipe).__name__}: {len(unmatched)} key(s) name no layer of "
            f"{sorted(components)}, e.g. {sorted(unmatched)[:3]}: the LoRA was trained for another model"
        )
    if not layers.get("unet"):
        raise ValueError(f"{source} holds no UNet layer: expected keys starting with 'unet.'")
    return layers


def _injected(model: torch.nn.Module, adapter_name: str) -> set[str]:
    """Names of the layers of ``model`` that carry the LoRA adapter ``adapter_name``."""
    return {
        name
        for name, module in model.named_modules()
        if adapter_name in getattr(module, "lora_A", {})
        or adapter_name in getattr(module, "lora_embedding_A", {})
        or adapter_name in getattr(module, "lora_magnitude_vector", {})
    }


def _adapter_names(pipe) -> set[str]:
    return {name for names in pipe.get_list_adapters().values() for name in names}


def _load_embedding_only_lora(
    pipe, file: Path, state_dict: dict[str, torch.Tensor], adapter_name: str
) -> None:
    """Load a LoRA whose text-encoder part adapts only the token embedding: diffusers loads the UNet part
    (with the file's peft metadata), peft the embedding, as one adapter ``adapter_name``."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    _, _, metadata = pipe.lora_state_dict(
        str(file.parent), weight_name=file.name, use_safetensors=True, return_lora_metadata=True
    )
    pipe.load_lora_into_unet(
        state_dict,
        network_alphas=None,
        unet=pipe.unet,
        adapter_name=adapter_name,
        metadata=metadata,
        _pipeline=pipe,
    )
    text_encoder = pipe.text_encoder
    state = {
        k.removeprefix("text_encoder."): v for k, v in state_dict.items() if k.startswith("text_encoder.")
    }
    if not hasattr(text_encoder, "text_model"):  # newer transformers flatten CLIPTextModel
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    config = {
        k.removeprefix("text_encoder."): v
        for k, v in (metadata or {}).items()
        if k.startswith("text_encoder.")
    }
    if not config:  # no peft metadata: alpha = rank, as diffusers assumes
        rank = next(v.shape[0] for k, v in state.items() if "lora_embedding_A" in k)
        config = {"r": rank, "lora_alpha": rank, "target_modules": ["token_embedding"]}
    inject_adapter_in_model(LoraConfig(**config), text_encoder, adapter_name=adapter_name)
    set_peft_model_state_dict(text_encoder, state, adapter_name=adapter_name)


def unload_lora(pipe, adapter_name: str) -> None:
    """Remove the LoRA adapter ``adapter_name`` from every model of ``pipe`` (no-op if absent)."""
    if adapter_name in _adapter_names(pipe):
        pipe.delete_adapters(adapter_name)


def load_lora(
    pipe, path: str | Path, adapter_name: str | None = None, scale: float | dict[str, float] = 1.0
) -> str:
    """Load a LoRA (e.g. from ``training/train_lora.py``) into ``pipe`` as the active adapter.

    The file's peft metadata is honoured, so a LoRA trained with ``lora_alpha != rank`` loads at its
    real strength (as ``pipe.load_lora_weights`` does). Like ``load_lora_weights``, the new adapter
    becomes the active one.

    Args:
        pipe: a diffusers pipeline with LoRA support (``StableDiffusionPipeline`` and relatives).
        path (`str` or `Path`): a ``.safetensors`` file, or a folder holding
            ``pytorch_lora_weights.safetensors`` (a training run's ``output_dir`` or ``checkpoint-N``).
        adapter_name (`str`, *optional*): name of the adapter; default ``default_<i>``, the first free one.
        scale (`float` or `dict`): the adapter's weight (``pipe.set_adapters``), or one per part
            (``{"unet": 0.5, "text_encoder": 1.0}``, :func:`parse_lora_scale`); 1.0 is the trained strength.

    Returns:
        The adapter's name.

    Raises:
        ValueError: the path is missing, a pickle or not safetensors; the file is unreadable; the LoRA's
            keys or shapes do not match the pipeline's layers; the name is taken; or the pipeline cannot
            load LoRAs. On any error the pipeline is left as it was.
    """
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(
            f"pipeline {type(pipe).__name__} cannot load LoRAs: expected a pipeline with load_lora_weights"
        )
    file = lora_file(path)
    source = f"LoRA {str(file)!r}"
    existing = _adapter_names(pipe)
    if adapter_name is None:
        adapter_name = next(
            f"default_{i}" for i in range(len(existing) + 1) if f"default_{i}" not in existing
        )
    elif adapter_name in existing:
        raise ValueError(
            f"adapter_name={adapter_name!r} is already loaded in this pipeline: pick another name or unload it"
        )

    try:
        state_dict, _ = pipe.lora_state_dict(str(file.parent), weight_name=file.name, use_safetensors=True)
    except Exception as err:  # safetensors raises its own error type for a corrupt header
        raise ValueError(f"{source} could not be read as safetensors: {err}") from err
    if not state_dict or not all("lora" in key for key in state_dict):
        raise ValueError(
            f"{source} is not a LoRA: expected keys containing 'lora', got {sorted(state_dict)[:3]}"
        )
    expected = check_lora_fits(pipe, state_dict, source)

    try:
        text_encoder_state = {k: v for k, v in state_dict.items() if k.startswith("text_encoder.")}
        # peft warns, for every model, that a second adapter is a second adapter
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            if is_embedding_only(text_encoder_state):
                _load_embedding_only_lora(pipe, file, state_dict, adapter_name)
            else:
                pipe.load_lora_weights(
                    str(file.parent), weight_name=file.name, adapter_name=adapter_name, use_safetensors=True
                )
        components = _components(pipe)
        for prefix, layers in expected.items():
            missing = layers - _injected(components[prefix], adapter_name)
            if missing:
                raise ValueError(
                    f"{source}: {len(missing)} {prefix} layer(s) were not adapted after loading, e.g. {sorted(missing)[:3]}"
                )
        if scale != 1.0:
            pipe.set_adapters(adapter_name, adapter_weights=scale)
    except Exception as err:
        unload_lora(pipe, adapter_name)
        if isinstance(err, ValueError):
            raise
        raise ValueError(f"{source} could not be loaded into {type(pipe).__name__}: {err}") from err
    logger.info("loaded %s as adapter %r (%d UNet layers)", source, adapter_name, len(expected["unet"]))
    return adapter_name


def load_loras(
    pipe,
    paths: Sequence[str | Path],
    adapter_names: Sequence[str] | None = None,
    scales: Sequence[float | dict[str, float]] | None = None,
) -> list[str]:
    """Load several LoRAs (one per concept) into ``pipe``, all active at once (diffusers' peft
    multi-adapter: ``load_lora_weights(..., adapter_name=...)`` then ``set_adapters``).

    Args:
        pipe: a diffusers pipeline with LoRA support.
        paths: one ``.safetensors`` file or run folder per LoRA (see :func:`load_lora`).
        adapter_names: their adapter names; default ``default_<i>``.
        scales: their weights (a number or one per part, as ``load_lora``'s ``scale``); default 1.0 each.

    Returns:
        The adapter names, in the order of ``paths``.

    Raises:
        ValueError: as :func:`load_lora`, or ``adapter_names``/``scales`` of another length than
            ``paths``; on any error every LoRA this call loaded is unloaded again.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("paths=[] is invalid: expected at least one LoRA")
    for label, values in (("adapter_names", adapter_names), ("scales", scales)):
        if values is not None and len(values) != len(paths):
            raise ValueError(
                f"{label}={list(values)!r} is invalid: expected one per LoRA path ({len(paths)})"
            )
    names: list[str] = []
    try:
        for i, path in enumerate(paths):
            names.append(load_lora(pipe, path, adapter_names[i] if adapter_names else None))
        pipe.set_adapters(names, adapter_weights=list(scales) if scales else [1.0] * len(names))
    except Exception:
        for name in names:
            unload_lora(pipe, name)
        raise
    return names


LORA_PARTS = ("unet", "text_encoder")


def parse_lora_scale(text: str) -> float | dict[str, float]:
    """A LoRA weight as written on a command line: ``"0.7"`` -> ``0.7`` (every part of the LoRA), or
    ``"unet=0.5"`` / ``"unet=0.5,text_encoder=1"`` -> ``{"unet": 0.5, "text_encoder": 1.0}`` (one weight
    per part, parts not named at 1.0): what ``pipe.set_adapters(..., adapter_weights=...)`` takes.

    Raises:
        ValueError: not a number, a part other than ``unet`` / ``text_encoder``, or a negative weight.
    """
    expected = "expected a weight >= 0 like '0.7' or per part like 'unet=0.5,text_encoder=1'"
    parts: dict[str, float] = {}
    try:
        if "=" not in text:
            weight = float(text)
            if weight < 0:
                raise ValueError
            return weight
        for item in text.split(","):
            part, _, value = item.partition("=")
            part = part.strip()
            if part not in LORA_PARTS or part in parts:
                raise ValueError
            parts[part] = float(value)
            if parts[part] < 0:
                raise ValueError
    except ValueError:
        raise ValueError(f"LoRA scale {text!r} is invalid: {expected}") from None
    return {part: parts.get(part, 1.0) for part in LORA_PARTS}


def personalized_subjects(
    prompt: str, identifier: str | Sequence[str], subjects: Sequence[SubjectSpec] | None = None
) -> list[Subject]:
    """The prompt's subjects with each identifier in the group of the noun it precedes.

    "a sks dog and a cat" -> ``[Subject("dog", identifier="sks"), Subject("cat")]``; with two concepts,
    "a sks star and a xyz heart" and ``["sks", "xyz"]`` -> ``[Subject("star", identifier="sks"),
    Subject("heart", identifier="xyz")]``. ``subjects=None`` infers them from the prompt
    (:func:`ait2i_ext.tokens.infer_subjects`). Subjects with layout boxes keep their boxes.

    Raises:
        ValueError: an identifier is not a word of the prompt or precedes none of the subjects, or two
            identifiers precede the same subject.
    """
    identifiers = [identifier] if isinstance(identifier, str) else list(identifier)
    if not identifiers:
        raise ValueError("identifier=[] is invalid: expected at least one identifier")
    result = list(subjects) if subjects is not None else infer_subjects(prompt)
    for ident in identifiers:
        before = [getattr(s, "identifier", None) for s in result]
        result = with_identifier(result, ident, prompt)
        taken = [i for i, s in enumerate(result) if before[i] is not None and s.identifier != before[i]]
        if taken:
            raise ValueError(
                f"identifiers {before[taken[0]]!r} and {ident!r} both precede the subject "
                f"{result[taken[0]].noun!r} in prompt {prompt!r}: expected one identifier per subject"
            )
    return result


# --- regional LoRA: each concept's LoRA acts only where its concept is -------------------------


MASK_SOURCES = ("current", "mean", "regions", "mixed", "auto")
LAID_OUT = ("regions", "mixed")  # the mask sources that share the image among layout boxes
ARRANGEMENTS = ("row", "diagonal")


@dataclass(frozen=True)
class RegionalConfig:
    """How :func:`regional_loras` confines each concept's LoRA to its region.

    The noise prediction is ``eps = eps_base + sum_k m_k * (eps_k - eps_base)``: ``eps_base`` the UNet with
    every LoRA disabled, ``eps_k`` with concept ``k``'s LoRA alone, ``m_k`` a soft mask from the
    cross-attention of concept ``k``'s group (identifier + noun) in the ``eps_k`` pass.

    Args:
        threshold: where the mask is 0.5, on the group map normalised to [0, 1] per image.
        softness: width of the ramp from 0 to 1 around ``threshold`` (0: a hard mask).
        dilation: map cells the mask grows by (a max filter), so the concept's thin parts (a star's tips),
            weaker in its map than its core, stay in the region.
        layout_fraction: the first part of the denoising, by timestep (``t > (1 - layout_fraction) * T``),
            runs each LoRA everywhere (``m_k = 1``: the concept's layout), the rest masked.
        mask_source: ``"current"`` the mask from this step's maps; ``"mean"`` from the maps averaged over
            the steps so far (steadier, as aggregation over steps is); ``"regions"``: the image shared
            among the subjects' layout boxes (``Subject.box``, the CLI's ``--box``), each cell to the
            subject whose box is nearest (:func:`box_regions`), the same at every step; without boxes,
            every subject gets one of the automatic layout (:func:`auto_layout`: side by side along
            the long axis); a subject that is no concept leaves its region to the no-LoRA pass;
            ``"mixed"``: ``"regions"`` for the first ``regions_fraction`` of the denoising (by timestep,
            as ``layout_fraction``: where the layout forms), then ``"mean"`` from the maps of the steps
            after it (each concept's mask follows what was drawn in its region);
            ``"auto"`` (default): ``"regions"`` when a concept has a box (the user's layout), else
            ``"mean"`` (:func:`for_concepts`; the automatic layout did not beat ``"mean"`` for two
            concepts, docs/personalization.md, ninth sitting).
        regions_fraction: with ``mask_source="mixed"``, the first part of the denoising that uses the
            layout's regions.
        box_size: the side of the automatic layout's boxes, as a fraction of the image side (the shapes
            world draws objects 14-28 px of 64: 0.22-0.44).
        box_softness: the width of the ramp between two regions, as a fraction of the image side
            (0: hard borders).
        arrangement: the automatic layout's order (:func:`auto_layout`): ``"row"``, side by side along
            the long axis; ``"diagonal"``, along the diagonal from the top left (two subjects' centres
            0.71 of the side apart instead of 0.5, so two objects drawn larger than their boxes do not
            touch).
        gain: each concept's change to the prediction is multiplied by ``gain`` inside its mask
            (``eps_base + gain * sum_k m_k * (eps_k - eps_base)``; 1: as trained, > 1: the concept's
            shape pushed further from the base model's).
        assign: ``"independent"``: each concept's mask from its own map alone (masks may overlap, and
            share a cell in proportion); ``"strongest"``: each map cell to at most one concept, the one
            whose normalised group level is highest there (:func:`strongest_only`), before the ramp.
        concept_prompt: what concept ``k``'s pass reads: ``"full"``, the whole prompt; ``"own"``, its
            group's words alone, as its LoRA was trained (``"a sks star"``, :func:`own_prompt`);
            ``"auto"`` (default): ``"own"`` when the prompt names two or more concepts, else ``"full"``
            (:func:`for_concepts`; with one concept ``"own"`` paints a second, non-concept subject in
            the concept's colour, docs/personalization.md, sixth round).
        full_prompt_fraction: with ``concept_prompt="own"``, the first part of the denoising (by
            timestep, as ``layout_fraction``) in which the concept passes still read the whole prompt
            (where the concepts go), before their own prompts (how each is drawn).
        exclude_others: drop from every concept's mask the map cells where a subject of the prompt that
            is no concept ("a blue square") draws more attention than the concept's group
            (:func:`held_by_others`, in the concept's pass reading the whole prompt; kept for the
            own-prompt part): the no-LoRA pass draws that subject there.
    """

    # Tuned on the shapes model (docs/personalization.md, fifth round): seeds 1000-1031; the last three
    # (sixth round) change nothing with one concept and were confirmed with two on seeds 20000-20063
    # and 30000-30063 (two concepts 14.1 -> 35.9 % and 18.8 -> 34.4 %).
    threshold: float = 0.3
    softness: float = 0.2
    dilation: int = 1
    layout_fraction: float = 0.0
    mask_source: str = "auto"
    assign: str = "strongest"
    concept_prompt: str = "auto"
    full_prompt_fraction: float = 0.3
    exclude_others: bool = False
    regions_fraction: float = 0.3
    box_size: float = 0.42
    box_softness: float = 0.1
    arrangement: str = "row"
    gain: float = 1.0

    def __post_init__(self):
        checks = (
            ("threshold", 0.0 <= self.threshold <= 1.0, "a number in [0, 1]"),
            ("softness", 0.0 <= self.softness <= 1.0, "a number in [0, 1]"),
            ("dilation", isinstance(self.dilation, int) and self.dilation >= 0, "an integer >= 0"),
            ("layout_fraction", 0.0 <= self.layout_fraction <= 1.0, "a number in [0, 1]"),
            ("mask_source", self.mask_source in MASK_SOURCES, "one of " + ", ".join(map(repr, MASK_SOURCES))),
            ("assign", self.assign in ("independent", "strongest"), "'independent' or 'strongest'"),
            ("concept_prompt", self.concept_prompt in ("full", "own", "auto"), "'full', 'own' or 'auto'"),
            ("full_prompt_fraction", 0.0 <= self.full_prompt_fraction <= 1.0, "a number in [0, 1]"),
            ("exclude_others", isinstance(self.exclude_others, bool), "True or False"),
            ("regions_fraction", 0.0 <= self.regions_fraction <= 1.0, "a number in [0, 1]"),
            ("box_size", 0.0 < self.box_size <= 1.0, "a number in (0, 1]"),
            ("box_softness", 0.0 <= self.box_softness <= 1.0, "a number in [0, 1]"),
            ("arrangement", self.arrangement in ARRANGEMENTS, "one of " + ", ".join(map(repr, ARRANGEMENTS))),
            ("gain", 0.0 <= self.gain <= 4.0, "a number in [0, 4]"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"RegionalConfig({name}={getattr(self, name)!r}) is invalid: expected {expected}"
                )


def for_concepts(config: RegionalConfig, count: int, boxed: bool = False) -> RegionalConfig:
    """``config`` with its ``"auto"`` fields settled for a prompt naming ``count`` concepts, ``boxed``
    when one of them has a layout box: ``concept_prompt`` ``"own"`` for two or more concepts, else
    ``"full"``; ``mask_source`` ``"regions"`` when a concept has a box, else ``"mean"`` (other values are
    kept as they are)."""
    if config.concept_prompt == "auto":
        config = replace(config, concept_prompt="own" if count >= 2 else "full")
    if config.mask_source == "auto":
        config = replace(config, mask_source="regions" if boxed else "mean")
    return config


def auto_layout(
    count: int, size: float, aspect: float = 1.0, arrangement: str = "row"
) -> list[tuple[float, float, float, float]]:
    """``count`` boxes side by side along the image's long axis, in order, each centred in its equal
    share of that axis and on the other: squares of side ``size`` (a fraction of the short side, cut to
    the share's width). ``arrangement="diagonal"``: the same boxes, each also centred in its equal share
    of the other axis (top left to bottom right).

    Args:
        count: how many boxes (the prompt's subjects).
        size: the boxes' side, as a fraction of the image's short side, in (0, 1].
        aspect: the image's width / height (> 1: side by side left to right; < 1: top to bottom).
        arrangement: ``"row"`` or ``"diagonal"`` (see :class:`RegionalConfig`).

    Returns:
        ``(x0, y0, x1, y1)`` boxes normalised to [0, 1], not overlapping.
    """
    if count < 1:
        raise ValueError(f"count={count!r} is invalid: expected an integer >= 1")
    if not 0.0 < size <= 1.0 or aspect <= 0:
        raise ValueError(f"size={size!r}, aspect={aspect!r} is invalid: expected size in (0, 1], aspect > 0")
    if arrangement not in ARRANGEMENTS:
        raise ValueError(f"arrangement={arrangement!r} is invalid: expected one of {ARRANGEMENTS}")
    wide = aspect >= 1.0
    long_side = max(aspect, 1.0 / aspect)  # the long side in units of the short side
    along = min(size / long_side, 1.0 / count)  # the side along the long axis, as a fraction of it
    across = min(size, along * long_side)  # the same length across, as a fraction of the short side
    boxes = []
    for i in range(count):
        centre = (i + 0.5) / count
        a0, a1 = centre - along / 2, centre + along / 2
        middle = centre if arrangement == "diagonal" else 0.5  # the box's centre on the other axis
        c0, c1 = middle - across / 2, middle + across / 2
        box = (a0, c0, a1, c1) if wide else (c0, a0, c1, a1)
        boxes.append(tuple(round(v, 6) for v in box))  # no float noise in run.json
    return boxes


def with_layout(subjects: Sequence[SubjectSpec], config: RegionalConfig | None = None) -> list[Subject]:
    """The subjects with the layout :func:`regional_loras` uses: as given when no concept (subject with an
    identifier) lacks a box or the config's mask source (settled by :func:`for_concepts`) is not
    ``"regions"``; else every subject gets its box of :func:`auto_layout`, in order. Pass the result to
    ``generate`` as well, so the box term guides each group into its box.

    Raises:
        ValueError: some concepts have boxes and others not (name them).
    """
    config = config or RegionalConfig()
    subjects = [Subject.parse(s) for s in subjects]
    concepts = [s for s in subjects if s.identifier is not None]
    boxed = [s for s in concepts if s.box is not None]
    settled = for_concepts(config, len(concepts), bool(boxed))
    if settled.mask_source not in LAID_OUT or len(boxed) == len(concepts):
        return subjects
    if boxed:
        missing = [s.identifier for s in concepts if s.box is None]
        raise ValueError(
            f"concepts {missing} have no box while {[s.identifier for s in boxed]} have one: "
            "expected a box for every concept, or none (the automatic layout)"
        )
    if any(s.box is not None for s in subjects):
        raise ValueError(
            f"concepts {[s.identifier for s in concepts]} have no box while other subjects have one: "
            "expected a box for every concept, or no box at all (the automatic layout)"
        )
    boxes = auto_layout(len(subjects), config.box_size, arrangement=config.arrangement)
    return [replace(s, box=box) for s, box in zip(subjects, boxes)]


def _signed_box_distance(box: Sequence[float], size: tuple[int, int]) -> torch.Tensor:
    """`(H, W)`: each cell centre's distance to a normalised box, negative inside (minus the distance
    to the nearest side)."""
    x0, y0, x1, y1 = box
    v = (torch.arange(size[0], dtype=torch.float32) + 0.5) / size[0]
    u = (torch.arange(size[1], dtype=torch.float32) + 0.5) / size[1]
    dy = torch.maximum(y0 - v, v - y1)[:, None].expand(*size)  # > 0 outside, along each axis
    dx = torch.maximum(x0 - u, u - x1)[None, :].expand(*size)
    outside = torch.hypot(dx.clamp_min(0), dy.clamp_min(0))
    return torch.where((dx <= 0) & (dy <= 0), torch.maximum(dx, dy), outside)


def box_regions(
    boxes: Sequence[Sequence[float]], size: tuple[int, int], softness: float
) -> list[torch.Tensor]:
    """The image shared among ``boxes``: each cell of a ``size = (H, W)`` grid to the box nearest to it
    (a cell inside several boxes: the one it is deepest in), the border between two regions ramped over
    ``softness`` (a fraction of the image side; 0: hard).

    Returns:
        Per box, `(1, 1, H, W)` in [0, 1]; they sum to 1 where two regions meet with a ramp, and to 1
        everywhere with ``softness=0``.
    """
    distances = torch.stack([_signed_box_distance(box, size) for box in boxes])
    regions = []
    for k in range(len(boxes)):
        if len(boxes) == 1:
            regions.append(torch.ones(1, 1, *size))
            continue
        nearest_other = torch.cat([distances[:k], distances[k + 1 :]]).amin(0)
        gap = nearest_other - distances[k]  # > 0 where box k is the nearest
        if softness > 0:
            region = (gap / softness + 0.5).clamp(0.0, 1.0)
        else:
            region = (gap > 0).float()
        regions.append(region[None, None])
    return regions


def _flag(text: str) -> bool:
    """``"true"``/``"1"`` -> True, ``"false"``/``"0"`` -> False (any case), else ``ValueError``."""
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


def parse_regional(text: str) -> RegionalConfig:
    """``"assign=strongest,threshold=0.3"`` -> a validated :class:`RegionalConfig` (the CLI's
    ``--regional`` and the benchmark's); ``""`` gives the defaults. A bad item is a ``ValueError``
    naming it and what was expected."""
    kinds = {
        f.name: {"int": int, "float": float, "bool": _flag}.get(f.type, str) for f in fields(RegionalConfig)
    }
    values: dict = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in kinds or not value:
            raise ValueError(f"{item!r} is invalid: expected name=value with a name of {sorted(kinds)}")
        try:
            values[name] = kinds[name](value)
        except ValueError:
            expected = {int: "an integer", float: "a number", _flag: "true or false"}[kinds[name]]
            raise ValueError(f"{item!r} is invalid: expected {expected}") from None
    return RegionalConfig(**values)


def group_level(maps: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """The group's map (``(B, h, w, T)`` maps summed over ``tokens``), normalised to [0, 1] per image: ``(B, h, w)``."""
    group = maps[..., list(tokens)].sum(-1)
    low = group.amin(dim=(1, 2), keepdim=True)
    high = group.amax(dim=(1, 2), keepdim=True)
    return (group - low) / (high - low).clamp_min(1e-8)


def strongest_only(levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each cell's level kept for the concept whose level is highest there, 0 for the others.

    Args:
        levels: per concept, `(B, h, w)` group levels (:func:`group_level`).

    Returns:
        The levels with every cell held by one concept only (ties: the first).
    """
    if len(levels) < 2:
        return list(levels)
    top = torch.stack(list(levels)).argmax(0)
    return [torch.where(top == k, level, torch.zeros_like(level)) for k, level in enumerate(levels)]


def held_by_others(
    maps: torch.Tensor, tokens: Sequence[int], others: Sequence[Sequence[int]]
) -> torch.Tensor:
    """The map cells where a subject that is no concept draws more attention than the concept.

    Args:
        maps (`torch.Tensor` of shape `(B, h, w, T)`): cross-attention maps (softmax over the ``T`` keys)
            of a pass reading the whole prompt.
        tokens: the concept's group (identifier and noun).
        others: the groups of the prompt's other subjects (:func:`other_tokens`).

    Returns:
        `(B, h, w)` bool: True where some other group's attention (summed over its tokens) is above the
        concept group's; all False without ``others``.
    """
    concept = maps[..., list(tokens)].sum(-1)
    if not others:
        return torch.zeros_like(concept, dtype=torch.bool)
    top = torch.stack([maps[..., list(group)].sum(-1) for group in others]).amax(0)
    return top > concept


def level_mask(
    level: torch.Tensor, size: tuple[int, int], threshold: float, softness: float, dilation: int = 0
) -> torch.Tensor:
    """A `(B, h, w)` level in [0, 1] ramped around ``threshold``, grown by ``dilation`` cells and
    upsampled bilinearly to ``size``: `(B, 1, H, W)` in [0, 1] (see :class:`RegionalConfig`)."""
    if softness > 0:
        mask = ((level - threshold) / softness + 0.5).clamp(0.0, 1.0)
    else:
        mask = (level >= threshold).to(level.dtype)
    mask = mask.unsqueeze(1)
    if dilation:
        mask = torch.nn.functional.max_pool2d(mask, 2 * dilation + 1, stride=1, padding=dilation)
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = torch.nn.functional.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    return mask


def concept_mask(
    maps: torch.Tensor,
    tokens: Sequence[int],
    size: tuple[int, int],
    threshold: float,
    softness: float,
    dilation: int = 0,
) -> torch.Tensor:
    """Soft mask of one concept from its group's cross-attention.

    Args:
        maps (`torch.Tensor` of shape `(B, h, w, T)`): cross-attention maps (softmax over the ``T`` keys).
        tokens: the token indices of the concept's group (identifier and noun).
        size: ``(H, W)`` of the latents the mask applies to.
        threshold, softness, dilation: see :class:`RegionalConfig`.

    Returns:
        `torch.Tensor` of shape `(B, 1, H, W)` in [0, 1]: the group map (summed over its tokens),
        normalised to [0, 1] per image, ramped around ``threshold``, grown by ``dilation`` cells and
        upsampled bilinearly.
    """
    return level_mask(group_level(maps, tokens), size, threshold, softness, dilation)


def regional_prediction(
    base: torch.Tensor, concepts: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], gain: float = 1.0
) -> torch.Tensor:
    """``base + gain * sum_k m_k * (concepts[k] - base)``, the masks scaled down where they sum above 1.

    Args:
        base (`torch.Tensor` of shape `(B, C, H, W)`): the prediction with no LoRA.
        concepts: per concept, the prediction with its LoRA alone, shaped as ``base``.
        masks: per concept, `(B, 1, H, W)` in [0, 1].
        gain: the factor on each concept's change (:class:`RegionalConfig`'s ``gain``).

    Returns:
        The combined prediction: ``base`` wherever every mask is 0, ``concepts[k]`` where only mask ``k``
        is 1.
    """
    if len(concepts) != len(masks):
        raise ValueError(f"got {len(concepts)} predictions and {len(masks)} masks: expected one mask each")
    if not masks:
        return base
    total = torch.stack(list(masks)).sum(0).clamp_min(1.0)
    out = base
    for eps, mask in zip(concepts, masks):
        out = out + (gain * mask / total).to(base.dtype) * (eps - base)
    return out


def concept_tokens(tokenizer, prompt: str, identifiers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Per identifier of ``prompt``, the token indices of its group (identifier + the noun it precedes)."""
    from ait2i_ext.tokens import resolve_groups

    subjects = personalized_subjects(prompt, list(identifiers))
    groups = resolve_groups(tokenizer, prompt, subjects)
    by_ident = {}
    for subject, group in zip(subjects, groups):
        if getattr(subject, "identifier", None) is not None:
            by_ident[subject.identifier] = group.indices
    return by_ident


def other_tokens(tokenizer, prompt: str, identifiers: Sequence[str]) -> list[tuple[int, ...]]:
    """The token indices of each subject of ``prompt`` that no identifier precedes (``"a sks star and a
    blue square"`` -> the group of ``blue square``)."""
    from ait2i_ext.tokens import resolve_groups

    subjects = personalized_subjects(prompt, list(identifiers))
    groups = resolve_groups(tokenizer, prompt, subjects)
    return [g.indices for s, g in zip(subjects, groups) if getattr(s, "identifier", None) is None]


def own_prompt(tokenizer, prompt: str, tokens: Sequence[int]) -> str:
    """The concept's own prompt: ``"a "`` + the words of its group's ``tokens`` in ``prompt``
    (``"a sks star and a xyz heart"``, the tokens of ``sks star`` -> ``"a sks star"``)."""
    ids = tokenizer(prompt).input_ids
    return "a " + tokenizer.decode([ids[i] for i in sorted(tokens)]).strip()


def _timestep(args: tuple, kwargs: dict) -> float:
    """The timestep of a UNet call (its second argument)."""
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    return float(t.flatten()[0]) if torch.is_tensor(t) else float(t)


def _sample(output) -> torch.Tensor:
    return output.sample if hasattr(output, "sample") else output[0]


def _with_sample(output, sample: torch.Tensor):
    if hasattr(output, "sample"):
        return type(output)(sample=sample)
    return sample if torch.is_tensor(output) else (sample, *output[1:])


def _own_text(args: tuple, kwargs: dict, embeds: torch.Tensor, num_images: int) -> tuple[tuple, dict]:
    """The UNet call's arguments with the prompt's rows of ``encoder_hidden_states`` (the last
    ``num_images``: with CFG the batch is [negative, prompt]) replaced by ``embeds`` ``(1, L, D)``."""
    given = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
    if given.shape[1:] != embeds.shape[1:]:
        return args, kwargs  # another text length (e.g. an explicit prompt_embeds): leave as given
    rows = embeds.to(given.device, given.dtype).expand(num_images, -1, -1)
    states = torch.cat([given[: given.shape[0] - num_images], rows])
    if len(args) > 2:
        return (*args[:2], states, *args[3:]), kwargs
    return args, {**kwargs, "encoder_hidden_states": states}


class _RegionalHook:
    """UNet hooks of :func:`regional_loras`: the pipeline's pass runs with no LoRA (``eps_base``), then one
    pass per concept with its LoRA alone, under attention capture; the output is their masked sum."""

    def __init__(self, pipe, adapters: dict[str, str], tokens: dict[str, tuple[int, ...]], num_images: int,
                 config: RegionalConfig, weights: dict[str, float], embeds: dict[str, dict[str, torch.Tensor]],
                 own_tokens: dict[str, tuple[int, ...]] | None = None,
                 others: Sequence[tuple[int, ...]] = (), layout: Sequence[tuple[float, ...]] = (),
                 boxes: dict[str, int] | None = None):  # fmt: skip
        # embeds: per phase ("full", "own"), per identifier, the prompt as concept k's pass reads it
        self.pipe, self.adapters, self.tokens, self.embeds = pipe, adapters, tokens, embeds
        self.own_tokens = own_tokens or tokens  # the group's tokens in the concept's own prompt
        self.others = list(others)  # the groups of the non-concept subjects (exclude_others)
        self.held: list[torch.Tensor] = []  # per concept, the cells others hold (last whole-prompt maps)
        self.num_images, self.config, self.weights = num_images, config, weights
        self.inside = False  # in one of our own passes
        self.sums: dict[str, torch.Tensor] = {}  # running sums of the group maps ("mean")
        self.counts: dict[str, int] = {}
        self.phase = "full"  # the prompt the concept passes read now ("full" or "own")
        self.last_t = float("inf")  # a timestep above the last one starts a new sampling run
        self.passes = 0  # UNet passes with a LoRA, for tests and cost reports
        self.layout = list(layout)  # every subject's box (mask_source "regions" or "mixed")
        self.boxes = boxes  # identifier -> index of its box in layout; None: masks from attention only

    def applies(self) -> bool:
        # Guidance passes (grad enabled) keep every concept's LoRA on: their maps are the LoRA's.
        return not self.inside and not torch.is_grad_enabled()

    def before(self, unet, args, kwargs):
        if self.applies():
            unet.disable_lora()  # the pipeline's own pass is eps_base

    def after(self, unet, args, kwargs, output):
        if not self.applies():
            return None
        base = _sample(output)
        batch = base.shape[0]
        if batch not in (self.num_images, 2 * self.num_images):
            unet.enable_lora()
            raise ValueError(
                f"regional LoRA: the UNet got a batch of {batch}, expected num_images={self.num_images} "
                f"(or twice that with classifier-free guidance)"
            )
        t = _timestep(args, kwargs)
        if t > self.last_t:  # a new call inside the same context: its mean starts afresh
            self.sums.clear()
            self.counts.clear()
            self.held = []
        self.last_t = t
        total = self.pipe.scheduler.config.num_train_timesteps
        everywhere = t > (1.0 - self.config.layout_fraction) * total
        phase = "full"
        if self.config.concept_prompt == "own" and t <= (1.0 - self.config.full_prompt_fraction) * total:
            phase = "own"
        if phase != self.phase:  # the maps of another prompt: their mean starts afresh
            self.sums.clear()
            self.counts.clear()
        self.phase = phase
        by_region = self.boxes is not None and (
            self.config.mask_source == "regions" or t > (1.0 - self.config.regions_fraction) * total
        )
        predictions, group_maps = [], []
        self.inside = True
        try:
            unet.enable_lora()
            for ident, name in self.adapters.items():
                unet.set_adapters([name], [self.weights.get(ident, 1.0)])
                size = tuple(base.shape[-2:])
                own_args, own_kwargs = _own_text(args, kwargs, self.embeds[phase][ident], self.num_images)
                if by_region:  # the masks are the layout's regions: no maps needed
                    predictions.append(_sample(unet.forward(*own_args, **own_kwargs)))
                    self.passes += 1
                    continue
                with capture_attention(
                    unet, size, detach=True, vae_scale_factor=getattr(self.pipe, "vae_scale_factor", None)
                ) as store:
                    eps = _sample(unet.forward(*own_args, **own_kwargs))
                    maps = store.maps()[-self.num_images :]  # with CFG the batch is [uncond, cond]
                self.passes += 1
                if self.config.mask_source in ("mean", "mixed"):
                    self.sums[ident] = maps if ident not in self.sums else self.sums[ident] + maps
                    self.counts[ident] = self.counts.get(ident, 0) + 1
                    maps = self.sums[ident] / self.counts[ident]
                predictions.append(eps)
                group_maps.append(maps)
        finally:
            self.inside = False
            unet.set_adapters(list(self.adapters.values()), [self.weights.get(i, 1.0) for i in self.adapters])
            unet.enable_lora()
        if everywhere:
            masks = [torch.ones_like(base[:, :1]) for _ in predictions]
        elif by_region:
            regions = box_regions(self.layout, tuple(base.shape[-2:]), self.config.box_softness)
            masks = [regions[self.boxes[i]].to(base.device, base.dtype) for i in self.adapters]
            masks = [m.expand(batch, -1, -1, -1) for m in masks]
        else:
            masks = self.masks(group_maps, tuple(base.shape[-2:]))
            masks = [m.repeat(batch // self.num_images, 1, 1, 1).to(base.device, base.dtype) for m in masks]
        return _with_sample(output, regional_prediction(base, predictions, masks, self.config.gain))

    def masks(self, group_maps: list[torch.Tensor], size: tuple[int, int]) -> list[torch.Tensor]:
        c = self.config
        tokens = self.own_tokens if self.phase == "own" else self.tokens
        levels = [group_level(m, tokens[ident]) for m, ident in zip(group_maps, self.adapters)]
        if c.assign == "strongest":
            levels = strongest_only(levels)
        if c.exclude_others:
            if self.phase == "full":  # the other subjects' words are in these maps (kept for "own")
                self.held = [
                    held_by_others(m, self.tokens[i], self.others) for m, i in zip(group_maps, self.adapters)
                ]
            if self.held:  # none before a whole-prompt pass (concept_prompt="own", full_prompt_fraction=0)
                levels = [torch.where(held, 0.0, level) for held, level in zip(self.held, levels)]
        return [level_mask(level, size, c.threshold, c.softness, c.dilation) for level in levels]


@contextmanager
def regional_loras(
    pipe,
    prompt: str,
    adapters: Mapping[str, str],
    num_images: int = 1,
    config: RegionalConfig | None = None,
    weights: Mapping[str, float] | None = None,
    subjects: Sequence[SubjectSpec] | None = None,
) -> Iterator[_RegionalHook | None]:
    """Run ``pipe`` (or :func:`ait2i_ext.generate` on it) with each concept's LoRA acting only where its
    concept is (regional LoRA, as Mix-of-Show's regional sampling, with the region from ait2i's maps).

    Every sampling step's noise prediction is ``eps_base + sum_k m_k * (eps_k - eps_base)`` (see
    :class:`RegionalConfig`): one extra UNet pass per concept of the prompt per step. A prompt naming no
    identifier runs with every LoRA disabled (text encoder and UNet): the stock model's images, by
    construction. Guidance passes (grad enabled) keep the prompt's LoRAs on, so ait2i's maps are the
    LoRA-loaded UNet's, as without this mode. The pipeline encodes the prompt with the text-encoder LoRAs of
    the prompt's concepts; concept ``k``'s pass reads it (or, with ``concept_prompt="own"``, its own
    words) as encoded with LoRA ``k`` alone.

        with regional_loras(pipe, prompt, {"sks": "default_0", "xyz": "default_1"}, num_images=4):
            out = generate(pipe, prompt, personalized_subjects(prompt, ["sks", "xyz"]),
                           num_images_per_prompt=4)

    Args:
        pipe: a pipeline with the LoRAs loaded (:func:`load_loras`), not fused.
        prompt: the one prompt the calls inside will use.
        adapters: identifier -> adapter name, for every loaded concept.
        num_images: images per call (``num_images_per_prompt``).
        config: the mask; default :class:`RegionalConfig`.
        weights: identifier -> LoRA weight in the UNet passes (default 1.0, as trained).
        subjects: the prompt's subjects as ``generate`` gets them (:func:`personalized_subjects`, with
            layout boxes: :func:`with_layout`); ``None``: inferred from the prompt. With
            ``mask_source="regions"`` the image is shared among the subjects' boxes (or the automatic
            layout's, :func:`with_layout`).

    Yields:
        The hook (its ``passes`` counts the LoRA passes), or ``None`` for a prompt without identifiers.

    Raises:
        ValueError: an adapter that is not loaded, or ``num_images < 1``. On exit the given adapters are all
            active again at their weights.
    """
    config = config or RegionalConfig()
    weights = dict(weights or {})
    loaded = _adapter_names(pipe)
    missing = sorted(set(adapters.values()) - loaded)
    if missing:
        raise ValueError(f"adapters {missing} are not loaded in this pipeline: loaded are {sorted(loaded)}")
    if num_images < 1:
        raise ValueError(f"num_images={num_images!r} is invalid: expected an integer >= 1")
    words = set(re.findall(r"[\w-]+", prompt.lower()))
    present = {i: name for i, name in adapters.items() if i.lower() in words}
    everything = [adapters[i] for i in adapters]
    restore = [weights.get(i, 1.0) for i in adapters]
    try:
        if not present:
            pipe.disable_lora()  # no concept named: no LoRA at all
            yield None
            return
        pipe.set_adapters(list(present.values()), [weights.get(i, 1.0) for i in present])
        subjects = personalized_subjects(prompt, list(present), subjects)
        config = for_concepts(config, len(present), any(s.box is not None for s in subjects if s.identifier))
        boxes, layout = None, []
        if config.mask_source in LAID_OUT:
            boxed = [s for s in with_layout(subjects, config) if s.box is not None]
            layout = [s.box for s in boxed]
            boxes = {s.identifier: k for k, s in enumerate(boxed) if s.identifier in present}
        tokens = concept_tokens(pipe.tokenizer, prompt, list(present))
        texts = {"full": {i: prompt for i in present}}  # what each concept's pass reads
        own_tokens = None
        if config.concept_prompt == "own":
            texts["own"] = {i: own_prompt(pipe.tokenizer, prompt, tokens[i]) for i in present}
            own_tokens = {i: concept_tokens(pipe.tokenizer, texts["own"][i], [i])[i] for i in present}
        embeds = {phase: {} for phase in texts}  # as each concept's own text-encoder LoRA alone encodes it
        for ident, name in present.items():
            pipe.set_adapters([name], [weights.get(ident, 1.0)])
            for phase, text in texts.items():
                embeds[phase][ident] = pipe.encode_prompt(text[ident], pipe._execution_device, 1, False)[0]
        pipe.set_adapters(list(present.values()), [weights.get(i, 1.0) for i in present])
        others = other_tokens(pipe.tokenizer, prompt, list(present)) if config.exclude_others else ()
        hook = _RegionalHook(
            pipe, present, tokens, num_images, config, weights, embeds, own_tokens, others, layout, boxes
        )
        pre = pipe.unet.register_forward_pre_hook(hook.before, with_kwargs=True)
        post = pipe.unet.register_forward_hook(hook.after, with_kwargs=True)
        try:
            yield hook
        finally:
            pre.remove()
            post.remove()
    finally:
        pipe.enable_lora()
        pipe.set_adapters(everything, restore)


__all__ = [
    "LORA_WEIGHT_NAME",
    "MASK_SOURCES",
    "RegionalConfig",
    "auto_layout",
    "box_regions",
    "check_lora_fits",
    "concept_mask",
    "concept_tokens",
    "for_concepts",
    "group_level",
    "held_by_others",
    "level_mask",
    "load_lora",
    "load_loras",
    "lora_file",
    "other_tokens",
    "own_prompt",
    "parse_lora_scale",
    "parse_regional",
    "personalized_subjects",
    "regional_loras",
    "regional_prediction",
    "strongest_only",
    "unload_lora",
    "with_layout",
]
