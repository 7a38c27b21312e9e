"""A top-view picture of one frame: LiDAR points, predicted and ground-truth boxes (matplotlib, Agg, PNG).

Boxes are ``deploykit.detection.decode.Boxes`` in deploykit's convention (LiDAR frame, dims l, w, h, yaw from
+x counter-clockwise); ground truth from nuScenes annotations goes through
``deploykit.detection.submission.annotations_to_boxes`` first. The picture looks down on the LiDAR frame: x
to the right, y up, metres; predictions are solid rotated rectangles with a heading tick from the centre to
the front edge, ground truth dashed, one colour per class (legend outside the plot, only the classes drawn),
points coloured by height, the ego (LiDAR origin) as a triangle pointing where the vehicle faces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from ..artifacts import atomic_file
from .decode import Boxes


def class_colors(class_names: Sequence[str]) -> dict[str, tuple[float, float, float]]:
    """One RGB colour per class, by position: matplotlib's tab10, then tab20's lighter shades, then repeats."""
    from matplotlib import colormaps

    tab10 = [tuple(c[:3]) for c in colormaps["tab10"].colors]
    light = [tuple(c[:3]) for c in colormaps["tab20"].colors[1::2]]
    palette = tab10 + light
    return {name: palette[i % len(palette)] for i, name in enumerate(class_names)}


def box_corners_bev(centers: np.ndarray, dims: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(K, 4, 2) ground-plane corners: front-left, front-right, rear-right, rear-left (front = +l/2 along the
    heading, left = +w/2 to its left)."""
    centers = np.asarray(centers, np.float64).reshape(-1, 3)
    dims = np.asarray(dims, np.float64).reshape(-1, 3)
    yaw = np.asarray(yaw, np.float64).reshape(-1)
    half_l, half_w = dims[:, 0:1] / 2, dims[:, 1:2] / 2
    local_x = np.concatenate([half_l, half_l, -half_l, -half_l], 1)
    local_y = np.concatenate([half_w, -half_w, -half_w, half_w], 1)
    c, s = np.cos(yaw)[:, None], np.sin(yaw)[:, None]
    x = centers[:, 0:1] + c * local_x - s * local_y
    y = centers[:, 1:2] + s * local_x + c * local_y
    return np.stack([x, y], -1)


