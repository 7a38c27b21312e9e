"""LSS voxel pooling on ONNX Runtime (CPU): the deploykit::BEVPool op against naive pooling.

At BEVDepth's recipe shapes (bev_depth_lss_r50_256x704_128x128_24e_2key: 6 cameras,
d_bound [2, 58, 0.5] = 112 depth bins, 16x44 feature maps, 80 context channels, a
128x128x1 BEV grid of 0.8 m), with the frustum of a simple surround rig, one pooling
from DepthNet's outputs (softmax depth (B*N, D, H, W), context (B*N, C, H, W)) to the
(B, C, Z, Y, X) BEV is exported several ways and timed interleaved in one process:

  a. BEVPool, ortx kernel     the deploykit::BEVPool node, constant sorted ranks, run by
                              the onnxruntime-extensions numpy kernel (by (cell, pixel) pair)
  b. BEVPool, ONNX function   the same file, the node as its ONNX function (ORT inlines it)
  c. naive: scatter_add       BEVDepth's pooling the public way: the frustum features
                              depth x context materialised (B*N, C, D, H, W), each point's
                              cell from geom_xyz, off-grid points to a spare row, summed
                              with scatter_add (ScatterElements, reduction add)
     naive: LSS cumsum        LSS's cumsum trick on the same frustum: points sorted by cell,
                              cumsum, the last of each run minus the one before (fp32, as
                              LSS; and with an fp64 running sum, which keeps the digits)
  d. BEVPool unsorted, ...    the previous key frame's pooling in BEVDepth's two-key model:
                              the cells come from the frustum moved by the ego motion (an
                              input), computed in the graph, so ranks are unsorted and the
                              intervals empty; ortx kernel and ONNX function

Every variant's BEV is checked against a float64 sum. Ratios are to the fastest naive
pooling; a second speed-up is to the fastest naive pooling within the op's tolerance.
Writes benchmarks/results/bev_pool.{md,json}.

    python benchmarks/bench_bev_pool.py [--rounds N] [--threads T]
    python benchmarks/bench_bev_pool.py --quick    # small shapes, results to a temp dir
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from common import run  # benchmarks/common.py also puts the repository on sys.path

from deploykit.bench import interleaved, ratio_interval  # noqa: E402
from deploykit.engines.ort import build  # noqa: E402
from deploykit.ops import bev_pool  # noqa: E402
from deploykit.report import ratio_rows_markdown  # noqa: E402

CONFIG = "bev_depth_lss_r50_256x704_128x128_24e_2key"
SHAPES = {
    "bevdepth_r50_256x704_2key": dict(cameras=6, d_bound=(2.0, 58.0, 0.5), image=(256, 704), stride=16,
                                      channels=80, x_bound=(-51.2, 51.2, 0.8), y_bound=(-51.2, 51.2, 0.8),
                                      z_bound=(-5.0, 3.0, 8.0)),
    "quick": dict(cameras=6, d_bound=(2.0, 58.0, 2.0), image=(128, 352), stride=16, channels=16,
                  x_bound=(-51.2, 51.2, 1.6), y_bound=(-51.2, 51.2, 1.6), z_bound=(-5.0, 3.0, 8.0)),
}
DEFAULT_ROUNDS = {"bevdepth_r50_256x704_2key": 25, "quick": 10}
OPSET = 17
YAWS_DEG = (0.0, -55.0, 55.0, 180.0, -110.0, 110.0)  # front, front-right, front-left, back, back-right, back-left
CAMERA_HEIGHT = 1.5  # metres above the ego origin
FX_AT_704 = 560.0
# The previous key frame, as the two-key model sees it: the ego moved 5 m ahead and turned 3 degrees.
PREV_MOTION = (5.0, 3.0)
TOL = 1e-5  # max |error| / max |bev|, against a float64 sum
# LSS's cumsum trick takes each cell's sum as the difference of two fp32 running sums over
# all points, which are much larger than one cell's: it loses digits the direct sums keep.
CUMSUM_TOL = 1e-4


# --- geometry -------------------------------------------------------------------------------------

def grid_of(s: dict) -> tuple[int, int, int]:
    return tuple(int(round((b[1] - b[0]) / b[2])) for b in (s["z_bound"], s["y_bound"], s["x_bound"]))


def frustum_points(s: dict) -> np.ndarray:
    """Each frustum point (u * d, v * d, d) through the inverse intrinsics into the ego frame:
    (N, D, H, W, 3) float32, as BEVDepth's create_frustum and get_geometry (no image or BEV
    augmentation). Cameras at the rig's yaws, 1 m from the ego origin, CAMERA_HEIGHT up."""
    img_h, img_w = s["image"]
    h, w = img_h // s["stride"], img_w // s["stride"]
    depths = np.arange(*s["d_bound"], dtype=np.float32)
    dd, vv, uu = np.meshgrid(depths, np.linspace(0, img_h - 1, h, dtype=np.float32),
                             np.linspace(0, img_w - 1, w, dtype=np.float32), indexing="ij")
    pix = np.stack([uu * dd, vv * dd, dd], -1)
    fx = FX_AT_704 * img_w / 704
    k = np.array([[fx, 0, img_w / 2], [0, fx, img_h / 2], [0, 0, 1]], np.float32)
    cam = pix @ np.linalg.inv(k).T.astype(np.float32)
    out = []
    for yaw in np.deg2rad(YAWS_DEG[:s["cameras"]]):
        forward, right = np.array([np.cos(yaw), np.sin(yaw), 0]), np.array([np.sin(yaw), -np.cos(yaw), 0])
        rot = np.stack([right, [0, 0, -1], forward], 1).astype(np.float32)  # camera x right, y down, z ahead
        out.append(cam @ rot.T + np.array([np.cos(yaw), np.sin(yaw), CAMERA_HEIGHT], np.float32))
    return np.stack(out).astype(np.float32)


