"""Data: corpora, tokenizers and the packed, rank-sharded loader.

- :func:`load_corpus` reads a text file, a directory, a JSONL file, or (``""``) the embedded
  corpus (the running interpreter's standard-library ``.py`` sources) into a :class:`Corpus`
  with a deterministic train/validation split.
- :func:`build_tokenizer` gives a :class:`ByteTokenizer` (``"byte"``) or an :class:`HFTokenizer`
  (path to a Hugging Face ``tokenizer.json`` or model folder); :func:`tokenizer_from_folder` finds a
  model folder's tokenizer and its BOS/EOS ids.
- :func:`tokenize_docs` turns documents into one token stream with EOS after each document.
- :class:`PackedLoader` packs the stream into ``seq_len`` windows and serves resumable,
  rank-sharded ``(inputs, targets)`` int64 batches.
"""

from system.data.corpus import Corpus, byte_unigram_entropy, load_corpus
from system.data.loader import PackedLoader, tokenize_docs
from system.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, tokenizer_from_folder

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "PackedLoader",
    "build_tokenizer",
    "byte_unigram_entropy",
    "load_corpus",
    "tokenize_docs",
    "tokenizer_from_folder",
]
