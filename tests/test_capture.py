import pytest
import torch

from ait2i_ext.capture import (
    StopForward,
    capture_attention,
    cross_attention_layers,
    map_side,
    select_factor,
)


def _unet(levels: int = 4, sdxl_like: bool = False, **kw):
    """A small UNet with Stable Diffusion's block layout: 4 levels, cross-attention on the first
    three (SD 1.x/2.x), or SDXL's 3 levels with cross-attention on the last two (mid block at 1/32)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if sdxl_like:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
        channels = (8, 16, 16)
    else:
        down = ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",)
        up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1)
        channels = (8, 16, 16, 16)[:levels]
    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=16,
        attention_head_dim=2,
        layers_per_block=1,
        norm_num_groups=8,
        **kw,
    ).eval()


def _inputs(pipe, batch=2, side=32):
    g = torch.Generator().manual_seed(0)
    dim = pipe.unet.config.cross_attention_dim
    return (
        torch.randn(batch, 4, side, side, generator=g),
        torch.tensor(500),
        torch.randn(batch, 77, dim, generator=g),
    )


def test_capture_output_equals_stock(tiny_sd):
    x, t, e = _inputs(tiny_sd)
    with torch.no_grad():
        ref = tiny_sd.unet(x, t, encoder_hidden_states=e).sample
        with capture_attention(tiny_sd.unet, (32, 32)) as store:
            out = tiny_sd.unet(x, t, encoder_hidden_states=e).sample
    assert torch.equal(out, ref)
    maps = store.maps()
    assert maps.shape == (2, 16, 16, 77) and maps.dtype == torch.float32
    assert torch.allclose(maps.sum(-1), torch.ones(2, 16, 16), atol=1e-5)  # probabilities over tokens


def test_only_layers_at_the_resolution_are_replaced(tiny_sd):
    originals = tiny_sd.unet.attn_processors
    with capture_attention(tiny_sd.unet, (32, 32)) as store:
        inside = tiny_sd.unet.attn_processors
    changed = [k for k in originals if inside[k] is not originals[k]]
    assert sorted(changed) == sorted(store.layer_names)
    assert all(".attn2." in k for k in changed) and len(changed) == 3
    assert all(".attn1." not in k for k in changed)


def test_processors_restored_after_run_and_error(tiny_sd):
    originals = tiny_sd.unet.attn_processors
    x, t, e = _inputs(tiny_sd)
    with capture_attention(tiny_sd.unet, 32):
        tiny_sd.unet(x, t, encoder_hidden_states=e)
    assert all(tiny_sd.unet.attn_processors[k] is v for k, v in originals.items())
    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny_sd.unet, 32):
            raise RuntimeError("boom")
    assert all(tiny_sd.unet.attn_processors[k] is v for k, v in originals.items())


def test_store_raises_naming_what_it_expected(tiny_sd):
    with capture_attention(tiny_sd.unet, 32) as store:
        pass
    with pytest.raises(
        RuntimeError, match=r"no cross-attention was captured at 16x16: expected layers \['down_blocks"
    ):
        store.maps()


def test_resolution_selection(tiny_sd, tiny_sdxl):
    assert select_factor(tiny_sd.unet, (32, 32)) == 2  # 16x16 maps
    assert select_factor(tiny_sd.unet, (32, 32), resolution=8) == 4
    assert select_factor(tiny_sdxl.unet, (64, 64)) == 4  # 16 is closest to 16
    with pytest.raises(ValueError, match=r"attention_resolution=5 does not exist .* map sides \[8, 16\]"):
        select_factor(tiny_sd.unet, (32, 32), resolution=5)
    assert [layer.order[0] for layer in cross_attention_layers(tiny_sd.unet)] == sorted(
        layer.order[0] for layer in cross_attention_layers(tiny_sd.unet)
    )


def test_stop_early_skips_the_rest_and_keeps_maps(tiny_sd):
    x, t, e = _inputs(tiny_sd)
    calls = []
    hook = tiny_sd.unet.conv_out.register_forward_pre_hook(lambda *a: calls.append(1))
    with capture_attention(tiny_sd.unet, 32, stop_early=True) as store:
        with pytest.raises(StopForward):
            tiny_sd.unet(x, t, encoder_hidden_states=e)
    hook.remove()
    assert calls == [] and len(store) == 3


def test_maps_keep_graph_for_latent_gradients(tiny_sd):
    x, t, e = _inputs(tiny_sd)
    x.requires_grad_(True)
    with capture_attention(tiny_sd.unet, 32) as store:
        tiny_sd.unet(x, t, encoder_hidden_states=e)
    (grad,) = torch.autograd.grad(store.maps()[..., 2].max(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_capture_in_half_precision(tiny_sd, dtype):
    unet = tiny_sd.unet.to(dtype)
    x, t, e = _inputs(tiny_sd)
    with torch.no_grad():
        ref = unet(x.to(dtype), t, encoder_hidden_states=e.to(dtype)).sample
        with capture_attention(unet, 32) as store:
            out = unet(x.to(dtype), t, encoder_hidden_states=e.to(dtype)).sample
    assert torch.equal(out, ref) and store.maps().dtype == torch.float32


def test_capture_with_peft_lora(tiny_sd):
    from peft import LoraConfig

    tiny_sd.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    x, t, e = _inputs(tiny_sd)
    with torch.no_grad():
        ref = tiny_sd.unet(x, t, encoder_hidden_states=e).sample
        with capture_attention(tiny_sd.unet, 32) as store:
            out = tiny_sd.unet(x, t, encoder_hidden_states=e).sample
    assert torch.equal(out, ref) and store.maps().shape == (2, 16, 16, 77)


@pytest.mark.parametrize("pixels, side", [(512, 16), (768, 24), (1024, 32)])
def test_sd_shaped_unet_reads_the_layers_at_a_32nd_of_the_image(pixels, side):
    unet = _unet(4)
    latent = (pixels // 8, pixels // 8)
    for vae_scale_factor in (8, None):  # a pipeline's factor, or none known
        assert map_side(unet, latent, vae_scale_factor=vae_scale_factor) == side
    with capture_attention(unet, latent, vae_scale_factor=8) as store:
        assert store.shape == (side, side)
        names = store.layer_names
    # the down and up blocks at that resolution (SD's third level), never the mid block
    assert names == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    ]


def test_sdxl_shaped_unet_leaves_the_mid_block_out():
    unet = _unet(sdxl_like=True)
    mid = [layer.name for layer in cross_attention_layers(unet) if layer.name.startswith("mid_block")]
    assert mid and select_factor(unet, (128, 128), vae_scale_factor=8) == 4  # 32x32 at 1024 px
    with capture_attention(unet, (128, 128), vae_scale_factor=8) as store:
        assert store.shape == (32, 32)
        assert not set(mid) & set(store.layer_names)
        assert all(name.startswith(("down_blocks.2", "up_blocks.0")) for name in store.layer_names)
    with pytest.raises(ValueError, match=r"map sides \[32, 64\]"):
        select_factor(unet, (128, 128), resolution=16)  # the mid block's 32 is there, 16 is not


def test_sd_shaped_capture_runs_at_a_32nd_of_the_image():
    unet = _unet(4)
    x, e = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 16)  # 256 px: 8x8 maps
    with torch.no_grad(), capture_attention(unet, (32, 32), vae_scale_factor=8) as store:
        unet(x, 10, encoder_hidden_states=e)
    assert store.maps().shape == (1, 8, 8, 77)


def test_recorded_probabilities_equal_the_layers_attention_scores(tiny_sd):
    """Per layer: the head mean of ``Attention.get_attention_scores`` on the layer's own inputs."""
    x, t, e = _inputs(tiny_sd)
    inputs = {}

    def keep(name):
        return lambda module, args, kwargs: inputs.__setitem__(name, (args, kwargs))

    with torch.no_grad(), capture_attention(tiny_sd.unet, (32, 32)) as store:
        modules = {n: tiny_sd.unet.get_submodule(n.removesuffix(".processor")) for n in store.layer_names}
        hooks = [m.register_forward_pre_hook(keep(n), with_kwargs=True) for n, m in modules.items()]
        tiny_sd.unet(x, t, encoder_hidden_states=e)
        for hook in hooks:
            hook.remove()
        recorded = store.recorded
    assert set(recorded) == set(modules) == set(inputs)
    for name, attn in modules.items():
        args, kwargs = inputs[name]
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs["encoder_hidden_states"]
        with torch.no_grad():
            query = attn.head_to_batch_dim(attn.to_q(hidden))
            key = attn.head_to_batch_dim(attn.to_k(context))
            probs = attn.get_attention_scores(query, key)
        expected = probs.view(x.shape[0], attn.heads, *probs.shape[1:]).mean(1)
        torch.testing.assert_close(recorded[name], expected, rtol=1e-5, atol=1e-6)


