"""Plain prose for perplexity and pruning calibration: the bundled books and local text files.

The books are four public-domain novels by Jane Austen (from Debian's r-cran-janeaustenr),
shipped gzip-compressed inside this package so that users need nothing outside it.

Deterministic split (`PARTS`): a book is cut into paragraphs (runs of non-blank lines
separated by blank lines; the hard-wrapped lines of a paragraph are joined with one space).
With n paragraphs, paragraphs [0, floor(0.8 n)) are "calibration", [floor(0.8 n),
floor(0.9 n)) "validation" and [floor(0.9 n), n) "test": contiguous, in reading order,
never overlapping, identical on every machine and run. FedSpaLLM clients draw calibration
blocks from the first part; perplexity is reported on the last.
"""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path
from typing import Any

import torch

from fedprune.data.sources import DataError

BOOKS_PACKAGE = "fedprune.data"
BOOKS_FOLDER = "books"
BOOK_SUFFIX = ".txt.gz"
# part -> [start, end) as fractions of the book's paragraphs (see the module docstring)
PARTS: dict[str, tuple[float, float]] = {
    "calibration": (0.0, 0.8),
    "validation": (0.8, 0.9),
    "test": (0.9, 1.0),
}


def book_names() -> list[str]:
    """Sorted names of the bundled books, e.g. "austen_emma" (the file name without .txt.gz)."""
    folder = importlib.resources.files(BOOKS_PACKAGE) / BOOKS_FOLDER
    return sorted(
        f.name.removesuffix(BOOK_SUFFIX) for f in folder.iterdir() if f.name.endswith(BOOK_SUFFIX)
    )


def read_book(name: str) -> str:
    """The full text of the bundled book `name` (one of `book_names()`), lines as shipped."""
    names = book_names()
    if name not in names:
        raise DataError(f"unknown book {name!r}; bundled books: {names}")
    resource = importlib.resources.files(BOOKS_PACKAGE) / BOOKS_FOLDER / f"{name}{BOOK_SUFFIX}"
    return gzip.decompress(resource.read_bytes()).decode("utf-8")


def paragraphs(text: str) -> list[str]:
    """Paragraphs of `text`: blank-line separated, inner line breaks and runs of spaces
    collapsed to one space, empty ones dropped."""
    blocks = text.replace("\r\n", "\n").split("\n\n")
    return [p for p in (" ".join(b.split()) for b in blocks) if p]


def split_paragraphs(paras: list[str], part: str) -> list[str]:
    """The paragraphs of `part` ("calibration" | "validation" | "test"), as in `PARTS`."""
    if part not in PARTS:
        raise DataError(f"unknown text part {part!r}; allowed: {list(PARTS)}")
    lo, hi = PARTS[part]
    n = len(paras)
    return paras[int(lo * n):int(hi * n)]  # floor: consecutive parts share their boundary


def book_part(name: str, part: str) -> str:
    """The text of one part of a bundled book: its paragraphs joined by blank lines."""
    return "\n\n".join(split_paragraphs(paragraphs(read_book(name)), part))


def read_text_file(path: str | Path) -> str:
    """A local UTF-8 text file (``.gz`` decompressed), for users' own calibration or test text.

    Read whole rather than through ``datasets.load_dataset("text")``, which would only split
    it into lines that we would join again.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist")
    data = path.read_bytes()
    if path.suffix.lower() == ".gz":
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"text file {str(path)!r} is not UTF-8 text: {exc}") from None


def token_blocks(
    tokenizer: Any, text: str, seq_len: int, n: int | None = None, *, where: str = "text"
) -> torch.Tensor:
    """Consecutive, non-overlapping blocks of `seq_len` tokens of `text`: long [blocks, seq_len].

    The whole text is tokenized once without special tokens (no BOS per block, as in the
    usual WikiText/C4 perplexity protocol) and cut from its start; the tail shorter than
    `seq_len` is dropped. `n` = None keeps every full block, otherwise the first `n`; asking
    for more blocks than the text holds is an error (`where` names the text in it).
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"`seq_len` must be an integer >= 1, got {seq_len!r}")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise DataError(f"`n` (number of blocks) must be None or an integer >= 1, got {n!r}")
    # verbose=False: a book is longer than model_max_length on purpose; no warning for that
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // seq_len
    if available == 0:
        raise DataError(
            f"{where} has {len(ids)} tokens, shorter than one sequence of seq_len={seq_len}"
        )
    if n is not None and n > available:
        raise DataError(
            f"{where} has {len(ids)} tokens = {available} blocks of seq_len={seq_len}; "
            f"{n} were asked for"
        )
    count = available if n is None else n
    return torch.tensor(ids[:count * seq_len], dtype=torch.long).view(count, seq_len)


