"""read_points / write_points_bin on files built here, one per format and failure.

Raw and .npy reads are bit-exact (float32 in, float32 out); PCD files are
written with pypcd4 itself, ASCII ones compared within 1e-6 relative (the text
round trip of float32).
"""

from __future__ import annotations

import numpy as np
import pytest
from pypcd4 import Encoding, PointCloud

from deploykit.data.points import layout_of, read_points, write_points_bin
from deploykit.errors import InputError


def _cloud(n: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-40, 40, (n, cols)).astype(np.float32)
    pts[:, 2] = rng.uniform(-2, 2, n)
    if cols > 3:
        pts[:, 3] = rng.uniform(0, 255, n)
    if cols > 4:
        pts[:, 4] = rng.integers(0, 32, n)
    return pts


def test_nuscenes_bin_round_trip(tmp_path):
    pts = _cloud(1000, 5)
    path = write_points_bin(tmp_path / "n015-sweep.pcd.bin", pts)
    cloud = read_points(path)
    assert cloud.source_layout == "nuscenes"
    assert cloud.columns == ("x", "y", "z", "intensity", "ring")
    assert cloud.intensity_range == (0.0, 255.0)
    assert cloud.points.dtype == np.float32
    np.testing.assert_array_equal(cloud.points, pts)


def test_kitti_bin_and_layout_override(tmp_path):
    pts = _cloud(999, 4)
    pts[:, 3] /= 255
    cloud = read_points(write_points_bin(tmp_path / "000001.bin", pts))
    assert (cloud.source_layout, cloud.columns, cloud.intensity_range) == ("kitti", ("x", "y", "z", "intensity"),
                                                                            (0.0, 1.0))
    np.testing.assert_array_equal(cloud.points, pts)
    # A nuScenes sweep saved under a plain .bin name reads right with layout="nuscenes".
    five = _cloud(40, 5)
    five.tofile(tmp_path / "renamed.bin")
    cloud = read_points(tmp_path / "renamed.bin", layout="nuscenes")
    assert cloud.source_layout == "nuscenes"
    np.testing.assert_array_equal(cloud.points, five)


def test_bin_size_not_a_whole_number_of_rows(tmp_path):
    _cloud(3, 5).tofile(tmp_path / "odd.bin")  # 60 bytes: 5-column rows, not 4-column
    with pytest.raises(InputError, match=r"odd.bin: 60 bytes is not a whole number of kitti-layout rows "
                                         r"\(4 float32 = 16 bytes\).*layout='nuscenes'"):
        read_points(tmp_path / "odd.bin")


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match=r"nope.pcd.bin: no such point cloud file; expected a .pcd.bin"):
        read_points(tmp_path / "nope.pcd.bin")
    (tmp_path / "empty.pcd.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty.pcd.bin: the file is empty"):
        read_points(tmp_path / "empty.pcd.bin")
    (tmp_path / "cloud.las").write_bytes(b"LASF")
    with pytest.raises(InputError, match=r"cloud.las: unknown point cloud format"):
        read_points(tmp_path / "cloud.las")
    with pytest.raises(InputError, match=r"unknown point layout 'velodyne'"):
        read_points(tmp_path / "cloud.las", layout="velodyne")
    np.save(tmp_path / "c.npy", _cloud(4, 4))
    with pytest.raises(InputError, match=r"c.npy: layout='nuscenes' is for raw float32 files, not .npy files"):
        read_points(tmp_path / "c.npy", layout="nuscenes")
    assert [layout_of(n) for n in ("a.PCD.BIN", "b.bin", "c.npy", "d.pcd", "e.ply")] == [
        "nuscenes", "kitti", "npy", "pcd", None]


