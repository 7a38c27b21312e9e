import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploykit.engines.ort import build, prepare
from deploykit.errors import EngineError, InputError


def test_wrong_shape_dtype_and_missing_inputs_are_named(converted_dir):
    engine = build(converted_dir / "model.onnx", threads=1)
    with np.load(converted_dir / "inputs.npz") as data:
        feeds = {k: data[k] for k in data.files}
    with pytest.raises(InputError, match=r"'pillars' must be float32\[1, 5, 16, 6000\], got float32\[1, 5, 6000, 16\]"):
        engine.run({**feeds, "pillars": np.ascontiguousarray(feeds["pillars"].swapaxes(2, 3))})
    with pytest.raises(InputError, match=r"'coords' must be int32.*got int64"):
        engine.run({**feeds, "coords": feeds["coords"].astype(np.int64)})
    with pytest.raises(InputError, match="'coords' is missing"):
        engine.run({"pillars": feeds["pillars"]})


def test_unknown_custom_op_and_mode():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="deploykit")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("deploykit", 1)])
    with pytest.raises(EngineError, match="no ONNX Runtime implementation for deploykit::Mystery"):
        prepare(model, "function")
    with pytest.raises(EngineError, match="unknown custom-op mode 'plugin'"):
        prepare(model, "plugin")


def test_prepare_leaves_the_exported_file_untouched(converted_dir):
    model = onnx.load(str(converted_dir / "model.onnx"))
    prepared = prepare(model, "function")
    assert not model.functions and len(prepared.functions) == 1
