"""Pairing two runs' taps and the error of every pair, in execution order.

Taps pair when they carry the same scope key and the same shape (size-1 axes
ignored; a layout pass that permuted the axes is undone when the sizes allow
exactly one permutation); where several fit, the closest (see ``_pairs``), so a
module called several times pairs call by call. Two keys that name one tensor on both sides
(a Sequential returning its last layer's output) make one row, named after the
innermost module.

Each row pools its statistics over the samples: max absolute error, max error
relative to the reference's largest magnitude, cosine, and SQNR. ``error`` is
the relative RMS error, 10 ** (-SQNR / 20), the one figure that reads the same
for a float rounding difference and for a quantized tensor (a max-based figure
is dominated by single rounding flips in int8). ``growth`` is a row's error over
the largest error of the layers it reads (its inputs' rows; where none of them
is a row, the error enters there): rounding differences grow by a little per
layer, a wrong layer multiplies the error at once.

Where the two versions part ways is the first row past the threshold that is
also a jump (growth >= ``jump``); where no row jumps, the first row past the
threshold (error that crept up layer by layer until it crossed it).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from .scopes import module_path
from .taps import Tap

# Default thresholds on the relative RMS error (see ``default_threshold``).
FLOAT_THRESHOLD = 1e-4       # two float versions: far above float32 rounding (~1e-7)
SAME_QUANT_THRESHOLD = 0.05  # a quantized graph against its fake-quant model: rounding flips, which compound
QUANT_THRESHOLD = 0.1        # float against quantized: SQNR 20 dB
JUMP = 4.0                   # growth that marks an error entering, not creeping


def default_threshold(a_quantized: bool, b_quantized: bool) -> float:
    if a_quantized and b_quantized:
        return SAME_QUANT_THRESHOLD
    return QUANT_THRESHOLD if (a_quantized or b_quantized) else FLOAT_THRESHOLD


@dataclass
class LayerRow:
    name: str          # module path
    key: str           # scope
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    cosine: float
    sqnr_db: float
    error: float       # relative RMS error
    growth: float      # error / the largest error of the rows it reads
    permuted: list[int] | None = None
    quantized: bool = False
    quantizer: str | None = None  # the quantizer the value was read through (B's, else A's)

    def to_dict(self) -> dict:
        # JSON has no infinity: null reads "no error" for SQNR and "first error" for growth.
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


@dataclass
class LayerProfile:
    a: str
    b: str
    threshold: float
    rows: list[LayerRow]
    unpaired: dict[str, list[str]] = field(default_factory=dict)  # side -> keys with no partner
    samples: int = 1
    jump: float = JUMP

    @property
    def first_past_threshold(self) -> LayerRow | None:
        return next((r for r in self.rows if r.error > self.threshold), None)

    @property
    def first_divergence(self) -> LayerRow | None:
        return next((r for r in self.rows if r.error > self.threshold and r.growth >= self.jump),
                    self.first_past_threshold)

    @property
    def largest_jump(self) -> LayerRow | None:
        rows = [r for r in self.rows if math.isfinite(r.growth)]
        return max(rows, key=lambda r: r.growth) if rows else None

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {"a": self.a, "b": self.b, "samples": self.samples,
                "threshold": {"relative_rms_error": self.threshold,
                              "sqnr_db": -20 * math.log10(self.threshold) if self.threshold > 0 else None},
                "jump": self.jump, "first_divergence": first.name if first else None,
                "first_past_threshold": self.first_past_threshold.name if self.first_past_threshold else None,
                "largest_jump": self.largest_jump.name if self.largest_jump else None,
                "layers": [r.to_dict() for r in self.rows], "unpaired": self.unpaired}


class _Stats:
    def __init__(self):
        self.abs = 0.0
        self.ref_max = 0.0
        self.err2 = self.ref2 = self.out2 = self.dot = 0.0

    def add(self, ref: np.ndarray, out: np.ndarray) -> None:
        ref, out = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
        err = ref - out
        if err.size:
            self.abs = max(self.abs, float(np.abs(err).max()))
            self.ref_max = max(self.ref_max, float(np.abs(ref).max()))
        self.err2 += float(err @ err)
        self.ref2 += float(ref @ ref)
        self.out2 += float(out @ out)
        self.dot += float(ref @ out)


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, list[int] | None] | None:
    """b reshaped/permuted onto a's layout, and the permutation used; None if they cannot pair."""
    sa, sb = _squeezed(a.shape), _squeezed(b.shape)
    if sa == sb:
        return b.reshape(a.shape), None
    if sorted(sa) != sorted(sb) or len(sa) > 6:
        return None
    perms = [p for p in itertools.permutations(range(len(sb))) if tuple(sb[i] for i in p) == sa]
    if len(perms) != 1:
        return None  # ambiguous (equal sizes): a guess could hide the very error looked for
    return b.reshape(sb).transpose(perms[0]).reshape(a.shape), list(perms[0])


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    ref = float(a64 @ a64)
    err = float((a64 - b64) @ (a64 - b64))
    return math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf)