def voxel_origin(s: dict) -> tuple[np.ndarray, np.ndarray]:
    """BEVDepth's voxel_coord - voxel_size / 2 and voxel_size, in float32 as its buffers are."""
    size = np.array([s["x_bound"][2], s["y_bound"][2], s["z_bound"][2]], np.float32)
    coord = np.array([b[0] + b[2] / 2.0 for b in (s["x_bound"], s["y_bound"], s["z_bound"])], np.float32)
    return coord - size / 2, size


def cells_of(points: np.ndarray, s: dict) -> np.ndarray:
    """geom_xyz: ((p - origin) / size).int(), truncation toward zero as BEVDepth's .int()."""
    origin, size = voxel_origin(s)
    return ((points - origin) / size).astype(np.int32)


def motion(forward_m: float, yaw_deg: float) -> np.ndarray:
    """4x4 previous-ego -> current-ego transform (float32)."""
    a = np.deg2rad(yaw_deg)
    m = np.eye(4, dtype=np.float32)
    m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    m[0, 3] = -forward_m  # the previous frame's origin lies behind the current one
    return m


# --- the pooling modules (all take DepthNet's depth (B*N, D, H, W) and context (B*N, C, H, W)) ------

class _Pooling(torch.nn.Module):
    input_names = ["depth", "context"]
    output_names = ["bev"]

    def __init__(self, s: dict):
        super().__init__()
        # Python ints, so shapes are constants in the graph (sizes read off traced tensors
        # become Shape ops that ONNX shape inference cannot see through).
        self.cameras, self.grid, self.channels = s["cameras"], grid_of(s), s["channels"]


