"""Block and norm→reader discovery used by transform-based quantizers."""

import pytest
from torch import nn

from qbench.quant.modules import rewrite_tower_attention
from qbench.quant.structure import UnsupportedBlock, norm_reader_pairs, transformer_blocks
from tiny_models import tiny_vlm


def test_blocks_are_found_in_forward_order_per_tower():
    vlm = tiny_vlm()
    rewrite_tower_attention(vlm, ("visual", "text"))
    blocks = transformer_blocks(vlm, ("visual", "text"))
    assert [block.name for block in blocks] == [
        "visual.transformer.resblocks.0", "visual.transformer.resblocks.1",
        "transformer.resblocks.0", "transformer.resblocks.1",
    ]
    first = blocks[0]
    assert first.q[0] == "visual.transformer.resblocks.0.attn.q_proj" and isinstance(first.q[1], nn.Linear)
    assert first.fc2[0].endswith("mlp.c_proj") and first.tower == "visual"
    assert len(first.linears) == 6


def test_every_norm_reader_pair_feeds_exactly_its_readers():
    vlm = tiny_vlm()
    rewrite_tower_attention(vlm, ("visual",))
    pairs = norm_reader_pairs(vlm, ("visual",))
    assert [(pair.norm_name.rsplit(".", 1)[1], len(pair.readers)) for pair in pairs] == [("ln_1", 3), ("ln_2", 1)] * 2
    for pair in pairs:
        for _, reader in pair.readers:
            assert reader.in_features == pair.norm.normalized_shape[0]


def test_unrewritten_attention_is_a_clear_error():
    vlm = tiny_vlm()
    with pytest.raises(UnsupportedBlock, match="rewrite_tower_attention"):
        transformer_blocks(vlm, ("visual",))
