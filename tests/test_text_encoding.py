"""Query-path text encoding: exact padding trim, the embedding cache, micro-batched forwards."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from regionsearch.backbone import Backbone
from regionsearch.backbone.text import (
    TextBatcher,
    TextEmbeddingCache,
    encode_texts,
    encode_texts_cached,
    forward_slots,
    trim_trailing,
)
from regionsearch.backbone.tiny import tiny_loaded_model

TEXTS = [
    "dog",
    "a red circle",
    "a big blue star to the left of a small green square",
    "!",  # CLIP's BPE id 0 is '!', the same id as its padding
    " ".join(["word"] * 40),  # longer than the tiny model's 16-token context: truncated
]


@pytest.fixture(scope="module")
def reference() -> Backbone:
    return Backbone.load("reference", device="cpu")


def _agree(backbone: Backbone, templates) -> float:
    args = (backbone.model, backbone.tokenizer, TEXTS, templates, backbone.device)
    trimmed = encode_texts(*args, trim=True)
    full = encode_texts(*args, trim=False)
    return float((trimmed - full).abs().max())


@pytest.mark.parametrize("templates", [None, ("a photo of a {}.", "itap of the {}!")])
def test_trim_is_exact_on_the_reference_hf_tower(reference, templates):
    assert _agree(reference, templates) <= 1e-5


@pytest.mark.parametrize("templates", [None, ("a photo of a {}.",)])
def test_trim_is_exact_on_open_clip_causal_tower(tiny_backbone_f32, tiny_backbone, templates):
    assert _agree(tiny_backbone_f32, templates) <= 1e-5
    assert _agree(tiny_backbone, templates) <= 1e-12  # float64: the same arithmetic


def test_trim_shortens_what_the_tower_sees(reference, tiny_backbone_f32):
    hf = reference.tokenizer(["dog"])
    assert trim_trailing(hf, 0).shape[1] < hf.shape[1] / 4
    assert trim_trailing(torch.zeros(2, 5, dtype=torch.long), 0).shape == (2, 1)
    # the open_clip path slices the causal mask and positions: a spy on the transformer
    seen = []
    transformer = tiny_backbone_f32.model.transformer
    handle = transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        tiny_backbone_f32.text_cache.clear()
        tiny_backbone_f32.encode_text(["dog"], templates=None)
    finally:
        handle.remove()
    assert seen and seen[0] < tiny_backbone_f32.model.context_length


def test_bidirectional_open_clip_tower_is_not_trimmed():
    loaded = tiny_loaded_model(seed=3)
    loaded.model.attn_mask = None  # a tower without a causal mask: padding would change it
    backbone = Backbone(loaded, device="cpu")
    seen = []
    transformer = backbone.model.transformer
    handle = transformer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        backbone.encode_text(["dog"], templates=None)
    finally:
        handle.remove()
    assert seen == [backbone.model.context_length]


def test_cache_never_returns_another_querys_vector():
    backbone = Backbone(tiny_loaded_model(seed=0), device="cpu", text_cache_size=7)
    words = [f"shape {i}" for i in range(20)]
    expected = {
        (w, tpl): encode_texts(backbone.model, backbone.tokenizer, [w], tpl, backbone.device)[0]
        for w in words
        for tpl in (None, ("a photo of a {}.",))
    }
    order = [(words[(i * 7) % 20], None if i % 3 else ("a photo of a {}.",)) for i in range(90)]
    for start in range(0, len(order), 3):  # mixed batches of hits, misses and repeats
        chunk = [*order[start : start + 3], order[start]]
        for tpl in (None, ("a photo of a {}.",), None):  # None twice: hits right after misses
            texts = [w for w, t in chunk if t == tpl]
            if not texts:
                continue
            got = backbone.encode_text(texts, templates=tpl)
            for text, vector in zip(texts, got, strict=True):
                assert torch.allclose(vector, expected[(text, tpl)], atol=1e-6), (text, tpl)
            got.mul_(0)  # the caller owns its copy: the cache must not change
    assert backbone.text_cache.hits > 0 and len(backbone.text_cache) == 7
    again = backbone.encode_text([order[-1][0]], templates=order[-1][1])
    assert torch.allclose(again[0], expected[order[-1]], atol=1e-6)


def test_cache_is_lru_and_keyed_by_templates():
    cache = TextEmbeddingCache(maxsize=2)
    calls = []

    def encode(texts, templates):
        calls.append(list(texts))
        offset = 100.0 if templates else 0.0
        return torch.tensor([[float(len(t)) + offset] for t in texts])

    assert encode_texts_cached(cache, encode, ["a", "bb", "a"], None).tolist() == [[1], [2], [1]]
    assert calls == [["a", "bb"]]  # a repeated text is encoded once
    assert encode_texts_cached(cache, encode, ["a"], ("x {}",)).tolist() == [[101.0]]
    assert encode_texts_cached(cache, encode, ["bb"], None).tolist() == [[2.0]]
    assert len(calls) == 2  # ("bb", None) was still cached
    assert encode_texts_cached(cache, encode, ["a"], None).tolist() == [[1.0]]
    assert calls[-1] == ["a"]  # ("a", None), the least recently used, had been evicted
    with pytest.raises(ValueError, match="no texts"):
        encode_texts_cached(cache, encode, [], None)


def test_batcher_merges_concurrent_callers_and_routes_rows_back():
    started = threading.Event()
    release = threading.Event()
    batches = []

    def encode(texts, templates):
        batches.append(list(texts))
        if len(batches) == 1:
            started.set()
            release.wait(5)
        return torch.tensor([[float(t.split()[-1])] for t in texts])

    batcher = TextBatcher(encode, slots=1)
    results: dict[int, list] = {}

    def call(i):
        results[i] = batcher.encode([f"q {i}", f"q {i + 100}"], None).tolist()

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert started.wait(5)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in others:
        t.start()
    time.sleep(0.2)  # let them queue behind the running forward
    release.set()
    for t in [first, *others]:
        t.join(5)
    assert results == {i: [[float(i)], [float(i + 100)]] for i in range(9)}
    assert len(batches) < 9  # the eight waiting callers shared forwards


def test_batcher_error_reaches_only_its_callers():
    def encode(texts, templates):
        if templates == ("bad",):
            raise ValueError("prompt template 'bad' has no '{}' placeholder")
        return torch.ones(len(texts), 1)

    batcher = TextBatcher(encode, slots=2)
    with pytest.raises(ValueError, match="placeholder"):
        batcher.encode(["x"], ("bad",))
    assert batcher.encode(["x"], None).tolist() == [[1.0]]


def test_forward_slots_never_oversubscribe():
    assert forward_slots(cores=2, threads=1) == 2
    assert forward_slots(cores=2, threads=2) == 1
    assert forward_slots(cores=16, threads=4) == 4
    assert forward_slots(cores=1, threads=8) == 1