class OpPool(_Pooling):
    """a, b: deploykit::BEVPool with prepare_ranks' constant sorted ranks."""

    def __init__(self, s: dict, cells: np.ndarray):
        super().__init__(s)
        for k, v in bev_pool.prepare_ranks(cells[None], self.grid).items():
            self.register_buffer(k, torch.from_numpy(v))

    def forward(self, depth, context):
        bn, c, h, w = context.shape
        feat = context.reshape(bn // self.cameras, self.cameras, c, h, w).permute(0, 1, 3, 4, 2)
        depth = depth.reshape(bn // self.cameras, self.cameras, *depth.shape[1:])
        return bev_pool.bev_pool(depth, feat, {k: getattr(self, k) for k in bev_pool.RANK_NAMES}, self.grid)


def frustum_features(depth, context, cameras):
    """BEVDepth's img_feat_with_depth: (B*N, C, D, H, W) -> (B*N*D*H*W, C), batch-major."""
    bn, c, h, w = context.shape
    x = depth.unsqueeze(1) * context.unsqueeze(2)
    return x.reshape(bn // cameras, cameras, c, depth.shape[1], h, w).permute(0, 1, 3, 4, 5, 2).reshape(-1, c)


class NaiveScatter(_Pooling):
    """c: the frustum, then each point added to its cell. BEVDepth's voxel_pooling_train is a
    CUDA extension without a symbolic (does not export); its PyTorch form exported only as
    scatter_add: index_add and index_put(accumulate=True) export, but as a Scatter without
    reduction, which keeps one of the duplicates (wrong sums), and boolean-masking the
    off-grid points gives NonZero, a data-dependent shape. So off-grid points go to a spare
    row (Where) and the index is expanded over the channels for ScatterElements(add)."""

    def __init__(self, s: dict, cells: np.ndarray):
        super().__init__(s)
        self.register_buffer("geom_xyz", torch.from_numpy(cells[None]))  # (B, N, D, H, W, 3) int32

    def forward(self, depth, context):
        z_n, y_n, x_n = self.grid
        x = frustum_features(depth, context, self.cameras)
        b = depth.shape[0] // self.cameras
        g = self.geom_xyz.reshape(b, -1, 3).long()
        batch = torch.arange(b).reshape(b, 1)
        gx, gy, gz = g[..., 0], g[..., 1], g[..., 2]
        kept = (gx >= 0) & (gx < x_n) & (gy >= 0) & (gy < y_n) & (gz >= 0) & (gz < z_n)
        cells = b * z_n * y_n * x_n
        index = torch.where(kept, ((batch * z_n + gz) * y_n + gy) * x_n + gx, torch.full_like(gx, cells))
        # Over the channels by broadcasting: expand(-1, C) and repeat(1, C) export with a
        # ConstantOfShape that ONNX shape inference does not see through.
        index = index.reshape(-1, 1) + torch.zeros(1, self.channels, dtype=torch.int64)
        out = x.new_zeros(cells + 1, self.channels).scatter_add(0, index, x)
        return out[:cells].reshape(b, z_n, y_n, x_n, -1).permute(0, 4, 1, 2, 3)


class NaiveCumsum(_Pooling):
    """c: LSS's voxel_pooling with its cumsum trick (x[kept]; argsort; cumsum; the last of each
    run). Its boolean masks export as NonZero (data-dependent shapes), ``kept[:-1] = ...`` and
    ``final[b, :, z, y, x] = x`` as index_put forms the exporter refuses; so, the geometry
    being constant, the kept-and-sorted order and the run ends are computed once here (buffers)
    and the sums land in a flat (cells, C) canvas with one 1-D index."""

    def __init__(self, s: dict, cells: np.ndarray, dtype: torch.dtype = torch.float32):
        super().__init__(s)
        self.dtype = dtype  # of the running sum: LSS's is fp32; fp64 keeps the digits it loses
        # Kept points sorted by cell: LSS's ranks.argsort() (prepare_ranks' order within a cell, by
        # pixel then depth bin, timed no different here from frustum order).
        ranks = bev_pool.prepare_ranks(cells[None], self.grid)
        ends = ranks["interval_starts"].astype(np.int64) + ranks["interval_lengths"] - 1
        self.register_buffer("order", torch.from_numpy(ranks["ranks_depth"].astype(np.int64)))
        self.register_buffer("ends", torch.from_numpy(ends))
        self.register_buffer("cell", torch.from_numpy(ranks["ranks_bev"][ends].astype(np.int64)))

    def forward(self, depth, context):
        z_n, y_n, x_n = self.grid
        b = depth.shape[0] // self.cameras
        x = frustum_features(depth, context, self.cameras)[self.order].to(self.dtype).cumsum(0)[self.ends]
        x = torch.cat((x[:1], x[1:] - x[:-1])).float()
        final = x.new_zeros(b * z_n * y_n * x_n, self.channels)
        final[self.cell] = x
        return final.reshape(b, z_n, y_n, x_n, -1).permute(0, 4, 1, 2, 3)


class PrevFramePool(_Pooling):
    """d: the previous key frame's pooling in BEVDepth's two-key model. The frustum (constant,
    in the previous ego frame) is moved by ``ego_motion`` (4x4, an input), cut into cells
    in the graph (off-grid: rank -1) and pooled with unsorted ranks (zero-length intervals)."""

    input_names = ["depth", "context", "ego_motion"]

    def __init__(self, s: dict, points: np.ndarray):
        super().__init__(s)
        n, d, h, w, _ = points.shape
        origin, size = voxel_origin(s)
        # (3, points): the per-axis offsets then broadcast along rows (ONNX Runtime is slow
        # broadcasting a 3-vector across a (points, 3) tensor); the same float32 arithmetic.
        self.register_buffer("points", torch.from_numpy(np.ascontiguousarray(points.reshape(-1, 3).T)))
        self.register_buffer("origin", torch.from_numpy(origin[:, None]))
        self.register_buffer("size", torch.from_numpy(size[:, None]))
        self.register_buffer("ranks_depth", torch.arange(n * d * h * w, dtype=torch.int32))
        pixel = torch.arange(n * h * w, dtype=torch.int32).reshape(n, 1, h, w).expand(n, d, h, w)
        self.register_buffer("ranks_feat", pixel.reshape(-1).contiguous())
        self.register_buffer("no_intervals", torch.zeros(0, dtype=torch.int32))

    def forward(self, depth, context, ego_motion):
        z_n, y_n, x_n = self.grid
        p = ego_motion[:3, :3] @ self.points + ego_motion[:3, 3:]
        g = ((p - self.origin) / self.size).int()
        gx, gy, gz = g[0], g[1], g[2]
        kept = (gx >= 0) & (gx < x_n) & (gy >= 0) & (gy < y_n) & (gz >= 0) & (gz < z_n)
        ranks_bev = torch.where(kept, (gz * y_n + gy) * x_n + gx, torch.full_like(gx, -1))
        bn, c, h, w = context.shape
        feat = context.reshape(1, bn, c, h, w).permute(0, 1, 3, 4, 2)
        ranks = bev_pool.unsorted_ranks(self.ranks_depth, self.ranks_feat, ranks_bev)
        return bev_pool.bev_pool(depth.reshape(1, bn, *depth.shape[1:]), feat, ranks, self.grid)


def export(module: torch.nn.Module, feeds: dict[str, np.ndarray], path: Path) -> Path:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(feeds[k]) for k in module.input_names), str(path),
                          input_names=module.input_names, output_names=module.output_names, opset_version=OPSET,
                          dynamo=False, do_constant_folding=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    dynamic = [v.name for v in [*model.graph.value_info, *model.graph.output]
               if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    if dynamic:
        raise RuntimeError(f"{path.name} has tensors of data-dependent shape: {dynamic[:5]}")
    return path


def float64_pooling(depth: np.ndarray, context: np.ndarray, cells: np.ndarray, s: dict) -> np.ndarray:
    """The ground truth: every in-grid frustum point's depth x feature summed in float64."""
    z_n, y_n, x_n = grid_of(s)
    n, d, h, w, _ = cells.shape
    c = cells.reshape(-1, 3)
    kept = ((c >= 0) & (c < [x_n, y_n, z_n])).all(1)
    pixel = np.broadcast_to(np.arange(n * h * w).reshape(n, 1, h, w), (n, d, h, w)).reshape(-1)
    feat = context.transpose(0, 2, 3, 1).reshape(-1, context.shape[1]).astype(np.float64)
    values = depth.reshape(-1)[kept].astype(np.float64)[:, None] * feat[pixel[kept]]
    out = np.zeros((z_n * y_n * x_n, feat.shape[1]))
    np.add.at(out, (c[kept, 2] * y_n + c[kept, 1]) * x_n + c[kept, 0], values)
    return out.reshape(1, z_n, y_n, x_n, -1).transpose(0, 4, 1, 2, 3)


def bench_recipe(name: str, rounds: int, threads: int, workdir: Path) -> dict:
    s = SHAPES[name]
    grid = grid_of(s)
    points = frustum_points(s)
    cells = cells_of(points, s)
    n, d, h, w, _ = cells.shape
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.standard_normal((n, d, h, w)).astype(np.float32)
    depth = np.exp(logits - logits.max(1, keepdims=True))
    depth = (depth / depth.sum(1, keepdims=True)).astype(np.float32)  # DepthNet's softmax over the bins
    context = rng.standard_normal((n, s["channels"], h, w)).astype(np.float32)
    feeds = {"depth": depth, "context": context}
    prev_feeds = {**feeds, "ego_motion": motion(*PREV_MOTION)}

    started = time.perf_counter()
    op = export(OpPool(s, cells), feeds, workdir / f"{name}-op.onnx")
    scatter = export(NaiveScatter(s, cells), feeds, workdir / f"{name}-scatter.onnx")
    cumsum = export(NaiveCumsum(s, cells), feeds, workdir / f"{name}-cumsum.onnx")
    cumsum64 = export(NaiveCumsum(s, cells, torch.float64), feeds, workdir / f"{name}-cumsum64.onnx")
    prev = export(PrevFramePool(s, points), prev_feeds, workdir / f"{name}-prev.onnx")
    export_s = time.perf_counter() - started
    variants = {
        "a. BEVPool, ortx kernel": (op, "ortx", feeds),
        "b. BEVPool, ONNX function": (op, "function", feeds),
        "c. naive: scatter_add": (scatter, "function", feeds),
        "c. naive: LSS cumsum": (cumsum, "function", feeds),
        "c. naive: LSS cumsum, fp64 running sum": (cumsum64, "function", feeds),
        "d. BEVPool unsorted (prev. frame), ortx kernel": (prev, "ortx", prev_feeds),
        "d. BEVPool unsorted (prev. frame), ONNX function": (prev, "function", prev_feeds),
    }
    engines = {k: build(p, custom_ops=mode, threads=threads, spinning=False) for k, (p, mode, _) in variants.items()}

    # The same BEV from every variant; d with no ego motion pools exactly the current frustum.
    want = float64_pooling(depth, context, cells, s)
    scale = float(np.abs(want).max())
    errors = {}
    for k, engine in engines.items():
        f = {**feeds, "ego_motion": np.eye(4, dtype=np.float32)} if "ego_motion" in variants[k][2] else feeds
        got = engine.run(f)["bev"]
        assert got.shape == want.shape, (k, got.shape)
        errors[k] = float(np.abs(got - want).max() / scale)
    tolerance = {k: CUMSUM_TOL if k == "c. naive: LSS cumsum" else TOL for k in errors}
    bad = {k: e for k, e in errors.items() if e > tolerance[k]}
    if bad:
        raise AssertionError(f"variants disagree with the float64 pooling beyond {tolerance}: {bad}")

    print(f"{name}: timing {len(engines)} variants x {rounds} rounds, {threads} threads", flush=True)
    samples = interleaved({k: (lambda e=e, f=variants[k][2]: e.run(f)) for k, e in engines.items()},
                          warmup=3, rounds=rounds)
    naive = [k for k in samples if k.startswith("c.")]
    baseline = min(naive, key=lambda k: np.median(samples[k]))
    accurate = min((k for k in naive if errors[k] <= TOL), key=lambda k: np.median(samples[k]))
    rows = []
    for k, t in samples.items():
        ratio, lo, hi = ratio_interval(t, samples[baseline])
        rows.append({"variant": k, "median_ms": float(np.median(t) * 1e3), "p90_ms": float(np.percentile(t, 90) * 1e3),
                     "ratio_to_baseline": ratio, "ratio_ci95": [lo, hi], "runs": int(t.size),
                     "speedup_vs_naive": 1 / ratio,
                     "speedup_vs_accurate_naive": float(np.median(samples[accurate]) / np.median(t)),
                     "max_rel_error": errors[k]})
    m = prev_feeds["ego_motion"]
    prev_cells = cells_of(points @ m[:3, :3].T + m[:3, 3], s)
    prev_kept = int(((prev_cells >= 0) & (prev_cells < [grid[2], grid[1], grid[0]])).all(-1).sum())
    ranks = bev_pool.prepare_ranks(cells[None], grid)
    rb, rf = ranks["ranks_bev"], ranks["ranks_feat"]
    pairs = 1 + int(np.count_nonzero((rb[1:] != rb[:-1]) | (rf[1:] != rf[:-1]))) if len(rb) else 0  # (cell, pixel) runs
    return {"recipe": name, "config": CONFIG if name != "quick" else f"{CONFIG} (reduced)", "shape": s,
            "depth_shape": list(depth.shape), "context_shape": list(context.shape),
            "bev_shape": list(want.shape), "frustum_points": int(cells[..., 0].size),
            "kept_points": int(len(ranks["ranks_bev"])), "occupied_cells": int(len(ranks["interval_starts"])),
            "cell_pixel_pairs": pairs,
            "prev_frame_motion": {"forward_m": PREV_MOTION[0], "yaw_deg": PREV_MOTION[1]},
            "prev_frame_kept_points": prev_kept, "baseline": baseline, "accurate_baseline": accurate,
            "tolerance": TOL, "cumsum_tolerance": CUMSUM_TOL,
            "export_s": export_s, "rows": rows}


def to_markdown(report: dict) -> str:
    m = report["machine"]
    out = ["# LSS voxel pooling on ONNX Runtime (CPU): deploykit::BEVPool vs naive", "",
           f"Measured {report['date']} by `benchmarks/bench_bev_pool.py` on {m['cpu']}, {m['cores']} cores, "
           f"{m['memory_gib']} GiB, {m['os']}; ONNX Runtime {report['versions']['onnxruntime']}, torch "
           f"{report['versions']['torch']}, numpy {report['versions']['numpy']}, {report['threads']} intra-op "
           "threads, sequential execution, idle threads not spinning. Each model is one pooling from DepthNet's "
           "outputs (softmax depth (B*N, D, H, W), context (B*N, C, H, W)) to the BEV (B, C, Z, Y, X), exported "
           f"by the TorchScript exporter (opset {OPSET}) with static shapes. Variants ran interleaved in one "
           "process (order rotating each round, 3 warm-up runs each); ratio = median latency / median of the "
           "fastest naive pooling, with a 95% bootstrap interval; the last speed-up is against the fastest naive "
           "pooling that meets the op's tolerance.", ""]
    for r in report["recipes"]:
        s = r["shape"]
        out += [f"## {r['recipe']} ({r['config']})", "",
                f"{s['cameras']} cameras, d_bound {list(s['d_bound'])} ({r['depth_shape'][1]} bins), image "
                f"{s['image'][0]}x{s['image'][1]} / {s['stride']} = {r['depth_shape'][2]}x{r['depth_shape'][3]} "
                f"features, {s['channels']} context channels; BEV {r['bev_shape'][2]}x{r['bev_shape'][3]}x"
                f"{r['bev_shape'][4]} over x/y {list(s['x_bound'])}, z {list(s['z_bound'])}. Surround rig: yaws "
                f"{', '.join(f'{y:g}' for y in YAWS_DEG[:s['cameras']])} deg, pinhole fx {FX_AT_704:g} at 704 px, "
                f"{CAMERA_HEIGHT} m up; cells truncated toward zero as BEVDepth's `.int()`; depth a softmax over "
                f"the bins. {r['kept_points']} of {r['frustum_points']} frustum points land in the grid, in "
                f"{r['occupied_cells']} cells, as {r['cell_pixel_pairs']} distinct (cell, pixel) pairs. d moves the frustum by the previous key frame's ego motion "
                f"({r['prev_frame_motion']['forward_m']} m, {r['prev_frame_motion']['yaw_deg']} deg; "
                f"{r['prev_frame_kept_points']} points in the grid) with the cells computed in the graph.", "",
                f"Every variant's BEV agrees with a float64 sum within {r['tolerance']:g} of max |bev| "
                "(d checked with no ego motion, where it pools the current frustum), except LSS's fp32 cumsum "
                f"trick, held to {r['cumsum_tolerance']:g}: it takes each cell as the difference of two fp32 "
                "running sums over all points and loses digits.", "",
                ratio_rows_markdown(r["rows"], {
                    "speed-up vs naive": lambda x: f"{x['speedup_vs_naive']:.1f}x",
                    f"vs naive within {r['tolerance']:g}": lambda x: f"{x['speedup_vs_accurate_naive']:.1f}x",
                    "max rel. error": lambda x: f"{x['max_rel_error']:.1e}"}), ""]
    out += ["Notes.", "",
            "* What the naive pooling needed to export with static shapes: BEVDepth's voxel_pooling_train is a "
            "CUDA extension with no ONNX symbolic. Its PyTorch form exports correctly only through `scatter_add` "
            "(ScatterElements, reduction add, over an index broadcast to every channel): `index_add` is refused "
            "for a constant index (\"duplicated values in 'index'\") and otherwise exported as a ScatterElements "
            "without reduction, and `index_put(accumulate=True)` as a ScatterND without reduction; both keep one "
            "of a cell's points and drop the rest, with no error. Masking off-grid points (`x[kept]`) exports as "
            "NonZero, a data-dependent shape, so they go to a spare row that is cut off. LSS's cumsum trick "
            "additionally needed its sort order and run ends precomputed from the constant geometry (NonZero "
            "again) and `final[b, :, z, y, x] = x` written as one 1-D index into a flat canvas.",
            "* BEVPool's ONNX function has no scatter-add: ONNX Runtime's CPU ScatterND with reduction \"add\" "
            "splits the updates over the intra-op threads with plain adds and loses sums when two threads hit one "
            "cell (wrong BEVs on 2 threads with unsorted ranks). It takes each cell's sum as a difference of "
            "running sums (fp32 within blocks of 64 points, fp64 across them), sorting unsorted ranks with TopK "
            "first; with ranks computed in the graph (d) that sort runs every frame.",
            "* The ortx kernel is numpy, by (cell, pixel) pair: a pixel's feature row is the same for all its depth "
            "bins, so the depths of a pixel's points in one cell are summed first (np.add.reduceat; prepare_ranks "
            "orders a cell's points by pixel, then depth bin, so they are adjacent) and the row is gathered and "
            "multiplied once per pair; each cell's pairs are summed by a matmul, cells with as many pairs batched. "
            "Its layout of the constant sorted ranks is built once and cached (checked against the ranks each call); "
            "unsorted ranks (d) are sorted by (cell, pixel) and laid out every call. onnxruntime-extensions' own "
            "bridge returned outputs as Python lists (100+ ms for this BEV), which the kernel avoids by handing back "
            "the array.", ""]
    return "\n".join(out)


def main() -> None:
    if "--quick" in sys.argv:
        sys.argv.remove("--quick")
        sys.argv += ["--recipes", "quick"]
        if "--out" not in sys.argv:
            sys.argv += ["--out", tempfile.mkdtemp(prefix="bench_bev_pool-")]
    run(__doc__, "bev_pool", "bevdepth_r50_256x704_2key", DEFAULT_ROUNDS, 20, bench_recipe, to_markdown)


if __name__ == "__main__":
    main()
