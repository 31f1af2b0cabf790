"""Load a model artifact and predict a batch. Shared by evaluation, Ray Serve and the edge server.

Artifacts are ONNX files that take raw inputs (standardization is inside the graph) and return logits.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class OnnxModel:
    """An ONNX Runtime session on CPU; `threads` bounds intra-op parallelism per replica."""

    def __init__(self, model_bytes: bytes, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [N], probabilities float32 [N, classes]) for raw inputs [N, features]."""
        logits = self.logits(x).astype(np.float32)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return probabilities.argmax(axis=1).astype(np.int64), probabilities