def test_fp16_sd2_shaped_unet_gives_finite_maps():
    """SD 2.x sets ``upcast_attention``: the product of unscaled queries and keys must not overflow
    fp16 (queries and keys scaled up so that it would; the layer's own fused output stays finite)."""
    unet = _unet(4, upcast_attention=True, use_linear_projection=True).to(torch.float16)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(20.0)
                module.to_k.weight.mul_(2000.0)
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32, dtype=torch.float16)
    e = torch.randn(1, 77, 16, dtype=torch.float16)
    with torch.no_grad(), capture_attention(unet, (32, 32), vae_scale_factor=8) as store:
        out = unet(x, 10, encoder_hidden_states=e).sample
    maps = store.maps()
    assert torch.isfinite(out).all()
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert torch.allclose(maps.sum(-1), torch.ones_like(maps[..., 0]), atol=1e-3)


def test_capture_wraps_the_layers_own_processor(tiny_sd):
    """A layer with the classic (non-SDPA) processor returns that processor's output under capture."""
    from diffusers.models.attention_processor import AttnProcessor

    tiny_sd.unet.set_attn_processor(AttnProcessor())
    x, t, e = _inputs(tiny_sd)
    with torch.no_grad():
        ref = tiny_sd.unet(x, t, encoder_hidden_states=e).sample
        with capture_attention(tiny_sd.unet, (32, 32)) as store:
            inside = tiny_sd.unet.attn_processors
            out = tiny_sd.unet(x, t, encoder_hidden_states=e).sample
    assert torch.equal(out, ref) and len(store) == 3
    assert all(inside[name].processor is not None for name in store.layer_names)


