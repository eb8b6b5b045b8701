"""Tests for ``system.data``: tokenizers, corpora, token streams and the packed loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from system.data import (
    ByteTokenizer,
    Corpus,
    HFTokenizer,
    PackedLoader,
    build_tokenizer,
    byte_unigram_entropy,
    load_corpus,
    tokenize_docs,
)
from system.data.corpus import CorpusNotFoundError, split_text_tail
from system.data.tokenizer import TokenizerNotFoundError
from system.errors import DataError, MoesysError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO_ROOT.parent / "shared/data/tinyshakespeare.txt"


# ------------------------------------------------------------------------------------------
# tokenizers


def test_byte_tokenizer_round_trip_non_ascii() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld — 日本語 🙂\n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    arr = tok.encode_to_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids
    assert tok.decode(ids) == text
    assert tok.decode(arr) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256 and tok.name == "byte"


def test_byte_tokenizer_decode_ignores_eos_and_replaces_bad_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([104, 256, 105, 256]) == "hi"
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    assert tok.encode("") == [] and tok.encode_to_array("").shape == (0,)


def _train_bpe(path: Path, special: list[str]) -> Path:
    """A tiny byte-level BPE tokenizer trained in memory and saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = ["the quick brown fox jumps over the lazy dog", "hello world", "the the the fox fox"] * 20
    tk.train_from_iterator(lines, trainer=trainer)
    tk.save(str(path))
    return path


def test_hf_tokenizer_bpe_with_eos_token(tmp_path: Path) -> None:
    path = _train_bpe(tmp_path / "tokenizer.json", ["<|endoftext|>"])
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 0  # first special token
    assert tok.vocab_size == tok._tok.get_vocab_size(with_added_tokens=True)
    text = "the quick fox says héllo 🙂"
    ids = tok.encode(text)
    assert len(ids) < len(text.encode("utf-8"))  # merges happened
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text
    arr = tok.encode_to_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids
    stream = tokenize_docs(["hello world", "the fox"], tok)
    assert stream.dtype == np.uint16
    assert stream.tolist() == tok.encode("hello world") + [tok.eos_id] + tok.encode("the fox") + [tok.eos_id]


def test_hf_tokenizer_without_eos_token_gets_new_id(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "wl.json"
    tk.save(str(path))
    tok = HFTokenizer(path)
    assert tok.eos_id == 3 and tok.vocab_size == 4
    assert tok.encode("hello world foo") == [1, 2, 0]
    assert tokenize_docs(["hello", "world hello"], tok).tolist() == [1, 3, 2, 1, 3]
    assert "hello" in tok.decode([1, 3, 2])


def test_build_tokenizer_errors(tmp_path: Path) -> None:
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_tokenizer(str(missing))
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer("")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        HFTokenizer(bad)


# ------------------------------------------------------------------------------------------
# corpora


def test_embedded_corpus_is_nontrivial_deterministic_and_disjoint() -> None:
    c1 = load_corpus("")
    c2 = load_corpus("", val_fraction=0.02)
    assert c1.name == "stdlib"
    assert c1.train_bytes > 1_000_000
    assert len(c1.val_docs) >= 1 and len(c1.train_docs) >= 1
    assert c1.train_docs == c2.train_docs and c1.val_docs == c2.val_docs
    n = len(c1.train_docs) + len(c1.val_docs)
    assert len(c1.val_docs) <= max(1, 0.1 * n)  # roughly val_fraction of files
    # split by file: no validation file is also a training file
    assert not set(c1.val_docs) & set(c1.train_docs) - {""}
    # mutating one result does not affect later loads (cache returns fresh lists)
    c1.train_docs.clear()
    assert len(load_corpus("").train_docs) == len(c2.train_docs)
    # Python source has a byte entropy well below uniform (8 bits)
    h = byte_unigram_entropy(c2.val_docs)
    assert 3.0 < h < 6.0


def test_embedded_corpus_tokenizes_whole() -> None:
    c = load_corpus("")
    stream = tokenize_docs(c.train_docs, ByteTokenizer())
    assert stream.dtype == np.uint16
    assert len(stream) == c.train_bytes + len(c.train_docs)
    assert int((stream == 256).sum()) == len(c.train_docs)


def test_text_file_corpus_splits_tail_at_newline(tmp_path: Path) -> None:
    lines = [f"line {i:04d} of the text\n" for i in range(1000)]
    text = "".join(lines)
    p = tmp_path / "book.txt"
    p.write_text(text, encoding="utf-8")
    c = load_corpus(str(p), val_fraction=0.1)
    assert c.name == "book.txt"
    assert len(c.train_docs) == 1 and len(c.val_docs) == 1
    assert c.train_docs[0] + c.val_docs[0] == text
    assert c.train_docs[0].endswith("\n")  # cut at a line boundary
    assert c.val_docs[0].startswith("line ")
    assert abs(len(c.val_docs[0]) / len(text) - 0.1) < 0.01
    assert load_corpus(str(p), val_fraction=0.1) == c


def test_split_text_tail_without_newline() -> None:
    train, val = split_text_tail("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")
    train, val = split_text_tail("ab", 0.01)
    assert (train, val) == ("a", "b")
    with pytest.raises(ValueError, match="1 characters"):
        split_text_tail("a", 0.5)


def test_directory_corpus(tmp_path: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub" / "deeper").mkdir(parents=True)
    texts = {}
    for i in range(40):
        rel = f"sub/f{i:02d}.txt" if i % 2 else f"sub/deeper/g{i:02d}.md"
        texts[rel] = f"document {i}\n" * (i + 1)
        (root / rel).write_text(texts[rel], encoding="utf-8")
    (root / "blob.bin").write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]) * 10)  # binary: skipped
    c = load_corpus(str(root), val_fraction=0.2)
    assert c.name == "docs"
    assert sorted(c.train_docs + c.val_docs) == sorted(texts.values())
    assert len(c.val_docs) >= 1 and len(c.train_docs) >= 1
    assert not set(c.train_docs) & set(c.val_docs)
    again = load_corpus(str(root), val_fraction=0.2)
    assert again.train_docs == c.train_docs and again.val_docs == c.val_docs
    # training documents keep sorted-relative-path order
    order = [texts[k] for k in sorted(texts)]
    assert c.train_docs == [d for d in order if d in set(c.train_docs)]


