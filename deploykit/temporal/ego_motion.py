"""Host-side ego-motion alignment between BEVFormer frames.

BEVFormer carries state from one frame to the next: the ego pose of the
previous frame (so the CAN-bus pose can be turned into a frame-to-frame delta)
and the previous BEV feature map (which has to be rotated into the current
heading before temporal self-attention reads it). All of that is done here, on
the host, rather than inside the exported engine: the pose delta and the BEV
shift are a handful of per-frame scalars, and the rotation is a cheap
nearest-neighbour resampling driven by a per-frame angle. The engine therefore
takes ``can_bus``, ``shift`` and the already-rotated ``prev_bev`` as inputs,
and these functions must produce them exactly as the released PyTorch model
does:

* :func:`relative_can_bus` follows ``BEVFormer.forward_test``
  (``projects/mmdet3d_plugin/bevformer/detectors/bevformer.py``);
* :func:`bev_shift` follows the shift computed in
  ``PerceptionTransformer.get_bev_features``
  (``projects/mmdet3d_plugin/bevformer/modules/transformer.py``);
* :func:`rotate_bev` follows the ``prev_bev`` rotation in that same method,
  which calls ``torchvision.transforms.functional.rotate`` on the map viewed as
  a ``(C, bev_h, bev_w)`` image with torchvision's defaults (nearest, no
  expansion, zeros outside). The affine grid is built the way torchvision's
  ``_gen_affine_grid`` builds it, in float32, and sampled with the same
  ``grid_sample`` call, so the result is the same array, not an approximation.

The rotate-centre quirk: ``PerceptionTransformer`` rotates about
``rotate_center=[100, 100]`` by default and none of the released base, small
or tiny configs overrides it.
That is the centre of BEVFormer-base's 200x200 grid, but BEVFormer-tiny
(50x50) and -small (150x150) rotate about the same pixel, which for tiny lies
well outside the grid, so even a small turn also translates the map. The
released weights were trained with exactly that behaviour, so ``(100, 100)``
stays the default here; matching the checkpoints matters more than a tidy
centre. Pass ``center`` explicitly only for a model that was trained with a
different ``rotate_center``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CAN_BUS_LEN = 18

# (x, y) = (column, row) in pixels, origin at the top-left corner, as torchvision takes it.
DEFAULT_ROTATE_CENTER = (100, 100)


@dataclass(frozen=True)
class EgoPose:
    """What BEVFormer remembers of a frame to make the next frame's CAN bus relative."""

    position: np.ndarray  # (3,) float64, can_bus[:3] of the frame
    angle_deg: float  # can_bus[-1] of the frame (degrees, as in nuScenes can_bus)

    def __post_init__(self) -> None:
        position = np.array(self.position, dtype=np.float64)
        if position.shape != (3,):
            raise ValueError(f"EgoPose.position must have shape (3,), got {list(position.shape)}")
        if not np.isfinite(position).all():
            raise ValueError(f"EgoPose.position must be finite, got {position.tolist()}")
        # A pose is kept across frames; a private read-only copy means a caller
        # reusing its can_bus buffer cannot silently rewrite the remembered pose.
        position.flags.writeable = False
        object.__setattr__(self, "position", position)
        object.__setattr__(self, "angle_deg", _finite_float(self.angle_deg, "EgoPose.angle_deg"))

    # The generated dataclass methods would compare/hash the ndarray field,
    # which raises; compare by value instead.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EgoPose):
            return NotImplemented
        return self.angle_deg == other.angle_deg and bool(np.array_equal(self.position, other.position))

    def __hash__(self) -> int:
        return hash((*(float(v) for v in self.position), self.angle_deg))


def relative_can_bus(can_bus: Any, previous: EgoPose | None) -> tuple[np.ndarray, EgoPose]:
    """BEVFormer's forward_test: returns (can_bus made relative to `previous`, or with
    [:3] and [-1] zeroed when previous is None, as an (18,) float64 copy; the input is
    never modified) and the EgoPose of this frame to keep for the next one.

    ``previous`` is None exactly when BEVFormer has no ``prev_bev``: the first
    frame of a scene, or any frame when temporal inference is off. The angle
    difference is not wrapped (359 -> 1 degree gives -358), as in BEVFormer;
    the rotation it drives is periodic, so this only matters for exactness.
    """
    bus = _can_bus(can_bus)
    # The pose to remember is the raw one, taken before the delta is applied.
    pose = EgoPose(bus[:3], bus[-1])
    if previous is None:
        bus[:3] = 0.0
        bus[-1] = 0.0
    else:
        if not isinstance(previous, EgoPose):
            raise TypeError(f"previous must be an EgoPose or None, got {type(previous).__name__}")
        bus[:3] -= previous.position
        bus[-1] -= previous.angle_deg
    return bus, pose


