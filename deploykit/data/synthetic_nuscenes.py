"""A small synthetic dataset in the nuScenes layout, valid for nuscenes-devkit.

``write_synthetic_nuscenes(out)`` writes the 13 v1.0 tables (real schema and
field names, 32-hex tokens), ray-cast LiDAR keyframes (``samples/LIDAR_TOP``,
2 Hz) and sweeps in between (``sweeps/LIDAR_TOP``, 20 Hz spacing), six camera
keyframes per sample (``samples/CAM_*``, objects drawn where they project) and
``can_bus/<scene>_pose.json``, so every reader, converter and evaluation path
can be run end to end without the real dataset.

Geometry, as on the nuScenes car:

* ego frame: x forward, y left, z up, on the ground (ego poses have z = 0 and
  pure yaw, over a flat ground at global z = 0);
* LIDAR_TOP: ``LIDAR_HEIGHT`` (synthetic_lidar.SENSOR_HEIGHT) above the ground,
  rotated -90 degrees about z: its x points right, its y forward;
* cameras: the geometry of calib/rigs/nuscenes_surround.json, whose frame is
  LIDAR_TOP's, mounted on the LiDAR through its extrinsics; intrinsics scaled to
  ``image_size``;
* objects live in the global frame, static or at constant velocity; each sweep
  is ray cast from that sweep's sensor pose with the objects where they are at
  its timestamp. Annotations are (w, l, h) boxes with a yaw quaternion about z
  (yaw of the length axis), ``num_lidar_pts`` counted in the keyframe sweep.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputExistsError
from ..preprocess.synthetic_lidar import _CLASS_DIMS, _DIM_JITTER, SENSOR_HEIGHT, cast_sweep
from .frames import invert_pose, pose_matrix, rotation_to_quaternion, yaw_quaternion

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")
CAMERAS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
# nuscenes-devkit utils/splits.py: mini_val first, so a 2-scene dataset is exactly the mini_val split.
SCENE_NAMES = {
    "v1.0-mini": ("scene-0103", "scene-0916", "scene-0061", "scene-0553", "scene-0655", "scene-0757", "scene-0796",
                  "scene-1077", "scene-1094", "scene-1100"),
    "v1.0-trainval": ("scene-0003", "scene-0012", "scene-0013", "scene-0014", "scene-0001", "scene-0002",
                      "scene-0004", "scene-0005"),
}

SAMPLE_INTERVAL_US = 500_000  # keyframes at 2 Hz
SWEEP_INTERVAL_US = 50_000  # LiDAR at 20 Hz
LIDAR_HEIGHT = SENSOR_HEIGHT
LIDAR_TRANSLATION = (0.94, 0.0, LIDAR_HEIGHT)  # in the ego frame
LIDAR_YAW = -np.pi / 2
LIDAR_ROTATION_MATRIX = np.array([[np.cos(LIDAR_YAW), -np.sin(LIDAR_YAW), 0.0],
                                  [np.sin(LIDAR_YAW), np.cos(LIDAR_YAW), 0.0], [0.0, 0.0, 1.0]]).round(12)
BEAMS, AZIMUTH_STEPS = 32, 1024
# Camera exposure times relative to the LiDAR keyframe (the cameras fire as the spin passes them).
CAMERA_OFFSET_US = {"CAM_FRONT": -7_500, "CAM_FRONT_RIGHT": 500, "CAM_FRONT_LEFT": -15_500, "CAM_BACK": 25_000,
                    "CAM_BACK_LEFT": -24_500, "CAM_BACK_RIGHT": 16_500}
RIG_IMAGE_SIZE = (900, 1600)  # (H, W) the nuscenes_surround intrinsics are for

# The 23 annotation categories and 8 attributes of nuScenes v1.0; the descriptions are short paraphrases.
CATEGORIES = (
    ("human.pedestrian.adult", "Adult pedestrian."), ("human.pedestrian.child", "Child pedestrian."),
    ("human.pedestrian.wheelchair", "Person in a wheelchair."), ("human.pedestrian.stroller", "Stroller."),
    ("human.pedestrian.personal_mobility", "Scooter, skateboard, segway."),
    ("human.pedestrian.police_officer", "Police officer."),
    ("human.pedestrian.construction_worker", "Construction worker."), ("animal", "Animal."),
    ("vehicle.car", "Passenger car, van, SUV."), ("vehicle.motorcycle", "Motorcycle, vespa."),
    ("vehicle.bicycle", "Bicycle, with or without rider."), ("vehicle.bus.bendy", "Articulated bus."),
    ("vehicle.bus.rigid", "Rigid bus."), ("vehicle.truck", "Truck, pickup."),
    ("vehicle.construction", "Construction vehicle."), ("vehicle.emergency.ambulance", "Ambulance."),
    ("vehicle.emergency.police", "Police vehicle."), ("vehicle.trailer", "Trailer."),
    ("movable_object.barrier", "Temporary road barrier."), ("movable_object.trafficcone", "Traffic cone."),
    ("movable_object.pushable_pullable", "Cart, dolly, wheelbarrow."), ("movable_object.debris", "Debris."),
    ("static_object.bicycle_rack", "Area of bicycles parked in a rack."),
)
ATTRIBUTES = (
    ("vehicle.moving", "Vehicle is moving."), ("vehicle.stopped", "Vehicle, with a driver, is stopped."),
    ("vehicle.parked", "Vehicle is parked."), ("cycle.with_rider", "There is a rider on the cycle."),
    ("cycle.without_rider", "There is no rider on the cycle."),
    ("pedestrian.sitting_lying_down", "The pedestrian is sitting or lying down."),
    ("pedestrian.standing", "The pedestrian is standing."), ("pedestrian.moving", "The pedestrian is moving."),
)
VISIBILITY = (("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%"))

_CAR, _PED, _CYCLIST = 0, 1, 2  # synthetic_lidar CLASSES indices, for the LiDAR intensities
_COLOR = {_CAR: (215, 55, 45), _PED: (50, 190, 75), _CYCLIST: (55, 85, 225)}
_EGO_HALF = (2.4, 1.0)  # half length / width of the ego car's footprint, centred 1.4 m ahead of the rear axle
_EGO_CENTRE_X = 1.4
_GAP = 0.3  # metres between bounding circles of two objects, and between an object and the ego car


@dataclass
class _Object:
    category: str
    attribute: str
    label: int | None  # synthetic_lidar class; None: not ray cast (a bicycle-rack area)
    dims: np.ndarray  # (3,) length, width, height
    yaw: float  # global heading of the length axis
    centre: np.ndarray  # (2,) global xy at t_ref
    velocity: np.ndarray  # (2,) global m/s
    t_ref: float  # seconds after the scene's first keyframe
    only_sample: int | None = None  # exists (and is annotated) only around this keyframe
    exempt: int | None = None  # index of an object it may overlap (a bicycle in its rack)
    annotations: list = field(default_factory=list)

    def xy(self, t):
        """Global xy at t (seconds after the first keyframe): (2,), or (T, 2) for an array of times."""
        return self.centre + self.velocity * (np.asarray(t, dtype=np.float64)[..., None] - self.t_ref)

    @property
    def radius(self) -> float:
        return 0.5 * float(np.hypot(self.dims[0], self.dims[1]))


@dataclass
class _Ego:
    start: np.ndarray  # (2,) global xy at t = 0 (the first keyframe)
    heading: float
    speed: float
    yaw_rate: float

    def heading_at(self, t):
        return self.heading + self.yaw_rate * t

    def xy(self, t):
        t = np.asarray(t, dtype=np.float64)
        h = self.heading + self.yaw_rate * t
        k = self.speed / self.yaw_rate
        return self.start + np.stack([k * (np.sin(h) - np.sin(self.heading)),
                                      -k * (np.cos(h) - np.cos(self.heading))], axis=-1)

    def pose(self, t: float) -> tuple[list, list]:
        """(translation, rotation quaternion) of the ego at t seconds."""
        x, y = self.xy(t)
        return [float(x), float(y), 0.0], [float(v) for v in yaw_quaternion(self.heading_at(t))]


def write_synthetic_nuscenes(
    out: str | Path,
    *,
    scenes: int = 2,
    samples_per_scene: int = 3,
    sweeps_between: int = 2,
    cameras: bool = True,
    image_size: tuple[int, int] = (900, 1600),
    seed: int = 0,
    version: str = "v1.0-mini",
    can_bus: bool = True,
) -> Path:
    """Write a synthetic nuScenes-layout dataroot at ``out`` (absent or an empty directory)
    and return it. Scenes take the split names of ``version`` in order (v1.0-mini:
    mini_val's scene-0103, scene-0916, then mini_train's). ``sweeps_between`` non-key
    sweeps (at 20 Hz spacing) precede every keyframe, the first one included."""
    out = Path(out)
    names = SCENE_NAMES.get(version)
    if names is None:
        raise InputError(f"version must be one of {', '.join(SCENE_NAMES)}, got {version!r}")
    if not 1 <= scenes <= len(names):
        raise InputError(f"{version} has room for 1 to {len(names)} synthetic scenes (split names), got {scenes}")
    if samples_per_scene < 1:
        raise InputError(f"samples_per_scene must be >= 1, got {samples_per_scene}")
    if not 0 <= sweeps_between < SAMPLE_INTERVAL_US // SWEEP_INTERVAL_US:
        raise InputError(f"sweeps_between must be 0 to 9 (20 Hz sweeps between 2 Hz keyframes), got {sweeps_between}")
    if int(seed) < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    height, width = (int(v) for v in image_size)
    if height < 16 or width < 16:
        raise InputError(f"image_size must be (H, W) of at least 16 pixels, got {image_size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} exists and is not an empty directory; choose a new output path")

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = _Writer(tmp, seed=seed, version=version, cameras=cameras, image_size=(height, width),
                         can_bus=can_bus)
        for index in range(scenes):
            writer.scene(index, names[index], samples_per_scene, sweeps_between)
        writer.finish()
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _Writer:
    def __init__(self, root: Path, *, seed: int, version: str, cameras: bool, image_size: tuple[int, int],
                 can_bus: bool):
        self.root, self.seed, self.version = root, int(seed), version
        self.cameras, self.image_size, self.can_bus = cameras, image_size, can_bus
        self.tables: dict[str, list[dict]] = {name: [] for name in TABLES}
        self.category = {name: self._record("category", self.token("category", name), name=name, description=d)
                         for name, d in CATEGORIES}
        self.attribute = {name: self._record("attribute", self.token("attribute", name), name=name, description=d)
                          for name, d in ATTRIBUTES}
        for token, level, description in VISIBILITY:
            self.tables["visibility"].append({"description": description, "token": token, "level": level})
        self.sensor = {"LIDAR_TOP": self._record("sensor", self.token("sensor", "LIDAR_TOP"), channel="LIDAR_TOP",
                                                 modality="lidar")}
        if cameras:
            for name in CAMERAS:
                self.sensor[name] = self._record("sensor", self.token("sensor", name), channel=name,
                                                 modality="camera")
            self.camera_geometry = _camera_geometry(image_size)
        self.maps: dict[str, dict] = {}

    def token(self, *parts) -> str:
        text = ":".join(str(p) for p in ("deploykit-synthetic-nuscenes", self.seed, *parts))
        return hashlib.md5(text.encode()).hexdigest()

    def _record(self, table: str, token: str, **fields) -> dict:
        record = {"token": token, **fields}
        self.tables[table].append(record)
        return record

    # -- one scene ----------------------------------------------------------------------------------------------

    def scene(self, index: int, name: str, num_samples: int, sweeps_between: int) -> None:
        rng = np.random.default_rng([self.seed, index])
        ego = _Ego(start=rng.uniform([300.0, 600.0], [1800.0, 1800.0]), heading=float(rng.uniform(-np.pi, np.pi)),
                   speed=float(rng.uniform(4.0, 8.0)),
                   yaw_rate=float(rng.choice([-1.0, 1.0]) * np.radians(rng.uniform(2.0, 5.0))))
        t0_us = 1_532_402_900_000_000 + index * 3_600_000_000 + int(rng.integers(0, 1_000_000))
        key_us = [t0_us + k * SAMPLE_INTERVAL_US for k in range(num_samples)]
        t_mid = (key_us[num_samples // 2] - t0_us) * 1e-6

        location = ("singapore-onenorth", "boston-seaport")[index % 2]
        logfile = f"n015-2018-07-{10 + index:02d}-11-22-45+0800" if index % 2 == 0 else \
            f"n008-2018-08-{10 + index:02d}-15-16-36-0400"
        log = self._record("log", self.token("log", index), logfile=logfile, vehicle=logfile[:4],
                           date_captured=logfile[5:15], location=location)
        self._map(location, log["token"])

        # Every LiDAR time of the scene (seconds from the first keyframe), for placement checks.
        lidar_times = sorted({(k - j * SWEEP_INTERVAL_US - t0_us) * 1e-6 for k in key_us
                              for j in range(sweeps_between + 1)})
        objects = _place_objects(rng, ego, t_mid, np.asarray(lidar_times), num_samples)

        scene_token = self.token("scene", index)
        sample_tokens = [self.token("sample", index, k) for k in range(num_samples)]
        for k, token in enumerate(sample_tokens):
            self._record("sample", token, timestamp=key_us[k], prev=sample_tokens[k - 1] if k else "",
                         next=sample_tokens[k + 1] if k + 1 < num_samples else "", scene_token=scene_token)
        self._record("scene", scene_token, log_token=log["token"], nbr_samples=num_samples,
                     first_sample_token=sample_tokens[0], last_sample_token=sample_tokens[-1], name=name,
                     description=f"Synthetic drive, {location}, ego {ego.speed:.1f} m/s turning "
                                 f"{np.degrees(ego.yaw_rate):+.1f} deg/s, {len(objects)} objects")

        calib = {channel: self._calibrated_sensor(index, channel) for channel in self.sensor}
        self._lidar(index, ego, objects, t0_us, key_us, sweeps_between, sample_tokens, calib["LIDAR_TOP"], logfile)
        self._annotations(index, objects, key_us, sample_tokens)
        if self.cameras:
            self._images(index, ego, objects, t0_us, key_us, sample_tokens, calib, logfile)
        if self.can_bus:
            self._can_bus(name, ego, t0_us, key_us[0] - sweeps_between * SWEEP_INTERVAL_US, key_us[-1])

    def _map(self, location: str, log_token: str) -> None:
        if location not in self.maps:
            token = self.token("map", location)
            self.maps[location] = self._record("map", token, log_tokens=[], category="semantic_prior",
                                               filename=f"maps/{token}.png")
        self.maps[location]["log_tokens"].append(log_token)

    def _calibrated_sensor(self, index: int, channel: str) -> dict:
        if channel == "LIDAR_TOP":
            translation, rotation, intrinsic = list(LIDAR_TRANSLATION), yaw_quaternion(LIDAR_YAW).tolist(), []
        else:
            translation, rotation, intrinsic = self.camera_geometry[channel]
        return self._record("calibrated_sensor", self.token("calibrated_sensor", index, channel),
                            sensor_token=self.sensor[channel]["token"], translation=translation,
                            rotation=rotation, camera_intrinsic=intrinsic)

    def _ego_pose(self, key: tuple, timestamp: int, ego: _Ego, t: float) -> str:
        translation, rotation = ego.pose(t)
        return self._record("ego_pose", self.token("ego_pose", *key), timestamp=timestamp, rotation=rotation,
                            translation=translation)["token"]

    def _lidar(self, index, ego, objects, t0_us, key_us, sweeps_between, sample_tokens, calib, logfile) -> None:
        records = []
        for k, key in enumerate(key_us):
            for j in range(sweeps_between, -1, -1):
                timestamp = key - j * SWEEP_INTERVAL_US
                is_key = j == 0
                folder = "samples" if is_key else "sweeps"
                filename = f"{folder}/LIDAR_TOP/{logfile}__LIDAR_TOP__{timestamp}.pcd.bin"
                t = (timestamp - t0_us) * 1e-6
                token = self.token("sample_data", index, "LIDAR_TOP", timestamp)
                records.append(self._record(
                    "sample_data", token, sample_token=sample_tokens[k],
                    ego_pose_token=self._ego_pose((index, "LIDAR_TOP", timestamp), timestamp, ego, t),
                    calibrated_sensor_token=calib["token"], timestamp=timestamp, fileformat="pcd",
                    is_key_frame=is_key, height=0, width=0, filename=filename, prev="", next=""))
                present = [o for o in objects if o.label is not None and o.only_sample in (None, k)]
                lidar2global = pose_matrix(*ego.pose(t)) @ pose_matrix(LIDAR_TRANSLATION, yaw_quaternion(LIDAR_YAW))
                boxes = _boxes_in_frame(present, t, lidar2global)
                rng = np.random.default_rng([self.seed, index, timestamp - t0_us + 10_000_000])
                cast = cast_sweep(boxes, np.array([o.label for o in present], np.int64), rng, beams=BEAMS,
                                  azimuth_steps=AZIMUTH_STEPS)
                points = np.column_stack([cast.points[:, :3], np.round(cast.points[:, 3] * 255.0),
                                          cast.ring]).astype(np.float32)
                path = self.root / filename
                path.parent.mkdir(parents=True, exist_ok=True)
                points.tofile(path)
                if is_key:
                    self._count_points(objects, k, t, lidar2global, points, present, cast)
        _link(records)

    def _count_points(self, objects, k, t, lidar2global, points, present, cast) -> None:
        """num_lidar_pts (keyframe points inside each box) and a LiDAR-based visibility level."""
        annotated = [o for o in objects if o.only_sample in (None, k)]
        inside = _points_in_boxes(points[:, :3].astype(np.float64), _boxes_in_frame(annotated, t, lidar2global))
        counts = inside.sum(axis=0)
        for i, obj in enumerate(annotated):
            visible = 1.0
            if obj.label is not None:
                j = next(n for n, p in enumerate(present) if p is obj)
                reachable = cast.rays_on_box[j]
                visible = float(np.sum(cast.box_index == j)) / reachable if reachable else 0.0
            level = "1" if visible < 0.4 else "2" if visible < 0.6 else "3" if visible < 0.8 else "4"
            obj.annotations.append({"sample": k, "num_lidar_pts": int(counts[i]), "visibility": level})

    def _annotations(self, index, objects, key_us, sample_tokens) -> None:
        t0 = key_us[0]
        for n, obj in enumerate(objects):
            if not obj.annotations:
                continue
            tokens = [self.token("sample_annotation", index, n, a["sample"]) for a in obj.annotations]
            instance = self.token("instance", index, n)
            attribute = [self.attribute[obj.attribute]["token"]] if obj.attribute else []
            for i, a in enumerate(obj.annotations):
                x, y = obj.xy((key_us[a["sample"]] - t0) * 1e-6)
                self._record(
                    "sample_annotation", tokens[i], sample_token=sample_tokens[a["sample"]], instance_token=instance,
                    visibility_token=a["visibility"], attribute_tokens=attribute,
                    translation=[float(x), float(y), float(obj.dims[2] / 2)],
                    size=[float(obj.dims[1]), float(obj.dims[0]), float(obj.dims[2])],
                    rotation=[float(v) for v in yaw_quaternion(obj.yaw)],
                    prev=tokens[i - 1] if i else "", next=tokens[i + 1] if i + 1 < len(tokens) else "",
                    num_lidar_pts=a["num_lidar_pts"], num_radar_pts=0)
            self._record("instance", instance, category_token=self.category[obj.category]["token"],
                         nbr_annotations=len(tokens), first_annotation_token=tokens[0],
                         last_annotation_token=tokens[-1])

    def _images(self, index, ego, objects, t0_us, key_us, sample_tokens, calib, logfile) -> None:
        from PIL import Image

        from ..preprocess.camera_inputs import synthetic_images

        height, width = self.image_size
        # deploykit's synthetic camera frames, made at a quarter of the size and scaled up:
        # 16 times faster, and the objects drawn over them carry the sharp edges.
        small = synthetic_images(len(CAMERAS), -(-height // 4), -(-width // 4), seed=self.seed * 1000 + index)
        backgrounds = [Image.fromarray(img.astype(np.uint8)).resize((width, height), Image.BILINEAR) for img in small]
        for c, name in enumerate(CAMERAS):
            records = []
            translation, rotation, intrinsic = self.camera_geometry[name]
            cam2ego = pose_matrix(translation, rotation)
            for k, key in enumerate(key_us):
                timestamp = key + CAMERA_OFFSET_US[name]
                t = (timestamp - t0_us) * 1e-6
                filename = f"samples/{name}/{logfile}__{name}__{timestamp}.jpg"
                records.append(self._record(
                    "sample_data", self.token("sample_data", index, name, timestamp), sample_token=sample_tokens[k],
                    ego_pose_token=self._ego_pose((index, name, timestamp), timestamp, ego, t),
                    calibrated_sensor_token=calib[name]["token"], timestamp=timestamp, fileformat="jpg",
                    is_key_frame=True, height=height, width=width, filename=filename, prev="", next=""))
                present = [o for o in objects if o.label is not None and o.only_sample in (None, k)]
                image = backgrounds[c].copy()
                _draw_objects(image, present, t, pose_matrix(*ego.pose(t)) @ cam2ego, np.asarray(intrinsic))
                path = self.root / filename
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, quality=90)
            _link(records)

    def _can_bus(self, name, ego, t0_us, first_us, last_us) -> None:
        """``can_bus/<scene>_pose.json``: 50 Hz pose messages, keys as in the real expansion."""
        messages = []
        for utime in range(first_us - 193_000, last_us + 200_001, 20_000):
            t = (utime - t0_us) * 1e-6
            translation, rotation = ego.pose(t)
            surge = 0.3 * np.sin(2 * np.pi * t / 1.3)  # a little throttle play, so messages differ
            messages.append({"accel": [surge, ego.speed * ego.yaw_rate, 9.81], "orientation": rotation,
                             "pos": translation, "rotation_rate": [0.0, 0.0, ego.yaw_rate], "utime": utime,
                             "vel": [ego.speed, 0.0, 0.0]})
        path = self.root / "can_bus" / f"{name}_pose.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(messages))

    def finish(self) -> None:
        from PIL import Image

        tables = self.root / self.version
        tables.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            (tables / f"{name}.json").write_text(json.dumps(self.tables[name], indent=0))
        for record in self.tables["map"]:
            path = self.root / record["filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((64, 64), 255, np.uint8)).save(path)


def _link(records: list[dict]) -> None:
    """prev / next links along one sensor's sample_data in time order."""
    for a, b in zip(records, records[1:]):
        a["next"], b["prev"] = b["token"], a["token"]


