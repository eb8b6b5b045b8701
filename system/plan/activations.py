"""Activation memory of one micro-batch, per transformer block and activation-checkpointing mode, from shapes.

Each block's forward is written out below as the tensors it creates, in the order
:class:`~system.models.model.Block` creates them, with what autograd keeps of each for the backward
pass (found by listing the saved tensors of a block with ``torch.autograd.graph.saved_tensors_hooks``,
fp32 and bf16 autocast). A :class:`Saved` row gives, per token of the micro-batch, the elements of one
tensor, its bytes per element, the op that made it, and whether eager autograd keeps it. Three modes
(``training.activation_checkpoint``, :mod:`system.parallel.ac`):

- ``none``: every row autograd keeps (``eager``);
- ``full``: the block input only (the block is recomputed in its backward);
- ``selective``: the block input and the outputs of :data:`system.parallel.ac.SAVE_OPS`-like ops (matmuls,
  attention, the router's top-k), whether or not eager autograd would keep them (Korthikanti et al.
  2022, sec. 4; TorchTitan's op-level policy, every matmul kept).

Under ``full`` and ``selective`` the backward of a block recomputes it, so one block's eager set is live
again during its backward: :func:`recompute_bytes`.

Token scopes under tensor parallelism with sequence parallelism (:mod:`system.parallel.tp`): the residual
stream and the norms hold ``T / tp`` tokens (``"sp"``); the inputs of the column-parallel linears are
all-gathered (``"full"``: ``T`` tokens, heads or hidden columns already divided by ``tp``); a MoE layer
(router, shared experts, routed copies) runs on the rank's own sequence shard when expert parallelism folds
onto the TP ranks (``T / tp``), and on the all-gathered ``T`` tokens with expert TP (``"moe"``).

Dtypes, as the trainer runs under bf16 autocast (``cb = 2``; everything fp32 when ``cb = 4``): the
residual stream, norm statistics and outputs, the router (run in fp32 on purpose) and the combine of the
expert outputs are fp32; matmul and attention outputs are bf16; each linear reading an fp32 tensor
keeps its own bf16 cast of it (autocast caches casts of weights only).
"""

from __future__ import annotations

from dataclasses import dataclass

from system.config.model import ModelConfig
from system.config.moe import MoEConfig

SAVE_OPS = ("input", "mm", "sdpa", "topk", "grouped_mm")
"""Producers whose outputs ``selective`` keeps (the block input, matmuls, attention, the top-k choice),
mirroring :data:`system.parallel.ac.SAVE_OPS`."""
AC_MODES = ("none", "full", "selective")


@dataclass(frozen=True)
class Saved:
    """One tensor of a block's forward.

    Attributes:
        name: what it is.
        per_token: elements per token of its scope.
        nbytes: bytes per element.
        scope: ``"sp"`` (``T / tp`` tokens), ``"full"`` (``T``) or ``"moe"`` (the tokens the rank's MoE layer
            handles); see the module docstring.
        op: the producer: ``"input"``, ``"mm"``, ``"sdpa"``, ``"topk"``, ``"grouped_mm"`` or ``"other"``.
        eager: autograd keeps it without activation checkpointing.
    """

    name: str
    per_token: float
    nbytes: int
    scope: str
    op: str = "other"
    eager: bool = True


@dataclass(frozen=True)
class ActShape:
    """What one micro-batch of one rank looks like.

    Attributes:
        tokens: ``T``, tokens of the micro-batch of one data stream (``micro_batch x seq_len``).
        seq_len: ``S``.
        tp: tensor-parallel degree (sequence parallel in between).
        routed_split: the MoE layer runs on the rank's sequence shard (EP folded onto ``tp``), not on the
            gathered tokens (expert TP).
        ep: expert-parallel degree (> 1: rows arrive through the all-to-all and are permuted).
        etp: expert tensor-parallel degree (expert hidden columns per rank ``f / etp``).
        cb: bytes per element of the compute dtype (2: bf16 autocast, 4: fp32).
        flash: a fused attention kernel (no ``[S, S]`` probabilities kept).
        grouped_mm: the experts run as ``torch._grouped_mm`` (CUDA, bf16, sm90/sm100) rather than the
            chunked kernel (:mod:`system.moe.swiglu`, CPU and elsewhere).
        chunk_bytes: the chunked kernel's chunk (:func:`system.moe.swiglu.chunk_bytes_for`: 4 MiB on CPU,
            ``None``, one chunk per expert, on CUDA).
    """

    tokens: int
    seq_len: int
    tp: int = 1
    routed_split: bool = True
    ep: int = 1
    etp: int = 1
    cb: int = 4
    flash: bool = True
    grouped_mm: bool = False
    chunk_bytes: int | None = None

    def scope_tokens(self, scope: str) -> float:
        """Tokens a row of ``scope`` holds on one rank."""
        if scope == "sp":
            return self.tokens / self.tp
        if scope == "moe":
            return self.tokens / self.tp if self.routed_split else self.tokens
        return self.tokens