def bev_shift(
    can_bus: Any,
    *,
    bev_h: int,
    bev_w: int,
    grid_length: float | Sequence[float],
    use_shift: bool = True,
) -> np.ndarray:
    """(2,) float32 [shift_x, shift_y], exactly get_bev_features' numbers.

    ``can_bus`` is the relative one from :func:`relative_can_bus`: [0:2] is the
    ego translation since the previous frame (global frame, metres) and [-2]
    the absolute ego yaw in radians, which projects that translation into the
    ego frame. ``grid_length`` is BEVFormer's ``(real_h / bev_h, real_w /
    bev_w)`` in metres per cell, y first as in ``get_bev_features``; a single
    number means a square cell. The result is a fraction of the BEV extent.
    """
    bus = _can_bus(can_bus)
    h, w = _grid_dims(bev_h, bev_w)
    cell_y, cell_x = _grid_length(grid_length)

    # Same float64 numpy scalar expressions, in the same order, as
    # get_bev_features, so the float32 rounding at the end sees the same value.
    delta_x = bus[0]
    delta_y = bus[1]
    ego_angle = bus[-2] / np.pi * 180
    translation_length = np.sqrt(delta_x ** 2 + delta_y ** 2)
    # The first release wrapped a negative translation_angle by +360; the
    # current code (since "support fp16 and batchsize>1") does not. The two
    # differ only in the last bits, e.g. a 1e-18 shift where the wrap gives 0.
    translation_angle = np.arctan2(delta_y, delta_x) / np.pi * 180
    bev_angle = ego_angle - translation_angle
    shift_y = translation_length * np.cos(bev_angle / 180 * np.pi) / cell_y / h
    shift_x = translation_length * np.sin(bev_angle / 180 * np.pi) / cell_x / w
    # BEVFormer multiplies by the bool, which also keeps the sign of a zeroed shift.
    gate = float(bool(use_shift))
    return np.array([shift_x * gate, shift_y * gate], dtype=np.float32)


