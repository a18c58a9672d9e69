import pytest
import torch

from ait2i_ext.capture import StopForward, capture_attention, cross_attention_layers, select_factor


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
