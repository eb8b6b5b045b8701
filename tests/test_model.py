"""Tests for ``system.models.model``: shapes, causality, layer layout, parameter counts, init, aux loss."""

from __future__ import annotations

import pytest
import torch

from system.config import ModelConfig, MoEConfig
from system.models import MoETransformer
from system.models.model import is_moe_layer
from system.moe import GroupedExperts, MoELayer
from system.moe.experts import FeedForward

VOCAB = 40


def _cfgs(**kw) -> tuple[ModelConfig, MoEConfig]:
    model_kw = {k: v for k, v in kw.items() if k in ModelConfig.__dataclass_fields__}
    moe_kw = {k: v for k, v in kw.items() if k in MoEConfig.__dataclass_fields__}
    assert len(model_kw) + len(moe_kw) == len(kw)
    cfg = ModelConfig(
        **{"dim": 16, "n_layers": 3, "n_heads": 2, "ffn_dim": 24, "vocab_size": VOCAB, "max_seq_len": 16, **model_kw}
    )
    moe = MoEConfig(**{"num_experts": 4, "top_k": 2, "expert_dim": 8, **moe_kw})
    cfg.validate()
    moe.validate()
    return cfg, moe


def _model(seed: int = 0, **kw) -> MoETransformer:
    m = MoETransformer(*_cfgs(**kw))
    m.init_weights(seed)
    return m


def test_forward_shape_and_dtype() -> None:
    m = _model()
    tokens = torch.randint(0, VOCAB, (3, 11))
    logits = m(tokens)
    assert logits.shape == (3, 11, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    full = m(torch.randint(0, VOCAB, (1, 16)))  # exactly max_seq_len is fine
    assert full.shape == (1, 16, VOCAB)


def test_sequence_longer_than_max_raises() -> None:
    m = _model()
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.randint(0, VOCAB, (1, 17)))


def test_vocab_size_must_be_resolved() -> None:
    cfg, moe = _cfgs(vocab_size=0)
    with pytest.raises(ValueError, match="vocab_size"):
        MoETransformer(cfg, moe)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1, "num_shared_experts": 1, "interleave": 2}])
def test_causality(kw: dict) -> None:
    m = _model(**kw)
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 12))
    base = m(tokens)
    for t in (1, 5, 11):
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, VOCAB - 1, changed[:, t:].shape)) % VOCAB
        assert (changed[:, t:] != tokens[:, t:]).all()
        out = m(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=1e-5, atol=1e-5)
        # the changed positions do change (the test would be vacuous otherwise)
        assert not torch.allclose(out[:, t], base[:, t])


def test_tied_vs_untied_embeddings() -> None:
    tied = _model(tie_embeddings=True)
    untied = _model(tie_embeddings=False)
    assert tied.output is None and untied.output is not None
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == VOCAB * 16
    assert tied.num_params()[0] + VOCAB * 16 == untied.num_params()[0]
    # tied: the logits are the final hidden state times the embedding matrix
    tokens = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        tied.tok_embeddings.weight.mul_(2.0)
        h = tied.tok_embeddings(tokens)
        for block in tied.layers:
            h = block(h, tied.rope[:5])
        expected = tied.norm(h) @ tied.tok_embeddings.weight.t()
        torch.testing.assert_close(tied(tokens), expected)


@pytest.mark.parametrize(
    ("n_layers", "first_dense", "interleave", "expected"),
    [
        (4, 0, 1, [0, 1, 2, 3]),
        (4, 0, 2, [0, 2]),
        (6, 1, 2, [1, 3, 5]),
        (6, 2, 3, [2, 5]),
        (3, 3, 1, []),
        (5, 1, 1, [1, 2, 3, 4]),
    ],
)
def test_is_moe_layer_and_layout(n_layers: int, first_dense: int, interleave: int, expected: list[int]) -> None:
    moe = MoEConfig(first_dense_layers=first_dense, interleave=interleave)
    assert [i for i in range(n_layers) if is_moe_layer(i, moe)] == expected
    m = MoETransformer(*_cfgs(n_layers=n_layers, first_dense_layers=first_dense, interleave=interleave))
    for i, block in enumerate(m.layers):
        if i in expected:
            assert isinstance(block.moe, MoELayer) and block.mlp is None
        else:
            assert block.moe is None and isinstance(block.mlp, FeedForward)
    assert [b.layer_id for b in m.layers if b.moe is not None] == expected
    assert len(m.moe_layers()) == len(expected)