def test_npy_columns_and_rejections(tmp_path):
    pts = _cloud(50, 6).astype(np.float64)
    np.save(tmp_path / "six.npy", pts)
    cloud = read_points(tmp_path / "six.npy")
    assert cloud.columns == ("x", "y", "z", "intensity", "col4", "col5")
    assert cloud.intensity_range is None and cloud.source_layout == "npy"
    np.testing.assert_array_equal(cloud.points, pts.astype(np.float32))
    np.save(tmp_path / "xyz.npy", pts[:, :3])
    assert read_points(tmp_path / "xyz.npy").columns == ("x", "y", "z")

    np.save(tmp_path / "flat.npy", pts.ravel())
    with pytest.raises(InputError, match=r"flat.npy: points must be a 2-D \(N, C >= 3\) array.*got shape \[300\]"):
        read_points(tmp_path / "flat.npy")
    np.save(tmp_path / "two.npy", pts[:, :2])
    with pytest.raises(InputError, match=r"got shape \[50, 2\]"):
        read_points(tmp_path / "two.npy")
    np.save(tmp_path / "ints.npy", pts.astype(np.int32))
    with pytest.raises(InputError, match=r"ints.npy: points must be float .* got dtype int32"):
        read_points(tmp_path / "ints.npy")
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=r"objects.npy: not a readable .npy array"):
        read_points(tmp_path / "objects.npy")
    np.save(tmp_path / "none.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(InputError, match=r"none.npy: the cloud has no points"):
        read_points(tmp_path / "none.npy")


@pytest.mark.parametrize("encoding", [Encoding.ASCII, Encoding.BINARY, Encoding.BINARY_COMPRESSED])
def test_pcd_encodings(tmp_path, encoding):
    pts = _cloud(300, 6, seed=1)
    pts[:, 5] = np.linspace(0, 0.1, 300)  # per-point capture time within the sweep
    fields = ("x", "y", "z", "intensity", "ring", "time")
    types = (np.float32,) * 4 + (np.uint16, np.float32)
    arrays = [pts[:, i].astype(t) for i, t in enumerate(types)]
    PointCloud.from_points(arrays, fields, types).save(tmp_path / "scan.pcd", encoding=encoding)
    cloud = read_points(tmp_path / "scan.pcd")
    assert cloud.columns == fields and cloud.source_layout == "pcd"
    assert cloud.intensity_range is None  # a float field says nothing about its scale
    np.testing.assert_allclose(cloud.points, pts, rtol=1e-6, atol=1e-6)
    assert any("'time' is a per-point capture time" in note for note in cloud.notes)


def test_pcd_intensity_names_and_8bit_range(tmp_path):
    pts = _cloud(20, 4)
    for name in ("reflectance", "i"):
        PointCloud.from_points([pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3]], ("x", "y", "z", name),
                               (np.float32,) * 4).save(tmp_path / f"{name}.pcd")
        assert read_points(tmp_path / f"{name}.pcd").columns == ("x", "y", "z", "intensity")
    PointCloud.from_points([pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3].astype(np.uint8)],
                           ("x", "y", "z", "intensity"), (np.float32,) * 3 + (np.uint8,)).save(tmp_path / "u8.pcd")
    assert read_points(tmp_path / "u8.pcd").intensity_range == (0.0, 255.0)


def test_pcd_failures(tmp_path):
    pts = _cloud(20, 3)
    PointCloud.from_points([pts[:, 0], pts[:, 1]], ("x", "y"), (np.float32,) * 2).save(tmp_path / "xy.pcd")
    with pytest.raises(InputError, match=r"xy.pcd: PCD fields \['x', 'y'\] lack z; x, y, z are required"):
        read_points(tmp_path / "xy.pcd")
    (tmp_path / "junk.pcd").write_text("this is not a point cloud\n")
    with pytest.raises(InputError, match=r"junk.pcd: not a readable PCD file .*expected a PCL header"):
        read_points(tmp_path / "junk.pcd")
    PointCloud.from_points([pts[:, 0], pts[:, 1], pts[:, 2]], ("x", "y", "z"),
                           (np.float32,) * 3).save(tmp_path / "cut.pcd", encoding=Encoding.BINARY)
    data = (tmp_path / "cut.pcd").read_bytes()
    (tmp_path / "cut.pcd").write_bytes(data[:-24])  # two whole rows short
    with pytest.raises(InputError, match=r"cut.pcd: the header says 20 points but the file holds 18; "
                                         r"the file is truncated"):
        read_points(tmp_path / "cut.pcd")
    (tmp_path / "cut.pcd").write_bytes(data[:-7])  # mid-row
    with pytest.raises(InputError, match=r"cut.pcd: not a readable PCD file \(ValueError.*and the points"):
        read_points(tmp_path / "cut.pcd")


def test_write_points_bin_keeps_the_name_rule(tmp_path):
    with pytest.raises(InputError, match=r"the nuscenes layout has 5 columns.*got points of shape \[10, 4\]"):
        write_points_bin(tmp_path / "a.pcd.bin", _cloud(10, 4))
    with pytest.raises(InputError, match=r"raw point files are named \*.pcd.bin"):
        write_points_bin(tmp_path / "a.npy", _cloud(10, 4))
    with pytest.raises(InputError, match=r"a.npy: layout='kitti' is for raw float32 files, not .npy files"):
        write_points_bin(tmp_path / "a.npy", _cloud(10, 4), layout="kitti")
    path = write_points_bin(tmp_path / "a.dat", _cloud(10, 4), layout="kitti")
    np.testing.assert_array_equal(read_points(path, layout="kitti").points, _cloud(10, 4))
