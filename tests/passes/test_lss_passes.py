"""BEVDepth's rewrite passes: each against the release's forward, and the ONNX they export."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

from deploykit.compare import compare_outputs
from deploykit.engines import ort as ort_engine
from deploykit.errors import InputError, RecipeError
from deploykit.models import make_sample
from deploykit.models.bevdepth import BEVDepth, StreamingBEVDepth
from deploykit.models.bevdepth.depth_net import FoldedDepthNet
from deploykit.passes import apply_passes
from deploykit.preprocess.camera_inputs import normalize_images, synthetic_images
from deploykit.preprocess.lss_inputs import ego_motion_matrix
from deploykit.samples import torch_outputs
from deploykit.temporal.runner import TorchEngine
from deploykit.temporal.two_key import KeyFrame, TwoKeyRunner, ego_motion

REL = 1e-5  # fp32: the same ops in another order at most


def worst(ref: dict, got: dict) -> float:
    return max(a.max_rel_error for a in compare_outputs(ref, got))


@pytest.fixture(scope="module")
def streaming(lss_model, lss_recipe):
    return apply_passes(lss_model, lss_recipe.convert.passes).eval()


def test_camera_mlp_fold_is_equivalent(lss_model, lss_recipe):
    folded = apply_passes(lss_model, ["camera_mlp_fold"]).eval()
    assert isinstance(folded.backbone.depth_net, FoldedDepthNet)
    gone = {k for k in lss_model.state_dict() if ".depth_mlp." in k or ".context_mlp." in k or ".depth_net.bn." in k}
    assert gone and not gone & set(folded.state_dict())
    for seed in (0, 1):
        ref = make_sample(lss_recipe, seed, lss_model).reference
        assert worst(torch_outputs(lss_model, ref), torch_outputs(folded, ref)) < 1e-6
    with pytest.raises(RecipeError, match="already folded"):
        apply_passes(folded, ["camera_mlp_fold"])


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_bev_pool_op_matches_the_release(lss_model, lss_recipe, streaming, seed):
    """Seed 0: a scene's first frame (fused with itself); odd seeds: a previous key frame
    metres behind and degrees off, whose cached depth and context are pooled by cells
    computed in the graph."""
    sample = make_sample(lss_recipe, seed, streaming)
    assert isinstance(streaming, StreamingBEVDepth) and set(sample.feeds) == set(streaming.input_names)
    ref = torch_outputs(lss_model, sample.reference)
    got = torch_outputs(streaming, sample.feeds)
    assert worst(ref, {k: got[k] for k in ref}) < REL


def test_previous_cells_equal_the_release_geometry(lss_model, streaming):
    """The graph's cells for the previous key frame are get_geometry's with the previous
    frame's sensor2ego (ego motion x camera -> ego), bit for bit."""
    motion = torch.from_numpy(ego_motion_matrix(-6.0, 0.4, 3.0).astype(np.float32)).expand(1, 6, 4, 4)
    lss = lss_model.backbone
    sensor2ego = motion @ lss_model.rig_sensor2ego[:, 0]
    cells = lss.cells(lss.get_geometry(sensor2ego, lss_model.rig_intrin[:, 0], lss_model.rig_ida[:, 0],
                                       lss_model.rig_bda))
    nx, ny, nz = (int(v) for v in lss.voxel_num)
    x, y, z = cells[..., 0], cells[..., 1], cells[..., 2]
    inside = (x >= 0) & (x < nx) & (y >= 0) & (y < ny) & (z >= 0) & (z < nz)
    want = torch.where(inside, y * nx + x, torch.full_like(x, -1)).reshape(-1)
    got = streaming.prev_cells(motion)
    assert torch.equal(got.long(), want.long()) and (got >= 0).sum() > 1000


def test_single_key_model(lss_recipe):
    recipe = dataclasses.replace(lss_recipe, model=dataclasses.replace(lss_recipe.model, keys=1))
    torch.manual_seed(0)
    original = BEVDepth(recipe.model).eval()
    deployed = apply_passes(original, recipe.convert.passes).eval()
    assert deployed.input_names == ["img"] and "key_depth" not in deployed.output_names
    sample = make_sample(recipe, 1, deployed)
    assert worst(torch_outputs(original, sample.reference), torch_outputs(deployed, sample.feeds)) < REL


def _scene(cfg, frames: int, seed: int) -> tuple[list[KeyFrame], list[np.ndarray]]:
    out, poses = [], []
    pose = np.eye(4)
    for i in range(frames):
        img = normalize_images(synthetic_images(cfg.num_cams, *cfg.image_size, seed + i), cfg.img_mean, cfg.img_std)
        step = ego_motion_matrix(4.0, 0.3 * i, 2.0 * i)
        pose = pose @ step
        out.append(KeyFrame(img, pose.copy(), "scene-a", i))
        poses.append(pose.copy())
    return out, poses


