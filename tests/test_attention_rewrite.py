"""nn.MultiheadAttention rewrite (models.md §6.2): same outputs, real Linear projections, working slots."""

import copy
import functools

import open_clip
import pytest
import torch
from torch import nn

from tiny_models import tiny_vlm
from qbench.quant.modules import QuantizableMultiheadAttention, TensorQuantizer, rewrite_attention


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_clip() -> nn.Module:
    return tiny_vlm().model


@pytest.fixture(scope="module")
def clip_inputs():
    torch.manual_seed(1)
    tokenize = functools.partial(open_clip.tokenizer.tokenize, context_length=16)
    return torch.randn(4, 3, 32, 32), tokenize(["a photo of a cat!", "a dog", "two birds on a wire", ""])


def test_tiny_clip_embeddings_unchanged_by_the_rewrite(clip_inputs):
    images, tokens = clip_inputs
    model = tiny_clip()
    assert model.attn_mask is not None  # the text tower runs with its causal mask
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(tokens)
        assert rewrite_attention(model) == 4  # 2 vision + 2 text blocks
        after = model.encode_image(images), model.encode_text(tokens)
    assert not any(isinstance(module, nn.MultiheadAttention) for module in model.modules())
    for old, new in zip(before, after):
        assert (old - new).abs().max() <= 1e-5


TINY_VISION = {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2}
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
OTHER_TINY_MODELS = {  # models.md §5: SigLIP-like (bidirectional text) and CoCa (attentional pooler, cls mask)
    "tiny-sigmoid": (
        open_clip.CustomTextCLIP,
        {
            "embed_dim": 64,
            "init_logit_bias": -10,
            "vision_cfg": {**TINY_VISION, "pool_type": "avg"},
            "text_cfg": {**TINY_TEXT, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                         "norm_kwargs": {"eps": 1e-6}},
        },
        4,
    ),
    "tiny-coca": (
        open_clip.CoCa,
        {
            "embed_dim": 64,
            "vision_cfg": {**TINY_VISION, "attentional_pool": True, "attn_pooler_heads": 2,
                           "attn_pooler_queries": 8, "output_tokens": True},
            "text_cfg": {**TINY_TEXT, "context_length": 15, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {**TINY_TEXT, "context_length": 15, "layers": 1, "attn_pooler_heads": 2},
        },
        7,  # 2 vision + 2 text + pooler + decoder self- and cross-attention
    ),
}


@pytest.mark.parametrize("name", sorted(OTHER_TINY_MODELS))
def test_other_tiny_architectures_unchanged_by_the_rewrite(name):
    cls, config, expected = OTHER_TINY_MODELS[name]
    torch.manual_seed(0)
    model = cls(**config).eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenizer.tokenize(["a cat!", "a dog on a mat", ""], context_length=config["text_cfg"]["context_length"])
    with torch.no_grad():
        before = model.encode_image(images), model.encode_text(tokens)
        assert rewrite_attention(model) == expected
        after = model.encode_image(images), model.encode_text(tokens)
    for old, new in zip(before, after):
        assert (old - new).abs().max() <= 1e-5


def test_out_proj_fires_only_after_the_rewrite(clip_inputs):
    images, _ = clip_inputs
    model = tiny_clip()
    calls = []

    def count(block):
        block.attn.out_proj.register_forward_hook(lambda *args: calls.append(1))

    count(model.visual.transformer.resblocks[0])
    with torch.no_grad():
        model.encode_image(images)
    assert calls == []  # nn.MultiheadAttention uses out_proj.weight directly (models.md §6.2)
    rewrite_attention(model)
    attn = model.visual.transformer.resblocks[0].attn
    assert all(type(getattr(attn, name)) is nn.Linear for name in ("q_proj", "k_proj", "v_proj", "out_proj"))
    count(model.visual.transformer.resblocks[0])
    with torch.no_grad():
        model.encode_image(images)
    assert calls == [1]


def reference_mha(batch_first: bool, kdim=None, vdim=None, bias=True) -> nn.MultiheadAttention:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias).eval()
    if bias:
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha


def compare(mha, args, **kwargs):
    rewritten = QuantizableMultiheadAttention.from_float(mha)
    with torch.no_grad():
        expected = mha(*args, **kwargs)
        got = rewritten(*args, **kwargs)
    assert (expected[0] - got[0]).abs().max() <= 1e-5
    if kwargs.get("need_weights", True):
        assert (expected[1] - got[1]).abs().max() <= 1e-5
    else:
        assert got[1] is None


