"""CPT data: tokenization, the concatenated token stream, packing and corpus building."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets
import pytest
import torch
from pydoc_data.topics import topics

from satrun.config import DataConfig
from satrun.data import build_corpus
from satrun.data.cpt import pack, token_stream, tokenize_documents
from satrun.data.sources import load_raw
from satrun.errors import UsageError


def _paragraphs(n: int, chars: int = 300) -> list[str]:
    """``n`` distinct one-line paragraphs of real English text (Python's help topics)."""
    seen: list[str] = []
    for key in sorted(topics):
        text = " ".join(topics[key].split())[:chars].strip()
        if len(text) > 40 and text not in seen:
            seen.append(text)
        if len(seen) == n:
            return seen
    raise AssertionError("not enough help topics")


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def _expected_stream(tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for doc in docs:
        out += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("seq_len", [7, 11, 32, 100, 1000])
def test_packed_blocks_are_the_concatenated_stream(tokenizer, seq_len):
    docs = [" ".join(topics[k].split())[: 150 + 40 * i] for i, k in enumerate(sorted(topics)[:5])]
    ds = datasets.Dataset.from_dict({"text": docs})
    tokenized = tokenize_documents(ds, tokenizer, fingerprint=_fingerprint("test_cpt", tokenizer.eos_token_id, *docs))
    assert len(tokenized) == len(docs)

    expected = _expected_stream(tokenizer, docs)
    stream = token_stream(tokenized)
    assert stream.dtype == torch.int64 and stream.dim() == 1
    assert stream.tolist() == expected
    # Each document ends with exactly one EOS, and there is no BOS.
    assert int((stream == tokenizer.eos_token_id).sum()) == len(docs)
    if tokenizer.bos_token_id is not None:
        assert tokenizer.bos_token_id not in stream.tolist()

    full, tail = divmod(len(expected), seq_len)

    blocks = pack(stream, seq_len, keep_tail=False)
    assert len(blocks) == full
    assert all(b.numel() == seq_len for b in blocks)
    assert [t for b in blocks for t in b.tolist()] == expected[: full * seq_len]

    with_tail = pack(stream, seq_len, keep_tail=True)
    assert len(with_tail) == full + (1 if tail else 0)
    assert all(b.numel() == seq_len for b in with_tail[:full])
    if tail:
        assert with_tail[-1].numel() == tail
    assert [t for b in with_tail for t in b.tolist()] == expected


def test_pack_exact_multiple_has_no_empty_tail():
    stream = torch.arange(12, dtype=torch.long)
    for keep_tail in (False, True):
        blocks = pack(stream, 4, keep_tail=keep_tail)
        assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert pack(stream, 20, keep_tail=False) == []
    assert [b.tolist() for b in pack(stream, 20, keep_tail=True)] == [list(range(12))]


def _split_docs(stream: list[int], eos: int) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """Complete EOS-terminated pieces of ``stream``, and the unterminated remainder."""
    pieces, current = [], []
    for t in stream:
        if t == eos:
            pieces.append(tuple(current))
            current = []
        else:
            current.append(t)
    return pieces, tuple(current)


def test_build_corpus_cpt_text_paragraphs(tokenizer, tmp_path: Path):
    paragraphs = _paragraphs(20)
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    cfg = DataConfig(name="text", format="text", path=str(path), sample_by="paragraph", eval_fraction=0.25)
    seq_len, seed = 48, 7

    raw_docs = list(load_raw(cfg, "cpt")["text"])
    assert sorted(d.strip() for d in raw_docs) == sorted(paragraphs)

    corpus = build_corpus(cfg, "cpt", tokenizer, seq_len=seq_len, micro_batch_size=2, seed=seed)
    assert corpus.pad_id == tokenizer.pad_token_id
    assert corpus.train and corpus.eval
    for ids, labels in corpus.train + corpus.eval:
        assert ids.dtype == torch.long and ids.dim() == 1
        assert torch.equal(ids, labels)
    assert all(ids.numel() == seq_len for ids, _ in corpus.train)
    assert all(ids.numel() == seq_len for ids, _ in corpus.eval[:-1])
    assert 0 < corpus.eval[-1][0].numel() <= seq_len

    eos = tokenizer.eos_token_id
    doc_of = {tuple(tokenizer(d, add_special_tokens=False).input_ids): d for d in raw_docs}
    assert len(doc_of) == len(raw_docs)

    # Held-out: the tail is kept, so the eval stream is whole documents, each ending in EOS.
    eval_stream = torch.cat([ids for ids, _ in corpus.eval]).tolist()
    eval_pieces, eval_rest = _split_docs(eval_stream, eos)
    assert eval_rest == ()
    assert all(p in doc_of for p in eval_pieces), "an eval piece is not a whole document"
    eval_docs = {doc_of[p] for p in eval_pieces}
    assert len(eval_docs) == len(eval_pieces) == round(0.25 * len(raw_docs))

    # Training: whole documents, then possibly the start of one whose tail was dropped.
    train_stream = torch.cat([ids for ids, _ in corpus.train]).tolist()
    train_pieces, train_rest = _split_docs(train_stream, eos)
    assert all(p in doc_of for p in train_pieces), "a training piece is not a whole document"
    train_docs = {doc_of[p] for p in train_pieces}
    if train_rest:
        starts = [d for toks, d in doc_of.items() if toks[: len(train_rest)] == train_rest]
        assert starts, "the training stream ends with something that is not a document's start"
        train_docs |= set(starts) if len(starts) == 1 else set()
    dropped = sum(len(toks) + 1 for toks, d in doc_of.items() if d not in eval_docs) - len(train_stream)
    assert 0 <= dropped < seq_len

    assert not eval_docs & train_docs, "a document is split between training and held-out data"
    assert len(train_pieces) + len(eval_pieces) <= len(raw_docs)
    assert len(train_pieces) >= len(raw_docs) - len(eval_docs) - 2  # at most the tail's documents are dropped

    # The same, seen as text: each held-out block decodes to held-out content only.
    eval_text = tokenizer.decode(eval_stream)
    train_text = tokenizer.decode(train_stream)
    for doc in raw_docs:
        assert (doc in eval_text) == (doc in eval_docs)
        if doc in eval_docs:
            assert doc not in train_text
    for ids, _ in corpus.eval:
        text = tokenizer.decode(ids.tolist())
        for chunk in text.split(tokenizer.eos_token):
            if chunk:
                assert any(chunk in d for d in eval_docs), f"eval block holds non-held-out text: {chunk[:60]!r}"

    # Same seed: the same corpus (split and packing are deterministic).
    again = build_corpus(cfg, "cpt", tokenizer, seq_len=seq_len, micro_batch_size=2, seed=seed)
    assert [a.tolist() for a, _ in again.eval] == [a.tolist() for a, _ in corpus.eval]
    assert [a.tolist() for a, _ in again.train] == [a.tolist() for a, _ in corpus.train]


def _text_cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(name="text", format="text", path=str(path), **kw)


@pytest.mark.parametrize(
    "content, sample_by",
    [
        ("", "document"),
        ("\n\n\n  \n\n", "paragraph"),
        ("\n\n\n  \n\n", "document"),
        ("", "paragraph"),
        ("", "line"),
    ],
)
def test_empty_text_file_is_a_usage_error(tokenizer, tmp_path, content, sample_by):
    path = tmp_path / "blank.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        build_corpus(_text_cfg(path, sample_by=sample_by), "cpt", tokenizer, 16, 1, 0)
    assert str(path) in str(info.value)
    assert "is empty" in str(info.value)


def test_empty_text_file_default_sampling_still_raises_usage_error(tokenizer, tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="data=text") as info:
        build_corpus(_text_cfg(path, sample_by="paragraph"), "cpt", tokenizer, 16, 1, 0)
    assert str(path) in str(info.value)


def test_single_document_is_a_usage_error(tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("\n\n".join(_paragraphs(3)), encoding="utf-8")
    with pytest.raises(UsageError, match="single document"):
        build_corpus(_text_cfg(path, sample_by="document"), "cpt", tokenizer, 16, 1, 0)


def test_fewer_blocks_than_micro_batch_is_a_usage_error(tokenizer, tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(_paragraphs(4, chars=80)), encoding="utf-8")
    with pytest.raises(UsageError, match=r"micro_batch_size=64") as info:
        build_corpus(_text_cfg(path, eval_fraction=0.25), "cpt", tokenizer, 16, 64, 0)
    assert "blocks of trainer.seq_len tokens" in str(info.value)


def test_missing_data_path_is_a_usage_error(tokenizer, tmp_path):
    missing = tmp_path / "does-not-exist.txt"
    with pytest.raises(UsageError, match="no such text file") as info:
        build_corpus(_text_cfg(missing), "cpt", tokenizer, 16, 1, 0)
    assert str(missing) in str(info.value)