def test_two_key_runner_matches_the_release_over_a_scene(lss_model, lss_recipe, streaming):
    """Frame by frame, the engine fed its own previous outputs equals the release fed both
    key frames' images, the previous frame's cameras put into the current ego frame."""
    cfg = lss_recipe.model
    frames, poses = _scene(cfg, 3, 40)
    outputs = TwoKeyRunner(TorchEngine(streaming), cfg).run(frames)
    key = lss_model.rig_sensor2ego[:, 0].numpy()
    for i, got in enumerate(outputs):
        j = max(i - 1, 0)  # the release's dataset pairs a scene's first frame with itself
        motion = ego_motion(poses[i], poses[j], cfg.num_cams)
        ref_inputs = {"sweep_imgs": np.stack([frames[i].img, frames[j].img], 1),
                      "sensor2ego_mats": np.stack([key, (torch.from_numpy(motion) @ torch.from_numpy(key)).numpy()],
                                                  1),
                      "intrin_mats": np.repeat(lss_model.rig_intrin.numpy(), 2, 1),
                      "ida_mats": np.repeat(lss_model.rig_ida.numpy(), 2, 1), "bda_mat": lss_model.rig_bda.numpy()}
        ref = torch_outputs(lss_model, ref_inputs)
        assert worst(ref, {k: got[k] for k in ref}) < REL, f"frame {i}"


def test_missing_previous_key_frame_is_an_error(lss_recipe, streaming):
    frames, _ = _scene(lss_recipe.model, 3, 50)
    runner = TwoKeyRunner(TorchEngine(streaming), lss_recipe.model)
    runner.step(frames[0])
    with pytest.raises(InputError, match="previous key frame it fuses \\(frame 1\\) is missing"):
        runner.step(frames[2])
    assert runner.index == 0  # nothing half-updated


def test_bev_pool_op_refuses_other_models(streaming):
    with pytest.raises(RecipeError, match="already converted"):
        apply_passes(streaming, ["bev_pool_op"])


# --- the exported graph ------------------------------------------------------------

def test_converted_graph(lss_converted_dir):
    manifest = json.loads((lss_converted_dir / "manifest.json").read_text())
    check = json.loads((lss_converted_dir / "check.json").read_text())
    assert check["passed"] and check["standard_ops"]["passed"]
    assert {c["op_type"]: c["count"] for c in manifest["onnx"]["custom_ops"]} == {"BEVPool": 2}
    assert [i["name"] for i in manifest["inputs"]] == ["img", "prev_depth", "prev_context", "ego_motion", "use_prev"]
    graph = onnx.load(str(lss_converted_dir / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "DeformConv" in ops and "TopK" not in ops and "NonZero" not in ops
    # No camera matrices reach the engine except the ego motion between key frames.
    assert not {"intrin_mats", "ida_mats", "sensor2ego_mats", "bda_mat"} & {i.name for i in graph.input}
    plain = onnx.load(str(lss_converted_dir / "model.standard_ops.onnx")).graph
    assert not [n for n in plain.node if n.domain == "deploykit"]


@pytest.mark.parametrize("custom_ops", ["function", "ortx"])
def test_ort_runs_the_bev_pool_nodes(lss_converted_dir, lss_recipe, lss_model, custom_ops):
    """Both ONNX Runtime paths of the custom nodes (the function lowering and the
    onnxruntime-extensions kernel) against the release on a later frame."""
    engine = ort_engine.build(lss_converted_dir / "model.onnx", custom_ops=custom_ops)
    streaming = apply_passes(lss_model, lss_recipe.convert.passes).eval()
    sample = make_sample(lss_recipe, 5, streaming)
    ref = torch_outputs(lss_model, sample.reference)
    got = engine.run(sample.feeds)
    assert worst(ref, {k: got[k] for k in ref}) < 1e-4


def test_deform_conv_op_exports_one_custom_node(tmp_path, lss_model, lss_recipe):
    """For runtimes without ONNX DeformConv: one deploykit::DeformConv node per DCN, equal to
    the standard form in ONNX Runtime (the node's function lowering) and in PyTorch."""
    from deploykit.export import convert

    out = convert(lss_recipe, tmp_path / "custom", passes=[*lss_recipe.convert.passes, "deform_conv_op"],
                  standard_ops=True, quiet=True)
    assert out.check["passed"] and out.check["standard_ops"]["passed"]
    counts = {c["op_type"]: c["count"] for c in out.manifest["onnx"]["custom_ops"]}
    assert counts == {"BEVPool": 2, "DeformConv": 1}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "custom" / "model.standard_ops.onnx")).graph.node]
    assert "DeformConv" not in ops and "GridSample" in ops
    with pytest.raises(RecipeError, match="already converted"):
        apply_passes(apply_passes(lss_model, ["deform_conv_op"]), ["deform_conv_op"])
