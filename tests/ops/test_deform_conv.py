"""DeformConv: every form against mmcv's im2col bilinear sampling, written out as loops.

The oracle walks (batch, channel, output pixel, kernel tap) as mmcv's
deformable_im2col / modulated_deformable_im2col kernels do, in float64 after forming
each sampling position in float32 (as the kernels do), then does the grouped
convolution sum. The forms sum in float32 in other orders, and the GridSample-based
ones (reference, ONNX function) map pixels to [-1, 1] and back, which moves a position
by a few float32 ulps: tolerance 1e-5 of the output's largest magnitude.
"""

import math

import numpy as np
import onnx
import pytest
import torch

from deploykit.engines.ort import build
from deploykit.errors import ExportError
from deploykit.export import export_onnx
from deploykit.ops import CUSTOM_OPS
from deploykit.ops import deform_conv as dc

TOL = 1e-5


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    # Until deploykit.ops.CUSTOM_OPS lists the op; a no-op once it does.
    monkeypatch.setitem(CUSTOM_OPS, dc.OP_TYPE, dc)


def bilinear(img, h, w):
    """mmcv's deformable_im2col_bilinear plus the caller's guard: zero unless -1 < h < H and
    -1 < w < W, each of the four neighbours off the image counting as zero."""
    height, width = img.shape
    if not (h > -1 and w > -1 and h < height and w < width):
        return 0.0
    h0, w0 = math.floor(h), math.floor(w)
    lh, lw = h - h0, w - w0

    def pixel(i, j):
        return float(img[i, j]) if 0 <= i < height and 0 <= j < width else 0.0

    return ((1 - lh) * (1 - lw) * pixel(h0, w0) + (1 - lh) * lw * pixel(h0, w0 + 1)
            + lh * (1 - lw) * pixel(h0 + 1, w0) + lh * lw * pixel(h0 + 1, w0 + 1))


def loop_deform_conv(x, offset, mask, weight, bias, stride, padding, dilation, groups, deform_groups):
    b_n, c_n, height, width = x.shape
    cout, cin_g, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho_n = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo_n = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_dg = c_n // deform_groups
    columns = np.zeros((b_n, c_n, kh, kw, ho_n, wo_n))
    for b in range(b_n):
        for c in range(c_n):
            g = c // per_dg  # the channel's deform group
            for ho in range(ho_n):
                for wo in range(wo_n):
                    for i in range(kh):
                        for j in range(kw):
                            tap = i * kw + j
                            dy = offset[b, g * 2 * kh * kw + 2 * tap, ho, wo]
                            dx = offset[b, g * 2 * kh * kw + 2 * tap + 1, ho, wo]
                            h = np.float32(ho * sh - ph + i * dh) + dy  # float32, as the kernel
                            w = np.float32(wo * sw - pw + j * dw) + dx
                            v = bilinear(x[b, c], float(h), float(w))
                            if mask is not None:
                                v *= float(mask[b, g * kh * kw + tap, ho, wo])
                            columns[b, c, i, j, ho, wo] = v
    out = np.zeros((b_n, cout, ho_n, wo_n))
    for o in range(cout):
        first = o // (cout // groups) * cin_g  # the output channel's group's first input channel
        for ci in range(cin_g):
            out[:, o] += np.einsum("ij,bijhw->bhw", weight[o, ci].astype(np.float64), columns[:, first + ci])
        if bias is not None:
            out[:, o] += bias[o]
    return out


