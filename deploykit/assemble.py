"""A fused model's weights from separately trained parts, with a report of where each came from.

Horizon's reference trains BEVFusion from pretrained streams (section 5.1), so a user
holds a BEVFormer release checkpoint, an mmdet3d CenterPoint checkpoint and maybe the
fused heads, not one file. ``assemble`` takes them by part:

    camera=bevformer.pth   BEVFormer's release layout: img_backbone, img_neck and
                           pts_bbox_head's BEV encoder; its DETR decoder (transformer.decoder,
                           reference_points, cls/reg branches, query_embedding) becomes
                           det_head when the fused model detects with that decoder
    lidar=centerpoint.pth  mmdet3d's layout: pts_voxel_encoder, pts_backbone, pts_neck; its
                           CenterHead (pts_bbox_head) becomes det_head when det_head = "centerpoint"
    fused=heads.pth        keys in the fused layout as they are (fusion_module, det_head,
                           occ_head, or any others); they win over the streams' keys

Each part is checked against its own layout (a camera checkpoint passed as lidar= is
named for what it is) and every key the model needs is accounted for: taken from a
part, or reported missing, grouped by stream. Nothing is filled with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import _size_hint, guess_layout, read_checkpoint
from .errors import CheckpointError

PARTS = ("camera", "lidar", "fused")
CAMERA_PREFIXES = ("img_backbone.", "img_neck.", "pts_bbox_head.")
LIDAR_PREFIXES = ("pts_voxel_encoder.", "pts_middle_encoder.", "pts_backbone.", "pts_neck.")
# A BEVFormer release's detection decoder, under its pts_bbox_head.
_BEVFORMER_DECODER = ("transformer.decoder.", "transformer.reference_points.", "cls_branches.", "reg_branches.",
                      "query_embedding.", "code_weights")


@dataclass
class Assembly:
    state: dict[str, torch.Tensor]
    # part -> {stream label: keys taken}, for the report
    taken: dict[str, dict[str, int]] = field(default_factory=dict)
    unused: dict[str, list[str]] = field(default_factory=dict)  # part -> its keys the model has no place for
    overridden: list[str] = field(default_factory=list)  # stream keys the fused part replaced

    def lines(self) -> list[str]:
        out = []
        for part, streams in self.taken.items():
            what = ", ".join(f"{stream} {n}" for stream, n in streams.items()) or "nothing"
            out.append(f"{part}: {what} keys")
        for part, keys in self.unused.items():
            if keys:
                out.append(f"{part}: {len(keys)} keys not used ({_first(keys)})")
        if self.overridden:
            out.append(f"fused: replaced {len(self.overridden)} stream keys ({_first(self.overridden)})")
        return out


def stream_of(key: str) -> str:
    from .models import ARCHITECTURES

    stages = ARCHITECTURES["bevfusion"].stages
    best = max((p for p, _ in stages if key.startswith(p + ".")), key=len, default=None)
    return dict(stages)[best] if best is not None else key.split(".")[0]


def parse_parts(values) -> dict[str, Path] | Path | None:
    """``--checkpoint`` values: one PATH, or PART=PATH for each of camera, lidar, fused."""
    values = [str(v) for v in values or ()]
    if not values:
        return None
    named = [v for v in values if "=" in v and v.split("=", 1)[0] in PARTS]
    if not named:
        if len(values) > 1:
            raise CheckpointError("several --checkpoint files need a part each: camera=PATH, lidar=PATH, fused=PATH")
        return Path(values[0])
    if len(named) != len(values):
        plain = [v for v in values if v not in named]
        raise CheckpointError(f"--checkpoint {plain[0]} has no part; with several files name each: camera=PATH, "
                              "lidar=PATH, fused=PATH")
    parts: dict[str, Path] = {}
    for v in named:
        part, path = v.split("=", 1)
        if part in parts:
            raise CheckpointError(f"--checkpoint {part}= is given twice")
        parts[part] = Path(path)
    return parts


def assemble(model: torch.nn.Module, parts: dict[str, Path]) -> Assembly:
    """The fused model's state dict from ``parts`` (see the module docstring)."""
    cfg = model.config
    expected = model.state_dict()
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CheckpointError(f"unknown checkpoint part {unknown[0]}; parts are {', '.join(PARTS)}")
    result = Assembly({})
    for part in ("camera", "lidar"):
        if part not in parts:
            continue
        state, _ = read_checkpoint(parts[part])
        _check_part(part, parts[part], state)
        mapped, unused = (_camera_keys if part == "camera" else _lidar_keys)(state, cfg.det_head)
        result.state.update(mapped)
        result.taken[part] = _count(mapped)
        result.unused[part] = unused
    if "fused" in parts:
        state, _ = read_checkpoint(parts["fused"])
        known = {k: v for k, v in state.items() if k in expected}
        result.overridden = sorted(k for k in known if k in result.state)
        result.state.update(known)
        result.taken["fused"] = _count(known)
        result.unused["fused"] = sorted(k for k in state if k not in expected)
    _raise_on_gaps(result, expected, parts)
    return result