def heading_ticks(centers: np.ndarray, dims: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """(K, 2, 2) segments from each box centre to the middle of its front edge."""
    centers = np.asarray(centers, np.float64).reshape(-1, 3)
    half_l = np.asarray(dims, np.float64).reshape(-1, 3)[:, 0] / 2
    yaw = np.asarray(yaw, np.float64).reshape(-1)
    tip = centers[:, :2] + half_l[:, None] * np.stack([np.cos(yaw), np.sin(yaw)], 1)
    return np.stack([centers[:, :2], tip], 1)


def _check_labels(boxes: Boxes, class_names: Sequence[str], what: str) -> np.ndarray:
    labels = np.asarray(boxes.labels).astype(np.int64).reshape(-1)
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        raise ValueError(f"{what} labels {sorted(set(labels[bad].tolist()))} do not index class_names "
                         f"({len(class_names)} names)")
    return labels


def bev_picture(path: str | os.PathLike, points: np.ndarray | None = None, boxes: Boxes | None = None,
                gt: Boxes | None = None, *, point_cloud_range: Sequence[float], class_names: Sequence[str],
                title: str | None = None, show_scores: bool = False, figsize: tuple[float, float] = (9.0, 8.0),
                dpi: int = 100, ego_heading: float = 0.0) -> dict:
    """Write the top view of one frame as a PNG of ``figsize * dpi`` pixels (atomically).

    ``points`` (N, >= 3) LiDAR-frame points inside ``point_cloud_range``, coloured by z over the range's height
    (drawn as an image of about one cell per pixel, the highest point of a cell on top); ``boxes`` predictions
    and ``gt`` ground truth, both ``Boxes`` whose labels index ``class_names``; ``show_scores`` writes each
    prediction's score beside it; ``title`` e.g. the scene and frame; ``ego_heading`` the vehicle's forward
    direction in the LiDAR frame (radians from +x; nuScenes' LIDAR_TOP looks along +y: pi/2). Returns the path, the pixel size
    (W, H), the legend's labels and the plot area (left, top, right, bottom) in image pixels, where
    ``point_cloud_range``'s x and y span.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import LineCollection, PolyCollection
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Polygon

    r = [float(v) for v in point_cloud_range]
    if len(r) != 6 or r[3] <= r[0] or r[4] <= r[1]:
        raise ValueError(f"point_cloud_range must be (x_min, y_min, z_min, x_max, y_max, z_max), got {r}")
    names = list(class_names)
    colors = class_colors(names)

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    # Room on the right for the legend, outside the data.
    ax = fig.add_axes((0.08, 0.07, 0.68, 0.86))
    ax.set_facecolor("white")

    if points is not None and len(points):
        # Points as a height image at about the plot's pixel size (the highest point of each cell on top):
        # as fast for 300k points as for 3k, unlike a scatter.
        p = np.asarray(points, np.float64)
        p = p[(p[:, 0] >= r[0]) & (p[:, 0] < r[3]) & (p[:, 1] >= r[1]) & (p[:, 1] < r[4])]
        cells = max(64, int(min(figsize) * dpi * 0.8))
        res = max(r[3] - r[0], r[4] - r[1]) / cells
        nx, ny = int(np.ceil((r[3] - r[0]) / res)), int(np.ceil((r[4] - r[1]) / res))
        height = np.full((ny, nx), np.nan)
        order = np.argsort(p[:, 2], kind="stable")
        ix = np.minimum(((p[order, 0] - r[0]) / res).astype(np.int64), nx - 1)
        iy = np.minimum(((p[order, 1] - r[1]) / res).astype(np.int64), ny - 1)
        height[iy, ix] = p[order, 2]
        ax.imshow(np.ma.masked_invalid(height), cmap="viridis", vmin=r[2], vmax=r[5], origin="lower",
                  extent=(r[0], r[0] + nx * res, r[1], r[1] + ny * res), interpolation="nearest", alpha=0.5,
                  zorder=1)

    present: list[str] = []
    for which, b in (("gt", gt), ("pred", boxes)):
        if b is None or not len(b):
            continue
        labels = _check_labels(b, names, which)
        corners = box_corners_bev(b.centers, b.dims, b.yaw)
        edge = [colors[names[k]] for k in labels]
        dashed = which == "gt"
        ax.add_collection(PolyCollection(corners, closed=True, facecolors="none", edgecolors=edge,
                                         linewidths=1.0 if dashed else 1.4, linestyles="--" if dashed else "-",
                                         zorder=2 if dashed else 3))
        ax.add_collection(LineCollection(heading_ticks(b.centers, b.dims, b.yaw), colors=edge,
                                         linewidths=1.0 if dashed else 1.4, linestyles="--" if dashed else "-",
                                         zorder=2 if dashed else 3))
        for k in labels.tolist():
            if names[k] not in present:
                present.append(names[k])
        if which == "pred" and show_scores:
            front = corners[:, 0]
            for (x, y), sc, col in zip(front, np.asarray(b.scores).reshape(-1), edge):
                if r[0] <= x <= r[3] and r[1] <= y <= r[4]:
                    ax.text(x, y, f"{sc:.2f}", fontsize=6, color=col, zorder=4, clip_on=True)

    # The ego: a 4.5 m triangle at the LiDAR origin pointing where the vehicle faces.
    c, s_ = np.cos(ego_heading), np.sin(ego_heading)
    triangle = np.array([[2.5, 0.0], [-2.0, 1.4], [-2.0, -1.4]]) @ np.array([[c, s_], [-s_, c]])
    ax.add_patch(Polygon(triangle, closed=True, facecolor="black", edgecolor="black", zorder=5))

    ax.set_xlim(r[0], r[3])
    ax.set_ylim(r[1], r[4])
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    ax.set_title(title or "BEV", fontsize=11)

    present = [n for n in names if n in present]  # class order
    handles = [Patch(facecolor="none", edgecolor=colors[n], linewidth=1.4, label=n) for n in present]
    if boxes is not None and len(boxes):
        handles.append(Line2D([], [], color="black", linestyle="-", linewidth=1.4, label="prediction"))
    if gt is not None and len(gt):
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1.0, label="ground truth"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8,
                  frameon=False)

    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    w, h = fig.canvas.get_width_height()
    box = ax.get_window_extent()  # after the draw: the equal-aspect plot area, pixels from the bottom left
    return {"path": path, "size": (int(w), int(h)), "legend": [hd.get_label() for hd in handles],
            "plot_area": (float(box.x0), float(h - box.y1), float(box.x1), float(h - box.y0))}