def _linear_inputs(n_linears: int, width: int, cb: int, scope: str, what: str) -> list[Saved]:
    """The inputs ``n_linears`` linears keep of one fp32 tensor ``[T, width]``: the tensor itself in fp32,
    or one bf16 cast per linear under autocast."""
    if cb == 4:
        return [Saved(f"{what} (fp32, read by {n_linears} linear(s))", width, 4, scope)]
    return [Saved(f"{what}, bf16 cast for linear {i + 1} of {n_linears}", width, cb, scope) for i in range(n_linears)]


def _norm(width: int, scope: str, what: str) -> list[Saved]:
    """``nn.RMSNorm`` (composite on CPU and CUDA): keeps ``1/rms`` and ``x * 1/rms`` (for the weight's gradient)."""
    return [Saved(f"{what} 1/rms", 1, 4, scope), Saved(f"{what} x/rms", width, 4, scope)]


def attention_rows(m: ModelConfig, a: ActShape) -> list[Saved]:
    """The attention half of a block: ``x + attention(attention_norm(x))`` (the block input included)."""
    d, cb, tp = m.dim, a.cb, a.tp
    rows = [Saved("block input (residual stream)", d, 4, "sp", "input"), *_norm(d, "sp", "attention_norm")]
    if m.attention_type == "mla":
        rows += _mla_rows(m, a)
    else:
        h, hkv, dh = m.n_heads / tp, (m.n_kv_heads or m.n_heads) / tp, m.attn_head_dim()
        rows += _linear_inputs(3, d, cb, "full", "attention_norm output")
        rows += [
            Saved("wq output", h * dh, cb, "full", "mm", eager=m.qk_norm != "none"),
            Saved("wk output", hkv * dh, cb, "full", "mm", eager=m.qk_norm != "none"),
            Saved("q, rotated (attention input)", h * dh, cb, "full"),
            Saved("k, rotated (attention input)", hkv * dh, cb, "full"),
            Saved("v = wv output (attention input)", hkv * dh, cb, "full", "mm"),
        ]
        if m.qk_norm != "none":  # the norms keep 1/rms and x/rms; their outputs feed the rotation
            rows += [Saved("q/k norm 1/rms", (h + hkv) if m.qk_norm == "head" else 2, 4, "full"),
                     Saved("q/k norm x/rms", (h + hkv) * dh, cb, "full")]
        rows += _attention_core(h, dh, a)
    rows += [Saved("wo output (before the residual add)", d, cb, "full", "mm", eager=False)]
    return rows


def _attention_core(h: float, dv: int, a: ActShape) -> list[Saved]:
    rows = [Saved("attention output", h * dv, a.cb, "full", "sdpa"),
            Saved("attention log-sum-exp", h, 4, "full", "sdpa")]
    if not a.flash:  # the math kernel keeps the [S, S] probabilities of every head
        rows.append(Saved("attention probabilities", h * a.seq_len, a.cb, "full"))
    return rows


