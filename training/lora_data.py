"""Data for DreamBooth-style LoRA fine-tuning: image folders checked up front, the paired
instance/class dataset, and a shuffling sampler whose order depends only on ``(seed, epoch)`` so a
resumed run sees the same batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

# Per-image captions, Hugging Face `datasets` imagefolder format: one JSON object per line,
# {"file_name": "star-00.png", "text": "a sks star and a blue square"}.
METADATA_NAME = "metadata.jsonl"


def _image_extensions() -> frozenset[str]:
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def list_images(folder: str | Path, flag: str = "--instance_data_dir") -> list[Path]:
    """The image files of ``folder``, sorted by name, after checking every file opens as an image.

    Hidden files (``.DS_Store``, ``.ipynb_checkpoints``), sub-folders and the captions file
    ``metadata.jsonl`` (see `read_captions`) are ignored.

    Args:
        folder (`str` or `Path`): the folder to read.
        flag (`str`): the command-line flag that named the folder, quoted in errors.

    Raises:
        ValueError: the folder is missing, is not a folder, holds no files, holds non-image files
            (all listed), or holds images that cannot be decoded (all listed).
    """
    path = Path(folder)
    if not path.exists():
        raise ValueError(f"{flag}={str(folder)!r} does not exist: expected a folder of images")
    if not path.is_dir():
        raise ValueError(f"{flag}={str(folder)!r} is not a folder: expected a folder of images")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != METADATA_NAME
    )
    if not files:
        raise ValueError(f"{flag}={str(folder)!r} is empty: expected at least one image (.png, .jpg, ...)")

    extensions = _image_extensions()
    not_images = [p.name for p in files if p.suffix.lower() not in extensions]
    if not_images:
        raise ValueError(
            f"{flag}={str(folder)!r} holds {len(not_images)} non-image file(s): {not_images}; "
            "expected only images (.png, .jpg, .webp, ...)"
        )
    unreadable = []
    for p in files:
        try:
            with Image.open(p) as image:
                image.verify()
        except Exception as err:  # PIL raises many types for broken files
            unreadable.append(f"{p.name} ({type(err).__name__})")
    if unreadable:
        raise ValueError(
            f"{flag}={str(folder)!r} holds {len(unreadable)} unreadable image(s): {unreadable}; "
            "expected images that PIL can decode"
        )
    return files


def read_captions(
    images: Sequence[Path], default: str | None, flag: str = "--instance_data_dir"
) -> list[str]:
    """The caption of each image: its ``text`` in the folder's ``metadata.jsonl`` (Hugging Face
    imagefolder format, ``{"file_name": ..., "text": ...}`` per line), else ``default``.

    Raises:
        ValueError: a line that is not such an object, or an image with no caption and no ``default``.
    """
    captions: dict[str, str] = {}
    folders = {Path(p).parent for p in images}
    for folder in folders:
        path = folder / METADATA_NAME
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[str(folder / entry["file_name"])] = str(entry["text"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{flag}: {str(path)!r} line {number} is {line[:80]!r}: expected a JSON object with "
                    '"file_name" and "text"'
                ) from None
    missing = [p.name for p in images if str(p) not in captions and default is None]
    if missing:
        raise ValueError(
            f"{flag}: {len(missing)} image(s) have no caption in {METADATA_NAME} and no prompt was given: "
            f"{missing[:5]}"
        )
    return [captions.get(str(p), default) for p in images]


def load_image_tensor(
    path: Path,
    resolution: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The image file at ``path`` as `image_tensor` makes it (EXIF orientation applied)."""
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    return image_tensor(image, resolution, center_crop, flip, generator)


