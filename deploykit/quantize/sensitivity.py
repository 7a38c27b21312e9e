"""Measured int16 choice: which quantized modules are worth 16 bits.

A "module" here is what an NPU runs as one quantized op: a layer's input and
weight quantizers together, or all input quantizers of one custom op. For each
module two figures are measured on the check samples:

* alone:  the outputs' SQNR when only this module is quantized (int8) and the
          rest runs in float: how much damage it does by itself;
* gain:   how much the worst output SQNR of the all-int8 model improves when
          only this module is lifted to int16.

Modules are ranked by gain, then added to the int16 set greedily until the
worst output SQNR meets the recipe's target: each step measures the best-ranked
few remaining modules on top of the set so far and adds the one that helps most
then. The search stops at the budget (in modules, and optionally in extra
bit-operations, deploykit.quantize.cost) and, if the target is still out of reach,
says how close the best set came. Once it is met, each chosen module, the most
expensive first, is tried without: one added early may have been made redundant by
later ones, and is dropped if the set meets the target without it. Every set it
measured is a point of fidelity against cost (deploykit.quantize.pareto).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CheckFailedError
from ..progress import track
from ..samples import torch_outputs
from .cost import CostModel
from .fidelity import fidelity
from .insert import set_bits, set_mode


@dataclass
class ModuleSensitivity:
    module: str
    quantizers: list[str]
    alone_sqnr_db: float
    lifted_sqnr_db: float
    gain_db: float


@dataclass
class Search:
    baseline_sqnr_db: float  # worst output, all int8
    modules: list[ModuleSensitivity]  # ranked by gain
    chosen: list[str] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # worst SQNR after each addition
    target_db: float = 0.0
    budget: int = 0
    # (module-path prefix, stage label), the architecture's stage table: a fused model's
    # report says which stream each module is in.
    stages: tuple[tuple[str, str], ...] = ()
    cost: CostModel | None = None  # bit-ops per module
    cost_budget: float = 0.0  # most extra bit-ops of the int16 set, as a fraction of all int8's (0: none)
    latency: list[dict] | None = None  # ORT latency of the front's sets (deploykit.quantize.latency_cost)
    # Each chosen module tried without, after the greedy steps: the set tried ("modules") and its SQNR.
    pruning: list[dict] = field(default_factory=list)

    def stage(self, module: str) -> str:
        # Stage prefixes are module paths, "." or "/" separated (the profiler reads ONNX node names).
        dotted = {p.strip("/").replace("/", "."): label for p, label in self.stages}
        best = max((p for p in dotted if module == p or module.startswith(p + ".")), key=len, default=None)
        return dotted[best] if best is not None else module.split(".")[0]

    @property
    def final_sqnr_db(self) -> float:
        dropped = [p for p in self.pruning if p["dropped"]]
        if dropped:  # the set is the one measured at the last drop
            return dropped[-1]["worst_sqnr_db"]
        return self.steps[-1]["worst_sqnr_db"] if self.steps else self.baseline_sqnr_db

    @property
    def greedy(self) -> list[str]:
        """The set the greedy steps built, before pruning."""
        return [s["module"] for s in self.steps]

    @property
    def met(self) -> bool:
        return bool(self.final_sqnr_db >= self.target_db)

    def chosen_quantizers(self) -> list[str]:
        names = {m.module: m.quantizers for m in self.modules}
        return sorted(q for module in self.chosen for q in names[module])

    def to_dict(self) -> dict:
        from . import pareto

        costs = ({} if self.cost is None else
                 {m.module: {"macs": self.cost.macs[m.module], "extra_cost": self.cost.extra([m.module])}
                  for m in self.modules})
        return {"baseline_worst_sqnr_db": self.baseline_sqnr_db, "target_db": self.target_db, "budget": self.budget,
                "cost_budget": self.cost_budget, "met": self.met, "final_worst_sqnr_db": self.final_sqnr_db,
                "chosen": self.chosen,
                "chosen_extra_cost": None if self.cost is None else self.cost.extra(self.chosen), "steps": self.steps,
                "pruning": self.pruning,
                "modules": [{**m.__dict__, "stage": self.stage(m.module), **costs.get(m.module, {})}
                            for m in self.modules],
                **({} if self.cost is None else {"cost": self.cost.to_dict(), "pareto": pareto.summary(self)}),
                **({} if self.latency is None else {"latency_onnxruntime": self.latency})}


def group_modules(names: list[str]) -> dict[str, list[str]]:
    """Quantizer names by owning module: ``a.b.input_quantizer`` -> ``a.b``."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.rpartition(".")[0], []).append(name)
    return groups


def _worst(references, outputs) -> float:
    return min(f.sqnr_db for f in fidelity(references, outputs))


@dataclass(frozen=True)
class Configuration:
    """Which quantizers quantize (the rest run in float), and which of them in int16."""

    quantized: tuple[str, ...]
    int16: tuple[str, ...] = ()