def _pairs(a: list[Tap], b: list[Tap], chosen: dict[tuple, int]) -> list[tuple]:
    """(row id, A's tap, B's tap, B's value on A's layout, the permutation, whether the
    pair is a new tensor rather than one already paired under an inner module's key).

    A scope can let out more tensors than its module returns: onnxsim merges equal
    subexpressions across scopes, so an internal tensor of one layer may feed another,
    and a decoder's scope lets out every layer's output. Where several of B's tensors of a
    key fit one of A's (same shape preferred to a permuted one), the closest is its partner:
    an unrelated tensor is off by about its own size, a wrong layer's output by its error.
    Between two ONNX graphs only the tensor of the same name is (one export's names). ``chosen`` keeps the
    choice made on the first sample for the others."""
    by_key: dict[str, list[Tap]] = {}
    for t in b:
        by_key.setdefault(t.key, []).append(t)
    used: set[int] = set()
    seen: set[tuple] = set()
    counts: dict[str, int] = {}
    pairs = []
    for ta in a:
        n = counts[ta.key] = counts.get(ta.key, -1) + 1
        taps = by_key.get(ta.key, [])
        if (ta.key, n) in chosen:
            j = chosen[(ta.key, n)]
            fits = [(j, taps[j], _align(ta.value, taps[j].value))] if j < len(taps) else []
        else:
            fits = [(j, tb, _align(ta.value, tb.value)) for j, tb in enumerate(taps) if id(tb) not in used]
            fits = [f for f in fits if f[2] is not None]
            same = [f for f in fits if f[2][1] is None]
            fits = same or fits
            if isinstance(ta.ident, str) and taps and isinstance(taps[0].ident, str):
                # Two graphs of one export: a tensor keeps its name (Q/DQ or a flavour's edits
                # around it aside), and one the other graph lets out of no scope has no partner.
                fits = [f for f in fits if f[1].ident == ta.ident]
            elif len(fits) > 1:
                fits.sort(key=lambda f: _rel_rms(ta.value, f[2][0]))
        for j, tb, aligned in fits[:1]:
            if aligned is None:
                continue
            used.add(id(tb))
            chosen.setdefault((ta.key, n), j)
            fresh = (ta.ident, tb.ident) not in seen
            seen.add((ta.ident, tb.ident))
            pairs.append(((ta.key, n, j), ta, tb, *aligned, fresh))
    return pairs


def profile_layers(a_runs: list[list[Tap]], b_runs: list[list[Tap]], *, a: str = "A", b: str = "B",
                   threshold: float | None = None, a_quantized: bool = False,
                   b_quantized: bool = False, jump: float = JUMP) -> LayerProfile:
    """Per-layer error of B against A (the reference), pooled over the samples."""
    if len(a_runs) != len(b_runs) or not a_runs:
        raise ValueError("both sides need the same, non-zero number of samples")
    threshold = default_threshold(a_quantized, b_quantized) if threshold is None else threshold
    stats: dict[tuple, _Stats] = {}
    meta: dict[tuple, tuple[Tap, Tap, list | None]] = {}
    paired_a, paired_b = set(), set()
    chosen: dict[tuple, int] = {}
    for ra, rb in zip(a_runs, b_runs):
        for row, ta, tb, value, perm, fresh in _pairs(ra, rb, chosen):
            paired_a.add(ta.key)
            paired_b.add(tb.key)
            if not fresh:
                continue
            ref, out = ta.value, value
            if a_quantized and b_quantized:
                # Both are quantized models: a tensor one reads on its int8 grid and the other
                # in float (a quantizer moved by a flavour) is compared on that grid.
                if tb.grid is not None and not ta.quantized:
                    ref = tb.on_grid(ref)
                elif ta.grid is not None and not tb.quantized:
                    out = ta.on_grid(out)
            if tb.clamped and not ta.clamped:
                ref = np.maximum(ref, 0)
            if ta.clamped and not tb.clamped:
                out = np.maximum(out, 0)
            stats.setdefault(row, _Stats()).add(ref, out)
            meta.setdefault(row, (ta, tb, perm))
    order = sorted(stats, key=lambda r: meta[r][0].order)
    rows = []
    error_of: dict = {}  # A's tensor -> its row's error, for the growth of the layers reading it
    read_by = {t.ident: t.inputs for t in a_runs[0]}

    def upstream(idents) -> list[float]:
        """The errors of the nearest paired layers above, looking through unpaired ones."""
        found, seen, todo = [], set(), list(idents)
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            if i in error_of:
                found.append(error_of[i])
            else:
                todo.extend(read_by.get(i, ()))
        return found

    for row in order:
        s, (ta, tb, perm) = stats[row], meta[row]
        error = math.sqrt(s.err2 / s.ref2) if s.ref2 > 0 else (0.0 if s.err2 == 0 else math.inf)
        norm = math.sqrt(s.ref2 * s.out2)
        before = upstream(ta.inputs)
        worst = max(before, default=0.0)
        rows.append(LayerRow(
            name=(ta.name or tb.name or module_path(ta.key)) + (f"#{row[1]}" if row[1] else ""), key=ta.key,
            shape=list(ta.value.shape), max_abs_error=s.abs, max_rel_error=s.abs / s.ref_max if s.ref_max > 0 else s.abs,
            cosine=s.dot / norm if norm > 0 else float(s.err2 == 0),
            sqnr_db=10 * math.log10(s.ref2 / s.err2) if s.err2 > 0 and s.ref2 > 0 else math.inf,
            error=error, growth=error / worst if worst > 0 else math.inf if error > 0 else 1.0,
            permuted=perm, quantized=ta.quantized or tb.quantized, quantizer=tb.quantizer or ta.quantizer))
        error_of.setdefault(ta.ident, error)
    unpaired = {a: sorted({t.key for t in a_runs[0]} - paired_a), b: sorted({t.key for t in b_runs[0]} - paired_b)}
    return LayerProfile(a, b, threshold, rows, unpaired, samples=len(a_runs), jump=jump)
