"""A nuScenes-layout dataset read with plain ``json``: no nuscenes-devkit needed.

``NuScenesLayout(dataroot)`` finds the ``v1.0-*`` table directory, loads the
tables and walks each scene (``scene.first_sample_token``, then ``sample.next``)
into :class:`~deploykit.data.frames.SensorFrame` objects with the values the
released models were trained and evaluated on:

* the LIDAR_TOP keyframe and its earlier sweeps (``sample_data.prev``, keyframes
  and non-keyframes alike, newest first), as mmdet3d's / BEVFormer's converter
  collects them; :func:`sensor2lidar` is their ``obtain_sensor2top``;
* the CAM_* keyframes of the sample, each with its own ego pose, in the order
  BEVFormer's converter writes them (:data:`CAMERA_ORDER`; the model's
  per-camera embeddings follow that order);
* ``can_bus`` (18,) as BEVFormer's ``_get_can_bus_info`` and
  ``CustomNuScenesDataset.get_data_info`` build it, quirks included ([3:7] hold the
  ego rotation's w four times; [7:16] come from the first CAN pose message after the
  sample, see :meth:`NuScenesLayout.can_bus`);
* ground truth as nuscenes-devkit's ``load_gt`` (DetectionBox) builds it, with
  ``NuScenes.box_velocity`` velocities; the ego translation ``add_center_dist``
  adds is ``annotation.translation - frame.ego2global[:3, 3]``.

Frames: a Sweep's / CameraView's ``sensor2ego`` is its calibrated_sensor record,
``ego2global`` its own ego_pose record. The LiDAR frame is nuScenes LIDAR_TOP
(x right, y forward, z up on the nuScenes car).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import InputError
from .can_bus import can_bus_from_pose
from .frames import Annotation, CameraView, SensorFrame, Sweep, invert_pose, pose_matrix

REQUIRED_TABLES = ("scene", "sample", "sample_data", "calibrated_sensor", "sensor", "ego_pose", "sample_annotation",
                   "instance", "category", "attribute", "log")
OPTIONAL_TABLES = ("map", "visibility")

LIDAR_CHANNEL = "LIDAR_TOP"
# BEVFormer's tools/data_converter/nuscenes_converter.py ``camera_types``: the order of info['cams'].
CAMERA_ORDER = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")
BIKE_RACK = "static_object.bicycle_rack"

# nuscenes-devkit eval/detection/utils.py category_to_detection_name; other categories are not detection classes.
DETECTION_NAME = {
    "movable_object.barrier": "barrier",
    "vehicle.bicycle": "bicycle",
    "vehicle.bus.bendy": "bus",
    "vehicle.bus.rigid": "bus",
    "vehicle.car": "car",
    "vehicle.construction": "construction_vehicle",
    "vehicle.motorcycle": "motorcycle",
    "human.pedestrian.adult": "pedestrian",
    "human.pedestrian.child": "pedestrian",
    "human.pedestrian.construction_worker": "pedestrian",
    "human.pedestrian.police_officer": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "vehicle.trailer": "trailer",
    "vehicle.truck": "truck",
}

# nuscenes-devkit can_bus/can_bus_api.py: scenes without CAN bus data (get_messages raises, BEVFormer gives zeros).
CAN_BUS_BLACKLIST = frozenset([161, 162, 163, 164, 165, 166, 167, 168, 170, 171, 172, 173, 174, 175, 176,
                               309, 310, 311, 312, 313, 314])
_CAN_SCENE_NAME = re.compile(r"^scene-\d\d\d\d$")
CAN_BUS_LEN = 18


def category_to_detection_name(category_name: str) -> str | None:
    return DETECTION_NAME.get(category_name)


def sensor2lidar(sensor: Sweep | CameraView, lidar_frame: SensorFrame | Sweep) -> tuple[np.ndarray, np.ndarray]:
    """(R (3, 3), T (3,)) with p_lidar = R @ p_sensor + T, through the sensor's and the
    LiDAR's own ego poses: mmdet3d / BEVFormer ``obtain_sensor2top``'s
    ``sensor2lidar_rotation`` and ``sensor2lidar_translation``."""
    if isinstance(lidar_frame, SensorFrame):
        lidar2global = lidar_frame.ego2global @ lidar_frame.lidar2ego
    else:
        lidar2global = lidar_frame.ego2global @ lidar_frame.sensor2ego
    m = invert_pose(lidar2global) @ (sensor.ego2global @ sensor.sensor2ego)
    return m[:3, :3].copy(), m[:3, 3].copy()


def find_version(dataroot: str | Path, version: str | None = None) -> str:
    """The table directory name under ``dataroot`` (``v1.0-mini``, ...)."""
    root = Path(dataroot)
    if not root.is_dir():
        raise InputError(f"nuScenes dataroot {root} is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("v1.0-"))
    if version is not None:
        if not (root / version).is_dir():
            raise InputError(f"{root}: no table directory {version}; found: {', '.join(found) or 'none'}")
        return version
    if not found:
        raise InputError(f"{root}: no v1.0-* table directory (a nuScenes dataroot holds e.g. v1.0-mini/, samples/, "
                         "sweeps/)")
    if len(found) > 1:
        raise InputError(f"{root} holds several table directories ({', '.join(found)}); pass version=")
    return found[0]


class NuScenesLayout:
    """The tables of one nuScenes-layout dataset, loaded with plain json."""

    def __init__(self, dataroot: str | Path, version: str | None = None):
        self.dataroot = Path(dataroot)
        self.version = find_version(self.dataroot, version)
        self.table_root = self.dataroot / self.version
        self._tables: dict[str, list[dict]] = {}
        self._index: dict[str, dict[str, dict]] = {}
        for name in REQUIRED_TABLES + OPTIONAL_TABLES:
            path = self.table_root / f"{name}.json"
            if not path.is_file():
                if name in OPTIONAL_TABLES:
                    continue
                raise InputError(f"{path} is missing: a nuScenes table directory needs "
                                 f"{', '.join(t + '.json' for t in REQUIRED_TABLES)}")
            self._tables[name] = _load_table(path)
            self._index[name] = {_field(r, "token", name, path): r for r in self._tables[name]}
        self._scene_by_name = {_field(s, "name", "scene"): s for s in self._tables["scene"]}
        self._build_reverse_index()
        self._can_cache: dict[str, list | None] = {}

    # -- tables ---------------------------------------------------------------------------------------------

    def table(self, name: str) -> list[dict]:
        """The records of one loaded table (do not modify them)."""
        if name not in self._tables:
            raise InputError(f"{self.table_root}: no {name} table loaded")
        return self._tables[name]

    def get(self, table: str, token: str, referrer: tuple[str, str, str] | None = None) -> dict:
        """The record of ``token`` in ``table``; ``referrer`` = (table, token, field) of the
        record that points here, for the error message of a dangling token."""
        try:
            return self._index[table][token]
        except KeyError:
            pass
        if table not in self._index:
            raise InputError(f"{self.table_root}/{table}.json is missing but {referrer or 'a record'} needs it")
        if referrer is None:
            raise InputError(f"{self.table_root}/{table}.json has no record {token!r}")
        src_table, src_token, field = referrer
        raise InputError(f"{self.table_root}/{src_table}.json: {src_table} {src_token} {field} = {token!r} "
                         f"is not in {table}.json (dangling token)")

    def _ref(self, table: str, record: dict, src_table: str, field: str) -> dict:
        return self.get(table, _field(record, field, src_table), (src_table, record.get("token", "?"), field))

    def _build_reverse_index(self) -> None:
        self._channel: dict[str, str] = {}
        self._sample_data: dict[str, dict[str, str]] = {token: {} for token in self._index["sample"]}
        for sd in self._tables["sample_data"]:
            cs = self._ref("calibrated_sensor", sd, "sample_data", "calibrated_sensor_token")
            sensor = self._ref("sensor", cs, "calibrated_sensor", "sensor_token")
            self._channel[sd["token"]] = _field(sensor, "channel", "sensor")
            if _field(sd, "is_key_frame", "sample_data"):
                sample = self._ref("sample", sd, "sample_data", "sample_token")
                self._sample_data[sample["token"]][self._channel[sd["token"]]] = sd["token"]
        self._anns: dict[str, list[str]] = {token: [] for token in self._index["sample"]}
        for ann in self._tables["sample_annotation"]:
            sample = self._ref("sample", ann, "sample_annotation", "sample_token")
            self._anns[sample["token"]].append(ann["token"])

    # -- scenes and samples ---------------------------------------------------------------------------------

    def scene_names(self) -> list[str]:
        return [s["name"] for s in self._tables["scene"]]

    def scene(self, scene: str) -> dict:
        """The scene record of a scene name (or token)."""
        record = self._scene_by_name.get(scene) or self._index["scene"].get(scene)
        if record is None:
            names = self.scene_names()
            shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
            raise InputError(f"unknown scene {scene!r} in {self.table_root}; scenes: {shown or 'none'}")
        return record

    def scene_description(self, scene: str) -> str:
        return str(self.scene(scene).get("description", ""))

    def sample_tokens(self, scene: str | None = None) -> list[str]:
        """Sample tokens in drive order: one scene's, or every scene's in scene-table order."""
        scenes = self._tables["scene"] if scene is None else [self.scene(scene)]
        return [token for record in scenes for token in self._walk_samples(record)]

    def _walk_samples(self, scene: dict) -> list[str]:
        sample = self._ref("sample", scene, "scene", "first_sample_token")
        tokens = [sample["token"]]
        while _field(sample, "next", "sample"):
            sample = self._ref("sample", sample, "sample", "next")
            if sample["token"] in tokens:
                raise InputError(f"{self.table_root}/sample.json: the next links of scene {scene['name']} loop "
                                 f"back to sample {sample['token']}")
            tokens.append(sample["token"])
        return tokens

    # -- frames ---------------------------------------------------------------------------------------------

    def frames(self, scene: str | None = None, *, sweeps: int = 10, cameras: bool = True,
               annotations: bool = True) -> Iterator[SensorFrame]:
        """SensorFrames of one scene (or of all, in scene-table order), index 0, 1, 2, ... per scene.

        ``sweeps``: up to that many earlier LIDAR_TOP sweeps per frame (BEVFormer's
        converter takes 10). ``annotations`` is None on a dataset without any (test split).
        """
        if sweeps < 0:
            raise InputError(f"sweeps must be >= 0, got {sweeps}")
        scenes = self._tables["scene"] if scene is None else [self.scene(scene)]
        return self._frames(scenes, sweeps, cameras, annotations)

    def _frames(self, scenes, sweeps, cameras, annotations) -> Iterator[SensorFrame]:
        for record in scenes:
            for index, token in enumerate(self._walk_samples(record)):
                yield self.frame(token, index=index, sweeps=sweeps, cameras=cameras, annotations=annotations)

    def frame(self, sample_token: str, *, index: int = 0, sweeps: int = 10, cameras: bool = True,
              annotations: bool = True) -> SensorFrame:
        sample = self.get("sample", sample_token)
        scene = self._ref("scene", sample, "sample", "scene_token")
        data = self._sample_data[sample_token]
        frame = SensorFrame(scene=scene["name"], index=index, token=sample_token,
                            timestamp_us=int(_field(sample, "timestamp", "sample")))
        if LIDAR_CHANNEL in data:
            sd = self.get("sample_data", data[LIDAR_CHANNEL])
            frame.lidar = self.sweep(sd["token"])
            frame.ego2global, frame.lidar2ego = frame.lidar.ego2global, frame.lidar.sensor2ego
            newer = sd
            while _field(newer, "prev", "sample_data") and len(frame.sweeps) < sweeps:
                newer = self._ref("sample_data", newer, "sample_data", "prev")
                frame.sweeps.append(self.sweep(newer["token"]))
        if cameras:
            frame.cameras = [self.camera(data[name]) for name in self.camera_channels(sample_token)]
            if frame.lidar is None and frame.cameras:
                frame.ego2global = frame.cameras[0].ego2global
        frame.can_bus = self.can_bus(sample_token)
        if annotations and self._tables["sample_annotation"]:
            frame.annotations = self.annotations(sample_token)
            frame.bike_racks = self.bike_racks(sample_token)
        return frame

    def camera_channels(self, sample_token: str) -> list[str]:
        """The sample's CAM_* keyframe channels: BEVFormer's order, then any others sorted."""
        data = self._sample_data[sample_token]
        extra = sorted(c for c in data if c.startswith("CAM_") and c not in CAMERA_ORDER)
        return [c for c in CAMERA_ORDER if c in data] + extra

    def _poses(self, sd: dict) -> tuple[dict, dict]:
        cs = self._ref("calibrated_sensor", sd, "sample_data", "calibrated_sensor_token")
        ego = self._ref("ego_pose", sd, "sample_data", "ego_pose_token")
        return cs, ego

    def _data_path(self, sd: dict, hint: str = "") -> Path:
        path = self.dataroot / _field(sd, "filename", "sample_data")
        if not path.is_file():
            raise InputError(f"{path} (sample_data {sd['token']}) does not exist{hint}")
        return path

    def sweep(self, sample_data_token: str) -> Sweep:
        """A LiDAR sample_data record as a Sweep with its own calibration and ego pose."""
        sd = self.get("sample_data", sample_data_token)
        cs, ego = self._poses(sd)
        hint = "" if sd["is_key_frame"] else "; non-keyframe sweeps live in sweeps/ (or pass sweeps=0)"
        return Sweep(path=self._data_path(sd, hint), timestamp_us=int(sd["timestamp"]),
                     sensor2ego=_pose(cs, "calibrated_sensor"), ego2global=_pose(ego, "ego_pose"),
                     layout="nuscenes")

    def camera(self, sample_data_token: str) -> CameraView:
        sd = self.get("sample_data", sample_data_token)
        cs, ego = self._poses(sd)
        intrinsic = np.asarray(_field(cs, "camera_intrinsic", "calibrated_sensor"), dtype=np.float64)
        if intrinsic.shape != (3, 3):
            raise InputError(f"{self.table_root}/calibrated_sensor.json: camera_intrinsic of {cs['token']} "
                             f"({self._channel[sd['token']]}) is not 3x3")
        height, width = int(sd.get("height") or 0), int(sd.get("width") or 0)
        return CameraView(name=self._channel[sd["token"]], path=self._data_path(sd), intrinsic=intrinsic,
                          sensor2ego=_pose(cs, "calibrated_sensor"), ego2global=_pose(ego, "ego_pose"),
                          timestamp_us=int(sd["timestamp"]),
                          image_size=(height, width) if height > 0 and width > 0 else None)

    # -- CAN bus --------------------------------------------------------------------------------------------

    def can_bus(self, sample_token: str) -> np.ndarray:
        """(18,) float64: BEVFormer's ``_get_can_bus_info`` (zeros where the scene has no
        ``can_bus/<scene>_pose.json``), then ``get_data_info``: [:3] ego translation, [3:7]
        the ego rotation's w four times (BEVFormer's numpy broadcast of a Quaternion, see
        deploykit.data.can_bus.can_bus_from_pose), [-2] / [-1] the ego yaw wrapped to [0, 360) degrees, in radians / degrees.
        The ego pose is LIDAR_TOP's (a camera's if the sample has no LiDAR)."""
        sample = self.get("sample", sample_token)
        scene = self._ref("scene", sample, "sample", "scene_token")
        data = self._sample_data[sample_token]
        channel = LIDAR_CHANNEL if LIDAR_CHANNEL in data else next(iter(self.camera_channels(sample_token)), None)
        if channel is None:
            raise InputError(f"sample {sample_token} has no LIDAR_TOP or CAM_* keyframe to take the ego pose from")
        ego = self._poses(self.get("sample_data", data[channel]))[1]
        can_bus = self._can_bus_info(scene["name"], int(sample["timestamp"]))
        return can_bus_from_pose(ego["translation"], ego["rotation"], can_bus[7:16])

    def _can_bus_info(self, scene_name: str, timestamp: int) -> np.ndarray:
        messages = self._can_pose_messages(scene_name)
        if messages is None:
            return np.zeros(CAN_BUS_LEN)
        path = self.dataroot / "can_bus" / f"{scene_name}_pose.json"
        try:
            # BEVFormer: position and orientation of the last message at or before the
            # sample (the first message if all are later), the remaining fields (accel,
            # rotation_rate, vel, in that message's key order) of its loop variable, i.e. of
            # the first message after the sample (the last message if none is).
            last = pose = messages[0]
            for pose in messages:
                if pose["utime"] > timestamp:
                    break
                last = pose
            values = list(last["pos"]) + list(last["orientation"])
            for key in last:
                if key not in ("utime", "pos", "orientation"):
                    values.extend(pose[key])
            values.extend([0.0, 0.0])
            can_bus = np.array(values, dtype=np.float64)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(f"{path}: malformed pose messages ({type(exc).__name__}: {exc})") from None
        if can_bus.shape != (CAN_BUS_LEN,):
            raise InputError(f"{path}: pose messages give {can_bus.size} CAN-bus values, expected 16 "
                             "(pos 3, orientation 4, accel 3, rotation_rate 3, vel 3)")
        return can_bus

    def _can_pose_messages(self, scene_name: str) -> list | None:
        if scene_name not in self._can_cache:
            path = self.dataroot / "can_bus" / f"{scene_name}_pose.json"
            messages = None
            # nuscenes-devkit's NuScenesCanBus.get_messages refuses these; BEVFormer then uses zeros.
            usable = _CAN_SCENE_NAME.match(scene_name) and int(scene_name[-4:]) not in CAN_BUS_BLACKLIST
            if usable and path.is_file():
                messages = _load_json(path)
                if not isinstance(messages, list) or not messages:
                    raise InputError(f"{path}: expected a non-empty list of pose messages")
            self._can_cache[scene_name] = messages
        return self._can_cache[scene_name]

    # -- ground truth ---------------------------------------------------------------------------------------

    def category_name(self, annotation: dict) -> str:
        instance = self._ref("instance", annotation, "sample_annotation", "instance_token")
        return _field(self._ref("category", instance, "instance", "category_token"), "name", "category")

    def annotations(self, sample_token: str) -> list[Annotation]:
        """The sample's detection boxes as devkit's ``load_gt(..., DetectionBox)`` makes them,
        in sample_annotation table order; non-detection categories are skipped."""
        out = []
        for token in self._anns[self.get("sample", sample_token)["token"]]:
            record = self.get("sample_annotation", token)
            name = category_to_detection_name(self.category_name(record))
            if name is not None:
                out.append(self._annotation(record, name))
        return out

    def bike_racks(self, sample_token: str) -> list[Annotation]:
        """The sample's static_object.bicycle_rack boxes (detection_name "")."""
        return [self._annotation(self.get("sample_annotation", token), "")
                for token in self._anns[self.get("sample", sample_token)["token"]]
                if self.category_name(self.get("sample_annotation", token)) == BIKE_RACK]

    def _annotation(self, record: dict, detection_name: str) -> Annotation:
        attributes = _field(record, "attribute_tokens", "sample_annotation")
        if len(attributes) > 1:
            raise InputError(f"{self.table_root}/sample_annotation.json: annotation {record['token']} has "
                             f"{len(attributes)} attributes; ground truth may have at most one")
        attribute = ""
        if attributes:
            attribute = self.get("attribute", attributes[0],
                                 ("sample_annotation", record["token"], "attribute_tokens"))["name"]
        return Annotation(
            token=record["token"],
            translation=np.asarray(record["translation"], dtype=np.float64),
            size=np.asarray(record["size"], dtype=np.float64),
            rotation=np.asarray(record["rotation"], dtype=np.float64),
            velocity=self.box_velocity(record["token"])[:2],
            detection_name=detection_name,
            attribute_name=attribute,
            num_pts=int(record["num_lidar_pts"]) + int(record["num_radar_pts"]),
        )

    def box_velocity(self, annotation_token: str, max_time_diff: float = 1.5) -> np.ndarray:
        """(3,) global velocity as nuscenes-devkit's ``NuScenes.box_velocity``: centred
        difference over prev/next (then ``max_time_diff`` doubles), else one-sided, NaN for
        a lone annotation or a time gap over the limit."""
        current = self.get("sample_annotation", annotation_token)
        has_prev, has_next = current["prev"] != "", current["next"] != ""
        if not has_prev and not has_next:
            return np.array([np.nan, np.nan, np.nan])
        ref = ("sample_annotation", annotation_token, "prev")
        first = self.get("sample_annotation", current["prev"], ref) if has_prev else current
        ref = ("sample_annotation", annotation_token, "next")
        last = self.get("sample_annotation", current["next"], ref) if has_next else current
        pos_diff = np.array(last["translation"]) - np.array(first["translation"])
        time_last = 1e-6 * self._ref("sample", last, "sample_annotation", "sample_token")["timestamp"]
        time_first = 1e-6 * self._ref("sample", first, "sample_annotation", "sample_token")["timestamp"]
        time_diff = time_last - time_first
        if has_next and has_prev:
            max_time_diff *= 2
        if time_diff > max_time_diff:
            return np.array([np.nan, np.nan, np.nan])
        return pos_diff / time_diff


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable JSON ({type(exc).__name__}: {exc})") from None


def _load_table(path: Path) -> list[dict]:
    table = _load_json(path)
    if not isinstance(table, list) or not all(isinstance(r, dict) for r in table):
        raise InputError(f"{path}: a nuScenes table is a JSON list of records")
    return table


def _field(record: dict, key: str, table: str, path: Path | None = None):
    try:
        return record[key]
    except KeyError:
        where = path or f"{table}.json"
        raise InputError(f"{where}: {table} record {record.get('token', '?')} has no field {key!r}") from None


def _pose(record: dict, table: str) -> np.ndarray:
    try:
        translation = np.asarray(record["translation"], dtype=np.float64)
        rotation = np.asarray(record["rotation"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{table}.json: record {record.get('token', '?')} needs translation and rotation") from None
    if translation.shape != (3,) or rotation.shape != (4,) or not np.linalg.norm(rotation) > 0:
        raise InputError(f"{table}.json: record {record['token']} needs a 3-vector translation and a (w, x, y, z) "
                         "quaternion rotation")
    return pose_matrix(translation, rotation)