@pytest.mark.parametrize("batch_first", [True, False])
def test_masks_and_layouts_match_torch(batch_first):
    torch.manual_seed(3)
    n, length, source, heads = 2, 5, 7, 4
    shape = (n, length, 16) if batch_first else (length, n, 16)
    kv_shape = (n, source, 16) if batch_first else (source, n, 16)
    q, k, v = torch.randn(shape), torch.randn(kv_shape), torch.randn(kv_shape)
    mha = reference_mha(batch_first)
    compare(mha, (q, k, v), need_weights=False)
    compare(mha, (q, k, v), need_weights=True)
    compare(mha, (q, k, v), need_weights=True, average_attn_weights=False)
    bool_mask = torch.rand(length, source) > 0.7
    bool_mask[:, 0] = False
    compare(mha, (q, k, v), attn_mask=bool_mask, need_weights=False)
    compare(mha, (q, k, v), attn_mask=torch.randn(length, source), need_weights=False)
    compare(mha, (q, k, v), attn_mask=torch.randn(n * heads, length, source), need_weights=False)  # CoCa's 3-D masks
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = True
    compare(mha, (q, k, v), key_padding_mask=padding, need_weights=False)
    compare(mha, (q, k, v), key_padding_mask=padding, attn_mask=bool_mask, need_weights=True)


def test_causal_self_attention_matches_torch():
    torch.manual_seed(4)
    x = torch.randn(3, 6, 16)
    causal = torch.full((6, 6), float("-inf")).triu(1)
    compare(reference_mha(True), (x, x, x), attn_mask=causal, need_weights=False)
    rewritten = QuantizableMultiheadAttention.from_float(reference_mha(True))
    with torch.no_grad():
        hinted = rewritten(x, x, x, need_weights=False, is_causal=True)[0]
        masked = rewritten(x, x, x, need_weights=False, attn_mask=causal)[0]
    assert torch.allclose(hinted, masked, atol=1e-6)


def test_separate_key_value_dims_and_cross_attention():
    torch.manual_seed(5)
    mha = reference_mha(True, kdim=8, vdim=12)
    assert not mha._qkv_same_embed_dim
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 9, 8), torch.randn(2, 9, 12)
    compare(mha, (q, k, v), need_weights=False)
    rewritten = QuantizableMultiheadAttention.from_float(mha)
    assert rewritten.k_proj.in_features == 8 and rewritten.v_proj.in_features == 12
    # equal dims but key/value differ from query: K and V must come from key/value
    same = reference_mha(True)
    compare(same, (q, torch.randn(2, 9, 16), torch.randn(2, 9, 16)), need_weights=False)


def test_unbatched_and_biasless():
    torch.manual_seed(6)
    compare(reference_mha(True, bias=False), (torch.randn(5, 16),) * 3, need_weights=True)


def test_probs_slot_materialises_softmax():
    torch.manual_seed(7)
    x = torch.randn(2, 6, 16)
    attn = QuantizableMultiheadAttention.from_float(reference_mha(True))
    with torch.no_grad():
        reference = attn(x, x, x, need_weights=False)[0]
        attn.probs = TensorQuantizer(8, symmetric=False, granularity="per_token", dynamic=True)
        attn.probs.set_mode("off")  # installed but inactive: materialised path == SDPA path
        assert torch.allclose(attn(x, x, x, need_weights=False)[0], reference, atol=1e-6)
        attn.probs.set_mode("quantize")
        seen = []
        attn.probs.register_forward_hook(lambda module, inputs, output: seen.append(output))
        quantized = attn(x, x, x, need_weights=False)[0]
    assert len(seen) == 1 and seen[0].shape == (2, 4, 6, 6)
    assert not torch.allclose(quantized, reference, atol=1e-6)
    assert (quantized - reference).abs().max() < 0.05
    for slot in ("q", "k", "v"):
        assert isinstance(getattr(attn, slot), nn.Identity)


def test_shared_attention_is_rewritten_once():
    shared = reference_mha(True)
    holder = nn.ModuleDict({"a": shared, "b": nn.Sequential(shared)})
    assert rewrite_attention(holder) == 1
    assert holder["a"] is holder["b"][0]
    assert isinstance(holder["a"], QuantizableMultiheadAttention)
    with pytest.raises(ValueError):
        rewrite_attention(copy.deepcopy(shared))