def rotate_bev(
    prev_bev: Any,
    angle_deg: float,
    *,
    bev_h: int,
    bev_w: int,
    center: Sequence[float] = DEFAULT_ROTATE_CENTER,
) -> np.ndarray:
    """prev_bev as the engine carries it: (bs, bev_h*bev_w, C) float32, query index = row*bev_w + col.
    Returns the same shape, rotated as get_bev_features does with torchvision's rotate.

    ``angle_deg`` is the relative can_bus[-1]; positive turns the map
    counter-clockwise as displayed with row 0 at the top. ``center`` is
    (x, y) = (column, row) in pixels from the top-left corner of the grid;
    see the module docstring for why it defaults to (100, 100). Cells whose
    source falls outside the grid become 0. Input that is not float32 is
    converted to float32, the dtype the rotation runs in for the engine.
    """
    h, w = _grid_dims(bev_h, bev_w)
    bev = np.asarray(prev_bev)
    if bev.ndim != 3 or bev.shape[1] != h * w or bev.shape[0] < 1 or bev.shape[2] < 1:
        raise ValueError(
            f"prev_bev must have shape (bs, bev_h*bev_w, C) = (bs, {h}*{w}={h * w}, C) with bs, C >= 1, "
            f"got {list(bev.shape)}"
        )
    if not np.issubdtype(bev.dtype, np.floating):
        raise ValueError(f"prev_bev must be a floating-point array (float32), got dtype {bev.dtype}")
    bev = np.ascontiguousarray(bev, dtype=np.float32)
    if not np.isfinite(bev).all():
        raise ValueError("prev_bev must be finite (as float32), it contains NaN or inf")
    angle = _finite_float(angle_deg, "angle_deg")
    cx, cy = _center(center)

    # torchvision's tensor rotate measures the centre from the image middle.
    matrix = _inverse_rotation(angle, cx - w * 0.5, cy - h * 0.5)
    grid = _affine_grid(matrix, h, w)

    bs, _, c = bev.shape
    # Same layout BEVFormer hands to rotate: one (bs*C, H, W) image whose
    # channel index is b*C + c. Every channel shares the grid, so this equals a
    # per-sample rotation, and keeping the layout keeps grid_sample's inputs identical.
    image = torch.from_numpy(bev).permute(1, 0, 2).reshape(h, w, bs * c).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        out = F.grid_sample(image, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out = out[0].permute(1, 2, 0).reshape(h * w, bs, c).permute(1, 0, 2)
    return np.ascontiguousarray(out.numpy())


def _inverse_rotation(angle_deg: float, cx: float, cy: float) -> list[float]:
    """Output-to-input affine map torchvision's rotate uses, as 6 float64 values.

    torchvision's rotate hands ``-angle`` to its general affine inverse (its
    rotate and affine disagree on direction). With zero shear, unit scale and
    no translation that inverse collapses to the rotation below, bit for bit:
    the shear terms only add signed zeros. ``cx, cy`` are relative to the
    image middle, x to the right and y down.
    """
    rot = math.radians(-angle_deg)
    cos_r, sin_r = math.cos(rot), math.sin(rot)
    m = [cos_r, sin_r, 0.0, -sin_r, cos_r, 0.0]
    # Conjugate by the centre translation. The grouping mirrors torchvision's
    # accumulation into a 0.0 start, so the float64 rounding is the same.
    m[2] = 0.0 + (m[0] * -cx + m[1] * -cy) + cx
    m[5] = 0.0 + (m[3] * -cx + m[4] * -cy) + cy
    return m


def _affine_grid(matrix: list[float], h: int, w: int) -> torch.Tensor:
    """The (1, h, w, 2) sampling grid torchvision's _gen_affine_grid makes for a float32 image.

    Unlike torch's affine_grid, the matrix is applied to pixel-centre
    coordinates around the middle and only then normalised by the half size.
    Every step is float32, as torchvision does for a float32 image, and uses
    the same ops (including the bmm), since the grid decides which cell a
    nearest lookup lands in.
    """
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    # Pixel centres relative to the image middle; half-integers, exact in float32.
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w, dtype=torch.float32)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h, dtype=torch.float32)
    base = torch.empty(1, h, w, 3, dtype=torch.float32)
    base[..., 0].copy_(xs)
    base[..., 1].copy_(ys.unsqueeze(-1))
    base[..., 2].fill_(1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)
    return base.view(1, h * w, 3).bmm(scaled).view(1, h, w, 2)


def _can_bus(can_bus: Any) -> np.ndarray:
    """Validated float64 copy of an 18-value CAN-bus vector."""
    arr = np.array(can_bus, copy=True)
    real = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == np.bool_ or not real:
        raise ValueError(f"can_bus must be {CAN_BUS_LEN} real numbers, got dtype {arr.dtype}")
    if arr.shape != (CAN_BUS_LEN,):
        raise ValueError(f"can_bus must have shape ({CAN_BUS_LEN},), got {list(arr.shape)}")
    arr = arr.astype(np.float64, copy=False)
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"can_bus must be finite, got {arr[bad].tolist()} at index {bad.tolist()}")
    return arr


def _grid_dims(bev_h: Any, bev_w: Any) -> tuple[int, int]:
    for name, v in (("bev_h", bev_h), ("bev_w", bev_w)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return int(bev_h), int(bev_w)


def _grid_length(grid_length: Any) -> tuple[float, float]:
    if isinstance(grid_length, (int, float, np.integer, np.floating)) and not isinstance(grid_length, bool):
        values = (grid_length, grid_length)
    else:
        values = tuple(grid_length)
        if len(values) != 2:
            raise ValueError(
                f"grid_length must be one number or (cell_y, cell_x) in metres, got {len(values)} values"
            )
    out = tuple(_finite_float(v, "grid_length") for v in values)
    if min(out) <= 0:
        raise ValueError(f"grid_length must be positive, got {out}")
    return out


def _center(center: Any) -> tuple[float, float]:
    values = tuple(center)
    if len(values) != 2:
        raise ValueError(f"center must be (x, y) in pixels, got {len(values)} values")
    cx, cy = (_finite_float(v, "center") for v in values)
    return cx, cy


def _finite_float(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out