def test_custom_processor_is_refused_clearly_and_left_in_place(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Doubling(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return 2 * super().__call__(attn, hidden_states, *args, **kwargs)

    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    tiny_sd.unet.set_attn_processor({**tiny_sd.unet.attn_processors, name: Doubling()})
    before = tiny_sd.unet.attn_processors
    with pytest.raises(ValueError, match=rf"layer '{name}' uses Doubling, whose attention ait2i cannot read"):
        with capture_attention(tiny_sd.unet, (32, 32)):
            pass
    assert all(tiny_sd.unet.attn_processors[k] is v for k, v in before.items())


def test_down_blocks_only_record_the_down_layers_and_stop_before_the_mid_block(tiny_sd):
    x, t, e = _inputs(tiny_sd)
    with capture_attention(tiny_sd.unet, 32) as both:
        tiny_sd.unet(x, t, encoder_hidden_states=e)
    mid = []
    hook = tiny_sd.unet.mid_block.register_forward_pre_hook(lambda *a: mid.append(1))
    with capture_attention(tiny_sd.unet, 32, stop_early=True, blocks="down") as down:
        with pytest.raises(StopForward):
            tiny_sd.unet(x, t, encoder_hidden_states=e)
    hook.remove()
    assert mid == [] and len(down) >= 1
    assert all(name.startswith("down_blocks.") for name in down.recorded)
    assert set(down.recorded) == {n for n in both.recorded if n.startswith("down_blocks.")}
    for name, probs in down.recorded.items():
        assert torch.allclose(probs, both.recorded[name])
    with pytest.raises(ValueError, match="blocks='middle' is invalid"):
        with capture_attention(tiny_sd.unet, 32, blocks="middle"):
            pass