def _camera_keys(state: dict, det_head: str) -> tuple[dict, list[str]]:
    mapped, unused = {}, []
    for key, value in state.items():
        inner = key.removeprefix("pts_bbox_head.")
        if key.startswith("pts_bbox_head.") and inner.startswith(_BEVFORMER_DECODER):
            if det_head == "bevformer":
                mapped["det_head." + inner] = value
            else:
                unused.append(key)
        elif key.startswith(CAMERA_PREFIXES):
            mapped[key] = value
        else:
            unused.append(key)
    return mapped, unused


def _lidar_keys(state: dict, det_head: str) -> tuple[dict, list[str]]:
    mapped, unused = {}, []
    for key, value in state.items():
        if key.startswith(LIDAR_PREFIXES):
            mapped[key] = value
        elif key.startswith("pts_bbox_head.") and det_head == "centerpoint":
            mapped["det_head." + key.removeprefix("pts_bbox_head.")] = value
        else:
            unused.append(key)
    return mapped, unused


def _check_part(part: str, path: Path, state: dict) -> None:
    has_camera = any(k.startswith("pts_bbox_head.transformer.") or k.startswith("img_backbone.") for k in state)
    has_lidar = any(k.startswith(LIDAR_PREFIXES) for k in state)
    if part == "camera" and not has_camera:
        what = guess_layout(set(state))
        hint = " (pass it as lidar=)" if has_lidar else ""
        raise CheckpointError(f"checkpoint {path} given as camera= holds no BEVFormer camera stream (img_backbone, "
                              f"pts_bbox_head.transformer); it looks like {what or 'another model'}{hint}")
    if part == "lidar" and not has_lidar:
        what = guess_layout(set(state))
        hint = " (pass it as camera=)" if has_camera else ""
        raise CheckpointError(f"checkpoint {path} given as lidar= holds no PointPillars LiDAR stream "
                              f"(pts_voxel_encoder, pts_backbone, pts_neck); it looks like "
                              f"{what or 'another model'}{hint}")


def _raise_on_gaps(result: Assembly, expected: dict, parts: dict) -> None:
    state = result.state
    missing = [k for k in expected if k not in state]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not missing and not shapes:
        return
    lines = ["the checkpoint parts do not make the whole model:", *("  " + line for line in result.lines())]
    lines += _gap_lines(missing, shapes)
    absent = sorted({stream_of(k) for k in missing})
    if absent:
        lines.append("  give the missing parts with --checkpoint fused=PATH (keys in the fused layout, see "
                     "deploykit.models.bevfusion)" if "fused" not in parts else
                     "  the fused= checkpoint must hold them under the fused layout's names")
    raise CheckpointError("\n".join(lines))


def _gap_lines(missing: list[str], shapes: list[tuple]) -> list[str]:
    lines = []
    by_stream: dict[str, list[str]] = {}
    for key in missing:
        by_stream.setdefault(stream_of(key), []).append(key)
    for stream, keys in by_stream.items():
        lines.append(f"  missing {stream}: {len(keys)} keys ({_first(keys)})")
    for key, got, want in shapes[:4]:
        lines.append(f"  shape: {key} ({stream_of(key)}) is {list(got)} in the checkpoint, the recipe builds "
                     f"{list(want)}")
    hints = {h for key, got, want in shapes if (h := _size_hint(key, got, want))}
    lines += [f"  {h.replace('[model]', '[model.camera]')}" for h in sorted(hints)]
    return lines


def fused_key_report(state: dict, expected: dict, *, source: str, recipe: str) -> str:
    """One message for a single checkpoint that does not fit a fused recipe: what it holds,
    stream by stream, and what is missing or of another size."""
    have: dict[str, int] = {}
    for key in state:
        if key in expected:
            have[stream_of(key)] = have.get(stream_of(key), 0) + 1
    missing = [k for k in expected if k not in state]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    unexpected = [k for k in state if k not in expected]
    holds = ", ".join(f"{s} {n} keys" for s, n in have.items()) or "none of the fused model's keys"
    layout = guess_layout(set(state))
    head = (f"checkpoint {source} does not fit recipe {recipe}: it holds {holds}"
            + (f" (it looks like {layout})" if layout and not have.get("fusion") else ""))
    lines = [head, *_gap_lines(missing, shapes)]
    if unexpected:
        lines.append(f"  unexpected: {len(unexpected)} keys ({_first(unexpected)})")
    if missing and not have.get("fusion"):
        lines.append("  a stream checkpoint alone is one part of the model: assemble it with --checkpoint "
                     "camera=BEVFORMER.pth --checkpoint lidar=CENTERPOINT.pth --checkpoint fused=HEADS.pth")
    return "\n".join(lines)


def _count(mapped: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for key in mapped:
        out[stream_of(key)] = out.get(stream_of(key), 0) + 1
    return out


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", +{len(keys) - n} more" if len(keys) > n else "")
