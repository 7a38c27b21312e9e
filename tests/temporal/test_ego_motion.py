"""Ego-motion helpers against BEVFormer's forward_test / get_bev_features and torchvision's rotate.

Expected values are worked out by hand or by an independent per-pixel loop,
never by calling the code under test a second way.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from deploykit.temporal.ego_motion import EgoPose, bev_shift, relative_can_bus, rotate_bev


def _can_bus(pos=(0.0, 0.0, 0.0), yaw_deg=0.0, fill=None) -> np.ndarray:
    """A nuScenes-style can_bus: [:3] position, [-2] yaw in radians, [-1] the same yaw in degrees."""
    bus = np.zeros(18) if fill is None else np.asarray(fill, dtype=np.float64).copy()
    bus[:3] = pos
    bus[-2] = yaw_deg / 180 * np.pi
    bus[-1] = yaw_deg
    return bus


# --------------------------------------------------------------------------- relative_can_bus


def test_first_frame_zeroes_position_and_angle_only():
    raw = _can_bus((600.5, 1640.25, 1.5), 123.0, fill=np.arange(1, 19) * 0.75)
    before = raw.copy()

    rel, pose = relative_can_bus(raw, None)

    assert rel.shape == (18,) and rel.dtype == np.float64
    assert rel[:3].tolist() == [0.0, 0.0, 0.0]
    assert rel[-1] == 0.0
    np.testing.assert_array_equal(rel[3:17], raw[3:17])  # includes yaw in radians at [-2]
    assert rel[-2] == raw[-2] != 0.0
    np.testing.assert_array_equal(raw, before)
    assert not np.shares_memory(rel, raw)
    np.testing.assert_array_equal(pose.position, [600.5, 1640.25, 1.5])
    assert pose.angle_deg == 123.0


def test_second_frame_subtracts_previous_raw_pose():
    first = _can_bus((600.5, 1640.25, 1.5), 123.0, fill=np.full(18, 9.0))
    second = _can_bus((602.0, 1639.0, 1.75), 121.5, fill=np.full(18, 7.0))
    before = second.copy()

    _, pose1 = relative_can_bus(first, None)
    rel, pose2 = relative_can_bus(second, pose1)

    np.testing.assert_array_equal(rel[:3], [1.5, -1.25, 0.25])
    assert rel[-1] == -1.5
    np.testing.assert_array_equal(rel[3:17], second[3:17])
    np.testing.assert_array_equal(second, before)
    # The pose kept for the next frame is this frame's raw pose, not the delta.
    assert pose2 == EgoPose(np.array([602.0, 1639.0, 1.75]), 121.5)


def test_chain_of_frames_is_relative_to_the_raw_previous_frame():
    frames = [_can_bus((10.0 * i, -3.0 * i, 0.0), 30.0 + 2.0 * i) for i in range(4)]
    pose = None
    deltas = []
    for bus in frames:
        rel, pose = relative_can_bus(bus, pose)
        deltas.append((rel[:3].tolist(), rel[-1]))
    assert deltas == [([0.0, 0.0, 0.0], 0.0)] + [([10.0, -3.0, 0.0], 2.0)] * 3


def test_angle_delta_is_not_wrapped_like_bevformer():
    _, pose = relative_can_bus(_can_bus(yaw_deg=359.0), None)
    rel, _ = relative_can_bus(_can_bus(yaw_deg=1.0), pose)
    assert rel[-1] == -358.0


def test_remembered_pose_does_not_alias_the_callers_buffer():
    buf = _can_bus((1.0, 2.0, 3.0), 45.0)
    _, pose = relative_can_bus(buf, None)
    buf[:3] = 99.0
    np.testing.assert_array_equal(pose.position, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        pose.position[0] = 5.0  # read-only


def test_can_bus_validation():
    with pytest.raises(ValueError, match=r"\(18,\)"):
        relative_can_bus(np.zeros(17), None)
    with pytest.raises(ValueError, match=r"\(18,\)"):
        bev_shift(np.zeros((1, 18)), bev_h=50, bev_w=50, grid_length=2.048)
    bad = np.zeros(18)
    bad[4] = np.nan
    with pytest.raises(ValueError, match="finite"):
        relative_can_bus(bad, None)
    with pytest.raises(TypeError):
        relative_can_bus(np.zeros(18), (0.0, 0.0, 0.0))


# --------------------------------------------------------------------------- bev_shift

GL = (0.512, 0.512)  # BEVFormer-base: 102.4 m / 200 cells


def test_zero_motion_gives_zero_shift():
    for yaw in (0.0, 37.0, 250.0):
        shift = bev_shift(_can_bus(yaw_deg=yaw), bev_h=200, bev_w=200, grid_length=GL)
        assert shift.dtype == np.float32 and shift.shape == (2,)
        assert shift.tolist() == [0.0, 0.0]


def test_forward_motion_is_along_y_of_the_bev():
    # Heading 0 (ego x = global x), 2 m forward: bev_angle 0, all of it in shift_y.
    shift = bev_shift(_can_bus((2.0, 0.0, 0.0), 0.0), bev_h=200, bev_w=200, grid_length=GL)
    assert shift[0] == 0.0
    assert shift[1] == np.float32(2.0 / (0.512 * 200))


def test_left_motion_is_negative_x():
    # Heading 0, 1.5 m along global +y (to the ego's left): bev_angle -90.
    shift = bev_shift(_can_bus((0.0, 1.5, 0.0), 0.0), bev_h=200, bev_w=200, grid_length=GL)
    np.testing.assert_allclose(shift, [-1.5 / (0.512 * 200), 0.0], rtol=1e-6, atol=1e-12)


def test_x_uses_cell_x_and_bev_w_and_y_uses_cell_y_and_bev_h():
    # 45 degrees to the left at heading 0, |d| = sqrt(2): one metre along each ego axis.
    # grid_length is (cell_y, cell_x), as BEVFormer passes (real_h / bev_h, real_w / bev_w).
    shift = bev_shift(_can_bus((1.0, 1.0, 0.0), 0.0), bev_h=100, bev_w=50, grid_length=(0.5, 2.0))
    np.testing.assert_allclose(shift, [-1.0 / (2.0 * 50), 1.0 / (0.5 * 100)], rtol=1e-6)


def test_negative_translation_angle_is_not_wrapped():
    # atan2 < 0 (motion towards global -y): BEVFormer's current code does not add 360.
    # 1 m forward and 1 m right at heading 0: translation angle -45, bev_angle 45.
    shift = bev_shift(_can_bus((1.0, -1.0, 0.0), 0.0), bev_h=200, bev_w=200, grid_length=GL)
    np.testing.assert_allclose(shift, [1.0 / (0.512 * 200), 1.0 / (0.512 * 200)], rtol=1e-6)
    # Driving straight ahead on heading 270 (global -y): bev_angle is 270 - (-90) = 360 and
    # sin(2*pi) in floating point leaves a tiny negative shift_x, as in BEVFormer (the
    # first release's +360 wrap gave exactly 0).
    shift = bev_shift(_can_bus((0.0, -2.0, 0.0), 270.0), bev_h=200, bev_w=200, grid_length=GL)
    assert shift[0] < 0 and abs(shift[0]) < 1e-15
    assert shift[1] == np.float32(2.0 / (0.512 * 200))


def test_use_shift_false_gives_zeros():
    bus = _can_bus((3.0, -1.0, 0.0), 80.0)
    assert bev_shift(bus, bev_h=50, bev_w=50, grid_length=2.048).any()
    shift = bev_shift(bus, bev_h=50, bev_w=50, grid_length=2.048, use_shift=False)
    assert shift.tolist() == [0.0, 0.0]


def test_scalar_grid_length_means_square_cells():
    bus = _can_bus((0.7, -0.3, 0.0), 12.0)
    np.testing.assert_array_equal(
        bev_shift(bus, bev_h=50, bev_w=50, grid_length=2.048),
        bev_shift(bus, bev_h=50, bev_w=50, grid_length=(2.048, 2.048)),
    )


def test_bev_shift_validation():
    bus = _can_bus((1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="bev_h"):
        bev_shift(bus, bev_h=0, bev_w=50, grid_length=2.048)
    with pytest.raises(ValueError, match="grid_length"):
        bev_shift(bus, bev_h=50, bev_w=50, grid_length=(2.048, 0.0))
    with pytest.raises(ValueError, match="grid_length"):
        bev_shift(bus, bev_h=50, bev_w=50, grid_length=(1.0, 1.0, 1.0))


# --------------------------------------------------------------------------- rotate_bev


def _bev(h, w, bs=1, c=3, seed=0):
    """Random (bs, h*w, c) float32 map with no zeros, so a 0 in the output means 'outside'."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 2.0, size=(bs, h * w, c)).astype(np.float32)
    return x * rng.choice([-1.0, 1.0], size=x.shape).astype(np.float32)


