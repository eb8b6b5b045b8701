"""Worker side of the distributed Hugging Face load tests (imports no ``transformers``: spawned ranks start fast)."""

from __future__ import annotations

import torch


def our_model(path):
    """Our :class:`~system.models.model.MoETransformer` of the Hugging Face folder ``path`` (random init)."""
    from system.hf.config import read_hf_config
    from system.models.model import MoETransformer

    hf = read_hf_config(path)
    return MoETransformer(hf.model, hf.moe)


def expected_bytes(path, model) -> int:
    """Bytes a rank must read to fill ``model``'s local tensors (the experts it holds, its dense shards)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from system.checkpoint.model_io import open_weights
    from system.parallel.layout import has_layout, layout_of

    reader = open_weights(model, path)
    params = dict(model.named_parameters())
    total = 0
    for name, t in model.state_dict().items():
        lay = layout_of(params[name]) if name in params and has_layout(params[name]) else None
        if lay is not None and lay.rows is not None:
            owned = lay.rows.owned()
            prefix = name.rpartition(".")[0]
            for wname, _ in lay.rows.layout:
                total += sum(reader.sources[f"{prefix}.{wname}"].pieces[e].nbytes for e in owned)
            continue
        if name not in reader:
            continue
        src = reader.sources[name]
        if lay is not None and lay.offsets is not None:
            total += sum(p.nbytes for p in src.pieces[lay.offsets[0]: lay.offsets[0] + t.shape[0]])
        elif isinstance(t, DTensor) and t.dim():
            shape, _ = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
            total += src.nbytes // src.shape[0] * shape[0]
        else:
            total += src.nbytes
    reader.close()
    return total


def distributed_logits(rank: int, world: int, cases: list[tuple[str, str, str]], tokens) -> dict:
    """For each ``(family, layout, path)``: build the model with a per-rank random init, parallelise it
    (``ep``: EP=2; ``fssdp``: FSSDP over 2 ranks; ``fsdp``: FSDP2 dense, dp=2), load the HF weights,
    and return the logits of ``tokens``, the bytes read and the bytes this rank holds."""
    from system.checkpoint.model_io import load_model
    from system.config.fssdp import FSSDPConfig
    from system.config.parallel import ParallelConfig
    from system.distributed import ParallelDims
    from system.models.parallelize import parallelize_model

    out = {}
    for family, layout, path in cases:
        par = {"ep": ParallelConfig(dp=1, ep=2), "fssdp": ParallelConfig(dp=2, ep=1, expert_mode="fssdp"),
               "fsdp": ParallelConfig(dp=2, ep=1, dense="fsdp")}[layout]
        mesh = ParallelDims.from_config(par.dp, par.ep, world).build_mesh("cpu")
        model = our_model(path)
        model.init_weights(seed=100 + rank)  # ranks differ: only the load can make them agree
        fssdp = parallelize_model(model, mesh, par, fssdp=FSSDPConfig(ranks_per_node=2) if layout == "fssdp" else None)
        nbytes = load_model(model, path)
        model.eval()
        if fssdp is not None:
            fssdp.begin_step()
        with torch.no_grad():
            logits = model(tokens)
        out[(family, layout)] = {"logits": logits, "bytes": nbytes, "expected": expected_bytes(path, model)}
    return out