def image_tensor(
    image: Image.Image,
    resolution: int,
    center_crop: bool = True,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """An RGB image resized (shorter side) and cropped to ``resolution``, as a `(3, R, R)` tensor in [-1, 1].

    A random crop (``center_crop=False``) and a random horizontal flip draw from ``generator``.
    """
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(torch.randint(0, size[0] - resolution + 1, (), generator=generator))
        top = int(torch.randint(0, size[1] - resolution + 1, (), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and torch.rand((), generator=generator).item() < 0.5:
        image = ImageOps.mirror(image)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class DreamBoothDataset(Dataset):
    """Instance images with their prompts, optionally paired with class images and their prompts.

    The length is the number of instance images; in epoch ``e``, item ``i`` pairs instance image ``i``
    with class image ``(e * num_instance + i) % num_class``, so every class image is used in turn
    (diffusers' DreamBooth dataset pairs only the first ``num_instance`` of them). Random crops and flips draw from a generator seeded by
    ``(seed, epoch, i)``, never from the global one: the dataloader fetches a batch ahead, so global
    draws made here would land on the wrong side of a checkpoint and a resumed run would diverge.

    Args:
        instance_images (`list[Path]`): checked instance image files (see `list_images`).
        instance_prompt_ids (`torch.Tensor`): `(77,)` token ids of the instance prompt, or `(N, 77)`:
            one row per instance image (captions of `read_captions`).
        resolution (`int`): side of the square training images.
        class_images (`list[Path]`, *optional*): class images for prior preservation.
        class_prompt_ids (`torch.Tensor`, *optional*): `(77,)` token ids of the class prompt, or `(M, 77)`,
            one row per class image.
        center_crop (`bool`): centre crop (default) or random crop.
        random_flip (`bool`): flip horizontally with probability 0.5.
        seed (`int`): base seed of the augmentations.
        compose (`Callable[[random.Random], tuple[PIL.Image, str]]`, *optional*): makes a new instance
            image and its caption, e.g. the concept placed in a scene of the world
            (`ait2i_ext.shapes.concepts.WorldComposer`); it takes the place of instance image ``i`` in a
            ``compose_fraction`` of the slots, drawn from ``(seed, epoch, i)``.
        compose_fraction (`float`): the share of instance slots that ``compose`` fills, in [0, 1].
        tokenize (`Callable[[str], torch.Tensor]`, *optional*): a caption -> its `(77,)` token ids;
            needed with ``compose``.
    """

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt_ids: torch.Tensor,
        resolution: int,
        class_images: list[Path] | None = None,
        class_prompt_ids: torch.Tensor | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
        compose: Callable[[random.Random], tuple[Image.Image, str]] | None = None,
        compose_fraction: float = 0.0,
        tokenize: Callable[[str], torch.Tensor] | None = None,
    ) -> None:
        if not 0.0 <= compose_fraction <= 1.0:
            raise ValueError(f"compose_fraction={compose_fraction} is invalid: expected a number in [0, 1]")
        if compose is not None and tokenize is None:
            raise ValueError(
                "tokenize=None is invalid with compose: expected a caption -> token ids function"
            )
        if class_images and class_prompt_ids is None:
            raise ValueError(
                "class_prompt_ids=None is invalid with class images: expected the class prompt's ids"
            )
        for name, ids, count in (
            ("instance_prompt_ids", instance_prompt_ids, len(instance_images)),
            ("class_prompt_ids", class_prompt_ids, len(class_images or [])),
        ):
            if ids is not None and ids.dim() == 2 and len(ids) != count:
                raise ValueError(f"{name} has {len(ids)} rows: expected one per image ({count})")
        self.instance_images = list(instance_images)
        self.instance_prompt_ids = instance_prompt_ids
        self.class_images = list(class_images or [])
        self.class_prompt_ids = class_prompt_ids
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.compose = compose
        self.compose_fraction = compose_fraction if compose is not None else 0.0
        self.tokenize = tokenize
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.instance_images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        generator = torch.Generator().manual_seed(item_seed)

        def load(path: Path) -> torch.Tensor:
            return load_image_tensor(path, self.resolution, self.center_crop, self.random_flip, generator)

        def ids(all_ids: torch.Tensor, i: int) -> torch.Tensor:
            return all_ids[i] if all_ids.dim() == 2 else all_ids

        rng = random.Random(item_seed)
        if self.compose_fraction and rng.random() < self.compose_fraction:
            image, caption = self.compose(rng)
            example = {
                "instance_pixels": image_tensor(
                    image, self.resolution, self.center_crop, self.random_flip, generator
                ),
                "instance_ids": self.tokenize(caption),
            }
        else:
            example = {
                "instance_pixels": load(self.instance_images[index]),
                "instance_ids": ids(self.instance_prompt_ids, index),
            }
        if self.class_images:
            j = (self.epoch * len(self) + index) % len(self.class_images)
            example["class_pixels"] = load(self.class_images[j])
            example["class_ids"] = ids(self.class_prompt_ids, j)
        return example


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch; with prior preservation the class half follows the instance half.

    Returns a dict with ``pixel_values`` `(B, 3, R, R)` (or `(2B, 3, R, R)`), ``input_ids`` `(B, 77)`
    (or `(2B, 77)`) and ``num_instance`` = B.
    """
    pixels = [e["instance_pixels"] for e in examples]
    ids = [e["instance_ids"] for e in examples]
    if "class_pixels" in examples[0]:
        pixels += [e["class_pixels"] for e in examples]
        ids += [e["class_ids"] for e in examples]
    return {
        "pixel_values": torch.stack(pixels).contiguous(),
        "input_ids": torch.stack(ids),
        "num_instance": torch.tensor(len(examples)),
    }


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(num_items)`` that depends only on ``seed`` and the epoch set with
    `set_epoch`, never on the global generator, so it is reproducible after a resume.
    """

    def __init__(self, num_items: int, seed: int) -> None:
        self.num_items = num_items
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_items, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_items


def class_images_present(folder: str | Path) -> int:
    """How many image files ``folder`` holds (0 if it does not exist); not checked like `list_images`."""
    path = Path(folder)
    if not path.is_dir():
        return 0
    extensions = _image_extensions()
    return sum(
        p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions for p in path.iterdir()
    )


def ensure_class_images(
    class_dir: str | Path,
    class_prompt: str | Sequence[str] | None,
    num_class_images: int,
    make_pipeline: Callable[[], object],
    seed: int,
    batch_size: int = 4,
    num_inference_steps: int = 25,
) -> list[Path]:
    """Fill ``class_dir`` up to ``num_class_images`` images of ``class_prompt`` made with the base model.

    Existing images are kept and checked like instance images; only the missing ones are generated,
    named ``class-{i:05d}.png`` after the existing count, from a generator seeded per batch. With
    several prompts, image ``i`` shows prompt ``i % len(prompts)``; each generated image's prompt is
    appended to the folder's ``metadata.jsonl`` (read back by `read_captions`).

    Args:
        class_dir (`str` or `Path`): the class image folder (created if missing).
        class_prompt (`str` or `list[str]`, *optional*): prompt(s) of the generated images, e.g. ``"a photo
            of dog"``; needed only when images are missing.
        num_class_images (`int`): how many class images training needs.
        make_pipeline (`Callable`): builds the base pipeline; called only when images are missing.
        seed (`int`): base seed of the generated images.
        batch_size (`int`): images per pipeline call.
        num_inference_steps (`int`): denoising steps per image.

    Returns:
        `list[Path]`: the first ``num_class_images`` images of the folder, sorted by name.
    """
    prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt or [])
    folder = Path(class_dir)
    folder.mkdir(parents=True, exist_ok=True)
    existing = list_images(folder, "--class_data_dir") if any(folder.iterdir()) else []
    missing = num_class_images - len(existing)
    if missing > 0 and not prompts:
        raise ValueError(
            f"class_prompt={class_prompt!r} is invalid: {missing} class image(s) are missing, expected at "
            "least one prompt to draw them"
        )
    if missing > 0:
        logger.info("Generating %d class images of %d prompt(s) into %s", missing, len(prompts), folder)
        pipeline = make_pipeline()
        made = len(existing)
        from tqdm.auto import tqdm

        for start in tqdm(range(0, missing, batch_size), desc="class images", unit="batch"):
            count = min(batch_size, missing - start)
            batch_prompts = [prompts[(made + k) % len(prompts)] for k in range(count)]
            generator = torch.Generator().manual_seed(seed + made)
            images = pipeline(
                batch_prompts, num_inference_steps=num_inference_steps, generator=generator
            ).images
            with (folder / METADATA_NAME).open("a") as metadata:
                for image, prompt in zip(images, batch_prompts, strict=True):
                    name = f"class-{made:05d}.png"
                    image.save(folder / name)
                    metadata.write(json.dumps({"file_name": name, "text": prompt}) + "\n")
                    made += 1
        del pipeline
        existing = list_images(folder, "--class_data_dir")
    return existing[:num_class_images]


def steps_per_epoch(num_batches: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps in one pass over ``num_batches`` (a short last accumulation still steps)."""
    return math.ceil(num_batches / gradient_accumulation_steps)
