"""Adapters for diffusers' ControlNet pipelines (SD 1.x/2.x and SDXL, one or several ControlNets).

The guided conditional pass must see the same ControlNet residuals as the pipeline's conditional
branch, or the guidance would steer a different model. The adapters therefore reuse the plain
SD/SDXL conditional pass and, while it runs, add the residuals from a UNet forward pre-hook: the
ControlNet is called on the very inputs that pass hands the UNet (scaled latents, timestep, text
embeddings and, for SDXL, the pooled embeddings and size ids), with

- the conditioning image(s) prepared by the pipeline's own ``prepare_image`` (conditional half);
- ``controlnet_conditioning_scale`` times the ``control_guidance_start/end`` window of the step;
- ``guess_mode`` (or the ControlNet's ``global_pool_conditions``).

The residuals keep their graph, so the latent gradient flows through the ControlNet as well.

Control images come from :func:`control_image`: ``canny:PATH``, ``lineart:PATH`` (controlnet-aux's
detectors when installed, else built-in numpy versions) or ``image:PATH`` (the image as is).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from .layout import StepTracker, torch_dtype
from .stable_diffusion import StableDiffusionAdapter, StableDiffusionXLAdapter

logger = logging.getLogger(__name__)


# --- the conditional pass -------------------------------------------------------------------


def _call_default(pipe, name: str):
    return inspect.signature(pipe.__call__).parameters[name].default


def _controlnets(pipe) -> tuple[object, list]:
    """The pipeline's ControlNet (unwrapped if compiled) and the list of its nets."""
    from diffusers.models import MultiControlNetModel

    controlnet = getattr(pipe.controlnet, "_orig_mod", pipe.controlnet)
    return controlnet, list(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else [controlnet]


def check_conditioning_channels(
    controlnet, images: torch.Tensor | Sequence[torch.Tensor] | Image.Image
) -> None:
    """Raise unless each conditioning image has the channels its ControlNet expects.

    Args:
        controlnet: a ``ControlNetModel`` or ``MultiControlNetModel``.
        images: prepared ``(B, C, H, W)`` tensors (one per net) or a PIL image (checked against every net).
    """
    nets = list(getattr(controlnet, "nets", [controlnet]))
    if isinstance(images, Image.Image):
        channels = [len(images.getbands())] * len(nets)
    else:
        images = [images] if torch.is_tensor(images) else list(images)
        channels = [int(image.shape[1]) for image in images]
    for k, (net, c) in enumerate(zip(nets, channels, strict=True)):
        expected = net.config.conditioning_channels
        if c != expected:
            which = f"ControlNet {k}" if len(nets) > 1 else "the ControlNet"
            raise ValueError(
                f"the control image has {c} channels but {which} expects conditioning_channels={expected}: "
                "use a control image with that many channels or a matching ControlNet"
            )


def controlnet_downsampling(controlnet) -> int:
    """How much a ``ControlNetModel``'s conditioning embedding shrinks the control image: 2 per
    stride-2 convolution, i.e. ``2 ** (len(conditioning_embedding_out_channels) - 1)``."""
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


def check_downsampling(controlnet, vae_scale_factor: int) -> None:
    """Raise unless each ControlNet shrinks the control image to the latents' size (the VAE's factor).

    Args:
        controlnet: a ``ControlNetModel`` or ``MultiControlNetModel``.
        vae_scale_factor: the base pipeline's ``vae_scale_factor`` (8 for Stable Diffusion).
    """
    nets = list(getattr(controlnet, "nets", [controlnet]))
    for k, net in enumerate(nets):
        factor = controlnet_downsampling(net)
        if factor != vae_scale_factor:
            which = f"ControlNet {k}" if len(nets) > 1 else "the ControlNet"
            channels = tuple(net.config.conditioning_embedding_out_channels)
            raise ValueError(
                f"{which} downsamples the control image by {factor} (conditioning_embedding_out_channels="
                f"{channels}) but the base's latents are the image downsampled by {vae_scale_factor}: "
                "use a ControlNet trained for this base"
            )


def control_scale(pipe, call_kwargs: dict, step: int, num_steps: int) -> float | list[float]:
    """``conditioning_scale`` the pipeline passes its ControlNet at ``step`` of ``num_steps``.

    ``controlnet_conditioning_scale`` times 1 inside the ``control_guidance_start/end`` window and
    0 outside, per net, aligned as the pipeline aligns them.
    """
    from diffusers.models import MultiControlNetModel

    controlnet, nets = _controlnets(pipe)
    multi = isinstance(controlnet, MultiControlNetModel)
    scale = call_kwargs.get(
        "controlnet_conditioning_scale", _call_default(pipe, "controlnet_conditioning_scale")
    )
    start = call_kwargs.get("control_guidance_start", _call_default(pipe, "control_guidance_start"))
    end = call_kwargs.get("control_guidance_end", _call_default(pipe, "control_guidance_end"))
    if not isinstance(start, list) and isinstance(end, list):
        start = len(end) * [start]
    elif not isinstance(end, list) and isinstance(start, list):
        end = len(start) * [end]
    elif not isinstance(start, list) and not isinstance(end, list):
        start, end = len(nets) * [start], len(nets) * [end]
    if multi and isinstance(scale, float):
        scale = [scale] * len(nets)
    keep = [
        1.0 - float(step / num_steps < s or (step + 1) / num_steps > e)
        for s, e in zip(start, end, strict=True)
    ]
    if multi:
        return [c * k for c, k in zip(scale, keep, strict=True)]
    return (scale[0] if isinstance(scale, list) else scale) * keep[0]


def prepare_control_images(
    pipe, call_kwargs: dict, batch: int
) -> tuple[torch.Tensor | list[torch.Tensor], bool]:
    """The conditioning image(s) of the conditional branch, via the pipeline's ``prepare_image``.

    Returns:
        The prepared image (a list of them for several ControlNets) and the effective ``guess_mode``.
    """
    from diffusers.models import MultiControlNetModel

    controlnet, nets = _controlnets(pipe)
    image = call_kwargs.get("image")
    if image is None:
        raise ValueError("ControlNet guidance needs the control image: pass image= (see control_image())")
    guess_mode = bool(call_kwargs.get("guess_mode", False) or nets[0].config.global_pool_conditions)
    multi = isinstance(controlnet, MultiControlNetModel)
    if multi and isinstance(image, (list, tuple)) and image and isinstance(image[0], list):
        image = [
            list(t) for t in zip(*image, strict=True)
        ]  # nested per-prompt lists, transposed as the pipeline does
    images = list(image) if multi else [image]
    if multi and len(images) != len(nets):
        raise ValueError(
            f"got {len(images)} control images for {len(nets)} ControlNets: expected one per net"
        )
    prepared = [
        pipe.prepare_image(
            image=img,
            width=call_kwargs.get("width"),
            height=call_kwargs.get("height"),
            batch_size=batch,
            num_images_per_prompt=1,  # generate passes embeddings already repeated per image
            device=pipe._execution_device,
            dtype=controlnet.dtype,
            do_classifier_free_guidance=False,
            guess_mode=guess_mode,
        )
        for img in images
    ]
    check_conditioning_channels(controlnet, prepared)
    return (prepared if multi else prepared[0]), guess_mode


def repeat_per_image(image, num_images: int, multi: bool):
    """``image`` with each prompt's control image repeated ``num_images`` times, in the order of
    prompt embeddings repeated per image (``[p0, p0, p1, p1]``).

    The pipeline repeats per-prompt control images itself only when it is told
    ``num_images_per_prompt``; ``generate`` passes embeddings already repeated, so it repeats the
    images too. A single image needs nothing: the pipeline repeats it to the whole batch.
    """

    def repeat(one):
        if isinstance(one, (list, tuple)):
            return [im for im in one for _ in range(num_images)]
        if torch.is_tensor(one) and one.ndim == 4:
            return one.repeat_interleave(num_images, dim=0)
        if isinstance(one, np.ndarray) and one.ndim == 4:
            return np.repeat(one, num_images, axis=0)
        return one

    if num_images == 1 or image is None:
        return image
    if multi and isinstance(image, (list, tuple)) and image and isinstance(image[0], list):
        return repeat(image)  # nested: one list of per-net images per prompt
    return [repeat(one) for one in image] if multi else repeat(image)


class _ControlNetMixin:
    """Adds the pipeline's ControlNet residuals to the plain adapter's conditional UNet pass."""

    layout_route = "controlnet"

    def __init__(self, pipe):
        super().__init__(pipe)
        self.tracker = StepTracker()

    def prepare(self, call_kwargs: dict, subjects=None) -> dict:
        """The call's kwargs with ``height`` / ``width`` of the prepared control image (the pipeline
        takes its size from it), after checking the image's channels and the ControlNet's
        downsampling against the base."""
        check_downsampling(_controlnets(self.pipe)[0], self.pipe.vae_scale_factor)
        images, _ = prepare_control_images(self.pipe, call_kwargs, 1)
        height, width = (images[0] if isinstance(images, list) else images).shape[-2:]
        return {**call_kwargs, "height": int(height), "width": int(width)}

    def encode(
        self, prompts: list[str], num_images: int, do_cfg: bool, call_kwargs: dict
    ) -> tuple[dict, Callable]:
        from diffusers.models import MultiControlNetModel

        pipe = self.pipe
        multi = isinstance(_controlnets(pipe)[0], MultiControlNetModel)
        call_kwargs["image"] = repeat_per_image(call_kwargs.get("image"), num_images, multi)
        images, guess_mode = prepare_control_images(pipe, call_kwargs, len(prompts) * num_images)
        # The pipeline takes its size from the prepared control image; so do the latents and SDXL's size ids.
        height, width = (int(n) for n in (images[0] if isinstance(images, list) else images).shape[-2:])
        call_kwargs.update(height=height, width=width)
        new, plain_forward = super().encode(prompts, num_images, do_cfg, call_kwargs)
        settings = dict(call_kwargs)
        self.tracker = tracker = StepTracker()

        def add_residuals(unet, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            down, mid = pipe.controlnet(
                sample,
                timestep,
                encoder_hidden_states=kwargs["encoder_hidden_states"],
                controlnet_cond=images,
                conditioning_scale=control_scale(pipe, settings, tracker.step, len(pipe.scheduler.timesteps)),
                guess_mode=guess_mode,
                added_cond_kwargs=kwargs.get("added_cond_kwargs"),
                return_dict=False,
            )
            return args, {
                **kwargs,
                "down_block_additional_residuals": down,
                "mid_block_additional_residual": mid,
            }

        def forward(latents: torch.Tensor, t) -> torch.Tensor:
            handle = pipe.unet.register_forward_pre_hook(add_residuals, with_kwargs=True)
            try:
                return plain_forward(latents, t)
            finally:
                handle.remove()

        return {**new, "image": call_kwargs["image"], "height": height, "width": width}, forward

    def attach(self, call_kwargs: dict, on_step_end: Callable[[int, torch.Tensor, dict], dict]) -> dict:
        """The plain adapter's ``callback_on_step_end``, telling the conditional pass its step."""
        return super().attach(call_kwargs, self.tracker.wrap(on_step_end))


class ControlNetAdapter(_ControlNetMixin, StableDiffusionAdapter):
    """``StableDiffusionControlNetPipeline`` with a ``ControlNetModel`` or a ``MultiControlNetModel``."""


class ControlNetXLAdapter(_ControlNetMixin, StableDiffusionXLAdapter):
    """``StableDiffusionXLControlNetPipeline`` with a ``ControlNetModel`` or a ``MultiControlNetModel``."""


# --- loading --------------------------------------------------------------------------------


def load_controlnet_pipeline(
    base: str, controlnet: str | Sequence[str], dtype: torch.dtype | str | None = None
):
    """A ControlNet pipeline from a base checkpoint and one or more ControlNets.

    SDXL bases (``_class_name`` containing ``XL``) give a ``StableDiffusionXLControlNetPipeline``,
    others a ``StableDiffusionControlNetPipeline``; several ControlNets become a ``MultiControlNetModel``.

    Raises:
        ValueError: a path that cannot be loaded, or a ControlNet whose cross-attention width or
            downsampling does not match the base's (e.g. an SD 1.5 ControlNet on an SDXL base).
    """
    from diffusers import (
        ControlNetModel,
        DiffusionPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    dtype = torch_dtype(dtype)
    paths = [controlnet] if isinstance(controlnet, str) else list(controlnet)
    if not paths:
        raise ValueError("controlnet=[] : expected at least one ControlNet path")
    nets = []
    for path in paths:
        try:
            nets.append(ControlNetModel.from_pretrained(path, torch_dtype=dtype))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"cannot load a ControlNet from {path!r}: {err}") from err
    try:
        class_name = DiffusionPipeline.load_config(base).get("_class_name", "")
        cls = StableDiffusionXLControlNetPipeline if "XL" in class_name else StableDiffusionControlNetPipeline
        pipe = cls.from_pretrained(base, controlnet=nets[0] if len(nets) == 1 else nets, torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"cannot load a base pipeline for ControlNet from {base!r}: {err}") from err
    for path, net in zip(paths, nets, strict=True):
        if net.config.cross_attention_dim != pipe.unet.config.cross_attention_dim:
            raise ValueError(
                f"ControlNet {path!r} has cross_attention_dim={net.config.cross_attention_dim} but the base "
                f"{base!r} has {pipe.unet.config.cross_attention_dim}: use a ControlNet trained for this base"
            )
        try:
            check_downsampling(net, pipe.vae_scale_factor)
        except ValueError as err:
            raise ValueError(f"ControlNet {path!r}: {err}") from None
    return pipe


# --- control images -------------------------------------------------------------------------

CONTROL_KINDS = ("canny", "lineart", "image")


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``a[y + dy, x + dx]`` with zeros outside."""
    height, width = a.shape
    p = np.pad(a, 1)
    return p[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def canny_edges(
    image: Image.Image, low: float = 100.0, high: float = 200.0, sigma: float = 1.0
) -> Image.Image:
    """A Canny-like edge map in numpy: Gaussian blur, Sobel, non-maximum suppression, hysteresis.

    White edges on black, RGB, the same size as ``image`` (what controlnet-aux's ``CannyDetector``
    gives, with OpenCV's default thresholds 100 / 200). As OpenCV's ``Canny`` on a colour image,
    each pixel takes the gradient of the RGB channel where it is strongest, so an edge between two
    colours of about the same brightness (yellow on white) is found too.
    """
    rgb = image.convert("RGB")
    if sigma > 0:
        rgb = rgb.filter(ImageFilter.GaussianBlur(sigma))
    channels = np.asarray(rgb, dtype=np.float32)
    gxs, gys = zip(*(_sobel(channels[..., c]) for c in range(3)), strict=True)
    gx, gy = np.stack(gxs), np.stack(gys)
    strongest = np.hypot(gx, gy).argmax(0)[None]
    gx, gy = np.take_along_axis(gx, strongest, 0)[0], np.take_along_axis(gy, strongest, 0)[0]
    magnitude = np.hypot(gx, gy)
    # Keep a pixel only where it is the maximum along its gradient direction (0, 45, 90, 135 degrees).
    direction = ((np.rad2deg(np.arctan2(gy, gx)) % 180 + 22.5) // 45).astype(int) % 4
    neighbours = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    thin = np.zeros_like(magnitude, dtype=bool)
    for d, (dy, dx) in neighbours.items():
        ahead, behind = _shift(magnitude, dy, dx), _shift(magnitude, -dy, -dx)
        thin |= (direction == d) & (magnitude >= ahead) & (magnitude >= behind)
    weak = thin & (magnitude >= low)
    edges = thin & (magnitude >= high)
    while True:  # hysteresis: grow the strong edges through 8-connected weak pixels
        grown = edges.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= _shift(edges, dy, dx)
        grown &= weak
        if np.array_equal(grown, edges):
            break
        edges = grown
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def lineart_standard(image: Image.Image, sigma: float = 6.0, intensity_threshold: float = 8.0) -> Image.Image:
    """controlnet-aux's ``LineartStandardDetector`` in numpy/PIL: dark lines against a blurred copy."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    g = np.asarray(image.convert("RGB").filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > intensity_threshold]
    intensity = intensity / max(16.0, float(np.median(strong)) if strong.size else 16.0) * 127
    return Image.fromarray(intensity.clip(0, 255).astype(np.uint8)).convert("RGB")


def _detector(kind: str) -> Callable[[Image.Image, int], Image.Image] | None:
    """controlnet-aux's weight-free detector for ``kind``, when controlnet-aux is installed."""
    try:
        with warnings.catch_warnings():  # its import warns about optional packages it does not need here
            warnings.simplefilter("ignore")
            import controlnet_aux  # noqa: F401
        if kind == "canny":
            from controlnet_aux import CannyDetector

            return lambda image, size: CannyDetector()(image, detect_resolution=size, image_resolution=size)
        from controlnet_aux import LineartStandardDetector

        return lambda image, size: LineartStandardDetector()(image, detect_resolution=size)
    except ImportError:
        return None


def control_image(spec: str, size: int, controlnet=None) -> Image.Image:
    """A control image from a ``KIND:PATH`` spec (the CLI's ``--control``).

    Args:
        spec: ``canny:PATH`` (edges), ``lineart:PATH`` (line art) or ``image:PATH`` (the image as is,
            e.g. a ready-made depth or pose map). Canny and line art use controlnet-aux's detectors
            when it is installed (``pip install -e ".[control]"``), else the built-in
            :func:`canny_edges` / :func:`lineart_standard`.
        size: side in pixels of the square result (the generated image's size); the image is resized.
        controlnet: optional ``ControlNetModel`` / ``MultiControlNetModel`` to check channels against.

    Returns:
        An RGB PIL image of ``size x size``.

    Raises:
        ValueError: a malformed spec, an unknown kind, an image that cannot be read (naming the path),
            a size < 8, or channels that do not match ``controlnet``.
    """
    kind, sep, path = str(spec).partition(":")
    if not sep or kind not in CONTROL_KINDS or not path:
        raise ValueError(
            f"control {spec!r} is malformed: expected one of {[k + ':PATH' for k in CONTROL_KINDS]}"
        )
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size={size!r} is invalid: expected an integer >= 8 (pixels)")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"control image {path!r} cannot be read: {err}") from err
    image = image.resize((size, size), Image.Resampling.BICUBIC)
    if kind != "image":
        detector = _detector(kind)
        if detector is not None:
            image = detector(image, size).convert("RGB").resize((size, size))
        else:
            image = canny_edges(image) if kind == "canny" else lineart_standard(image)
    if controlnet is not None:
        check_conditioning_channels(controlnet, image)
    return image


__all__ = [
    "CONTROL_KINDS",
    "ControlNetAdapter",
    "ControlNetXLAdapter",
    "canny_edges",
    "check_conditioning_channels",
    "check_downsampling",
    "control_image",
    "control_scale",
    "lineart_standard",
    "load_controlnet_pipeline",
    "prepare_control_images",
]
