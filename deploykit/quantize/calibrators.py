"""Range calibrators: the statistics behind each quantizer's ``amax``.

Quantization here is symmetric and narrow-range: a tensor is mapped onto the
integers [-qmax, qmax] with qmax = 2**(bits-1) - 1 (int8: [-127, 127], int16:
[-32767, 32767]) and scale = amax / qmax; -2**(bits-1) is never used, so zero
is exact and the grid is symmetric, as TensorRT's Q/DQ layers expect. A
calibrator sees the float tensor a quantizer guards, batch after batch
(``collect``), and turns what it saw into ``amax`` (``compute_amax``).
Calibrators of the same tensor fed different batches (shards of the
calibration set on different workers; they pickle) combine with ``merge``,
exactly: the result is bit for bit the one a single calibrator fed all the
batches would give, whatever the split.

Which method for what:

``max``
    The largest |x| seen, per tensor or per channel along one axis. Right for
    weights (fixed, no outliers worth clipping, per output channel) and for
    activations whose range is well behaved (bounded inputs, normalised
    features). It is the only per-channel method.
``percentile``
    The |x| below which ``percentile`` percent of the values lie. A simple,
    predictable cut for activations with a long tail.
``entropy``
    TensorRT's KL-divergence calibration: the clipping threshold whose
    quantized distribution loses the least information. The usual default for
    post-ReLU / long-tailed activations.
``mse``
    The threshold minimising the mean squared quantize-dequantize error of the
    observed values, clipping included. Tends to clip a heavy tail harder than
    entropy and keeps nearly the full range of flat distributions.

The three histogram methods are per tensor (``amax`` is a scalar): they share
one histogram of |x| with ``num_bins`` bins (a power of two) over [0, 2**k),
k the smallest integer with every |x| seen < 2**k, so the largest value sits
in the upper half and never on the top edge. Value x lands in bin
floor(x * num_bins / 2**k), computed exactly (scaling by a power of two is
exact in binary floating point; see ``_bin_indices``). When a batch needs
2**(k+j), the histogram coarsens by summing groups of 2**j adjacent bins,
which is exactly where those values would have landed on the wider grid:
floor(floor(y) / 2**j) == floor(y / 2**j). Counts are integers (float64, exact
to 2**53), so the histogram depends only on the multiset of values seen, never
on the batch order, and histograms of shards calibrated on different workers
merge (``merge``) into exactly the one a single calibrator would have built
over all of them. Exact zeros go to bin 0; while only zeros were seen there is
no range yet (k is unset) and their count waits in bin 0.

The methods run on the histogram trimmed after its last non-empty bin (the
one holding the max), with that bin's upper edge lowered to the largest |x|
seen (which is tracked exactly, and merges as a max): they see [0, max] in
between num_bins/2 + 1 and num_bins bins, as on a [0, max] grid, and never
return more than the max. ``histogram`` returns that trimmed view. The price
of exactness: bins up to twice as wide as a [0, max] grid's, which moves
percentile and mse by a fraction of a bin; entropy's KL objective is often
nearly flat over a sparse tail, so its argmin can move further (it does so
between bin counts on a [0, max] grid too).

Entropy details, following pytorch-quantization's ``_compute_amax_entropy``:
the first bin's count is replaced by the second's (after a ReLU the exact
zeros form a spike that would dominate both distributions, and zero is
represented exactly anyway); for each candidate i the reference p is
hist[:i] with everything above folded into its last bin, the candidate q is
built from hist[:i] *without* the folded outliers, merged into
L = 2**(bits-1) levels (bin j goes to level floor(j*L/i)) and spread back
evenly over the non-empty bins of each level; amax = edge i (the top of the
range p covers) of the candidate with the smallest KL(p||q), the larger one on
ties. Candidates start at max(start_bin, L): with fewer bins than levels every
bin is its own level, q only differs from p by the clipped mass, and the
method would judge clipping alone. For the same reason, when the histogram
has no more (trimmed) bins than levels (int16 with the default 2048 bins)
the quantization grid is finer than the histogram and entropy returns the max.

Differences from pytorch-quantization, on purpose:

* the grid is [0, 2**k) in ``num_bins`` bins, coarsened exactly when the
  range grows, for exact merges and order independence (pytorch-quantization
  spans [0, max] of its first batch and keeps the bin width, appending bins
  as the range grows, so the bin count, and the entropy/mse work, grows with
  every widening and the grid depends on which batch came first);
* percentile returns the *upper* edge of the bin where the cumulative count
  reaches the percentile, so at least that share of values is <= amax
  (pytorch-quantization returns that bin's lower edge);
* mse tries the bin edges from ``start_bin`` up to and including the max
  (pytorch-quantization tries bin centres and never the last one, so it can
  never keep the full range of a flat distribution);
* non-finite data is refused, and an all-zero tensor gets ``AMAX_FLOOR``.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError

CALIBRATION_METHODS = ("max", "percentile", "entropy", "mse")
HISTOGRAM_METHODS = CALIBRATION_METHODS[1:]

# amax of a tensor that was all zeros. A zero amax means a zero scale, and
# fake-quant divides by the scale; 1e-8 keeps scale = amax/qmax a normal
# float32 (no denormal flushing in an engine) while quantizing any value of a
# real tensor to +-1e-8, i.e. the tensor stays effectively zero, as calibrated.
AMAX_FLOOR = 1e-8

# Bound the (candidates x levels) temporaries of the entropy search.
_ENTROPY_CHUNK = 1 << 20
# Divergences closer than this are a tie (rounding, not information); see _entropy_edge.
_KL_TIE = 1e-12
# Candidates per chunk in the mse search, to bound the (candidates x bins) temporaries.
_MSE_CHUNK = 256


def _levels(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 2:
        raise ValueError(f"bits must be an integer >= 2, not {bits!r}")
    return 2 ** (bits - 1)


def _check_batch(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"calibration data must be a tensor, not {type(x).__name__}")
    if x.numel() == 0:
        raise InputError(f"calibration data is empty (shape {tuple(x.shape)}): nothing to calibrate on")
    x = x.detach()
    return x if x.is_floating_point() else x.float()


def _refuse_non_finite(x: torch.Tensor, reduced: torch.Tensor) -> None:
    # The reduction that was needed anyway propagates NaN/Inf, so clean data
    # costs no extra pass; only a bad batch is scanned again to count.
    if bool(torch.isfinite(reduced).all()):
        return
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    raise InputError(f"calibration data has {nan} NaN and {inf} Inf values (of {x.numel()}); "
                     "a range cannot be calibrated on non-finite data")


class Calibrator:
    """Accumulates range statistics of one tensor and turns them into ``amax``."""

    def __init__(self) -> None:
        self._batches = 0
        self._device = torch.device("cpu")

    def collect(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_amax(self, bits: int) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, other: Calibrator) -> None:
        """Add ``other``'s statistics (of the same tensor, other batches) to this one's.

        Exact: collecting batches a, b here and c, d in ``other`` then merging gives what
        collecting a, b, c, d here would (``amax`` and ``batches``). ``other`` is left as is."""
        if type(other) is not type(self):
            raise ValueError(f"cannot merge a {type(other).__name__} into a {type(self).__name__}")
        mine, theirs = self._settings(), other._settings()
        if mine != theirs:
            diff = ", ".join(f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
            raise ValueError(f"cannot merge {type(self).__name__}s with different settings: {diff}")
        if other._batches == 0:
            return
        self._merge(other)
        self._batches += other._batches
        self._device = other._device  # as collect does: the result goes where the latest data was

    def reset(self) -> None:
        self._batches = 0

    @property
    def batches(self) -> int:
        return self._batches

    def _settings(self) -> dict:
        return {}

    def _merge(self, other: Calibrator) -> None:
        raise NotImplementedError

    def _require_data(self) -> None:
        if self._batches == 0:
            raise RuntimeError(f"{type(self).__name__} was never calibrated: "
                               "collect() at least one batch before compute_amax()")

    def _result(self, amax: torch.Tensor) -> torch.Tensor:
        # Returned where the data lives so the quantizer can use it as its buffer directly.
        return amax.float().clamp(min=AMAX_FLOOR).to(self._device)


class MaxCalibrator(Calibrator):
    """Running max of |x|: per tensor (``axis=None``) or per channel along ``axis``."""

    def __init__(self, axis: int | None = None):
        super().__init__()
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ValueError(f"axis must be an int or None, not {axis!r}")
        self.axis = axis
        self._amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        x = _check_batch(x)
        if self.axis is None:
            lo, hi = torch.aminmax(x)
            local = torch.maximum(hi, -lo)
        else:
            if not -x.dim() <= self.axis < x.dim():
                raise InputError(f"per-channel axis {self.axis} does not exist in a tensor of shape {tuple(x.shape)}")
            axis = self.axis % x.dim()
            others = tuple(d for d in range(x.dim()) if d != axis)
            if others:
                # max and -min instead of abs().amax(): no |x| copy of the whole tensor.
                local = torch.maximum(x.amax(dim=others), -x.amin(dim=others))
            else:
                local = x.abs()
        _refuse_non_finite(x, local)
        local = local.float()
        if self._amax is None:
            self._amax = local.clone()
        else:
            if local.shape != self._amax.shape:
                raise InputError(f"per-channel calibration along axis {self.axis} saw {self._amax.numel()} "
                                 f"channels before and {local.numel()} now (shape {tuple(x.shape)})")
            torch.maximum(self._amax, local, out=self._amax)
        self._device = x.device
        self._batches += 1

    def compute_amax(self, bits: int) -> torch.Tensor:
        _levels(bits)  # the max does not depend on bits, but a bad value is still a bug
        self._require_data()
        return self._result(self._amax)

    def reset(self) -> None:
        super().reset()
        self._amax = None

    def _settings(self) -> dict:
        return {"axis": self.axis}

    def _merge(self, other: MaxCalibrator) -> None:
        theirs = other._amax
        if self._amax is None:
            self._amax = theirs.clone()  # not a view: collect updates its running max in place
            return
        if theirs.shape != self._amax.shape:
            raise InputError(f"per-channel calibration along axis {self.axis} saw {self._amax.numel()} "
                             f"channels here and {theirs.numel()} in the calibrator merged into it")
        torch.maximum(self._amax, theirs.to(self._amax.device), out=self._amax)


class HistogramCalibrator(Calibrator):
    """Histogram of |x| over [0, 2**k), k the smallest with |x| < 2**k; amax by ``percentile``,
    ``entropy`` or ``mse``. Per tensor. See the module docstring for the grid."""

    def __init__(self, method: str = "entropy", num_bins: int = 2048, percentile: float = 99.99,
                 start_bin: int = 128):
        super().__init__()
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"unknown histogram calibration method {method!r}; "
                             f"choose one of {', '.join(HISTOGRAM_METHODS)}")
        # A power of two, so that the grid coarsens exactly when the range doubles; at most
        # 2**30 for int32 bin indices.
        if (not isinstance(num_bins, int) or isinstance(num_bins, bool) or not 2 <= num_bins <= 2**30
                or num_bins & (num_bins - 1)):
            raise ValueError(f"num_bins must be a power of two from 2 to 2**30 (e.g. 2048), not {num_bins!r}")
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {percentile!r}")
        if not isinstance(start_bin, int) or start_bin < 1:
            raise ValueError(f"start_bin must be an integer >= 1, not {start_bin!r}")
        self.method = method
        self.num_bins = num_bins
        self.percentile = float(percentile)
        self.start_bin = start_bin
        self.reset()

    def reset(self) -> None:
        super().reset()
        # Integer counts in float64 (exact to 2**53), where the searches want them.
        self._counts = torch.zeros(self.num_bins, dtype=torch.float64)
        self._exp: int | None = None  # the range is [0, 2**_exp); None while only zeros were seen
        self._peak = 0.0  # the largest |x| seen, the top of the range the methods search

    @property
    def histogram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(counts, edges) in float64 as the amax methods see them, None before any data.

        Trimmed after the last non-empty bin (between ``num_bins/2 + 1`` and ``num_bins``
        bins), whose upper edge is the largest |x| seen; the other edges are multiples of
        the grid's bin width, ``edges[1]``. All zeros so far: one bin, [0, 0]."""
        if self._batches == 0:
            return None
        return self._trimmed()

    def _trimmed(self) -> tuple[torch.Tensor, torch.Tensor]:
        used = int(torch.nonzero(self._counts)[-1]) + 1
        width = 0.0 if self._exp is None else math.ldexp(1.0, self._exp - self._log2_bins)
        edges = torch.arange(used + 1, dtype=torch.float64) * width
        edges[used] = self._peak
        return self._counts[:used].clone(), edges

    @property
    def _log2_bins(self) -> int:
        return self.num_bins.bit_length() - 1

    def collect(self, x: torch.Tensor) -> None:
        x = _check_batch(x)
        if x.dtype != torch.float64:
            x = x.float()  # half's exponent range is too narrow to scale by, see _bin_indices
        mag = x.abs().reshape(-1)
        peak = mag.max()
        _refuse_non_finite(x, peak)
        peak = float(peak)
        if peak > 0.0:
            # frexp: peak = m * 2**e with 0.5 <= m < 1, so e is the smallest with peak < 2**e.
            self._grow(math.frexp(peak)[1])
        if self._exp is None:
            self._counts[0] += mag.numel()
        else:
            # bincount counts in int64: exact however large the tensor (histc counts in the input's dtype).
            batch = torch.bincount(_bin_indices(mag, self._exp, self._log2_bins), minlength=self.num_bins)
            self._counts += batch.to("cpu", torch.float64)
        self._peak = max(self._peak, peak)
        self._device = x.device
        self._batches += 1

    def _grow(self, exp: int) -> None:
        if self._exp is None or exp > self._exp:
            self._counts = _coarsen(self._counts, self._exp, exp)
            self._exp = exp

    def _settings(self) -> dict:
        return {"method": self.method, "num_bins": self.num_bins, "percentile": self.percentile,
                "start_bin": self.start_bin}

    def _merge(self, other: HistogramCalibrator) -> None:
        if other._exp is not None:
            self._grow(other._exp)
        self._counts += _coarsen(other._counts, other._exp, self._exp)  # reads other's counts, never writes them
        self._peak = max(self._peak, other._peak)

    def compute_amax(self, bits: int) -> torch.Tensor:
        levels = _levels(bits)
        self._require_data()
        if self._exp is None:
            return self._result(torch.tensor(0.0))
        counts, edges = self._trimmed()
        if self.method == "percentile":
            amax = edges[_percentile_bin(counts, self.percentile) + 1]
        elif self.method == "entropy":
            amax = edges[_entropy_edge(counts, levels, self.start_bin)]
        else:
            amax = edges[_mse_edge(counts, edges, levels - 1, self.start_bin)]
        return self._result(amax)


