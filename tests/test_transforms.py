"""Norm/reader re-parameterisations leave the float model's output unchanged."""

import torch

from qbench.quant.modules import rewrite_tower_attention
from qbench.quant.structure import norm_reader_pairs
from qbench.quant.transforms import fold_norm_into_readers, input_channel_absmax, scale_norm_and_readers
from tiny_models import embeddings, proxy_batch, tiny_vlm


def prepared(outliers=(3, 17)):
    vlm = tiny_vlm(outlier_channels=outliers)
    rewrite_tower_attention(vlm, ("visual", "text"))
    return vlm


def test_scaling_is_exact_in_float():
    vlm = prepared()
    data = proxy_batch(vlm)
    before = embeddings(vlm, data)
    for pair in norm_reader_pairs(vlm, ("visual", "text")):
        scale_norm_and_readers(pair, torch.rand(pair.norm.weight.numel()) * 10 + 0.1)
    after = embeddings(vlm, data)
    for old, new in zip(before, after):
        assert torch.allclose(old, new, atol=1e-5, rtol=1e-5)


def test_folding_is_exact_and_leaves_an_affine_free_norm():
    vlm = prepared()
    data = proxy_batch(vlm)
    before = embeddings(vlm, data)
    pairs = norm_reader_pairs(vlm, ("visual",))
    for pair in pairs:
        fold_norm_into_readers(pair)
    after = embeddings(vlm, data)
    assert torch.allclose(before[0], after[0], atol=1e-5, rtol=1e-5)
    for pair in pairs:
        assert torch.equal(pair.norm.weight, torch.ones_like(pair.norm.weight))
        assert torch.equal(pair.norm.bias, torch.zeros_like(pair.norm.bias))


def test_weight_statistic_covers_every_reader():
    vlm = prepared()
    pair = norm_reader_pairs(vlm, ("visual",))[0]
    expected = torch.stack([reader.weight.abs().max(dim=0).values for _, reader in pair.readers]).max(dim=0).values
    assert torch.equal(input_channel_absmax(pair), expected)
    assert input_channel_absmax(pair).shape == (pair.norm.weight.numel(),)