def test_oracle_bilinear_rule_by_hand():
    img = np.arange(12, dtype=np.float64).reshape(3, 4) + 1  # 1..12
    assert bilinear(img, 1.5, 1.5) == pytest.approx((6 + 7 + 10 + 11) / 4)
    assert bilinear(img, -0.25, 1.0) == pytest.approx(0.75 * img[0, 1])  # (-1, 0): top row only
    assert bilinear(img, 1.0, -0.5) == pytest.approx(0.5 * img[1, 0])
    assert bilinear(img, 2.5, 3.0) == pytest.approx(0.5 * img[2, 3])  # (H - 1, H): bottom row only
    assert bilinear(img, 1.0, 3.75) == pytest.approx(0.25 * img[1, 3])
    assert bilinear(img, -0.5, -0.5) == pytest.approx(0.25 * img[0, 0])
    for h, w in ((-1.0, 1.0), (-1.5, 1.0), (1.0, -1.0), (3.0, 1.0), (1.0, 4.0), (3.2, 4.1)):
        assert bilinear(img, h, w) == 0.0
    assert bilinear(img, 2.0, 3.0) == img[2, 3]


def case(b=2, c=4, h=7, w=9, cout=6, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2,
         deform_groups=2, with_mask=False, with_bias=False, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    ho, wo = dc.output_size(h, w, k, stride, padding, dilation)
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    # Offsets of a few pixels push taps off the map on every side (checked below).
    offset = (rng.standard_normal((b, deform_groups * 2 * k[0] * k[1], ho, wo)) * scale).astype(np.float32)
    mask = rng.random((b, deform_groups * k[0] * k[1], ho, wo)).astype(np.float32) if with_mask else None
    weight = rng.standard_normal((cout, c // groups, *k)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
             "deform_groups": deform_groups}
    return (x, offset, mask, weight, bias), attrs


CASES = {
    "v1": {},
    "v1 stride 2": {"stride": (2, 2), "seed": 1},
    "v2 dilation 2 bias": {"dilation": (2, 2), "with_mask": True, "with_bias": True, "seed": 2},
    "v2 stride 2x1 dilation 1x2": {"stride": (2, 1), "dilation": (1, 2), "with_mask": True, "seed": 3},
    "v1 bias, 1 group, 1 deform group, 5x3 kernel": {"k": (5, 3), "padding": (2, 0), "groups": 1,
                                                     "deform_groups": 1, "with_bias": True, "seed": 4},
    "v2 one-row map": {"h": 1, "w": 6, "k": (1, 3), "padding": (0, 1), "with_mask": True, "scale": 1.0, "seed": 5},
}


def _torch(args):
    return [None if a is None else torch.from_numpy(a) for a in args]


def _rel(got, want):
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))


def _positions(offset, attrs, k, h, w):
    """Every tap's sampling position (h, w), as the oracle forms it."""
    b, _, ho, wo = offset.shape
    base = dc.base_positions(ho, wo, k, attrs["stride"], attrs["padding"], attrs["dilation"]).astype(np.float32)
    off = offset.reshape(b, attrs["deform_groups"], k[0] * k[1], 2, ho, wo)
    return base[..., 0] + off[:, :, :, 0], base[..., 1] + off[:, :, :, 1]


@pytest.mark.parametrize("name", CASES)
def test_reference_and_numpy_kernel_match_the_loops(name):
    args, attrs = case(**CASES[name])
    want = loop_deform_conv(*args, **attrs)
    got = dc.reference(*_torch(args), **attrs).numpy()
    assert got.shape == want.shape
    assert _rel(got, want) < TOL
    assert _rel(dc.numpy_kernel(*args, **attrs), want) < TOL
    if name == "v1":
        x, offset = args[0], args[1]
        ph, pw = _positions(offset, attrs, (3, 3), *x.shape[2:])
        for side in (ph <= -1, pw <= -1, ph >= x.shape[2], pw >= x.shape[3],  # wholly off
                     (ph > -1) & (ph < 0), (pw > -1) & (pw < 0),  # in (-1, 0)
                     (ph > x.shape[2] - 1) & (ph < x.shape[2]), (pw > x.shape[3] - 1) & (pw < x.shape[3])):
            assert side.any()