def test_directory_split_guarantees_both_sides(tmp_path: Path) -> None:
    root = tmp_path / "two"
    root.mkdir()
    (root / "a.txt").write_text("alpha\n")
    (root / "b.txt").write_text("beta\n")
    for vf in (0.001, 0.999):
        c = load_corpus(str(root), val_fraction=vf)
        assert len(c.train_docs) == 1 and len(c.val_docs) == 1


def test_jsonl_corpus_and_missing_text(tmp_path: Path) -> None:
    p = tmp_path / "data.jsonl"
    rows = [{"text": f"record number {i} ü", "id": i} for i in range(50)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    c = load_corpus(str(p), val_fraction=0.2)
    assert sorted(c.train_docs + c.val_docs) == sorted(r["text"] for r in rows)
    assert 1 <= len(c.val_docs) < 25
    assert load_corpus(str(p), val_fraction=0.2) == c

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(ValueError, match="line 2 has no 'text'"):
        load_corpus(str(bad))
    notjson = tmp_path / "broken.jsonl"
    notjson.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_corpus(str(notjson))


def test_corpus_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing_corpus.txt"
    with pytest.raises(FileNotFoundError, match="missing_corpus.txt"):
        load_corpus(str(missing))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no documents"):
        load_corpus(str(empty_dir))
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(str(empty_file))
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        load_corpus(str(empty_jsonl))
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus("", val_fraction=0.0)


def test_bad_tokenizer_files_are_data_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerNotFoundError, match="nope.json") as info:
        build_tokenizer(str(missing))
    assert isinstance(info.value, (DataError, FileNotFoundError, MoesysError))
    with pytest.raises(DataError, match="has no tokenizer.json"):  # a folder is a Hugging Face model folder
        build_tokenizer(str(tmp_path))
    for name, data, needle in (("bad.json", b"{not json", "cannot load"), ("bin.json", b"\xff\xfe\x00", "not UTF-8"),
                               ("list.json", b"[1, 2]", "cannot load")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=needle) as info:
            build_tokenizer(str(tmp_path / name))
        assert name in str(info.value)
    with pytest.raises(DataError, match="empty"):
        build_tokenizer("  ")


def test_bad_corpus_inputs_are_data_errors_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "gone.txt")
    with pytest.raises(CorpusNotFoundError, match="gone.txt.*does not exist"):
        load_corpus(str(dangling))
    links = tmp_path / "links"
    links.mkdir()
    (links / "a.txt").symlink_to(tmp_path / "gone.txt")
    with pytest.raises(DataError, match=r"no documents .*symbolic link.*a\.txt"):
        load_corpus(str(links))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"no documents .*non-UTF-8/binary.*latin1\.txt"):
        load_corpus(str(binary))
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_corpus(str(binary / "latin1.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no documents .*holds no files"):
        load_corpus(str(empty))
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(DataError, match="one.txt.*1 character"):
        load_corpus(str(one))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match="bad.jsonl is not UTF-8"):
        load_corpus(str(jsonl))
    # a file that cannot be opened (tests may run as root, for whom chmod 000 does not stop a read)
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.txt").write_text("alpha\n")
    (good / "locked.txt").write_text("beta\n")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match="locked.txt.*cannot be read: Permission denied"):
        load_corpus(str(good))