def _camera_geometry(image_size: tuple[int, int]) -> dict[str, tuple[list, list, list]]:
    """Per camera (translation, rotation quaternion) in the ego frame and the intrinsic
    matrix, from calib/rigs/nuscenes_surround.json, whose frame is LIDAR_TOP's: the
    cameras are mounted on the LiDAR through its extrinsics."""
    from ..camera.rig import load_rig

    rig = load_rig("nuscenes_surround")
    sy, sx = image_size[0] / RIG_IMAGE_SIZE[0], image_size[1] / RIG_IMAGE_SIZE[1]
    out = {}
    for cam in rig.cameras:
        k = cam.intrinsic
        intrinsic = [[k[0, 0] * sx, 0.0, k[0, 2] * sx], [0.0, k[1, 1] * sy, k[1, 2] * sy], [0.0, 0.0, 1.0]]
        lidar2ego = LIDAR_ROTATION_MATRIX
        translation = (np.asarray(LIDAR_TRANSLATION) + lidar2ego @ cam.sensor2lidar_translation).tolist()
        rotation = rotation_to_quaternion(lidar2ego @ cam.sensor2lidar_rotation)
        out[cam.name] = (translation, (rotation / np.linalg.norm(rotation)).tolist(), intrinsic)
    missing = set(CAMERAS) - set(out)
    if missing:
        raise InputError(f"calib/rigs/nuscenes_surround.json lacks cameras {sorted(missing)}")
    return out


