"""The TensorRT backend: importable and explicit without TensorRT; checked against ORT with it."""

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.engines import tensorrt as trt_engine
from deploykit.errors import EngineError


def test_custom_nodes_are_what_a_build_needs_plugins_for(converted_dir):
    assert trt_engine.custom_nodes(converted_dir / "model.onnx") == ["PillarScatter"]


@pytest.mark.skipif(trt_engine.available(), reason="checks the message shown where TensorRT is missing")
def test_without_tensorrt_the_error_says_what_to_install(converted_dir):
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        trt_engine.build(converted_dir / "model.onnx")
    result = CliRunner().invoke(main, ["bench", str(converted_dir / "model.onnx"), "--backend", "tensorrt"])
    assert result.exit_code == 9 and "use --backend ort" in result.output


def test_bad_precision_is_refused_before_anything_else(converted_dir):
    with pytest.raises(EngineError, match="precision must be one of"):
        trt_engine.build(converted_dir / "model.onnx", precision="int4")
    with pytest.raises(EngineError, match="plugin_impl must be one of aot, jit"):
        trt_engine.build(converted_dir / "model.onnx", plugin_impl="cubin")


def test_network_states_the_plugin_preference_where_tensorrt_has_one():
    """tensorrt.plugin refuses to create a plugin with both implementations unless the network
    says which it prefers (TensorRT >= 10.9); older TensorRT has no such flags."""
    import types

    flags = types.SimpleNamespace(PREFER_AOT_PYTHON_PLUGINS=3, PREFER_JIT_PYTHON_PLUGINS=4)
    new = types.SimpleNamespace(NetworkDefinitionCreationFlag=flags)
    assert trt_engine._network_flags(new, "aot") == 1 << 3
    assert trt_engine._network_flags(new, "jit") == 1 << 4
    old = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())
    assert trt_engine._network_flags(old, "aot") == 0


@pytest.mark.skipif(not trt_engine.available(), reason="TensorRT is not installed (optional extra)")
def test_tensorrt_matches_onnx_runtime_on_the_standard_ops_model(small_recipe, tmp_path):
    from deploykit.engines import ort
    from deploykit.export import convert

    out = tmp_path / "std"
    convert(small_recipe, out, standard_ops=True, quiet=True)
    feeds = dict(np.load(out / "inputs.npz"))
    expected = ort.build(out / "model.standard_ops.onnx").run(feeds)
    got = trt_engine.build(out / "model.standard_ops.onnx").run(feeds)
    for name, ref in expected.items():
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-3 * np.abs(ref).max())