def _grid(bev, h, w):
    """(bs, h*w, c) -> (bs, h, w, c), query index = row*w + col."""
    return bev.reshape(bev.shape[0], h, w, bev.shape[2])


def _reference_rotate(bev, angle_deg, h, w, center):
    """Per-pixel reference written from torchvision's formulas, in float64.

    torchvision's tensor rotate maps each output pixel centre back to the input
    through R(angle) = [[cos, -sin], [sin, cos]] (x right, y down) about
    ``center``, because it negates the angle before building the inverse affine.
    grid_sample (align_corners=False) then reads the input at source - 0.5 in
    index units and, for nearest, rounds half to even; anything outside is 0.
    Returns the output and the smallest distance of any rounded coordinate to a
    .5 tie, so callers can check the comparison is not balanced on float rounding.
    """
    t = math.radians(angle_deg)
    cos_t, sin_t = math.cos(t), math.sin(t)
    cx, cy = center
    src = _grid(bev, h, w)
    out = np.zeros_like(src)
    margin = math.inf
    for i in range(h):
        for j in range(w):
            px, py = j + 0.5 - cx, i + 0.5 - cy
            sx = cos_t * px - sin_t * py + cx - 0.5
            sy = sin_t * px + cos_t * py + cy - 0.5
            margin = min(margin, abs(abs(sx - math.floor(sx)) - 0.5), abs(abs(sy - math.floor(sy)) - 0.5))
            col, row = round(sx), round(sy)  # Python rounds half to even, like nearbyint
            if 0 <= col < w and 0 <= row < h:
                out[:, i, j, :] = src[:, row, col, :]
    return out.reshape(bev.shape), margin


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("center", [(100, 100), (2.5, 3.5), (1.3, 6.1)])
def test_zero_angle_is_identity(center):
    for h, w in ((7, 5), (50, 50)):
        bev = _bev(h, w, bs=2)
        before = bev.copy()
        out = rotate_bev(bev, 0.0, bev_h=h, bev_w=w, center=center)
        assert out.dtype == np.float32 and out.shape == bev.shape
        np.testing.assert_array_equal(_bits(out), _bits(bev))
        np.testing.assert_array_equal(bev, before)