# -- objects ------------------------------------------------------------------------------------------------

# kind: category, attribute, lidar class, speed range (m/s), lateral offset range (m, either side), count
_PLAN = (
    ("vehicle.car", "vehicle.parked", _CAR, (0.0, 0.0), (4.6, 6.5), 5),
    ("vehicle.car", "vehicle.moving", _CAR, (5.0, 11.0), (4.0, 4.0), 3),
    ("human.pedestrian.adult", "pedestrian.standing", _PED, (0.0, 0.0), (7.0, 11.0), 2),
    ("human.pedestrian.adult", "pedestrian.moving", _PED, (1.0, 1.6), (7.0, 11.0), 2),
    ("vehicle.bicycle", "cycle.with_rider", _CYCLIST, (3.0, 6.0), (2.7, 3.0), 1),
)


def _place_objects(rng: np.random.Generator, ego: _Ego, t_mid: float, times: np.ndarray,
                   num_samples: int) -> list[_Object]:
    """Objects along the road around the ego's middle pose: parked and moving cars,
    standing and walking pedestrians, a cyclist, one pedestrian present at a single
    keyframe only (a lone annotation: NaN velocity), and a bicycle rack holding a
    parked bicycle. None overlaps another or the ego car at any LiDAR time."""
    centre, heading = ego.xy(t_mid), ego.heading_at(t_mid)
    forward, left = np.array([np.cos(heading), np.sin(heading)]), np.array([-np.sin(heading), np.cos(heading)])
    ego_xy = ego.xy(times)  # (T, 2)
    ego_heading = ego.heading_at(times)
    placed: list[_Object] = []

    def fits(obj: _Object) -> bool:
        xy = obj.xy(times)  # (T, 2)
        offset = xy - ego_xy
        along = offset[:, 0] * np.cos(ego_heading) + offset[:, 1] * np.sin(ego_heading) - _EGO_CENTRE_X
        across = -offset[:, 0] * np.sin(ego_heading) + offset[:, 1] * np.cos(ego_heading)
        reach = obj.radius + _GAP
        if ((np.abs(along) < _EGO_HALF[0] + reach) & (np.abs(across) < _EGO_HALF[1] + reach)).any():
            return False
        for i, other in enumerate(placed):
            if obj.exempt == i:
                continue
            gap = np.linalg.norm(xy - other.xy(times), axis=1) - obj.radius - other.radius
            if (gap < _GAP).any():
                return False
        return True

    def candidate(category, attribute, label, speeds, laterals, along_range=(-30.0, 40.0)):
        dims = _CLASS_DIMS[label] * rng.uniform(1 - _DIM_JITTER, 1 + _DIM_JITTER, 3)
        side = rng.choice([-1.0, 1.0])
        lateral = side * rng.uniform(*laterals)
        along = rng.uniform(*along_range)
        speed = rng.uniform(*speeds)
        direction = heading + (0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0.0, 0.05)
        if speed == 0.0 and label == _PED:
            direction = rng.uniform(-np.pi, np.pi)
        velocity = speed * np.array([np.cos(direction), np.sin(direction)])
        return _Object(category, attribute, label, dims, float(np.arctan2(np.sin(direction), np.cos(direction))),
                       centre + along * forward + lateral * left, velocity, t_mid)

    for category, attribute, label, speeds, laterals, count in _PLAN:
        for _ in range(count):
            for _attempt in range(40):
                obj = candidate(category, attribute, label, speeds, laterals)
                if fits(obj):
                    placed.append(obj)
                    break

    # One pedestrian seen at a single keyframe only.
    for _attempt in range(40):
        obj = candidate("human.pedestrian.adult", "pedestrian.standing", _PED, (0.0, 0.0), (6.0, 9.0),
                        (-10.0, 20.0))
        obj.only_sample = min(1, num_samples - 1)
        if fits(obj):
            placed.append(obj)
            break

    # A bicycle rack on the sidewalk with a parked bicycle in it.
    for _attempt in range(40):
        along, lateral = rng.uniform(-15.0, 25.0), rng.choice([-1.0, 1.0]) * rng.uniform(8.0, 10.0)
        rack = _Object("static_object.bicycle_rack", "", None, np.array([3.0, 0.8, 1.0]), heading,
                       centre + along * forward + lateral * left, np.zeros(2), t_mid)
        bike_dims = _CLASS_DIMS[_CYCLIST] * np.array([0.95, 0.9, 0.7])
        bike = _Object("vehicle.bicycle", "cycle.without_rider", _CYCLIST, bike_dims, heading + np.pi / 2,
                       rack.centre + 0.6 * forward, np.zeros(2), t_mid, exempt=len(placed))
        if fits(rack):
            placed.append(rack)
            if fits(bike):
                placed.append(bike)
            else:
                placed.pop()
                continue
            break
    return placed