def _hand_counts(cfg: ModelConfig, moe: MoEConfig, moe_layers: int) -> tuple[int, int]:
    d, v, h = cfg.dim, cfg.vocab_size, cfg.n_heads
    head_dim = d // h
    kv = cfg.n_kv_heads or h
    attn = d * h * head_dim + 2 * d * kv * head_dim + h * head_dim * d
    norms = 2 * d
    dense_ffn = 3 * d * cfg.ffn_dim
    router = d * moe.num_experts
    expert = 3 * d * moe.expert_dim
    shared = 3 * d * moe.expert_dim * moe.num_shared_experts
    dense_layers = cfg.n_layers - moe_layers
    common = v * d + d + (0 if cfg.tie_embeddings else v * d)
    common += cfg.n_layers * (attn + norms) + dense_layers * dense_ffn + moe_layers * (router + shared)
    return common + moe_layers * moe.num_experts * expert, common + moe_layers * moe.top_k * expert


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": False},
        {"n_layers": 4, "interleave": 2, "num_shared_experts": 2, "n_kv_heads": 1},
        {"n_layers": 4, "first_dense_layers": 1, "num_experts": 8, "top_k": 1},
    ],
)
def test_num_params_hand_computation(kw: dict) -> None:
    cfg, moe = _cfgs(**kw)
    m = MoETransformer(cfg, moe)
    n_moe = sum(is_moe_layer(i, moe) for i in range(cfg.n_layers))
    total, active = m.num_params()
    assert (total, active) == _hand_counts(cfg, moe, n_moe)
    assert total == sum(p.numel() for p in m.parameters())  # unsharded: total is every parameter
    assert active < total


def test_num_params_counts_global_experts_when_sliced() -> None:
    """After an expert-parallel slice (here simulated: 1 of 4 experts held), totals stay global."""
    cfg, moe = _cfgs(num_experts=4, top_k=2)
    m = MoETransformer(cfg, moe)
    before = m.num_params()
    for layer in m.moe_layers():
        layer.experts = GroupedExperts(1, cfg.dim, moe.expert_dim, num_global_experts=4, expert_offset=2)
    assert m.num_params() == before


def test_aux_loss_before_forward_raises() -> None:
    m = _model()
    with pytest.raises(RuntimeError, match="before forward"):
        m.aux_loss()


def test_aux_loss_after_forward() -> None:
    m = _model(aux_loss_coef=0.5, z_loss_coef=0.25, n_layers=3, interleave=2)
    m(torch.randint(0, VOCAB, (2, 8)))
    layers = m.moe_layers()
    assert len(layers) == 2
    expected = sum(0.5 * lay.last_stats.aux_loss + 0.25 * lay.last_stats.z_loss for lay in layers)
    aux = m.aux_loss()
    assert aux.shape == () and aux.requires_grad
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert all(lay.router.gate.weight.grad.abs().sum() > 0 for lay in layers)


def test_aux_loss_dense_only_model_is_zero() -> None:
    m = _model(first_dense_layers=3)
    assert m.moe_layers() == []
    assert m.aux_loss().item() == 0.0


def test_init_weights_reproducible_and_preserves_global_rng() -> None:
    a = MoETransformer(*_cfgs(num_shared_experts=1, tie_embeddings=False))
    b = MoETransformer(*_cfgs(num_shared_experts=1, tie_embeddings=False))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a.init_weights(7)
    assert torch.equal(torch.random.get_rng_state(), state)
    expected_next = torch.rand(3)
    torch.random.set_rng_state(state)
    a.init_weights(7)
    torch.manual_seed(999)  # a different global state must not matter
    b.init_weights(7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the global stream continues as if init_weights had not run
    torch.random.set_rng_state(state)
    a.init_weights(7)
    assert torch.equal(torch.rand(3), expected_next)
    # another seed gives other weights
    b.init_weights(8)
    assert not torch.equal(a.tok_embeddings.weight, b.tok_embeddings.weight)
    # every expert is initialised (not left as torch.empty garbage) with a sensible scale
    for layer in a.moe_layers():
        for p in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
            assert torch.isfinite(p).all() and 0 < p.std() < 0.1
    # norms reset to ones
    assert torch.equal(a.norm.weight, torch.ones(16))
