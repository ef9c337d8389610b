"""A model trained with a margin head exports to ONNX as the embedding alone: one [N, D] output, no head."""

from __future__ import annotations

import io

import keras
import numpy as np
import onnx
import pytest

from bundle.manifest import InputSpec
from training.backbones import build_backbone
from training.export import check_parity, keras_to_onnx
from training.heads import make_head
from training.model import CenterLossModel

NUM_CLASSES = 5
FEATURE_DIM = 3


@pytest.mark.slow
# Export never sees the head, whichever it is; A-Softmax, the head with extra state, makes the point.
@pytest.mark.parametrize("head_name", ["asoftmax"])
def test_margin_head_model_exports_embedding_only(head_name):
    keras.utils.set_random_seed(0)
    backbone = build_backbone("lenetpp", (8, 8, 1), FEATURE_DIM, width=2)
    head = make_head(head_name, NUM_CLASSES)
    model = CenterLossModel(backbone, head, NUM_CLASSES, center_lambda=0.1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(0)
    x = rng.random((16, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, 16).astype(np.int32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    model_bytes = keras_to_onnx(model.backbone, InputSpec(height=8, width=8, channels=1))
    proto = onnx.load(io.BytesIO(model_bytes))
    outputs = proto.graph.output
    assert [o.name for o in outputs] == ["embedding"]
    assert outputs[0].type.tensor_type.shape.dim[1].dim_value == FEATURE_DIM
    # The head's [D, K] class weights are not in the graph: the head stays in training.
    head_kernel = tuple(np.shape(head.kernel))
    assert all(tuple(init.dims) != head_kernel for init in proto.graph.initializer)
    assert check_parity(model.backbone, model_bytes, x) < 1e-4
