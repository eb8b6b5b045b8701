"""Hugging Face MoE families computed by our decoder equal ``transformers`` (tiny random models, fp32).

Per family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3): the checkpoint ``save_pretrained``
wrote is read in place (:func:`system.checkpoint.model_io.load_model`) into one process, under expert
parallelism (EP=2), FSSDP on 2 ranks and FSDP2 dense parameters (dp=2), and our logits equal
``transformers``' on the same tokens. Each rank reads exactly the bytes of what it holds: counted.
"""

from __future__ import annotations

import pytest
import torch

from _dist import run_workers
from hf_tiny import FAMILIES, VOCAB, hf_logits, save_model

ATOL = 1e-4


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def _our_model(path):
    from system.hf.config import read_hf_config
    from system.models.model import MoETransformer

    hf = read_hf_config(path)
    return MoETransformer(hf.model, hf.moe)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: save_model(fam, root / fam, seed=i) for i, fam in enumerate(FAMILIES)}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family, hf_dirs):
    from system.checkpoint.model_io import load_model

    path = hf_dirs[family]
    model = _our_model(path)
    nbytes = load_model(model, path)
    tokens = _tokens()
    with torch.no_grad():
        ours = model.eval()(tokens)
    ref = hf_logits(path, tokens)
    assert (ours - ref).abs().max().item() <= ATOL
    files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert 0.95 * files < nbytes <= files  # every tensor once (the headers are not counted)


@pytest.mark.parametrize("family,dtype", [("mixtral", torch.bfloat16), ("deepseek_v3", torch.bfloat16),
                                          ("qwen3_moe", torch.float16)])
def test_half_precision_and_sharded_checkpoints(family, dtype, tmp_path):
    """bf16 and fp16 weights and an index with several shards read the same as transformers reads them."""
    from system.checkpoint.model_io import load_model

    path = save_model(family, tmp_path / family, dtype=dtype, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 2
    model = _our_model(path)
    load_model(model, path)
    tokens = _tokens(1)
    with torch.no_grad():
        ours = model.eval()(tokens)
    assert (ours - hf_logits(path, tokens)).abs().max().item() <= ATOL


LAYOUTS = ("ep", "fssdp", "fsdp")
DIST_FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3")


def test_distributed_load_reads_only_owned_bytes(hf_dirs):
    """EP=2, FSSDP on 2 ranks, FSDP2 dp=2: logits equal transformers' and each rank read exactly the bytes
    of what it holds (one set of 2 processes runs every family and layout)."""
    from hf_dist import distributed_logits

    cases = [(fam, layout, str(hf_dirs[fam])) for fam in DIST_FAMILIES for layout in LAYOUTS]
    tokens = _tokens(2)
    results = run_workers(distributed_logits, 2, cases, tokens)
    for fam, layout, path in cases:
        ref = hf_logits(path, tokens)
        files = sum(f.stat().st_size for f in hf_dirs[fam].glob("*.safetensors"))
        for rank in (0, 1):
            r = results[rank][(fam, layout)]
            assert (r["logits"] - ref).abs().max().item() <= ATOL, (fam, layout, rank)
            assert r["bytes"] == r["expected"], (fam, layout, rank)
        assert max(results[rank][(fam, layout)]["bytes"] for rank in (0, 1)) < 0.9 * files, (fam, layout)


ROPE_CASES = [
    ("deepseek_v3", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}),
    ("mixtral", {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}),
    ("mixtral", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ("qwen3_moe", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64}),
]


@pytest.mark.parametrize("legacy", [False, True], ids=["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("family,rope", ROPE_CASES, ids=[f"{f}-{r['rope_type']}" for f, r in ROPE_CASES])
def test_rope_scaling_equals_transformers(family, rope, legacy, tmp_path):
    """Linear, YaRN (with DeepSeek's mscale) and Llama-3 rotary scaling, over 200 positions (past the
    original 64), as transformers 5 writes them (``rope_parameters``) and as older configs on the hub do
    (``rope_theta`` + ``rope_scaling`` with ``type``)."""
    import json

    from system.checkpoint.model_io import load_model

    path = save_model(family, tmp_path / "m", rope_parameters=dict(rope))
    if legacy:
        cfg = json.loads((path / "config.json").read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        params["type"] = params.pop("rope_type")
        cfg["rope_scaling"] = params
        (path / "config.json").write_text(json.dumps(cfg))
    model = _our_model(path)
    load_model(model, path)
    tokens = torch.randint(0, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.eval()(tokens)
    assert (ours - hf_logits(path, tokens)).abs().max().item() <= ATOL