@pytest.mark.parametrize("size", [6, 5])
@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3)])
def test_quarter_turns_about_the_grid_centre_are_rot90(size, angle, k):
    # Positive angles are counter-clockwise with row 0 at the top, the same
    # direction as np.rot90 over (row, col).
    bev = _bev(size, size, bs=2, c=4, seed=size)
    out = rotate_bev(bev, angle, bev_h=size, bev_w=size, center=(size / 2, size / 2))
    expected = np.rot90(_grid(bev, size, size), k=k, axes=(1, 2))
    np.testing.assert_array_equal(_bits(_grid(out, size, size)), _bits(expected))


def test_direction_of_a_single_cell():
    # One hot cell right of centre on a 5x5 grid moves to above the centre for +90.
    h = w = 5
    bev = np.zeros((1, h * w, 1), np.float32)
    bev[0, 2 * w + 4, 0] = 1.0  # row 2, col 4
    out = _grid(rotate_bev(bev, 90.0, bev_h=h, bev_w=w, center=(2.5, 2.5)), h, w)[0, :, :, 0]
    assert np.argwhere(out == 1.0).tolist() == [[0, 2]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_pixel_reference_on_non_square_grid(seed):
    rng = np.random.default_rng(100 + seed)
    h, w = 7, 5
    angle = float(rng.uniform(-180.0, 180.0))
    center = (float(rng.uniform(0.5, 2.0)), float(rng.uniform(4.8, 6.5)))  # inside, off the (2.5, 3.5) middle
    bev = _bev(h, w, bs=2, c=3, seed=seed)

    out = rotate_bev(bev, angle, bev_h=h, bev_w=w, center=center)
    expected, margin = _reference_rotate(bev, angle, h, w, center)

    # float32 grid maths is off by ~1e-6 at these coordinates; stay well clear of ties.
    assert margin > 1e-4, "test case sits on a rounding tie; pick another seed"
    assert np.any(expected == 0) and np.any(expected != 0)  # both inside and outside samples
    np.testing.assert_array_equal(_bits(out), _bits(expected))


def test_default_center_is_bevformers_100_100_even_on_a_50x50_grid():
    h = w = 50
    bev = np.arange(1, h * w + 1, dtype=np.float32).reshape(1, h * w, 1)
    angle = 2.0  # a typical frame-to-frame turn

    out = rotate_bev(bev, angle, bev_h=h, bev_w=w)
    np.testing.assert_array_equal(out, rotate_bev(bev, angle, bev_h=h, bev_w=w, center=(100, 100)))
    expected, margin = _reference_rotate(bev, angle, h, w, (100, 100))
    assert margin > 1e-4  # float32 error at coordinates ~100 is ~1e-5
    np.testing.assert_array_equal(_bits(out), _bits(expected))

    # About the true centre the middle cell stays put; about (100, 100) the
    # whole map is also dragged by ~3.7 cells, so it does not.
    mid = 25 * w + 25
    centred = rotate_bev(bev, angle, bev_h=h, bev_w=w, center=(25, 25))
    assert centred[0, mid, 0] == bev[0, mid, 0]
    assert out[0, mid, 0] != bev[0, mid, 0]
    assert not np.array_equal(out, centred)


def test_rotate_bev_validation():
    h = w = 50
    ok = _bev(h, w, c=2)
    with pytest.raises(ValueError, match=r"2500"):
        rotate_bev(ok[:, :-1], 1.0, bev_h=h, bev_w=w)
    with pytest.raises(ValueError, match=r"bs, bev_h\*bev_w, C"):
        rotate_bev(ok.transpose(1, 0, 2), 1.0, bev_h=h, bev_w=w)  # BEVFormer's (HW, bs, C) layout
    with pytest.raises(ValueError, match=r"bs, bev_h\*bev_w, C"):
        rotate_bev(ok[0], 1.0, bev_h=h, bev_w=w)
    with pytest.raises(ValueError, match="floating"):
        rotate_bev(ok.astype(np.int32), 1.0, bev_h=h, bev_w=w)
    bad = ok.copy()
    bad[0, 7, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        rotate_bev(bad, 1.0, bev_h=h, bev_w=w)
    with pytest.raises(ValueError, match="angle_deg"):
        rotate_bev(ok, float("nan"), bev_h=h, bev_w=w)
    with pytest.raises(ValueError, match="center"):
        rotate_bev(ok, 1.0, bev_h=h, bev_w=w, center=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="bev_w"):
        rotate_bev(ok, 1.0, bev_h=h, bev_w=50.0)