def _bin_indices(mag: torch.Tensor, exp: int, log2_bins: int) -> torch.Tensor:
    """floor(mag * 2**log2_bins / 2**exp) as int32, exactly, for 0 <= mag < 2**exp; scales ``mag`` in place.

    Not torch.histc: it computes x * bins / (max - min), which overflows for |x| > 2**117 in
    float32 (and 2**128 cannot be its max at all); its CUDA kernel is a different code path.
    """
    # Multiplying by a power of two is exact unless the product leaves the normal range: upwards
    # it stays below the bin count, downwards only products below 1 (bin 0 either way) can turn
    # subnormal. The factor itself must be normal, so large shifts go in steps.
    limit = math.frexp(torch.finfo(mag.dtype).max)[1] - 2  # 2**+-limit is normal: 126 for float32
    shift = log2_bins - exp
    while shift:
        step = max(-limit, min(limit, shift))
        mag.mul_(2.0 ** step)
        shift -= step
    return mag.to(torch.int32)  # truncation is floor for these non-negative values


def _coarsen(counts: torch.Tensor, exp: int | None, new_exp: int | None) -> torch.Tensor:
    """The histogram over [0, 2**exp) regrouped onto [0, 2**new_exp), new_exp >= exp: bin i goes to
    bin i // 2**(new_exp - exp), where its values land on the wider grid (exact)."""
    if exp is None or exp == new_exp:
        return counts  # only zeros (bin 0 on any grid), or the same grid
    n = counts.numel()
    group = 1 << min(new_exp - exp, n.bit_length() - 1)
    coarse = torch.zeros_like(counts)
    coarse[:n // group] = counts.reshape(n // group, group).sum(1)
    return coarse


def _percentile_bin(counts: torch.Tensor, percentile: float) -> int:
    """The first bin at whose top the cumulative count reaches ``percentile`` percent."""
    cum = torch.cumsum(counts, 0)
    target = cum[-1] * (percentile / 100.0)
    idx = int(torch.searchsorted(cum, target.reshape(1)))
    return min(idx, counts.numel() - 1)


def _entropy_edge(counts: torch.Tensor, levels: int, start_bin: int) -> int:
    """Index of the edge (threshold) minimising KL(p || q); see the module docstring.

    Every per-level quantity is a difference of prefix sums over bins, so the
    candidates are scored together in O(candidates x levels) work instead of
    O(candidates x bins).
    """
    n = counts.numel()
    first = max(start_bin, levels)
    if first >= n:
        return n  # no candidate coarser than the quantization grid: keep the max
    h = counts.clone()
    h[0] = h[1]
    total = h.sum()
    pos = h > 0
    xlogx = torch.where(pos, h * torch.log(torch.where(pos, h, 1.0)), 0.0)
    zero = torch.zeros(1, dtype=torch.float64)
    cum = torch.cat([zero, h.cumsum(0)])
    cum_nonzero = torch.cat([zero, pos.double().cumsum(0)])
    cum_xlogx = torch.cat([zero, xlogx.cumsum(0)])
    # Mass above each edge summed from the top, so it is exactly 0 above the
    # last non-empty bin (total - cum[i] would leave rounding residue there).
    above = torch.cat([h.flip(0).cumsum(0).flip(0), zero])

    chunk = max(1, _ENTROPY_CHUNK // levels)
    kl = torch.cat([_kl_scores(torch.arange(lo, min(lo + chunk, n + 1)), levels, h, total, cum, cum_nonzero,
                               cum_xlogx, above)
                    for lo in range(first, n + 1, chunk)])
    # Ties go to the larger threshold. The prefix-sum form cancels large terms,
    # so equal divergences can come out ~1e-16 apart; differences below
    # _KL_TIE are rounding, not information.
    ties = torch.nonzero(kl <= kl.min() + _KL_TIE)
    return first + int(ties[-1])


def _kl_scores(i, levels, h, total, cum, cum_nonzero, cum_xlogx, above) -> torch.Tensor:
    """KL(p || q) for the candidate thresholds ``i`` (all >= levels)."""
    # Level k of candidate i holds bins [ceil(k*i/L), ceil((k+1)*i/L)), i.e. floor(j*L/i) == k.
    k = torch.arange(levels + 1)
    bounds = (k[None, :] * i[:, None] + levels - 1) // levels
    level_sum = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    level_nonzero = cum_nonzero[bounds[:, 1:]] - cum_nonzero[bounds[:, :-1]]
    occupied = level_nonzero > 0
    # log of q's unnormalised value on each non-empty bin: the level's mean count
    log_q = torch.log(torch.where(occupied, level_sum, 1.0) / level_nonzero.clamp(min=1.0))
    p_log_q = torch.where(occupied, level_sum * log_q, 0.0).sum(1)

    last = h[i - 1]
    outliers = above[i]
    folded = last + outliers
    # The folded outliers sit in bin i-1, which belongs to the top level (i >= L).
    p_log_q = p_log_q + torch.where(last > 0, outliers * log_q[:, -1], 0.0)

    def _xlogx(v):
        return torch.where(v > 0, v * torch.log(torch.where(v > 0, v, 1.0)), 0.0)

    p_log_p = cum_xlogx[i] - _xlogx(last) + _xlogx(folded)
    # KL with p normalised by the total and q by its own mass, cum[i].
    kl = (p_log_p - p_log_q) / total + torch.log(cum[i].clamp(min=1e-300) / total)
    # Clipped mass landing on a bin q leaves empty is infinitely surprising.
    kl = torch.where((last == 0) & (outliers > 0), math.inf, kl)
    return kl


def _mse_edge(counts: torch.Tensor, edges: torch.Tensor, qmax: int, start_bin: int) -> int:
    """Index of the edge whose quantize-dequantize of the bin centres has the least weighted squared error."""
    n = counts.numel()
    first = min(start_bin, n)
    pos = counts > 0
    centres = ((edges[:-1] + edges[1:]) / 2)[pos]
    weights = counts[pos]
    errors = []
    for lo in range(first, n + 1, _MSE_CHUNK):
        amax = edges[lo:min(lo + _MSE_CHUNK, n + 1)]
        scale = (amax / qmax)[:, None]
        deq = torch.round(centres[None, :] / scale).clamp(-qmax, qmax) * scale
        errors.append(((deq - centres[None, :]) ** 2 * weights[None, :]).sum(1))
    return first + int(torch.argmin(torch.cat(errors)))


def make_calibrator(method: str, axis: int | None = None, **kw) -> Calibrator:
    """The calibrator for ``method`` (one of ``CALIBRATION_METHODS``); ``kw`` go to the histogram one."""
    if method == "max":
        if kw:
            raise ValueError(f"the max calibrator takes no options, got {', '.join(sorted(kw))}")
        return MaxCalibrator(axis)
    if method in HISTOGRAM_METHODS:
        if axis is not None:
            raise ValueError(f"histogram calibrators ({method}) are per-tensor only, got axis={axis}; "
                             "use 'max' for per-channel ranges")
        return HistogramCalibrator(method, **kw)
    raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
