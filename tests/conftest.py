import pytest
import torch

# The tiny models are dominated by per-op overhead: one thread is faster and steadier than two.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from ait2i_ext.testing import load_clip_tokenizer

    return load_clip_tokenizer()


def sharpen_attention(pipe, factor: float = 8.0):
    """Random tiny UNets attend almost uniformly, so attention gradients are weak; scaling the
    cross-attention keys makes the maps peaky, like a trained model's."""
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.mul_(factor)
    return pipe


@pytest.fixture
def tiny_sd():
    from ait2i_ext.testing import tiny_sd_pipeline

    return tiny_sd_pipeline()


@pytest.fixture
def tiny_sdxl():
    from ait2i_ext.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved with ``save_pretrained`` (a local ``--model`` folder)."""
    from ait2i_ext.testing import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder
