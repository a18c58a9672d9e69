"""Faster guidance: the ``"lagged"`` mode, which needs no UNet pass of its own.

The reference schedule (``"full"`` / ``"truncated"``) runs an extra conditional UNet pass and its
backward before each guided step: the update of step ``i`` is computed at the latents of step ``i``.
``"lagged"`` computes it from the pass the pipeline runs anyway:

1. on a guided step ``i`` the pipeline's own classifier-free-guidance forward pass runs with grad
   enabled on its input, under attention capture (only the map layers record; every other layer
   keeps the fused kernel);
2. right after the last layer that produces the maps, grad is switched off again, so the rest of
   the UNet runs and stores nothing for backward;
3. the losses read the conditional half of the maps; their gradient w.r.t. the UNet input is taken
   at once (no parameter gradients) and the pass returns its ordinary noise prediction;
4. after the scheduler step, ``z_{i+1} <- z_{i+1} - alpha_i / c_i^2 * grad_{z_i} L``: the update the
   reference schedule takes at step ``i``, applied one step late.

It is an approximation: the noise prediction of step ``i`` does not see step ``i``'s update (the
reference schedule's does), and the gradient is taken at ``z_i`` but applied to ``z_{i+1}``. Its
cost is the backward of the first part of the UNet on the guided steps, with no extra forward.

Limits: no iterative refinement (it needs extra passes: use ``"full"`` or ``"truncated"``); with
``return_maps`` the returned maps average the unguided steps only (the guided passes record into
the lagged mode's own store); a ControlNet's residuals enter the pass as constants, so the gradient
does not flow through the ControlNet.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

from .capture import AttentionStore, capture_attention
from .guidance import Guide, StepRecord, batch_losses, frozen_parameters

logger = logging.getLogger(__name__)


def _grad_off() -> None:
    torch.set_grad_enabled(False)  # nothing after the last map layer is differentiated


def _rows(value, rows: slice, batch: int):
    """``value`` with every tensor of leading size ``batch`` (in tuples, lists, dicts) cut to ``rows``."""
    if torch.is_tensor(value):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, batch) for v in value)
    return value


def _concat(first, second):
    """Two UNet outputs (tensor, tuple or ``BaseOutput``) joined along the batch."""
    if torch.is_tensor(first):
        return torch.cat([first, second])
    if isinstance(first, dict):  # diffusers' BaseOutput is an OrderedDict dataclass
        return type(first)(**{k: _concat(first[k], second[k]) for k in first})
    return type(first)(_concat(a, b) for a, b in zip(first, second))


class LaggedGuide(Guide):
    """The ``"lagged"`` mode: guidance from the pipeline's own UNet passes (see the module docstring).

    Used like :class:`~ait2i_ext.guidance.Guide` (``update(i, latents)`` before step ``i``), with the
    pipeline call run inside :meth:`attached`, which hooks the UNet for the duration.
    """

    # Differentiate only the conditional half of a CFG batch, running the halves as two calls: half
    # the backward and its saved activations, for one more (half-size) call. On the tiny CPU
    # benchmark it saves memory and costs time (docs/performance.md), hence off by default.
    split_cfg = False

    def __init__(self, unet, forward, targets, timesteps, config, input_scale=None):
        super().__init__(unet, forward, targets, timesteps, config, input_scale)
        if config.schedule.refinement:
            raise ValueError(
                "mode='lagged' does not support refinement (it needs extra UNet passes): "
                "use mode='full' or 'truncated', or ScheduleConfig(refinement=False)"
            )
        self._batch = sum(t.num_images for t in self.targets)
        self._step = 0  # the denoising step whose pass runs next
        self._pending: tuple[int, torch.Tensor] | None = None  # (step i, grad_{z_i} L / c_i^2)
        self._input: torch.Tensor | None = None
        self._store: AttentionStore | None = None
        self._grad_mode = False
        self._recorder = nullcontext()
        self._uncond = None  # the unconditional half's output, when the CFG batch is split

    def update(self, i: int, latents: torch.Tensor) -> torch.Tensor:
        """The latents for step ``i``: those the scheduler gave, moved by step ``i - 1``'s gradient."""
        self._step = i
        pending, self._pending = self._pending, None
        if pending is None or i >= len(self.timesteps):
            return latents
        step, grad = pending
        return (latents - self.step_sizes[step] * grad.to(latents.dtype)).to(latents.dtype)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Hook the UNet so that guided steps' passes also compute the update; always unhooks."""
        pre = self.unet.register_forward_pre_hook(self._before, with_kwargs=True)
        post = self.unet.register_forward_hook(self._after, with_kwargs=True)
        grad_mode = torch.is_grad_enabled()
        try:
            with frozen_parameters(self.unet):
                yield
        finally:
            pre.remove()
            post.remove()
            self._recorder.__exit__(None, None, None)
            self._recorder, self._input, self._store, self._uncond = nullcontext(), None, None, None
            torch.set_grad_enabled(grad_mode)

    def _wants(self, sample: torch.Tensor) -> bool:
        i = self._step
        done = bool(self.records) and self.records[-1].step == i
        applicable = self.is_guided(i) and i + 1 < len(self.timesteps)  # the last step has no step after it
        cfg_or_not = sample.shape[0] in (self._batch, 2 * self._batch)
        return applicable and not done and self._input is None and cfg_or_not

    def _before(self, unet, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        if not self._wants(sample):
            return None
        n = self._batch
        if self.split_cfg and sample.shape[0] == 2 * n:
            uncond, cond = slice(0, n), slice(n, None)
            # The unconditional half runs on its own without grad; only the conditional half is
            # differentiated, so the backward and its saved activations cover half the batch.
            with torch.no_grad():
                self._uncond = unet.forward(*_rows(args, uncond, 2 * n), **_rows(kwargs, uncond, 2 * n))
            args, kwargs = _rows(args, cond, 2 * n), _rows(kwargs, cond, 2 * n)
            sample = args[0] if args else kwargs["sample"]
        self._input = sample.detach().requires_grad_(True)
        self._grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        hw = tuple(sample.shape[-2:])
        self._recorder = capture_attention(
            unet, hw, self.config.attention_resolution, after_last=_grad_off, blocks=self.config.map_blocks
        )
        self._store = self._recorder.__enter__()
        if args:
            return (self._input, *args[1:]), kwargs
        return args, {**kwargs, "sample": self._input}

    def _after(self, unet, args, kwargs, output):
        if self._input is None:
            return None
        recorder, x, store = self._recorder, self._input, self._store
        self._recorder, self._input, self._store = nullcontext(), None, None
        recorder.__exit__(None, None, None)
        i, t = self._step, self.timesteps[self._step]
        with torch.enable_grad():
            maps = store.maps()[-self._batch :]  # with CFG the batch is [uncond, cond]
            terms = batch_losses(maps, self.targets, self.config, self.radii)
            (grad,) = torch.autograd.grad(terms.total.sum(), x)
        torch.set_grad_enabled(self._grad_mode)
        self._calibrate(maps)
        # grad is w.r.t. the UNet input c * z: grad_z L = c * grad, step = alpha / c^2 * grad_z L.
        self._pending = (i, grad[-self._batch :].detach() / self.input_scale(t))
        self.records.append(StepRecord(i, float(t), self.step_sizes[i], 1, terms.as_floats()))
        logger.debug("step %d (lagged): %s", i, self.records[-1].losses)
        uncond, self._uncond = self._uncond, None
        return output if uncond is None else _concat(uncond, output)


def sampling_hooks(guide: Guide | None):
    """The context the pipeline call runs in: :meth:`LaggedGuide.attached`, else nothing."""
    return guide.attached() if isinstance(guide, LaggedGuide) else nullcontext()