def _boxes_in_frame(objects: list[_Object], t: float, frame2global: np.ndarray) -> np.ndarray:
    """(K, 7) boxes (x, y, z_center, length, width, height, yaw) in a sensor frame at t."""
    if not objects:
        return np.zeros((0, 7))
    global2frame = invert_pose(frame2global)
    frame_yaw = np.arctan2(frame2global[1, 0], frame2global[0, 0])
    xy = np.stack([o.xy(t) for o in objects])
    z = np.array([o.dims[2] / 2 for o in objects])
    centres = np.column_stack([xy, z]) @ global2frame[:3, :3].T + global2frame[:3, 3]
    yaw = np.array([o.yaw for o in objects]) - frame_yaw
    return np.column_stack([centres, np.stack([o.dims for o in objects]), yaw])


def _points_in_boxes(xyz: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(M, K) whether each point lies in each box (faces included)."""
    offset = xyz[:, None, :] - boxes[None, :, :3]
    c, s = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    local = np.stack([c * offset[..., 0] + s * offset[..., 1], -s * offset[..., 0] + c * offset[..., 1],
                      offset[..., 2]], axis=-1)
    return (np.abs(local) <= boxes[None, :, 3:6] / 2).all(axis=2)


def _box_corners(obj: _Object, t: float) -> np.ndarray:
    """(8, 3) global corners."""
    l, w, h = obj.dims
    x = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * l / 2
    y = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
    z = np.array([0, 0, 0, 0, 1, 1, 1, 1]) * h
    c, s = np.cos(obj.yaw), np.sin(obj.yaw)
    cx, cy = obj.xy(t)
    return np.column_stack([cx + c * x - s * y, cy + s * x + c * y, z])


def _draw_objects(image, objects: list[_Object], t: float, cam2global: np.ndarray, intrinsic: np.ndarray) -> None:
    """Paint each object's projected box (convex hull of its corners), far to near."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    global2cam = invert_pose(cam2global)
    shapes = []
    for obj in objects:
        cam = _box_corners(obj, t) @ global2cam[:3, :3].T + global2cam[:3, 3]
        if (cam[:, 2] < 0.5).any():
            continue
        uv = cam[:, :2] / cam[:, 2:3] * [intrinsic[0, 0], intrinsic[1, 1]] + intrinsic[:2, 2]
        shapes.append((float(cam[:, 2].mean()), obj.label, _convex_hull(uv)))
    for _, label, hull in sorted(shapes, key=lambda s: -s[0]):
        color = _COLOR[label]
        draw.polygon([tuple(p) for p in hull.tolist()], fill=color, outline=tuple(v // 2 for v in color))


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain, counter-clockwise."""
    pts = sorted(map(tuple, points.tolist()))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])
