"""The manifest an index folder carries: what it was built from and how, checked before it is served."""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from searchgym import __version__
from searchgym.errors import SearchgymError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
Method = Literal["bm25", "pyserini", "dense"]
METHODS: tuple[str, ...] = get_args(Method)


class IndexLoadError(SearchgymError):
    """An index folder that cannot be served: missing, incomplete, or from an incompatible version."""


class IndexMismatchError(IndexLoadError):
    """The index was built from another corpus or encoder than the one given."""


@dataclass(frozen=True, slots=True)
class CorpusInfo:
    """The corpus file an index was built from.

    Attributes:
        path: the path as given to ``searchgym index`` (informative; files move).
        sha256: hex SHA-256 of the file's bytes; what identifies the corpus.
        size_bytes: the file's size.
    """

    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Bm25Params:
    """BM25 scoring and analysis settings (Anserini's defaults, as Search-R1's pyserini index uses)."""

    k1: float = 0.9
    b: float = 0.4
    stopwords: str = "en"
    stemmer: str = "english"


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """The dense encoder an index was built with; queries must be encoded the same way.

    Attributes:
        model: a sentence-transformers or Hugging Face model path or hub id, or ``all-MiniLM-L6-v2`` for the
            embedded default.
        dimension: embedding size.
        query_prefix: text put before each query (``"query: "`` for e5 models).
        passage_prefix: text put before each passage (``"passage: "`` for e5 models).
        pooling: ``mean`` or ``cls``; None is the model's own (mean for a plain Hugging Face folder).
        max_length: tokens per text; None is the model's own limit.
    """

    model: str
    dimension: int
    query_prefix: str = ""
    passage_prefix: str = ""
    pooling: str | None = None
    max_length: int | None = None


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything needed to check and open an index folder.

    Attributes:
        method: ``bm25`` (bm25s), ``pyserini`` (Lucene) or ``dense`` (FAISS).
        num_documents: documents indexed.
        corpus: the corpus file indexed.
        bm25: BM25 settings (``bm25`` and ``pyserini``).
        encoder: the encoder (``dense``).
        faiss_type: the FAISS ``index_factory`` string (``dense``).
        format_version: layout version of the folder; newer than this code's is refused.
        searchgym_version: the version that built it.
        created: UTC build time, ISO 8601.
    """

    method: Method
    num_documents: int
    corpus: CorpusInfo
    bm25: Bm25Params | None = None
    encoder: EncoderInfo | None = None
    faiss_type: str | None = None
    format_version: int = FORMAT_VERSION
    searchgym_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def __post_init__(self) -> None:
        if self.method in ("bm25", "pyserini") and self.bm25 is None:
            raise ValueError(f"a {self.method} manifest needs its bm25 settings")
        if self.method == "dense" and (self.encoder is None or self.faiss_type is None):
            raise ValueError("a dense manifest needs its encoder and faiss_type")

    def save(self, index_dir: Path) -> None:
        """Write ``manifest.json``; written last, so a folder with a manifest holds a finished index."""
        (index_dir / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, index_dir: Path) -> "Manifest":
        """Read and check ``index_dir/manifest.json``.

        Raises:
            IndexLoadError: no manifest (not an index, or an unfinished build), a malformed one, or one
                written by a newer searchgym.
        """
        path = index_dir / MANIFEST_NAME
        if not path.is_file():
            raise IndexLoadError(
                f"{index_dir} is not a searchgym index (it has no {MANIFEST_NAME}): "
                f"build it with `searchgym index --corpus CORPUS --method bm25 --out {index_dir}`"
            )
        try:
            manifest = _from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise IndexLoadError(f"{path} is malformed ({error!r}): rebuild the index") from error
        if manifest.format_version > FORMAT_VERSION:
            raise IndexLoadError(
                f"{index_dir} has index format {manifest.format_version}, written by searchgym "
                f"{manifest.searchgym_version}; this searchgym {__version__} reads up to format "
                f"{FORMAT_VERSION}: upgrade searchgym or rebuild the index"
            )
        return manifest


def _from_dict(data: dict[str, Any]) -> Manifest:
    if data["method"] not in METHODS:
        raise ValueError(f"unknown method {data['method']!r}")
    return Manifest(
        method=data["method"],
        num_documents=int(data["num_documents"]),
        corpus=CorpusInfo(**data["corpus"]),
        bm25=Bm25Params(**data["bm25"]) if data.get("bm25") else None,
        encoder=EncoderInfo(**data["encoder"]) if data.get("encoder") else None,
        faiss_type=data.get("faiss_type"),
        format_version=int(data["format_version"]),
        searchgym_version=str(data["searchgym_version"]),
        created=str(data["created"]),
    )
