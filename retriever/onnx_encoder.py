"""The encoder's transformer run by ONNX Runtime on the CPU, optionally int8-quantised.

The sentence-transformers model is loaded as usual; its first module (the Hugging Face transformer) is
exported to ONNX when the encoder is opened, and ONNX Runtime runs it in place of PyTorch. Tokenisation
and the model's own pooling and normalisation modules still come from sentence-transformers, so the
vectors are the PyTorch encoder's (fp32: cosine 1.0 on wiki-mini questions) and an index built with one
backend is served with the other.

Why not sentence-transformers' own ``backend="onnx"``: it goes through optimum, whose ONNX exporter pins
transformers below 5.

``onnx-int8`` quantises the weights of every MatMul to int8 per output channel (ONNX Runtime's dynamic
quantisation): about 1.5x the fp32 speed on a CPU, at a cosine of about 0.99 to the fp32 vectors.
"""

import itertools
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from searchgym.errors import SearchgymError

if TYPE_CHECKING:
    import onnxruntime
    from sentence_transformers import SentenceTransformer

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OPSET = 17


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
        sample = self._features(["a short text", "a somewhat longer text to export the model with"])
        self._inputs = [name for name in _MODEL_INPUTS if name in sample]
        with tempfile.TemporaryDirectory(prefix="searchgym-onnx-") as folder:
            path = _export(transformer, sample, self._inputs, Path(folder) / "encoder.onnx")
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
            self._sessions[threads] = onnxruntime.InferenceSession(
                self._graph, options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[threads]

    def _encode(
        self, session: "onnxruntime.InferenceSession", texts: list[str], batch_size: int
    ) -> np.ndarray:
        import torch

        order = np.argsort([-len(text) for text in texts], kind="stable")
        vectors: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            features = self._features([texts[i] for i in order[start : start + batch_size]])
            feed = {name: features[name].numpy() for name in self._inputs}
            features["token_embeddings"] = torch.from_numpy(session.run(None, feed)[0])
            for module in self._pooling:
                features = module(features)
            vectors.append(features["sentence_embedding"].numpy())
        out = np.empty((len(texts), vectors[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(vectors)  # back from length order to the callers'
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def _features(self, texts: list[str]) -> dict[str, Any]:
        """What the model's tokenizer makes of ``texts`` (sentence-transformers 6 renamed the method)."""
        preprocess = getattr(self._model, "preprocess", None) or self._model.tokenize
        return dict(preprocess(texts))


def _export(transformer: Any, sample: dict[str, Any], inputs: list[str], path: Path) -> Path:
    import torch

    class LastHiddenState(torch.nn.Module):
        """The transformer with positional inputs and one output, as the exporter wants it."""

        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.transformer(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    dynamic = {name: {0: "batch", 1: "tokens"} for name in [*inputs, "last_hidden_state"]}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            # The TorchScript exporter: the dynamo one needs onnxscript and traces the same graph.
            torch.onnx.export(
                LastHiddenState(),
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