def boundary_case():
    """Taps put on chosen positions, every pair of: both sides of -1, in (-1, 0), 0, in
    (size - 1, size), size - 1, size and beyond. A one-hot weight makes each output channel
    one (channel, tap)'s sample, so each position is checked on its own."""
    c, h, w = 2, 5, 6
    spots_h = [-1.5, -1.0, -0.999, -0.5, -0.001, 0.0, 0.25, 2.5, 3.999, 4.0, 4.001, 4.5, 4.999, 5.0, 5.25]
    spots_w = [-2.0, -1.0, -0.75, -0.01, 0.0, 1.5, 4.5, 5.0, 5.01, 5.5, 5.99, 6.0, 6.5]
    th, tw = (a.reshape(-1) for a in np.meshgrid(np.array(spots_h), np.array(spots_w), indexing="ij"))
    rng = np.random.default_rng(7)
    attrs = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "deform_groups": 1}
    base = dc.base_positions(h, w, (3, 3), (1, 1), (1, 1), (1, 1)).astype(np.float64)  # (9, 5, 6, 2)
    slots = base.shape[0] * h * w
    assert slots >= th.size
    target = rng.uniform(0, 4, (slots, 2))  # taps left over sample inside
    target[:th.size, 0], target[:th.size, 1] = th, tw
    off = (target.reshape(9, h, w, 2) - base).astype(np.float32)  # (tap, ho, wo, [dy, dx])
    offset = off.transpose(0, 3, 1, 2).reshape(1, 18, h, w)
    # The float32 position the kernel forms is on the intended side of (or on) each boundary.
    got = (base.astype(np.float32) + off).reshape(-1, 2)[:th.size].astype(np.float64)
    for axis, size in ((0, h), (1, w)):
        for edge in (-1, 0, size - 1, size):
            assert np.array_equal(got[:, axis] > edge, target[:th.size, axis] > edge)
            assert np.array_equal(got[:, axis] == edge, target[:th.size, axis] == edge)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32)
    weight = np.zeros((c * 9, c, 3, 3), np.float32)
    for ch in range(c):
        for tap in range(9):
            weight[ch * 9 + tap, ch, tap // 3, tap % 3] = 1.0
    mask = rng.random((1, 9, h, w)).astype(np.float32)
    return x, offset, mask, weight, attrs


class _Op(torch.nn.Module):
    """One deform_conv2d with offsets (and mask) as graph inputs."""

    output_names = ("out",)

    def __init__(self, weight, bias, attrs, form, with_mask):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(weight))
        self.bias = None if bias is None else torch.nn.Parameter(torch.from_numpy(bias))
        self.attrs, self.form = attrs, form
        self.input_names = ["x", "offset"] + (["mask"] if with_mask else [])

    def forward(self, x, offset, mask=None):
        return dc.deform_conv2d(x, offset, mask, self.weight, self.bias, export_form=self.form, **self.attrs)


FORMS = [("custom", "function"), ("custom", "inline"), ("custom", "ortx"), ("onnx", "function"),
         ("reference", "function")]


def _export(module, feeds, form, tmp_path):
    path = tmp_path / f"{form}.onnx"
    export_onnx(module, feeds, path, dc.STANDARD_OPSET if form == "onnx" else 17)
    return onnx.load(str(path))


def _run_op(args, attrs, form, mode, tmp_path):
    x, offset, mask, weight, bias = args
    module = _Op(weight, bias, attrs, form, mask is not None)
    feeds = {"x": x, "offset": offset} | ({"mask": mask} if mask is not None else {})
    return build(_export(module, feeds, form, tmp_path), custom_ops=mode, threads=1).run(feeds)["out"]


def test_boundary_positions_are_mmcvs(tmp_path):
    x, offset, mask, weight, attrs = boundary_case()
    for m in (None, mask):
        args = (x, offset, m, weight, None)
        want = loop_deform_conv(*args, **attrs)
        assert (want[:, :, 0] == 0).any() and (want != 0).any()
        assert _rel(dc.reference(*_torch(args), **attrs).numpy(), want) < TOL
        assert _rel(dc.numpy_kernel(*args, **attrs), want) < TOL
        for form, mode in FORMS:
            assert _rel(_run_op(args, attrs, form, mode, tmp_path), want) < TOL, (form, mode)


