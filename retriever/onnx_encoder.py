"""The encoder's transformer run by ONNX Runtime on the CPU, optionally int8-quantised.

The sentence-transformers model is loaded as usual; its first module (the Hugging Face transformer) is
exported to ONNX when the encoder is opened, and ONNX Runtime runs it in place of PyTorch. Tokenisation
and the model's own pooling and normalisation modules still come from sentence-transformers, so the
vectors are the PyTorch encoder's (fp32: cosine 1.0 on wiki-mini questions) and an index built with one
backend is served with the other.

Why not sentence-transformers' own ``backend="onnx"``: it goes through optimum, whose ONNX exporter pins
transformers below 5.

Texts of uneven length are packed: a batch's texts run end to end in a few sequences of up to
:data:`PACK_TOKENS` tokens, each text's positions counted from 0 and its attention kept within itself (a
block-diagonal mask), which is the padded computation minus the padding. The server's micro-batches of
questions from different clients are 24-40% padding (wiki-mini, batches of 4 to 16), and the encoder's
cost is per token. Packing is used only for a model whose packed export gives its padded export's hidden
states (checked when the encoder is opened: models that offset their positions, as RoBERTa does, keep
the padded graph), and only for a batch where it costs less, since a packed sequence attends over all
its tokens.

``onnx-int8`` quantises the weights of every MatMul to int8 per output channel (ONNX Runtime's dynamic
quantisation): about 1.5x the fp32 speed on a CPU, at a cosine of about 0.99 to the fp32 vectors.
"""

import itertools
import logging
import math
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from searchgym.errors import SearchgymError

if TYPE_CHECKING:
    import onnxruntime
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PACKED_INPUTS = ("position_ids", "sequence_ids")  # besides the token inputs; they replace the mask
_OPSET = 17
# Texts of these lengths (in tokens) export the graphs and check that packing gives the padded result.
_SAMPLE_TEXTS = (
    "a short text",
    "a somewhat longer text to export the model with",
    "one more of a third length",
)
# Tokens of one packed sequence: its attention costs about tokens / (6 x hidden size) of its linear
# layers (a 256-token pack: +11% for MiniLM's 384), so longer packs gain less than they pad away.
PACK_TOKENS = 256


