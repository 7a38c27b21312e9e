"""A layer profile as people read it: a table, JSON and error along depth."""

from __future__ import annotations

import math
from pathlib import Path

from ..artifacts import atomic_directory, write_json
from .profile import LayerProfile


def _num(x: float, fmt: str) -> str:
    return "inf" if math.isinf(x) else format(x, fmt)


def rows_markdown(profile: LayerProfile, limit: int | None = None) -> str:
    from ..report import markdown_table

    first = profile.first_divergence
    rows = []
    for r in profile.rows[:limit]:
        mark = " **<- parts ways here**" if r is first else ""
        via = f" (via `{r.quantizer.rsplit('.', 1)[-1]}`)" if r.quantizer else ""
        rows.append([f"`{r.name}`{via}{mark}", "x".join(map(str, r.shape)), f"{r.max_abs_error:.3g}",
                     f"{r.max_rel_error:.2e}", f"{r.cosine:.6f}", _num(r.sqnr_db, ".1f"), f"{r.error:.2e}",
                     _num(r.growth, ".1f")])
    return markdown_table(["layer", "shape", "max abs", "max rel", "cosine", "SQNR dB", "rel RMS", "growth"], rows)


def summary(profile: LayerProfile) -> str:
    first = profile.first_divergence
    t = profile.threshold
    if first is None:
        where = "no layer is past the threshold"
    else:
        how = (f"{_num(first.growth, '.1f')}x the largest error before it" if first.growth >= profile.jump
               else "no layer jumps: the error crept past the threshold")
        via = f", read through {first.quantizer}" if first.quantizer else ""
        where = f"the versions part ways at `{first.name}` (relative RMS error {first.error:.2e}{via}, {how})"
    return (f"{len(profile.rows)} layers paired over {profile.samples} sample(s); threshold: relative RMS "
            f"error {t:.0e} (SQNR {-20 * math.log10(t):.0f} dB), jump {profile.jump:g}x; {where}")


def markdown(profile: LayerProfile) -> str:
    lines = ["# Layer-wise comparison", "", f"- A (reference): `{profile.a}`", f"- B: `{profile.b}`",
             f"- {summary(profile)}", "",
             "Rows in A's execution order. rel RMS = 10^(-SQNR/20); growth = this layer's rel RMS over the "
             "largest of the layers before it: rounding grows it a little per layer, a wrong layer at once.", "", rows_markdown(profile)]
    for side, keys in profile.unpaired.items():
        if keys:
            lines += ["", f"Scopes of `{side}` with no partner ({len(keys)}): "
                      + ", ".join(f"`{k}`" for k in keys[:40]) + (" ..." if len(keys) > 40 else "")]
    return "\n".join(lines) + "\n"


def plot(profile: LayerProfile, path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.12 * len(profile.rows) + 4)), 4.2))
    errors = [max(r.error, 1e-12) for r in profile.rows]
    ax.semilogy(range(len(errors)), errors, marker=".", lw=1)
    ax.axhline(profile.threshold, color="tab:red", ls="--", lw=1, label=f"threshold {profile.threshold:.0e}")
    first = profile.first_divergence
    if first is not None:
        i = profile.rows.index(first)
        ax.annotate(first.name, (i, errors[i]), xytext=(5, 10), textcoords="offset points", fontsize=8,
                    color="tab:red", arrowprops={"arrowstyle": "->", "color": "tab:red"})
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("relative RMS error")
    ax.set_title(title or f"{profile.b} vs {profile.a}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_files(profile: LayerProfile, directory: Path, stem: str = "compare") -> None:
    write_json(directory / f"{stem}.json", profile.to_dict())
    (directory / f"{stem}.md").write_text(markdown(profile))
    plot(profile, directory / f"{stem}.png")


def write_report(profile: LayerProfile, out: Path, *, overwrite: bool = True) -> Path:
    """OUT/compare.md, compare.json and compare.png, written whole or not at all."""
    with atomic_directory(Path(out), overwrite=overwrite) as scratch:
        write_files(profile, scratch)
    return Path(out)


def block(name: str) -> str:
    """The block a layer belongs to: its path up to the first index (``img_backbone.layer1.0``,
    ``pts_bbox_head.transformer.encoder.layers.0``), else its first two names."""
    atoms = name.split("#")[0].split(".")
    for i, atom in enumerate(atoms):
        if atom.isnumeric():
            return ".".join(atoms[: i + 1])
    return ".".join(atoms[:2])


def quantization_markdown(profiles: dict[str, LayerProfile], plot_file: str | None = None,
                          int16: list[str] = ()) -> list[str]:
    """The quantize report's section: per block of layers, in execution order, the SQNR each
    configuration reaches at its end and the layer in it where the error grew most; layers read
    through an int16-lifted quantizer (``int16``) are counted per block."""
    from ..report import markdown_table

    keys = [k for k, p in profiles.items() if p.rows]
    if not keys:
        return []
    lines = ["## Where the quantization error enters, layer by layer", "",
             "Each layer's output in the fake-quant model against the float model (a tensor an int8 layer "
             "reads is taken as its quantizer delivers it), in execution order, grouped in blocks. Growth is a "
             "layer's relative RMS error over the largest before it: where it is large, that layer's "
             "quantization adds the error. Read the int16 choice against it: an override pays where a block's "
             "SQNR rises between the two columns.", ""]
    if plot_file:
        lines += [f"![error along depth]({plot_file})", ""]
    for key in keys:
        first = profiles[key].first_past_threshold
        worst = min(profiles[key].rows, key=lambda r: r.sqnr_db)
        lines.append(f"- {key.replace('_', ' + ')}: first layer below "
                     f"{-20 * math.log10(profiles[key].threshold):.0f} dB SQNR "
                     + (f"`{first.name}` ({first.sqnr_db:.1f} dB)" if first else "none")
                     + f"; lowest `{worst.name}` ({_num(worst.sqnr_db, '.1f')} dB)")
    lifted = set(int16)
    groups: dict[str, dict[str, list]] = {}
    for key in keys:
        for r in profiles[key].rows:
            groups.setdefault(block(r.name), {}).setdefault(key, []).append(r)
    rows = []
    for name, by_key in groups.items():
        ref = by_key.get(keys[0], [])
        grew = max(ref, key=lambda r: r.growth if math.isfinite(r.growth) else 1e30) if ref else None
        n16 = sum(1 for r in ref if r.quantizer in lifted)
        rows.append([f"`{name}`", str(len(ref)),
                     *(_num(by_key[k][-1].sqnr_db, ".1f") if k in by_key else "" for k in keys),
                     f"`{grew.name}` ({_num(grew.growth, '.1f')}x)" if grew else "", str(n16) if n16 else ""])
    lines += ["", markdown_table(["block", "layers", *(f"SQNR dB at its end, {k.replace('_', ' + ')}" for k in keys),
                                  f"largest growth ({keys[0].replace('_', ' + ')})", "read through int16"], rows), ""]
    return lines


def quantization_plot(profiles: dict[str, LayerProfile], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max((len(p.rows) for p in profiles.values()), default=0)
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.12 * longest + 4)), 4.2))
    for key, profile in profiles.items():
        sqnr = [min(r.sqnr_db, 120.0) for r in profile.rows]
        ax.plot(range(len(sqnr)), sqnr, marker=".", lw=1, label=key.replace("_", " + "))
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("SQNR vs float, dB")
    ax.set_title("Quantization error along depth", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
