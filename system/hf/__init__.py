"""Hugging Face MoE checkpoints (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3) in and out.

- :mod:`system.hf.config`: a folder's ``config.json`` as our ``[model]``/``[moe]`` sections; fields we
  cannot honour are refused by name.
- :mod:`system.hf.weights`: where each of our tensors lies in the shards (byte ranges, per expert), read
  in place (``preadv`` into each rank's shard; mmap views for the serving engine).
- :mod:`system.hf.export`: our config and tensors as a folder ``transformers`` loads (sharded safetensors
  with an index, ``config.json``, ``generation_config.json``, tokenizer files).
- :mod:`system.hf.convert`: ``moesys ckpt import-hf`` and ``moesys ckpt export --format hf``.
"""