def text_file_blocks(
    tokenizer: Any, path: str | Path, seq_len: int, n: int | None = None
) -> torch.Tensor:
    """`token_blocks` of a local text file; the errors name the file."""
    return token_blocks(tokenizer, read_text_file(path), seq_len, n, where=f"text file {str(path)!r}")


# --- per-client calibration text (FedSpaLLM) -------------------------------------------------

CALIBRATION_SOURCES = ("books", "book", "bbc")  # or the path of a local text file


def _deal(blocks: torch.Tensor, num_clients: int, samples: int, seed: int, where: str
          ) -> list[torch.Tensor]:
    """``samples`` blocks for each client, disjoint, from a seeded permutation of ``blocks``."""
    need = num_clients * samples
    if need > len(blocks):
        raise DataError(f"{where} holds {len(blocks)} calibration blocks; {num_clients} "
                        f"clients x {samples} samples need {need}")
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    return [blocks[order[c * samples:(c + 1) * samples]] for c in range(num_clients)]


def calibration_blocks(tokenizer: Any, source: str, num_clients: int, samples: int,
                       seq_len: int, seed: int) -> list[torch.Tensor]:
    """Each client's private calibration text as long [samples, seq_len] token blocks.

    ``source``: "books" — blocks of the calibration parts of all bundled books, dealt IID;
    "book" — client c draws from book c mod 4 only (non-IID; clients sharing a book get
    disjoint blocks); "bbc" — client c draws from BBC News articles of category c mod 5
    (non-IID, another domain); else the path of a local text file, dealt IID. Never the
    books' "test" part (held out for perplexity, `test_blocks`).
    """
    if source == "books":
        text = "\n\n".join(book_part(b, "calibration") for b in book_names())
        return _deal(token_blocks(tokenizer, text, seq_len, where="the books' calibration "
                                  "parts"), num_clients, samples, seed, "the bundled books")
    if source in ("book", "bbc"):
        groups = (_bbc_by_category() if source == "bbc"
                  else {b: book_part(b, "calibration") for b in book_names()})
        names = sorted(groups)
        per_group = [sum(1 for c in range(num_clients) if c % len(names) == g)
                     for g in range(len(names))]
        dealt = [_deal(token_blocks(tokenizer, groups[n], seq_len, where=f"{source} {n!r}"),
                       k, samples, seed, f"{source} {n!r}") if k else []
                 for n, k in zip(names, per_group, strict=True)]
        return [dealt[c % len(names)][c // len(names)] for c in range(num_clients)]
    if not Path(source).is_file():
        raise DataError(f"calibration source {source!r} is none of {CALIBRATION_SOURCES} "
                        f"and no such text file exists")
    text = read_text_file(source)
    return _deal(token_blocks(tokenizer, text, seq_len, where=f"text file {source!r}"),
                 num_clients, samples, seed, f"text file {source!r}")


def test_blocks(tokenizer: Any, n: int, seq_len: int) -> torch.Tensor:
    """Held-out text for perplexity: long [n, seq_len], the first ceil(n / 4) blocks of each
    bundled book's "test" part (never used for calibration), in book order."""
    per_book = -(-n // len(book_names()))
    parts = [token_blocks(tokenizer, book_part(b, "test"), seq_len, per_book,
                          where=f"the test part of {b}") for b in book_names()]
    return torch.cat(parts)[:n]


def _bbc_by_category() -> dict[str, str]:
    from fedprune.data.sources import load_source

    ds = load_source("bbc_news")
    names = ds.features["label"].names
    texts: dict[str, list[str]] = {n: [] for n in names}
    for row in ds:
        texts[names[row["label"]]].append(row["text"])
    return {n: "\n\n".join(t) for n, t in texts.items()}