class OnnxTransformer:
    """Encodes texts with ``model``'s transformer exported to ONNX and its own pooling modules.

    The threads are matched to the load: a call that runs alone gets all ``threads``, and when calls
    overlap (the server's search workers under many clients) each gets ``threads`` divided by the calls
    that overlap, because small batches parallelise poorly and two batches on one thread each encode more
    than one batch on two. The calls that overlap are those running when a call starts or, if more, those
    that overlapped the last call to finish: under steady load a worker often starts while the other is
    between batches, and on all the threads it would oversubscribe the cores once the other starts again.
    ONNX Runtime fixes a session's threads when it is created, so there is a session per thread count,
    made the first time it is needed (each holds its own copy of the weights).

    Args:
        model: a CPU sentence-transformers model (transformer first, then pooling and the like).
        quantize: int8 dynamic quantisation of the MatMul weights.
        threads: ONNX Runtime's intra-op threads for a call that runs alone.

    Attributes:
        packed: batches of texts of uneven length run packed, several texts to a sequence (the model's
            packed export gave its padded export's hidden states).

    Raises:
        SearchgymError: onnxruntime (the ``onnx`` extra) is not installed, or the export fails.
    """

    def __init__(self, model: "SentenceTransformer", *, quantize: bool, threads: int) -> None:
        try:
            import onnxruntime
        except ImportError as error:
            raise SearchgymError(
                'the ONNX Runtime encoder needs the onnx extra: pip install "searchgym[dense,onnx]"'
            ) from error
        self._model = model
        first, *self._pooling = model  # the transformer, then pooling (and normalising) modules
        transformer: Any = first.auto_model
        transformer.eval()
        sample = self._features(list(_SAMPLE_TEXTS))
        self._inputs = [name for name in _MODEL_INPUTS if name in sample]
        self._token_inputs = [name for name in self._inputs if name != "attention_mask"]
        self._hidden_size = int(transformer.config.hidden_size)
        with tempfile.TemporaryDirectory(prefix="searchgym-onnx-") as folder:
            padded = _export(
                _LastHiddenState(transformer, self._inputs),
                {name: sample[name] for name in self._inputs},
                Path(folder) / "encoder.onnx",
            )
            packed = self._export_packed(transformer, sample, Path(folder) / "encoder.packed.onnx")
            self.packed = packed is not None and self._packing_agrees(padded, packed, sample)
            path = packed if self.packed and packed is not None else padded
            if quantize:
                path = _quantize(path)
            self._graph = path.read_bytes()
        self.threads = threads
        self._sessions: dict[int, onnxruntime.InferenceSession] = {}
        self._lock = threading.Lock()
        self._call_ids = itertools.count()
        self._overlaps: dict[int, int] = {}  # running call -> the most calls that ran at once during it
        self._last_overlap = 1
        self._session(threads)

    @property
    def session_threads(self) -> list[int]:
        """The thread counts of the sessions made so far, most first."""
        return sorted(self._sessions, reverse=True)

    def encode(self, texts: list[str], *, batch_size: int) -> np.ndarray:
        """(N, D) float32 unit vectors, encoded in batches of texts of similar length."""
        with self._lock:
            call = next(self._call_ids)
            self._overlaps[call] = 0
            running = len(self._overlaps)
            for other in self._overlaps:
                self._overlaps[other] = max(self._overlaps[other], running)
            session = self._session(max(1, self.threads // max(running, self._last_overlap)))
        try:
            return self._encode(session, texts, batch_size)
        finally:
            with self._lock:
                self._last_overlap = self._overlaps.pop(call)

    def _session(self, threads: int) -> "onnxruntime.InferenceSession":
        """The session running on ``threads`` intra-op threads (made on first use)."""
        import onnxruntime

        if threads not in self._sessions:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle threads sleep instead of spinning: in the server, spinning ones took the cores from the
            # HTTP and search threads between encodes (1 client: 62 -> 74 q/s; 32: 172 -> 202 q/s).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._sessions[threads] = onnxruntime.InferenceSession(
                self._graph, options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[threads]

    def _encode(
        self, session: "onnxruntime.InferenceSession", texts: list[str], batch_size: int
    ) -> np.ndarray:
        order = np.argsort([-len(text) for text in texts], kind="stable")
        vectors: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            features = self._features([texts[i] for i in order[start : start + batch_size]])
            features["token_embeddings"] = torch.from_numpy(self._hidden_states(session, features))
            for module in self._pooling:
                features = module(features)
            vectors.append(features["sentence_embedding"].numpy())
        out = np.empty((len(texts), vectors[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(vectors)  # back from length order to the callers'
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _hidden_states(self, session: "onnxruntime.InferenceSession", features: dict[str, Any]) -> np.ndarray:
        """(B, L, D) last hidden states of a tokenised batch (any values at its padding)."""
        if not self.packed:
            return session.run(None, {name: features[name].numpy() for name in self._inputs})[0]
        rows, tokens = self._rows_and_tokens(features)
        packs = cheapest_packs(rows.sum(axis=1).tolist(), self._hidden_size)
        return _unpack(session.run(None, _packed_feed(tokens, rows, packs))[0], rows, packs)

    def _export_packed(self, transformer: Any, sample: dict[str, Any], path: Path) -> Path | None:
        """The transformer exported for packed input, or None where it cannot be."""
        rows, tokens = self._rows_and_tokens(sample)
        feed = _packed_feed(tokens, rows, [[0, 1], [2]])  # packs of 2 texts and 1: both axes vary
        try:
            return _export(
                _PackedLastHiddenState(transformer, self._token_inputs),
                {name: torch.from_numpy(array) for name, array in feed.items()},
                path,
            )
        except SearchgymError as error:
            logger.info("the encoder runs padded: its packed export failed (%s)", error)
            return None

    def _packing_agrees(self, padded: Path, packed: Path, sample: dict[str, Any]) -> bool:
        """Whether the packed graph gives the padded graph's hidden states, one text or all to a pack."""
        import onnxruntime

        rows, tokens = self._rows_and_tokens(sample)
        padded_run, packed_run = (
            onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            for path in (padded, packed)
        )
        reference = padded_run.run(None, {name: sample[name].numpy() for name in self._inputs})[0][rows]
        difference = 0.0
        for packs in ([[row] for row in range(len(rows))], [list(range(len(rows)))]):
            hidden = _unpack(packed_run.run(None, _packed_feed(tokens, rows, packs))[0], rows, packs)
            difference = max(difference, float(np.abs(hidden[rows] - reference).max()))
        if difference > 1e-4:
            logger.info("the encoder runs padded: packed input changes its hidden states by %.2g", difference)
        return difference <= 1e-4

    def _rows_and_tokens(self, features: dict[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """A tokenised batch as packing reads it: its attention mask as booleans, and its token inputs."""
        rows = features["attention_mask"].numpy().astype(bool)
        return rows, {name: features[name].numpy() for name in self._token_inputs}

    def _features(self, texts: list[str]) -> dict[str, Any]:
        """What the model's tokenizer makes of ``texts`` (sentence-transformers 6 renamed the method)."""
        preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
        return dict(preprocess(texts))


def cheapest_packs(lengths: list[int], hidden_size: int) -> list[list[int]]:
    """How to run a batch of texts of ``lengths`` tokens: the texts (rows) of each sequence.

    Either one text per sequence (the padded batch) or the texts packed into as few sequences of at
    most about :data:`PACK_TOKENS` tokens as hold them, balanced (each text, longest first, joins the
    shortest sequence), whichever costs less. The sequences run as one batch padded to the longest. A
    token costs its linear layers (about 12 x hidden size² multiply-adds a layer) plus its attention over
    its sequence (about 2 x sequence x hidden size).
    """
    alone = [[row] for row in range(len(lengths))]
    packed: list[list[int]] = [[] for _ in range(math.ceil(sum(lengths) / PACK_TOKENS))]
    tokens = [0] * len(packed)
    for row in sorted(range(len(lengths)), key=lambda row: -lengths[row]):
        shortest = tokens.index(min(tokens))
        packed[shortest].append(row)
        tokens[shortest] += lengths[row]

    def cost(packs: list[list[int]]) -> float:
        longest = max(sum(lengths[row] for row in pack) for pack in packs)
        return len(packs) * longest * (1 + longest / (6 * hidden_size))

    return packed if cost(packed) < cost(alone) else alone


def _text_spans(rows: np.ndarray, packs: list[list[int]]) -> Iterator[tuple[int, int, slice]]:
    """(pack, text's row in the batch, its span in the pack's row) for each text of ``packs``.

    ``rows`` is the batch's attention mask, as booleans: a text's span holds its real tokens.
    """
    lengths = rows.sum(axis=1)
    for pack, texts in enumerate(packs):
        offset = 0
        for text in texts:
            yield pack, text, slice(offset, offset + int(lengths[text]))
            offset += int(lengths[text])


def _packed_feed(
    tokens: dict[str, np.ndarray], rows: np.ndarray, packs: list[list[int]]
) -> dict[str, np.ndarray]:
    """The packed graph's inputs: each pack's real tokens (``rows``: the batch's attention mask) in a row.

    Within a row, a token's position counts from its own text's start, and its sequence id (the text's
    row in the batch) keeps its attention within that text; the padding after a pack has its own id.
    """
    width = max(int(rows[pack].sum()) for pack in packs)
    feed = {name: np.zeros((len(packs), width), dtype=array.dtype) for name, array in tokens.items()}
    feed["position_ids"] = np.zeros((len(packs), width), dtype=np.int64)
    feed["sequence_ids"] = np.full((len(packs), width), -1, dtype=np.int64)
    positions = np.cumsum(rows, axis=1) - 1
    for pack, text, span in _text_spans(rows, packs):
        for name, array in tokens.items():
            feed[name][pack, span] = array[text][rows[text]]
        feed["position_ids"][pack, span] = positions[text][rows[text]]
        feed["sequence_ids"][pack, span] = text
    return feed


def _unpack(hidden: np.ndarray, rows: np.ndarray, packs: list[list[int]]) -> np.ndarray:
    """The packed graph's (packs, tokens, D) output back to the batch's (B, L, D), zero at padding."""
    out = np.zeros((*rows.shape, hidden.shape[-1]), dtype=hidden.dtype)
    for pack, text, span in _text_spans(rows, packs):
        out[text][rows[text]] = hidden[pack, span]
    return out


class _LastHiddenState(torch.nn.Module):
    """The transformer with positional inputs and one output, as the exporter wants it."""

    def __init__(self, transformer: Any, inputs: list[str]) -> None:
        super().__init__()
        self.transformer = transformer
        self.inputs = inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.transformer(**dict(zip(self.inputs, tensors, strict=True))).last_hidden_state


class _PackedLastHiddenState(_LastHiddenState):
    """The transformer on packed sequences: each text's tokens attend only to one another."""

    def __init__(self, transformer: Any, token_inputs: list[str]) -> None:
        super().__init__(transformer, [*token_inputs, *_PACKED_INPUTS])

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.inputs, tensors, strict=True))
        sequence = named.pop("sequence_ids")
        apart = sequence[:, :, None] != sequence[:, None, :]
        blocked = torch.zeros(apart.shape).masked_fill(apart, torch.finfo(torch.float32).min)
        return self.transformer(**named, attention_mask=blocked[:, None]).last_hidden_state


def _export(module: torch.nn.Module, sample: dict[str, torch.Tensor], path: Path) -> Path:
    inputs = list(sample)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "last_hidden_state"]}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            # The TorchScript exporter: the dynamo one needs onnxscript and traces the same graph.
            torch.onnx.export(
                module,
                tuple(sample[name] for name in inputs),
                str(path),
                input_names=inputs,
                output_names=["last_hidden_state"],
                dynamic_axes=dynamic,
                opset_version=_OPSET,
                dynamo=False,
            )
    except Exception as error:
        raise SearchgymError(
            f"cannot export the encoder to ONNX ({type(error).__name__}: {error}); "
            "serve it with --encoder-backend torch"
        ) from error
    return path


def _quantize(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name("encoder.int8.onnx")
    # Per-channel MatMul weights only: quantising the embedding tables too drops the cosine to ~0.95.
    quantize_dynamic(
        path, quantized, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    return quantized
