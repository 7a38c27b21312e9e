"""Load checkpoints safely and report exactly how they fit a model.

Nothing here unpickles arbitrary objects: PyTorch files are read with
``torch.load(weights_only=True)``. Release checkpoints from mmengine-based
repos also pickle training bookkeeping (``message_hub`` history buffers, numpy
scalars in ``meta``) that the weights-only loader refuses; those globals are
bound to an inert placeholder class whose only behaviour is to store the
state it is given, so the file loads without running any of its code and the
bookkeeping is dropped.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

# Key prefixes of public release layouts, to name the model a checkpoint
# belongs to when it does not fit the recipe.
KNOWN_LAYOUTS: dict[str, tuple[str, ...]] = {
    # Before BEVFormer's: a fused checkpoint holds BEVFormer's keys too.
    "deploykit BEVFusion (camera + LiDAR streams, fusion_module, det_head, occ_head)": ("fusion_module.",),
    "BEVFormer (img_backbone + pts_bbox_head.transformer)": ("pts_bbox_head.transformer.",),
    "BEVFusion, MIT layout (encoders/fuser/decoder/heads)": ("encoders.camera.", "encoders.lidar."),
    "BEVDepth, Megvii layout (backbone.depth_net + head.trunk)": ("backbone.depth_net.", "head.trunk."),
    "BEVDet / mmdet3d LSS (img_view_transformer)": ("img_view_transformer.",),
    "CenterPoint with sparse voxels (pts_middle_encoder.conv_input)": ("pts_middle_encoder.conv_input.",),
    "CenterPoint-PointPillars (pts_voxel_encoder.pfn_layers)": ("pts_voxel_encoder.pfn_layers.",),
    "mmdet3d PointPillars / VoxelNet (voxel_encoder + bbox_head)": ("voxel_encoder.pfn_layers.",),
    "an image detector or classifier (backbone.* only)": ("backbone.conv1.", "backbone.layer1."),
}

MAX_LISTED = 6
_CODE_RUNNING_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "shutil", "runpy", "importlib"}


class InertGlobal:
    """Stand-in for a class or function pickled in a checkpoint's metadata.

    Constructing, calling or setting state on it only records the arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _inert(name: str) -> type:
    module, _, qualname = name.rpartition(".")
    return type(qualname, (InertGlobal,), {"__module__": module, "__qualname__": qualname})


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) from a .pth/.pt/.ckpt or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
    obj = _torch_load(path)
    return extract_state_dict(obj, path)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # foreign globals in the metadata; handled below
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(_unreadable(path, exc)) from None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [(_inert(n), n) for n in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # PyTorch blocks modules such as os/posix/subprocess even when allowed:
        # the file asks to call something that can run code.
        if "blocked" in str(exc):
            blocked = [n for n in names if n.split(".")[0] in _CODE_RUNNING_MODULES] or names
            raise CheckpointError(
                f"checkpoint {path} refers to {', '.join(blocked)}, which can run code; refusing to load it"
            ) from None
        raise CheckpointError(_unreadable(path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is unusable
        raise CheckpointError(_unreadable(path, exc)) from None


def _unreadable(path: Path, exc: BaseException) -> str:
    text = str(exc).strip()
    # The library's first sentence names the problem; the rest is advice for its own developers.
    detail = text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(exc).__name__
    return f"checkpoint {path} cannot be read: it is truncated or not a PyTorch checkpoint ({detail[:160]})"


def extract_state_dict(obj: Any, source: Path | str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict]:
    """Accept mmcv/mmengine ``{"state_dict", "meta"}`` files and raw state dicts."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{source} contains no tensors; is it a training log or config?")
    # DistributedDataParallel wraps the model and prefixes every key; a PyTorch Lightning
    # module holding the network as ``self.model`` (BEVDepth's releases) prefixes "model.".
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, _plain(meta)


def _plain(meta: dict) -> dict:
    """Keep only JSON-friendly metadata (strings, numbers, lists of them)."""
    out = {}
    for k, v in meta.items():
        if isinstance(v, (str, int, float, bool)):
            out[str(k)] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
            out[str(k)] = list(v)
    return out


@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    matched: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> KeyReport:
    report = KeyReport()
    for key, ref in expected.items():
        if key not in state:
            report.missing.append(key)
        elif tuple(state[key].shape) != tuple(ref.shape):
            report.mismatched.append((key, tuple(state[key].shape), tuple(ref.shape)))
        else:
            report.matched += 1
    report.unexpected = [k for k in state if k not in expected]
    return report


def guess_layout(keys: list[str] | set[str]) -> str | None:
    for name, prefixes in KNOWN_LAYOUTS.items():
        if any(k.startswith(p) for k in keys for p in prefixes):
            return name
    return None


def load_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, recipe: str) -> KeyReport:
    """Load ``state`` into ``model`` or raise one error listing every problem."""
    expected = model.state_dict()
    report = compare_keys(state, expected)
    if not report.ok:
        raise CheckpointError(format_key_report(report, state, source=source, recipe=recipe))
    values = lss_value_hints(state, expected)
    if values:
        raise CheckpointError(f"checkpoint {source} does not fit recipe {recipe}: " + "; ".join(values))
    model.load_state_dict(state, strict=True)
    return report


def format_key_report(report: KeyReport, state: dict, *, source: str, recipe: str) -> str:
    total = report.matched + len(report.missing) + len(report.mismatched)
    head = (f"checkpoint {source} does not fit recipe {recipe}: "
            f"{report.matched}/{total} keys match, {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected, {len(report.mismatched)} with another shape")
    if report.matched == 0:
        # Another model entirely: listing its keys would only bury the point.
        layout = guess_layout(set(state))
        return head + (f"; it looks like {layout}" if layout else "; it looks like another model")
    lines = [head]
    for title, items in (("missing", report.missing), ("unexpected", report.unexpected)):
        if items:
            shown = ", ".join(items[:MAX_LISTED])
            more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
            lines.append(f"  {title}: {shown}{more}")
    for key, got, want in report.mismatched[:MAX_LISTED]:
        lines.append(f"  shape: {key} is {list(got)} in the checkpoint, the recipe builds {list(want)}")
    hints = [h for key, got, want in report.mismatched if (h := _size_hint(key, got, want))]
    lines += [f"  {h}" for h in dict.fromkeys(hints)]
    if report.mismatched and report.matched and not hints:
        lines.append("  a shape mismatch usually means the recipe's sizes differ from the training config "
                     "(channels, classes per task, point features, decoration flags)")
    return "\n".join(lines)


# Keys whose shape states one recipe field directly: (key suffix, dim, field).
_SIZE_KEYS = (
    ("positional_encoding.row_embed.weight", 0, "bev_h"),
    ("positional_encoding.col_embed.weight", 0, "bev_w"),
    ("query_embedding.weight", 0, "num_query"),
    ("transformer.cams_embeds", 0, "num_cams"),
    ("transformer.encoder.layers.0.norms.0.weight", 0, "embed_dims"),
)


# BEVDepth: buffers and layers whose shape is set by a bound or size (key suffix, dim, advice).
_LSS_KEYS = (
    ("backbone.frustum", 0, "the checkpoint has {n} depth bins: set [model] d_bound so that "
                            "arange(d_bound) gives {n} (the release: [2.0, 58.0, 0.5] = 112)"),
    ("depth_net.depth_conv.5.weight", 0, "the checkpoint's DepthNet predicts {n} depth bins: set [model] d_bound "
                                         "to give {n} bins"),
    ("backbone.frustum", 1, "the checkpoint's feature map has {n} rows: [model] image_size[0] / "
                            "downsample_factor must be {n}"),
    ("backbone.frustum", 2, "the checkpoint's feature map has {n} columns: [model] image_size[1] / "
                            "downsample_factor must be {n}"),
    ("head.trunk.conv1.weight", 1, "the checkpoint's BEV trunk takes {n} channels: output_channels x keys "
                                   "must be {n}"),
)


def lss_value_hints(state: dict, expected: dict) -> list[str]:
    """BEVDepth's grid buffers have fixed shapes: a different BEV grid shows in their values."""
    hints = []
    for key, field_names in (("backbone.voxel_num", "x_bound / y_bound / z_bound"),
                             ("backbone.voxel_size", "the third entry of x_bound / y_bound / z_bound"),
                             ("backbone.voxel_coord", "x_bound / y_bound / z_bound")):
        got, want = state.get(key), expected.get(key)
        if got is not None and want is not None and got.shape == want.shape and not torch.allclose(
                got.double(), want.double(), atol=1e-6):
            hints.append(f"{key} is {got.tolist()} in the checkpoint, the recipe builds {want.tolist()}: set [model] "
                         f"{field_names} to the checkpoint's grid")
    return hints


def _size_hint(key: str, got: tuple, want: tuple) -> str | None:
    for suffix, dim, text in _LSS_KEYS:
        if key.endswith(suffix) and len(got) == len(want) and got[dim] != want[dim]:
            return text.format(n=got[dim])
    for suffix, dim, name in _SIZE_KEYS:
        if key.endswith(suffix):
            return f"the checkpoint was trained with {name} = {got[dim]}: set [model] {name} = {got[dim]} in the recipe"
    return None
