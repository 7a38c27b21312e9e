"""Range calibrators: the statistics behind each quantizer's ``amax``.

Quantization here is symmetric and narrow-range: a tensor is mapped onto the
integers [-qmax, qmax] with qmax = 2**(bits-1) - 1 (int8: [-127, 127], int16:
[-32767, 32767]) and scale = amax / qmax; -2**(bits-1) is never used, so zero
is exact and the grid is symmetric, as TensorRT's Q/DQ layers expect. A
calibrator sees the float tensor a quantizer guards, batch after batch
(``collect``), and turns what it saw into ``amax`` (``compute_amax``).

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
one histogram of |x| with ``num_bins`` bins over [0, largest |x| seen]. When a
batch goes past that range the histogram is re-binned onto the wider range
rather than restarted: each old bin's count is shared between the (at most
two) new bins it overlaps, in proportion to the overlap. Totals are kept, no
data is dropped, and because the final grid is always [0, max] whatever the
order, the order of the batches barely matters (only the within-bin position
of counts that were re-binned is approximated).

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
has no more bins than levels (int16 with the default 2048 bins) the
quantization grid is finer than the histogram and entropy returns the max.

Differences from pytorch-quantization, on purpose:

* growth keeps ``num_bins`` and re-bins (pytorch-quantization keeps the bin
  width and appends bins, so the bin count, and the entropy/mse work, grows
  with every widening of the range);
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

# torch.histc counts in the input's dtype; float32 stops counting past 2**24
# in one bin (x + 1 == x), so larger tensors are histogrammed in float64.
_FLOAT32_EXACT_COUNT = 2**24

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

    def reset(self) -> None:
        self._batches = 0

    @property
    def batches(self) -> int:
        return self._batches

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


class HistogramCalibrator(Calibrator):
    """Histogram of |x| over [0, max seen]; amax by ``percentile``, ``entropy`` or ``mse``. Per tensor."""

    def __init__(self, method: str = "entropy", num_bins: int = 2048, percentile: float = 99.99,
                 start_bin: int = 128):
        super().__init__()
        if method not in HISTOGRAM_METHODS:
            raise ValueError(f"unknown histogram calibration method {method!r}; "
                             f"choose one of {', '.join(HISTOGRAM_METHODS)}")
        if not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, not {num_bins!r}")
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
        # float64: counts stay exact integers up to 2**53, and re-binning makes them fractional.
        self._counts = torch.zeros(self.num_bins, dtype=torch.float64)
        self._hi = 0.0

    @property
    def histogram(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(counts, edges) in float64, ``num_bins`` and ``num_bins + 1`` long; None before any data."""
        if self._batches == 0:
            return None
        return self._counts.clone(), self._edges()

    def _edges(self) -> torch.Tensor:
        return torch.linspace(0.0, self._hi, self.num_bins + 1, dtype=torch.float64)

    def collect(self, x: torch.Tensor) -> None:
        x = _check_batch(x)
        if x.numel() >= _FLOAT32_EXACT_COUNT:
            x = x.double()
        elif x.dtype != torch.float64:
            x = x.float()  # histc has no half kernels on every device
        mag = x.abs()
        peak = mag.max()
        _refuse_non_finite(x, peak)
        peak = float(peak)
        if peak > self._hi:
            self._widen(peak)
        if self._hi > 0:
            batch = torch.histc(mag, bins=self.num_bins, min=0.0, max=self._hi)
        else:
            # Nothing but zeros so far: histc cannot take an empty range, and zeros
            # belong in bin 0 whatever range comes later.
            batch = torch.zeros(self.num_bins, dtype=torch.float64)
            batch[0] = mag.numel()
        self._counts += batch.to("cpu", torch.float64)
        self._device = x.device
        self._batches += 1

    def _widen(self, hi: float) -> None:
        old, self._hi = self._hi, hi
        if old == 0.0:
            return  # only exact zeros were seen, and they stay in bin 0
        n = self.num_bins
        # Old bin j covers [j*s, (j+1)*s) in units of new bins, s < 1, so it
        # overlaps new bin floor(j*s) and possibly the next one.
        s = old / hi
        start = torch.arange(n, dtype=torch.float64) * s
        first = start.floor().clamp(max=n - 1)
        inside = ((first + 1 - start) / s).clamp(0.0, 1.0)
        first = first.long()
        share = self._counts * inside
        counts = torch.zeros(n, dtype=torch.float64)
        counts.index_add_(0, first, share)
        counts.index_add_(0, (first + 1).clamp(max=n - 1), self._counts - share)
        self._counts = counts

    def compute_amax(self, bits: int) -> torch.Tensor:
        levels = _levels(bits)
        self._require_data()
        if self._hi == 0.0:
            return self._result(torch.tensor(0.0))
        edges = self._edges()
        if self.method == "percentile":
            amax = edges[_percentile_bin(self._counts, self.percentile) + 1]
        elif self.method == "entropy":
            amax = edges[_entropy_edge(self._counts, levels, self.start_bin)]
        else:
            amax = edges[_mse_edge(self._counts, edges, levels - 1, self.start_bin)]
        return self._result(amax)


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