def _mla_rows(m: ModelConfig, a: ActShape) -> list[Saved]:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query, compressed key/value latent."""
    d, cb, h = m.dim, a.cb, m.n_heads / a.tp
    qk, rope, nope, dv, c = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_rope_head_dim, m.qk_nope_head_dim, \
        m.v_head_dim, m.kv_lora_rank
    n_in = 2  # wq (or wq_a) and wkv_a read the norm output
    rows = _linear_inputs(n_in, d, cb, "full", "attention_norm output")
    if m.q_lora_rank:
        rows += [Saved("wq_a output", m.q_lora_rank, cb, "full", "mm"), *_norm(m.q_lora_rank, "full", "q_norm"),
                 *_linear_inputs(1, m.q_lora_rank, cb, "full", "q_norm output")]
    rows += [
        Saved("query (wq / wq_b output)", h * qk, cb, "full", "mm", eager=False),
        Saved("wkv_a output (latent + rotary key; kv_norm keeps a view)", c + rope, cb, "full", "mm"),
        *_norm(c, "full", "kv_norm"),
        *_linear_inputs(1, c, cb, "full", "kv_norm output"),
        Saved("wkv_b output (keys, values)", h * (nope + dv), cb, "full", "mm"),
        Saved("q (concatenated, attention input)", h * qk, cb, "full"),
        Saved("k (concatenated, attention input)", h * qk, cb, "full"),
    ]
    return rows + _attention_core(h, dv, a)


def _swiglu_hidden_rows(width_out: int, hidden: float, cb: int, scope: str, what: str) -> list[Saved]:
    """What a SwiGLU ``w2(silu(w1 x) * w3 x)`` keeps past its inputs: ``w1 x`` (silu's input), ``silu(w1 x)`` and
    ``w3 x`` (the product's), the product (``w2``'s input); ``w2``'s output only under selective AC."""
    return [
        Saved(f"{what} w1 output", hidden, cb, scope, "mm"),
        Saved(f"{what} silu(w1 x)", hidden, cb, scope),
        Saved(f"{what} w3 output", hidden, cb, scope, "mm"),
        Saved(f"{what} silu(w1 x) * w3 x (w2 input)", hidden, cb, scope),
        Saved(f"{what} w2 output", width_out, cb, scope, "mm", eager=False),
    ]


def ffn_rows(m: ModelConfig, moe: MoEConfig, a: ActShape, is_moe: bool) -> list[Saved]:
    """The FFN half of a block: ``h + ffn(ffn_norm(h))`` (dense SwiGLU or MoE layer)."""
    d, cb = m.dim, a.cb
    rows = [Saved("h = x + attention (residual stream)", d, 4, "sp"), *_norm(d, "sp", "ffn_norm")]
    # The MoE layer's tokens: the sequence shard (EP on the TP ranks; its router and shared experts are plain
    # modules) or the all-gathered sequence (expert TP).
    if not is_moe:
        return rows + _linear_inputs(2, d, cb, "full", "mlp input") + _swiglu_hidden_rows(d, m.ffn_dim / a.tp, cb,
                                                                                           "full", "mlp")
    k, e, f = moe.top_k, moe.num_experts, moe.expert_dim / a.etp
    rows += [
        Saved("ffn_norm output (router input, fp32)", d, 4, "moe"),
        Saved("router logits (fp32)", e, 4, "moe", "mm"),
        Saved("router scores (fp32)", e, 4, "moe"),
        Saved("top-k indices (int64)", 2 * k, 4, "moe", "topk"),
        Saved("top-k values", k, 4, "moe", "topk", eager=False),
        Saved("combine weights (per token and per routed copy), their sums, log-sum-exp (z-loss)", 2 * k + 3, 4,
              "moe"),
        Saved("token of each routed copy, and the sort order (int64)", 2 * k, 8, "moe"),
        Saved("expert input rows (compute dtype)", k * d, cb, "moe"),
    ]
    if a.ep > 1:
        rows.append(Saved("received rows' expert-major permutation (int64)", k, 8, "moe"))
    if a.grouped_mm:
        rows += [Saved("expert w1 output", k * f, cb, "moe", "grouped_mm"),
                 Saved("expert silu(w1 x)", k * f, cb, "moe"),
                 Saved("expert w3 output", k * f, cb, "moe", "grouped_mm"),
                 Saved("expert w2 input", k * f, cb, "moe"),
                 Saved("expert w2 output", k * d, cb, "moe", "grouped_mm", eager=cb == 4)]
    else:  # the chunked kernel keeps its inputs and both pre-activations; w2 writes with mm(out=): recomputed
        rows += [Saved("expert w1 output", k * f, cb, "moe", "mm"),
                 Saved("expert w3 output", k * f, cb, "moe", "mm"),
                 Saved("expert output", k * d, cb, "moe", eager=cb == 4)]
    rows += [
        Saved("expert output in fp32 (combine input)", k * d, 4, "moe", eager=cb < 4),
        Saved("weighted expert output (index_add source)", k * d, 4, "moe"),
    ]
    shared = moe.shared_hidden_dim()
    if shared:
        rows += _swiglu_hidden_rows(d, shared, cb, "moe", "shared experts")  # not split over tp
        if cb < 4:  # in fp32 they read the router's input, already kept
            rows += _linear_inputs(2, d, cb, "moe", "shared experts input")
    return rows


def block_rows(m: ModelConfig, moe: MoEConfig, a: ActShape, is_moe: bool) -> list[Saved]:
    """Every tensor of one block's forward (:func:`attention_rows` + :func:`ffn_rows`)."""
    return attention_rows(m, a) + ffn_rows(m, moe, a, is_moe)


def rows_bytes(rows: list[Saved], a: ActShape, mode: str) -> float:
    """Bytes one block keeps for its backward under AC ``mode`` (``none``, ``full``, ``selective``).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in AC_MODES:
        raise ValueError(f"training.activation_checkpoint must be one of {AC_MODES}, got {mode!r}")
    total = 0.0
    for r in rows:
        keep = r.eager if mode == "none" else r.op == "input" if mode == "full" else r.op in SAVE_OPS
        if keep:
            total += r.per_token * r.nbytes * a.scope_tokens(r.scope)
    return total


def recompute_bytes(rows: list[Saved], a: ActShape, mode: str) -> float:
    """Bytes live again while one block's backward recomputes it: its eager set beyond what ``mode`` kept
    (0 for ``none``)."""
    if mode == "none":
        return 0.0
    return rows_bytes(rows, a, "none") - rows_bytes([r for r in rows if r.eager], a, mode)


def head_rows(m: ModelConfig, a: ActShape, vocab: int) -> list[Saved]:
    """The last stage's norm, head and loss: ``cross_entropy(output(norm(h)).float())``.

    The step keeps the logits themselves alive until after backward (a local variable); cross-entropy
    keeps its fp32 log-softmax. With tensor parallelism (loss parallel) both are vocabulary shards.
    """
    v = vocab / a.tp
    return [
        Saved("last block output", m.dim, 4, "sp"),
        *_norm(m.dim, "sp", "final norm"),
        *_linear_inputs(1, m.dim, a.cb, "full", "final norm output"),
        Saved("logits", v, a.cb, "full"),
        Saved("log-softmax (fp32)", v, 4, "full"),
    ]


def loss_backward_bytes(a: ActShape, vocab: int) -> float:
    """Transient bytes of the loss's backward at the head: the fp32 gradients of the log-softmax output and
    of the logits, and their cast to the compute dtype (``[T, V / tp]`` each)."""
    return a.tokens * vocab / a.tp * (4 + 4 + (a.cb if a.cb < 4 else 0))


def embedding_rows(a: ActShape) -> list[Saved]:
    """The first stage's embedding: it keeps the token ids (int64) for its weight's gradient."""
    return [Saved("token ids (int64)", 1, 8, "full")]


def exchange_bytes(moe: MoEConfig, m: ModelConfig, a: ActShape) -> float:
    """One MoE layer's all-to-all buffers under expert parallelism (or FSSDP): the routed rows as sent and as
    received, fp32 ``[T k, d]`` each (the dispatch moves the norm's fp32 output); 0 without an exchange."""
    return 2 * a.scope_tokens("moe") * moe.top_k * m.dim * 4 if a.ep > 1 else 0.0


def expert_kernel_workspace(moe: MoEConfig, m: ModelConfig, a: ActShape) -> float:
    """Transient bytes of the routed experts' backward, in the compute dtype.

    The chunked kernel (:mod:`system.moe.swiglu`) allocates a ``[4, rows, f]`` workspace, ``rows`` the chunk
    (``chunk_bytes`` of ``[rows, f]``; all the rank's routed rows when ``chunk_bytes`` is None, as on CUDA);
    ``torch._grouped_mm`` under autograd makes the gradients of ``w1 x``, ``w3 x`` and the ``w2`` input,
    ``[T k, f]`` each.
    """
    rows = a.scope_tokens("moe") * moe.top_k
    f = moe.expert_dim / a.etp
    if a.grouped_mm:
        return 3 * rows * f * a.cb
    chunk = rows if a.chunk_bytes is None else max(1, a.chunk_bytes // int(f * a.cb))
    return 4 * min(chunk, rows) * f * a.cb


def block_backward_bytes(moe: MoEConfig, m: ModelConfig, a: ActShape, is_moe: bool) -> float:
    """Transient bytes of one block's backward besides its parameters' gradients: for a MoE block the
    experts' workspace (:func:`expert_kernel_workspace`), the gradients of the routed rows (fp32 ``[T k, d]``,
    two at a time: the combine's and the experts' input's) and the all-to-all buffers (:func:`exchange_bytes`);
    for a dense block the gradients of the FFN's hidden activations (``[T, f / tp]``, three at a time)."""
    if not is_moe:
        return 3 * a.tokens * m.ffn_dim / a.tp * a.cb
    rows = a.scope_tokens("moe") * moe.top_k
    return expert_kernel_workspace(moe, m, a) + 2 * rows * m.dim * 4 + exchange_bytes(moe, m, a)