@pytest.mark.parametrize("name", ["v1 stride 2", "v2 dilation 2 bias", "v2 one-row map"])
@pytest.mark.parametrize("form,mode", FORMS)
def test_onnxruntime_forms_match_the_loops(name, form, mode, tmp_path):
    args, attrs = case(**CASES[name])
    want = loop_deform_conv(*args, **attrs)
    assert _rel(_run_op(args, attrs, form, mode, tmp_path), want) < TOL


def test_export_nodes(tmp_path):
    args, attrs = case(**CASES["v2 dilation 2 bias"])
    x, offset, mask, weight, bias = args
    feeds = {"x": x, "offset": offset, "mask": mask}
    custom = _export(_Op(weight, bias, attrs, "custom", True), feeds, "custom", tmp_path)
    node = next(n for n in custom.graph.node if n.domain == dc.DOMAIN)
    assert [n.op_type for n in custom.graph.node if n.domain == dc.DOMAIN] == ["DeformConv"]
    assert {a.name: a.i for a in node.attribute} == {"stride_h": 1, "stride_w": 1, "pad_h": 1, "pad_w": 1,
                                                     "dilation_h": 2, "dilation_w": 2, "groups": 2,
                                                     "deform_groups": 2}
    assert [d.dim_value for d in custom.graph.output[0].type.tensor_type.shape.dim] == [2, 6, 5, 7]
    standard = _export(_Op(weight, bias, attrs, "onnx", True), feeds, "onnx", tmp_path)
    assert [n.op_type for n in standard.graph.node] == ["DeformConv"]
    # v1 without bias: the custom node's absent mask and bias are 0-element tensors.
    v1 = _export(_Op(weight, None, attrs, "custom", False), {"x": x, "offset": offset}, "custom", tmp_path)
    node = next(n for n in v1.graph.node if n.domain == dc.DOMAIN)
    sizes = {t.name: list(t.dims) for t in v1.graph.initializer}
    sizes |= {n.output[0]: list(n.attribute[0].t.dims) for n in v1.graph.node if n.op_type == "Constant"}
    assert len(node.input) == 5 and sizes[node.input[2]] == [0] and sizes[node.input[4]] == [0]


def test_standard_form_needs_opset_19(tmp_path):
    args, attrs = case()
    x, offset, _, weight, _ = args
    with pytest.raises(ExportError, match="opset >= 19"):
        export_onnx(_Op(weight, None, attrs, "onnx", False), {"x": x, "offset": offset}, tmp_path / "m.onnx", 17)


# ---------------------------------------------------------------------------------------
# The modules


MMCV_KEYS = {  # mmcv.ops.DeformConv2dPack / ModulatedDeformConv2dPack(512, 512, 3, padding=1, groups=4)
    dc.DeformConv2dPack: {"weight": (512, 128, 3, 3), "conv_offset.weight": (18, 512, 3, 3),
                          "conv_offset.bias": (18,)},
    dc.ModulatedDeformConv2dPack: {"weight": (512, 128, 3, 3), "bias": (512,),
                                   "conv_offset.weight": (27, 512, 3, 3), "conv_offset.bias": (27,)},
}


@pytest.mark.parametrize("cls", list(MMCV_KEYS))
def test_state_dict_is_mmcvs(cls):
    module = cls(512, 512, 3, padding=1, groups=4, **({"im2col_step": 128} if cls is dc.DeformConv2dPack else {}))
    state = module.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == MMCV_KEYS[cls]
    assert list(state) == list(MMCV_KEYS[cls])
    assert state._metadata[""]["version"] == 2
    assert float(state["conv_offset.weight"].abs().sum()) == 0 and float(state["conv_offset.bias"].abs().sum()) == 0
    fresh = cls(512, 512, 3, padding=1, groups=4)
    fresh.load_state_dict({k: torch.randn(v.shape) for k, v in state.items()}, strict=True)