class WorstSqnr:
    """The worst target-output SQNR of configurations of ``qmodel`` on ``samples``, one after
    another in this process. deploykit.distributed.RayWorstSqnr is the same on Ray workers."""

    def __init__(self, qmodel, samples, references, outputs: list[str] | None = None):
        self.qmodel, self.feeds, self.outputs = qmodel, [s.feeds for s in samples], outputs
        self.references = references if outputs is None else [{k: r[k] for k in outputs} for r in references]

    def one(self, config: Configuration) -> float:
        set_mode(self.qmodel, "off")
        set_mode(self.qmodel, "quant", config.quantized)
        set_bits(self.qmodel, config.quantized, 8)
        set_bits(self.qmodel, config.int16, 16)
        outputs = [{k: v for k, v in torch_outputs(self.qmodel, f).items() if self.outputs is None or k in self.outputs}
                   for f in self.feeds]
        return _worst(self.references, outputs)

    def __call__(self, configs: list[Configuration], description: str, quiet: bool = False) -> list[float]:
        return [self.one(c) for c in track(configs, description, quiet=quiet)]


def search_int16(qmodel, active: list[str], samples, references, *, target_db: float, budget: int,
                 outputs: list[str] | None = None, lookahead: int = 4, quiet: bool = False,
                 evaluate=None, cost: CostModel | None = None, cost_budget: float = 0.0) -> Search:
    """``outputs``: the outputs whose worst SQNR is the target (default: all). ``evaluate``
    runs a list of Configurations (default: WorstSqnr here); whoever runs them, the search
    and its result are the same. ``cost_budget`` (> 0, needs ``cost``): sets whose extra
    bit-ops exceed this fraction of the all-int8 model's are not tried."""
    if cost_budget < 0 or (cost_budget and cost is None):
        raise ValueError("cost_budget must be 0 (none) or a positive fraction, and needs a cost model")
    groups = group_modules(active)
    evaluate = evaluate or WorstSqnr(qmodel, samples, references, outputs)
    active = tuple(active)
    baseline = evaluate([Configuration(active)], "sensitivity: all int8", quiet)[0]
    # Two runs per module: quantized alone (the rest float), and lifted to int16 in the all-int8 model.
    configs = [c for names in groups.values() for c in (Configuration(tuple(names)), Configuration(active, tuple(names)))]
    sqnr = evaluate(configs, f"sensitivity of {len(groups)} modules", quiet)
    measured = [ModuleSensitivity(module, names, sqnr[2 * i], sqnr[2 * i + 1], sqnr[2 * i + 1] - baseline)
                for i, (module, names) in enumerate(groups.items())]
    measured.sort(key=lambda m: (-m.gain_db, m.alone_sqnr_db))
    result = Search(baseline, measured, target_db=target_db, budget=budget, cost=cost, cost_budget=cost_budget)
    if baseline >= target_db:
        return _restore(qmodel, active, result)
    # Gains do not add up (lifting one module changes what the next one is worth), so
    # each step tries the best-ranked few of the rest on top of the current set and
    # keeps the one that helps most now.
    remaining, chosen16 = list(measured), ()
    while len(result.chosen) < budget and remaining:
        affordable = [m for m in remaining
                      if not cost_budget or cost.extra([*result.chosen, m.module]) <= cost_budget * (1 + 1e-9)]
        if not affordable:
            break
        candidates = affordable[:lookahead]
        tried = evaluate([Configuration(active, chosen16 + tuple(m.quantizers)) for m in candidates],
                         f"int16 step {len(result.chosen) + 1}", quiet)
        # max() keeps the first of equals: the better-ranked candidate, as the serial loop did.
        worst, best = max(zip(tried, candidates), key=lambda t: t[0])
        remaining.remove(best)
        chosen16 += tuple(best.quantizers)
        result.chosen.append(best.module)
        result.steps.append({"module": best.module, "worst_sqnr_db": worst, "candidates": len(tried),
                             **({} if cost is None else {"extra_cost": cost.extra(result.chosen)}),
                             "tried": [{"module": m.module, "worst_sqnr_db": t} for t, m in zip(tried, candidates)]})
        if worst >= target_db:
            break
    if result.met and len(result.chosen) > 1:
        _prune(result, evaluate, active, quiet)
    return _restore(qmodel, active, result)


def _prune(result: Search, evaluate, active: tuple[str, ...], quiet: bool) -> None:
    """Gains do not add up: a module the greedy steps added early can be redundant once later
    ones are in. Try the set without each chosen module, the most expensive first (by MACs,
    else the smallest gain), and drop it where the target still holds."""
    names = {m.module: m.quantizers for m in result.modules}
    gain = {m.module: m.gain_db for m in result.modules}
    macs = result.cost.macs if result.cost is not None else {}
    kept = list(result.chosen)
    for module in sorted(result.chosen, key=lambda m: (-macs.get(m, 0), gain[m])):
        trial = [m for m in kept if m != module]
        worst = evaluate([Configuration(active, tuple(q for m in trial for q in names[m]))],
                         f"int16 pruning: without {module}", quiet)[0]
        dropped = bool(worst >= result.target_db)
        result.pruning.append({"module": module, "modules": trial, "worst_sqnr_db": worst, "dropped": dropped})
        if dropped:
            kept = trial
    result.chosen = kept