def test_corpus_byte_counts() -> None:
    c = Corpus(name="x", train_docs=["ab", "é"], val_docs=["日"])
    assert c.train_bytes == 4 and c.val_bytes == 3


def test_byte_unigram_entropy_known_distributions() -> None:
    assert byte_unigram_entropy(["abab"]) == pytest.approx(1.0)
    assert byte_unigram_entropy(["aaaa"]) == pytest.approx(0.0)
    assert byte_unigram_entropy(["ab", "cd"]) == pytest.approx(2.0)
    # p = (1/2, 1/4, 1/4) -> 1.5 bits
    assert byte_unigram_entropy(["aabc"]) == pytest.approx(1.5)
    assert byte_unigram_entropy(["".join(chr(i) for i in range(128))]) == pytest.approx(7.0)
    with pytest.raises(ValueError, match="0 bytes"):
        byte_unigram_entropy(["", ""])


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"tiny Shakespeare not present at {SHAKESPEARE}")
def test_tinyshakespeare_text_corpus() -> None:
    c = load_corpus(str(SHAKESPEARE), val_fraction=0.1)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert c.train_docs[0] + c.val_docs[0] == text
    assert c.train_docs[0].endswith("\n")
    assert abs(c.val_bytes / (c.train_bytes + c.val_bytes) - 0.1) < 0.01
    h = byte_unigram_entropy(c.train_docs)
    assert 4.0 < h < 5.0  # English text: ~4.5 bits per byte
    stream = tokenize_docs(c.train_docs, ByteTokenizer())
    loader = PackedLoader(stream, seq_len=128, batch_size=4)
    x, y = loader.next_batch()
    assert x.shape == (4, 128) and int(x.max()) < 256


# ------------------------------------------------------------------------------------------
# token streams


def test_tokenize_docs_inserts_eos_after_each_document() -> None:
    tok = ByteTokenizer()
    stream = tokenize_docs(["ab", "", "é"], tok)
    assert stream.dtype == np.uint16
    assert stream.tolist() == [97, 98, 256, 256, 0xC3, 0xA9, 256]
    assert tokenize_docs([], tok).shape == (0,)


# ------------------------------------------------------------------------------------------
# packed loader


def _stream(n: int = 10_000) -> np.ndarray:
    """A stream where token i == i (mod 60000): windows are easy to locate."""
    return (np.arange(n) % 60_000).astype(np.uint16)