@pytest.mark.parametrize("cls", list(MMCV_KEYS))
def test_zero_offsets_are_the_standard_conv(cls, tmp_path):
    """A fresh layer (conv_offset zero) is nn.Conv2d with the same weights; v2's mask is then
    sigmoid(0) = 1/2 everywhere."""
    torch.manual_seed(0)
    module = cls(8, 6, 3, stride=2, padding=1, dilation=1, groups=2, deform_groups=2).eval()
    conv = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2, bias=module.bias is not None)
    with torch.no_grad():
        conv.weight.copy_(module.weight)
        if module.bias is not None:
            module.bias.normal_()
            conv.bias.copy_(module.bias * 2)
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        want = conv(x).numpy() * (0.5 if cls is dc.ModulatedDeformConv2dPack else 1.0)
        got = module(x).numpy()
    assert _rel(got, want) < 1e-6
    for form in dc.EXPORT_FORMS:
        module.export_form = form
        wrapper = _Wrap(module)
        engine = build(_export(wrapper, {"x": x.numpy()}, form, tmp_path), threads=1)
        assert _rel(engine.run({"x": x.numpy()})["out"], want) < 1e-6, form


class _Wrap(torch.nn.Module):
    input_names, output_names = ("x",), ("out",)

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("cls", list(MMCV_KEYS))
def test_modules_split_conv_offset_as_mmcv(cls, tmp_path):
    """Learned offsets (and v2's mask) from conv_offset, as mmcv's Pack forward makes them."""
    torch.manual_seed(1)
    module = cls(4, 6, 3, padding=1, groups=2, deform_groups=2).eval()
    with torch.no_grad():
        module.conv_offset.weight.normal_(std=0.4)
        module.conv_offset.bias.normal_(std=1.0)
    x = torch.randn(2, 4, 7, 9)
    with torch.no_grad():
        raw = module.conv_offset(x)
        if cls is dc.ModulatedDeformConv2dPack:
            o1, o2, m = torch.chunk(raw, 3, dim=1)  # mmcv: offset = cat(o1, o2), mask = sigmoid(m)
            offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(m)
        else:
            offset, mask = raw, None
        got = module(x).numpy()
    assert float(offset.abs().max()) > 2  # far enough to leave the map
    b = None if module.bias is None else module.bias.detach().numpy()
    want = loop_deform_conv(x.numpy(), offset.numpy(), None if mask is None else mask.numpy(),
                            module.weight.detach().numpy(), b, (1, 1), (1, 1), (1, 1), 2, 2)
    assert _rel(got, want) < TOL
    for form in dc.EXPORT_FORMS:
        module.export_form = form
        model = _export(_Wrap(module), {"x": x.numpy()}, form, tmp_path)
        for mode in ("function", "ortx") if form == "custom" else ("function",):
            assert _rel(build(model, custom_ops=mode, threads=1).run({"x": x.numpy()})["out"], want) < TOL


def test_default_form_and_validation():
    assert dc.DeformConv2dPack(4, 4, 3).export_form == dc.DEFAULT_EXPORT_FORM in dc.EXPORT_FORMS
    with pytest.raises(ValueError, match="export_form"):
        dc.deform_conv2d(torch.zeros(1, 4, 5, 5), torch.zeros(1, 18, 5, 5), None, torch.zeros(4, 4, 3, 3),
                         padding=1, export_form="trt")
    with pytest.raises(ValueError, match="offset must be"):
        dc.reference(torch.zeros(1, 4, 5, 5), torch.zeros(1, 18, 3, 3), None, torch.zeros(4, 4, 3, 3), None, 1, 1)


def test_gradients_flow():
    module = dc.ModulatedDeformConv2dPack(4, 4, 3, padding=1)
    with torch.no_grad():
        module.conv_offset.weight.normal_(std=0.3)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    module(x).square().sum().backward()
    for t in (x, module.weight, module.bias, module.conv_offset.weight, module.conv_offset.bias):
        assert t.grad is not None and float(t.grad.abs().sum()) > 0
