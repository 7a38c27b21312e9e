"""BEVFormer's 18-value CAN-bus vector from an ego pose, as its nuScenes dataset builds it."""

from __future__ import annotations

from typing import Any

import numpy as np

from .frames import quaternion_yaw

CAN_BUS_LEN = 18


def can_bus_from_pose(translation: Any, rotation: Any, can_fields: Any = None) -> np.ndarray:
    """(18,) float64 as BEVFormer's nuScenes dataset builds it (``get_data_info``) from an
    ego pose: [:3] the translation, [3:7] the rotation quaternion's w four times, [7:16]
    ``can_fields`` (accel, rotation rate, velocity from the CAN bus; zeros without it),
    [-2] / [-1] the ego yaw wrapped to [0, 360) degrees, in radians / degrees.

    The [3:7] quirk: BEVFormer assigns a pyquaternion Quaternion to the slice, which
    numpy converts with ``__float__`` (its w) and broadcasts. The released checkpoints
    were trained on that (BEVFormer PR #285, unmerged, would change it)."""
    rotation = [float(v) for v in rotation]
    can_bus = np.zeros(CAN_BUS_LEN, np.float64)
    if can_fields is not None:
        can_bus[7:16] = np.asarray(can_fields, np.float64)
    can_bus[:3] = np.asarray(translation, np.float64)
    can_bus[3:7] = rotation[0]
    patch_angle = quaternion_yaw(rotation) / np.pi * 180
    if patch_angle < 0:
        patch_angle += 360
    can_bus[-2] = patch_angle / 180 * np.pi
    can_bus[-1] = patch_angle
    return can_bus