def _window_ids(inputs: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row of ``inputs`` from a :func:`_stream` stream."""
    return [int(row[0]) // seq_len for row in inputs]


def test_loader_shapes_dtypes_and_shift() -> None:
    tokens = _stream()
    loader = PackedLoader(tokens, seq_len=16, batch_size=4, seed=3)
    x, y = loader.next_batch()
    assert x.shape == (4, 16) and y.shape == (4, 16)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)  # stream is arange
    assert all(int(r[0]) % 16 == 0 for r in x)  # windows start on seq_len boundaries
    assert loader.tokens_per_batch == 64
    assert loader.num_windows == (len(tokens) - 1) // 16


def test_loader_window_packing_shares_one_token() -> None:
    tokens = _stream(33)  # exactly 2 windows of 16 (+1)
    loader = PackedLoader(tokens, seq_len=16, batch_size=2, shuffle=False)
    x, y = loader.next_batch()
    assert x[0].tolist() == list(range(0, 16)) and y[0].tolist() == list(range(1, 17))
    assert x[1].tolist() == list(range(16, 32)) and y[1].tolist() == list(range(17, 33))


def test_loader_rank_shards_disjoint_and_concatenate_to_single_process() -> None:
    tokens = _stream(20_000)
    world, bs, seq = 4, 3, 8
    single = PackedLoader(tokens, seq_len=seq, batch_size=bs * world, seed=7)
    ranks = [PackedLoader(tokens, seq_len=seq, batch_size=bs, rank=r, world_size=world, seed=7) for r in range(world)]
    for _ in range(5):
        xs, ys = zip(*(ld.next_batch() for ld in ranks))
        sx, sy = single.next_batch()
        assert torch.equal(torch.cat(xs), sx) and torch.equal(torch.cat(ys), sy)
        ids = [set(_window_ids(x, seq)) for x in xs]
        for i in range(world):
            for j in range(i + 1, world):
                assert not ids[i] & ids[j]
    assert all(ld.state_dict() == single.state_dict() for ld in ranks)


def test_loader_deterministic_across_instances_and_seeds() -> None:
    tokens = _stream()
    a = PackedLoader(tokens, seq_len=10, batch_size=5, seed=1)
    b = PackedLoader(tokens, seq_len=10, batch_size=5, seed=1)
    c = PackedLoader(tokens, seq_len=10, batch_size=5, seed=2)
    batches_a = [a.next_batch()[0] for _ in range(3)]
    batches_b = [b.next_batch()[0] for _ in range(3)]
    batches_c = [c.next_batch()[0] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(batches_a, batches_b))
    assert not all(torch.equal(p, q) for p, q in zip(batches_a, batches_c))


def test_loader_epoch_rollover_drops_remainder_and_reshuffles() -> None:
    seq, bs = 4, 3
    tokens = _stream(10 * seq + 1)  # 10 windows -> 3 batches per epoch, 1 window dropped
    loader = PackedLoader(tokens, seq_len=seq, batch_size=bs, seed=0)
    assert loader.num_windows == 10 and loader.steps_per_epoch == 3
    epoch0 = [w for _ in range(3) for w in _window_ids(loader.next_batch()[0], seq)]
    assert len(set(epoch0)) == 9 and set(epoch0) <= set(range(10))
    assert loader.state_dict() == {"epoch": 0, "position": 9}
    epoch1 = [w for _ in range(3) for w in _window_ids(loader.next_batch()[0], seq)]
    assert loader.state_dict() == {"epoch": 1, "position": 9}
    assert len(set(epoch1)) == 9
    assert epoch0 != epoch1  # a new permutation
    it = iter(loader)
    next(it)
    assert loader.state_dict() == {"epoch": 2, "position": 3}


def test_loader_no_shuffle_is_in_order() -> None:
    seq = 5
    loader = PackedLoader(_stream(), seq_len=seq, batch_size=4, shuffle=False)
    ids = [w for _ in range(3) for w in _window_ids(loader.next_batch()[0], seq)]
    assert ids == list(range(12))


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_resume_equals_uninterrupted(world_size: int) -> None:
    tokens = _stream(300)  # 42 windows: 8 (world 1) or 4 (world 2) steps per epoch
    kw = dict(seq_len=7, batch_size=5, world_size=world_size, rank=world_size - 1, seed=11)
    ref = PackedLoader(tokens, **kw)
    expected = [ref.next_batch() for _ in range(40)]  # crosses several epochs
    assert ref.state_dict()["epoch"] >= 2

    first = PackedLoader(tokens, **kw)
    got = [first.next_batch() for _ in range(17)]
    state = first.state_dict()
    assert set(state) == {"epoch", "position"} and all(type(v) is int for v in state.values())
    resumed = PackedLoader(tokens, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    got += [resumed.next_batch() for _ in range(23)]
    for (ex, ey), (gx, gy) in zip(expected, got, strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_loader_errors() -> None:
    tokens = _stream(100)
    with pytest.raises(ValueError, match=r"100 tokens give 9 windows.*= 10 windows"):
        PackedLoader(tokens, seq_len=11, batch_size=10)
    with pytest.raises(ValueError, match="world_size=2"):
        PackedLoader(tokens, seq_len=10, batch_size=5, world_size=2)
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        PackedLoader(tokens, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        PackedLoader(tokens, seq_len=4, batch_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        PackedLoader(tokens, seq_len=4, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\), got -1"):
        PackedLoader(tokens, seq_len=4, batch_size=1, rank=-1)
    with pytest.raises(ValueError, match="1-D"):
        PackedLoader(tokens.reshape(10, 10), seq_len=4, batch_size=1)
    loader = PackedLoader(tokens, seq_len=4, batch_size=1)
    with pytest.raises(ValueError, match="'position'"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match=r"position must be in \[0, 24\], got 99"):
        loader.load_state_dict({"epoch": 0, "position": 99})


def test_loader_accepts_int32_streams() -> None:
    tokens = np.arange(1000, dtype=np.int32) + 70_000
    x, y = PackedLoader(tokens, seq_len=8, batch_size=2).next_batch()
    assert x.dtype == torch.int64 and int(x.min()) >= 70_000
    assert math.isclose(float((y - x).float().mean()), 1.0)
