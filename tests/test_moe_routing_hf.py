"""The MoE layer equals Hugging Face's DeepSeek-V3 and Qwen2-MoE MoE blocks, and the
auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2) keeps its bias
identical on every rank (real Gloo processes on CPU). fp32, no downloads.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from _dist import run_workers
from system.config import MoEConfig
from system.moe import MoELayer, TopKRouter, bias_step, limit_groups, update_expert_bias

DIM, EXPERT_DIM, E = 32, 16, 8
TOKENS = 64


def _hf(family: str):
    """Hugging Face's module, imported here only (the spawned workers below need no transformers)."""
    pytest.importorskip("transformers")
    if family == "deepseek_v3":
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m
    else:
        from transformers.models.qwen2_moe import modeling_qwen2_moe as m
    return m


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter of ``module`` normal(0, 0.2) (HF's fused experts start as ``torch.empty``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _copy_hf_experts(ours: MoELayer, hf_experts: nn.Module) -> None:
    """HF fused ``gate_up_proj`` ``[E, 2f, d]`` (gate rows first) and ``down_proj`` ``[E, d, f]`` ->
    our ``w1``/``w3`` ``[E, d, f]`` and ``w2`` ``[E, f, d]``."""
    f = ours.experts.w1.shape[-1]
    with torch.no_grad():
        ours.experts.w1.copy_(hf_experts.gate_up_proj[:, :f].transpose(1, 2))
        ours.experts.w3.copy_(hf_experts.gate_up_proj[:, f:].transpose(1, 2))
        ours.experts.w2.copy_(hf_experts.down_proj.transpose(1, 2))


def _copy_hf_mlp(ours: nn.Module, hf_mlp: nn.Module) -> None:
    with torch.no_grad():
        ours.w1.weight.copy_(hf_mlp.gate_proj.weight)
        ours.w3.weight.copy_(hf_mlp.up_proj.weight)
        ours.w2.weight.copy_(hf_mlp.down_proj.weight)


def _same_choice(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal top-k indices ``[T, k]`` as sets per token (HF's top-k is unsorted)."""
    assert torch.equal(ours.sort(dim=-1).values, theirs.sort(dim=-1).values)


def _weights_by_expert(indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` dense weights from ``[T, k]`` indices and weights (order-free comparison)."""
    return torch.zeros(indices.shape[0], E).scatter(1, indices, weights)


# ------------------------------------------------------------------------------------------
# DeepSeek-V3: sigmoid, selection bias, group-limited top-k, route scale, shared experts


def _deepseek(norm: bool, seed: int = 0) -> tuple[nn.Module, MoELayer]:
    """HF ``DeepseekV3MoE`` (random weights, random non-zero ``e_score_correction_bias``) and our layer
    with the same weights."""
    m = _hf("deepseek_v3")
    hf_cfg = m.DeepseekV3Config(
        hidden_size=DIM, intermediate_size=64, moe_intermediate_size=EXPERT_DIM, n_routed_experts=E,
        n_shared_experts=2, n_group=4, topk_group=2, num_experts_per_tok=2, routed_scaling_factor=2.5,
        norm_topk_prob=norm, hidden_act="silu",
    )
    hf = m.DeepseekV3MoE(hf_cfg).float()
    _randomise(hf, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        hf.gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)
    cfg = MoEConfig(num_experts=E, top_k=2, expert_dim=EXPERT_DIM, num_shared_experts=2, score_func="sigmoid",
                    norm_topk_prob=norm, route_scale=2.5, num_expert_groups=4, num_limited_groups=2,
                    load_balance="bias", grouped_mm="off")
    ours = MoELayer(DIM, cfg)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
    _copy_hf_experts(ours, hf.experts)
    _copy_hf_mlp(ours.shared_experts, hf.shared_experts)
    return hf, ours


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_routing_equals_hf(norm: bool) -> None:
    hf, ours = _deepseek(norm)
    x = torch.randn(TOKENS, DIM)
    with torch.no_grad():
        _, hf_weights, hf_indices = hf.gate(x)
        route = ours.router(x)
    _same_choice(route.indices, hf_indices)
    torch.testing.assert_close(_weights_by_expert(route.indices, route.weights),
                               _weights_by_expert(hf_indices, hf_weights), rtol=0, atol=1e-6)
    # The test means something: the bias and the group limit both change some token's choice.
    scores = torch.sigmoid(x @ ours.router.gate.weight.t())
    plain = scores.topk(2, dim=-1).indices.sort(-1).values
    assert not torch.equal(plain, route.indices.sort(-1).values)
    biased = (scores + ours.router.expert_bias).topk(2, dim=-1).indices.sort(-1).values
    assert not torch.equal(biased, route.indices.sort(-1).values)


@pytest.mark.parametrize("norm", [True, False])
def test_deepseek_v3_layer_equals_hf(norm: bool) -> None:
    hf, ours = _deepseek(norm, seed=3)
    x = torch.randn(4, TOKENS // 4, DIM)
    with torch.no_grad():
        expected = hf(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_group_limit_masks_worst_groups() -> None:
    # groups {0,1} {2,3} {4,5}: scores by top-2 sum 0.3, 1.1, 0.9 -> keep groups 1 and 2
    choice = torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.45, 0.45]])
    out = limit_groups(choice, num_groups=3, limited_groups=2)
    assert torch.isinf(out[0, :2]).all() and torch.equal(out[0, 2:], choice[0, 2:])
    r = TopKRouter(4, 6, 2, num_groups=3, limited_groups=1)
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(6, 4))
    idx = r(torch.randn(50, 4)).indices
    assert torch.equal(idx // 2 == (idx // 2)[:, :1], torch.ones_like(idx, dtype=torch.bool))  # one group each
    with pytest.raises(ValueError, match="num_groups"):
        TopKRouter(4, 6, 2, num_groups=4, limited_groups=1)
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(4, 6, 3, num_groups=3, limited_groups=1)


def test_expert_bias_buffer_only_for_bias_balancing() -> None:
    for balance in ("aux", "none"):
        layer = MoELayer(DIM, MoEConfig(num_experts=E, expert_dim=EXPERT_DIM, load_balance=balance))
        assert layer.router.expert_bias is None
        assert not any(k.endswith("expert_bias") for k in layer.state_dict())
    layer = MoELayer(DIM, MoEConfig(num_experts=E, expert_dim=EXPERT_DIM, load_balance="bias"))
    assert layer.state_dict()["router.expert_bias"].dtype == torch.float32
    assert torch.equal(layer.state_dict()["router.expert_bias"], torch.zeros(E))


def test_forced_indices_with_bias_and_scale() -> None:
    _, ours = _deepseek(norm=True)
    x = torch.randn(10, DIM)
    forced = torch.randint(0, E, (10, 2))
    ours.router.forced_indices = forced
    route = ours.router(x)
    assert torch.equal(route.indices, forced)
    w = torch.sigmoid(x @ ours.router.gate.weight.t()).gather(1, forced)
    torch.testing.assert_close(route.weights, 2.5 * w / w.sum(-1, keepdim=True))


# ------------------------------------------------------------------------------------------
# Qwen2-MoE: softmax, no re-normalisation, shared expert of its own size behind a sigmoid gate


def test_qwen2_moe_layer_equals_hf() -> None:
    m = _hf("qwen2_moe")
    hf_cfg = m.Qwen2MoeConfig(hidden_size=DIM, moe_intermediate_size=EXPERT_DIM, shared_expert_intermediate_size=40,
                            num_experts=E, num_experts_per_tok=2, norm_topk_prob=False, hidden_act="silu")
    hf = m.Qwen2MoeSparseMoeBlock(hf_cfg).float()
    _randomise(hf, seed=5)
    cfg = MoEConfig(num_experts=E, top_k=2, expert_dim=EXPERT_DIM, num_shared_experts=1, shared_expert_dim=40,
                    shared_expert_gate=True, score_func="softmax", norm_topk_prob=False, grouped_mm="off")
    ours = MoELayer(DIM, cfg)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf.gate.weight)
        ours.shared_expert_gate.weight.copy_(hf.shared_expert_gate.weight)
    _copy_hf_experts(ours, hf.experts)
    _copy_hf_mlp(ours.shared_experts, hf.shared_expert)
    x = torch.randn(4, TOKENS // 4, DIM)
    with torch.no_grad():
        _, hf_weights, hf_indices = hf.gate(x.view(-1, DIM))
        route = ours.router(x.view(-1, DIM))
        expected = hf(x)
        got = ours(x)
    _same_choice(route.indices, hf_indices)
    torch.testing.assert_close(_weights_by_expert(route.indices, route.weights),
                               _weights_by_expert(hf_indices, hf_weights), rtol=0, atol=1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_shared_expert_gate_needs_shared_experts() -> None:
    with pytest.raises(ValueError, match="shared_expert_gate"):
        MoELayer(DIM, MoEConfig(num_experts=E, expert_dim=EXPERT_DIM, shared_expert_gate=True))


# ------------------------------------------------------------------------------------------
# load_balance = "bias" / "none": no balancing loss, a training step still runs


@pytest.mark.parametrize("balance", ["bias", "none"])
def test_no_aux_loss_and_training_step_runs(balance: str) -> None:
    from system.config.model import ModelConfig
    from system.models.model import MoETransformer

    moe_cfg = MoEConfig(num_experts=E, top_k=2, expert_dim=EXPERT_DIM, load_balance=balance, aux_loss_coef=1.0,
                        z_loss_coef=0.0, score_func="sigmoid", num_expert_groups=4, num_limited_groups=2,
                        route_scale=2.0)
    model = MoETransformer(ModelConfig(dim=DIM, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16),
                           moe_cfg)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 16))
    logits = model(tokens)
    for moe in model.moe_layers():
        assert moe.last_stats.aux_loss.item() == 0.0
    aux = model.aux_loss()
    assert aux.item() == 0.0  # z_loss_coef = 0 and no balancing loss
    (F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux).backward()
    router = model.moe_layers()[0].router
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    opt.step()
    if balance == "bias":
        update_expert_bias(model.moe_layers(), [m.last_stats.tokens_per_expert for m in model.moe_layers()])
        assert all(m.router.expert_bias.abs().sum() > 0 for m in model.moe_layers())
        assert not router.expert_bias.requires_grad


# ------------------------------------------------------------------------------------------
# the bias update


def test_bias_step_sign_rule() -> None:
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    bias_step(bias, torch.tensor([10.0, 2.0, 4.0, 0.0]), rate=0.25)  # mean 4
    assert torch.equal(bias, torch.tensor([-0.25, 0.75, -0.5, 0.25]))
    with pytest.raises(ValueError, match="2 MoE layers but 1"):
        update_expert_bias([None, None], [torch.zeros(4)])


GAMMA, STEPS, MICRO, WORLD, ROWS_PER_RANK, SEQ = 0.05, 3, 2, 2, 2, 8


def _bias_layers() -> nn.ModuleList:
    cfg = MoEConfig(num_experts=E, top_k=2, expert_dim=EXPERT_DIM, score_func="sigmoid", load_balance="bias",
                    bias_update_rate=GAMMA, num_expert_groups=4, num_limited_groups=2, grouped_mm="off")
    torch.manual_seed(11)
    layers = nn.ModuleList(MoELayer(DIM, cfg) for _ in range(2))
    for layer in layers:
        layer.init_weights(0.5, 0.1)
    return layers


def _bias_steps(layers: nn.ModuleList, rows: slice) -> list[torch.Tensor]:
    """``STEPS`` steps of ``MICRO`` micro-batches each (forward only; loads accumulated over the
    micro-batches as the trainer does) on ``rows`` of each global batch ``[WORLD * ROWS_PER_RANK, SEQ, d]``;
    returns both layers' biases ``[2, E]`` after every step."""
    g = torch.Generator().manual_seed(23)
    history = []
    for _ in range(STEPS):
        loads = [torch.zeros(E) for _ in layers]
        for _ in range(MICRO):
            x = torch.randn(WORLD * ROWS_PER_RANK, SEQ, DIM, generator=g)[rows]
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    layer(x)  # the same input to both: routing does not depend on expert numerics
                    loads[i] += layer.last_stats.tokens_per_expert
        update_expert_bias(list(layers), loads)
        history.append(torch.stack([layer.router.expert_bias.clone() for layer in layers]))
    return history


MODES = ("ep2", "dp2", "local")


def _bias_worker(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    """Per mode, this rank's bias history: ``ep2`` (experts split over 2 ranks, all-to-all), ``dp2``
    (experts replicated), ``local`` (no ``stats_group``: update_expert_bias sums the counts itself)."""
    from system.distributed import ParallelDims
    from system.parallel import apply_ep

    out = {}
    for mode in MODES:
        layers = _bias_layers()
        if mode != "local":
            ep = 2 if mode == "ep2" else 1
            apply_ep(layers, ParallelDims.from_config(world // ep, ep, world).build_mesh("cpu"))
            assert all(layer.stats_group is not None for layer in layers)
            assert layers[0].experts.w1.shape[0] == E // ep
        out[mode] = _bias_steps(layers, slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK))
    return out


def test_bias_identical_across_ranks_and_equal_to_one_process() -> None:
    reference = _bias_steps(_bias_layers(), slice(None))  # one process, every rank's rows
    assert reference[-1].abs().sum() > 0
    ranks = run_workers(_bias_worker, WORLD)
    for mode in MODES:
        for history in ranks:
            for got, want in zip(history[mode], reference, strict=True):
                assert torch.equal(got, want), mode