def _restore(qmodel, active: tuple[str, ...], result: Search) -> Search:
    set_mode(qmodel, "quant", active)
    set_bits(qmodel, active, 8)
    return result


def raise_if_unmet(search: Search) -> None:
    if search.met:
        return
    best = max([s["worst_sqnr_db"] for s in search.steps], default=search.baseline_sqnr_db)
    top = ", ".join(f"{m.module} (+{m.gain_db:.1f} dB)" for m in search.modules[:3])
    within = f"at most {search.budget} modules" + (
        f" and {100 * search.cost_budget:.2f}% extra bit-ops" if search.cost_budget else "")
    raise CheckFailedError(
        f"no int16 set of {within} reaches {search.target_db:.1f} dB worst-output SQNR: "
        f"all-int8 gives {search.baseline_sqnr_db:.1f} dB, the best set {best:.1f} dB. The modules that help most: "
        f"{top}. Raise [quantize] int16_budget{' or int16_cost_budget' if search.cost_budget else ''}, "
        "lower target_sqnr_db, or try another calibrator")


def markdown(search: Search, recipe: str, task: dict | None = None) -> str:
    """sensitivity.md. ``task``: the task metric where it was measured (see pareto.markdown)."""
    from ..report import markdown_table
    from . import pareto

    cost = search.cost
    budget = f"budget {search.budget} modules" + (
        f" and {100 * search.cost_budget:.2f}% extra bit-ops" if search.cost_budget else "")
    extra = f" (+{100 * cost.extra(search.chosen):.2f}% bit-ops)" if cost is not None else ""
    lines = [f"# int16 sensitivity: {recipe}", "",
             f"All int8: worst output SQNR {search.baseline_sqnr_db:.1f} dB; target {search.target_db:.1f} dB, "
             f"{budget}; {'met' if search.met else 'NOT met'} with "
             f"{len(search.chosen)} module(s) in int16{extra}.", ""]

    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    if search.steps:
        lines += ["## Greedy choice", "",
                  markdown_table(["added to int16", "stage", "worst SQNR dB after",
                                  *(["extra bit-ops % after"] if cost else [])],
                                 [[s["module"], search.stage(s["module"]), f"{s['worst_sqnr_db']:.1f}",
                                   *([pct(s["extra_cost"])] if cost else [])] for s in search.steps]), ""]
    if any(p["dropped"] for p in search.pruning):
        lines += ["## Pruning", "", "Each chosen module tried without, after the greedy steps (most expensive first); "
                  "dropped where the set still met the target:", "",
                  markdown_table(["without", "worst SQNR dB", "dropped"],
                                 [[p["module"], f"{p['worst_sqnr_db']:.1f}", "yes" if p["dropped"] else ""]
                                  for p in search.pruning]), ""]
    chosen = set(search.chosen)
    if chosen and search.stages:
        per_stage: dict[str, int] = {}
        for module in search.chosen:
            per_stage[search.stage(module)] = per_stage.get(search.stage(module), 0) + 1
        lines += ["int16 modules per stage: " + ", ".join(f"{k} {v}" for k, v in per_stage.items()) + ".", ""]
    rows = [[m.module, search.stage(m.module), f"{m.gain_db:+.2f}", f"{m.alone_sqnr_db:.1f}", len(m.quantizers),
             *([f"{cost.macs[m.module] / 1e6:.2f}", pct(cost.extra([m.module]))] if cost else []),
             "yes" if m.module in chosen else ""] for m in search.modules]
    lines += ["## Modules ranked by gain when lifted alone", "",
              markdown_table(["module", "stage", "gain dB", "SQNR quantized alone", "quantizers",
                              *(["M MACs", "int16 extra bit-ops %"] if cost else []), "int16"], rows), "",
              "![sensitivity](sensitivity.png)", ""]
    if cost is not None:
        lines += pareto.markdown(search, task)
    return "\n".join(lines)


def plot(search: Search, path, top: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mods = search.modules[:top]
    chosen = set(search.chosen)
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(mods) + 1.5))
    names = [m.module[-60:] for m in mods][::-1]
    gains = [m.gain_db for m in mods][::-1]
    colors = ["#c44e52" if m.module in chosen else "#4878a8" for m in mods][::-1]
    ax.barh(names, gains, color=colors)
    ax.set_xlabel("worst-output SQNR gain when lifted alone to int16 (dB); red: chosen")
    ax.tick_params(axis="y", labelsize=7)
    shown = (f"the {len(mods)} highest-ranked of {len(search.modules)} modules"
             if len(mods) < len(search.modules) else f"all {len(mods)} modules")
    ax.set_title(f"{shown}; baseline all-int8 {search.baseline_sqnr_db:.1f} dB, target {search.target_db:.1f} dB "
                 "(full ranking in sensitivity.md)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

