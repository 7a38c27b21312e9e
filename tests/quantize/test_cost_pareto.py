"""Bit-op cost of int16 sets, the cost budget of the search, and the Pareto view."""

import pytest
import torch
from torch import nn

from deploykit.models.bevformer.attention import Sampler
from deploykit.models.layers import Add
from deploykit.quantize.cost import CostModel, _op_macs, measure_macs
from deploykit.quantize.insert import insert_quantizers, quantizers, set_mode
from deploykit.quantize.pareto import Point, front, points, summary
from deploykit.quantize.sensitivity import Configuration, group_modules, markdown, search_int16


class Toy(nn.Module):
    """conv (big) -> conv (small) + residual add -> multi-head attention over pixels -> linear."""

    input_names, output_names = ("x",), ("y",)

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(3, 16, 3, padding=1)
        self.small = nn.Conv2d(16, 16, 1, groups=4)
        self.add = Add()
        self.attn = nn.MultiheadAttention(16, 2)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        a = self.big(x)
        h = self.add(a, self.small(a))  # (1, 16, 6, 6)
        seq = h.flatten(2).permute(2, 0, 1)  # (36, 1, 16)
        return (self.head(self.attn(seq, seq, seq)[0]),)


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    q = insert_quantizers(Toy().eval(), "max")
    set_mode(q, "quant")  # measure_macs must not depend on (or change) the modes
    return q


FEEDS = {"x": torch.randn(1, 3, 6, 6).numpy()}


def test_macs_match_the_layer_arithmetic(toy):
    groups = group_modules(list(quantizers(toy)))
    cost = measure_macs(toy, FEEDS, groups)
    pixels = 36
    assert cost.macs["big"] == pixels * 16 * 3 * 9
    assert cost.macs["small"] == pixels * 16 * 4  # 16 outputs x 4 inputs per group
    assert cost.macs["add"] == 2 * pixels * 16  # one op per input element
    # In-projection (3 x L x E x E) and both matmuls (2 x L x L x E); out_proj is its own module.
    assert cost.macs["attn"] == 3 * pixels * 16 * 16 + 2 * pixels * pixels * 16
    assert cost.macs["attn.out_proj"] == pixels * 16 * 16
    assert cost.macs["head"] == pixels * 16 * 4
    assert {q.mode for q in quantizers(toy).values()} == {"quant"}


def test_extra_cost_is_three_times_the_lifted_modules_share():
    cost = CostModel({"a": 300, "b": 100})
    assert cost.int8_bitops == 64 * 400
    assert cost.extra(["b"]) == pytest.approx((256 - 64) * 100 / (64 * 400))  # 0.75
    assert cost.extra(["a", "b", "a"]) == pytest.approx(3.0)  # all lifted: 4x the bit-ops
    assert CostModel({"a": 0}).extra(["a"]) == 0.0


def test_deformable_sampler_counts_taps_and_weights():
    value = torch.zeros(1, 50, 2, 8)  # (bs, keys, heads, head dim)
    locations = torch.zeros(1, 10, 2, 1, 4, 2)
    weights = torch.zeros(1, 10, 2, 1, 4)  # (bs, queries, heads, levels, points)
    args = (value, torch.tensor([[5, 10]]), torch.tensor([0]), locations, weights)
    assert _op_macs(Sampler(), args) == 5 * 10 * 2 * 4 * 8


def _scripted_search(toy, gains: dict[str, float], cost: CostModel, budget: float, target: float):
    """search_int16 on an evaluator whose SQNR is 20 dB plus the lifted modules' gains."""
    groups = group_modules(list(quantizers(toy)))
    owner = {q: m for m, names in groups.items() for q in names}

    def evaluate(configs: list[Configuration], description, quiet=False):
        return [20.0 + sum(gains.get(m, 0.0) for m in {owner[q] for q in c.int16}) for c in configs]

    return search_int16(toy, list(owner), [], [], target_db=target, budget=4, evaluate=evaluate, quiet=True,
                        cost=cost, cost_budget=budget)


def test_cost_budget_skips_sets_it_cannot_afford(toy):
    cost = measure_macs(toy, FEEDS, group_modules(list(quantizers(toy))))
    gains = {"big": 5.0, "head": 2.0, "small": 1.5}
    free = _scripted_search(toy, gains, cost, 0.0, 24.0)
    assert free.chosen == ["big"] and free.met
    budget = cost.extra(["head", "small"]) * 1.01
    assert cost.extra(["big"]) > budget
    cheap = _scripted_search(toy, gains, cost, budget, 23.5)
    assert cheap.chosen == ["head", "small"] and cheap.met
    assert all(s["extra_cost"] <= budget for s in cheap.steps)
    assert all(t["module"] != "big" for s in cheap.steps for t in s["tried"])
    # The mode and bits are restored for every quantizer it touched.
    assert {q.bits for q in quantizers(toy).values()} == {8}
    with pytest.raises(ValueError, match="cost model"):
        search_int16(toy, [], [], [], target_db=1, budget=1, evaluate=lambda c, d, q=False: [0.0], cost_budget=0.1)


def test_pareto_front_and_points(toy):
    cost = measure_macs(toy, FEEDS, group_modules(list(quantizers(toy))))
    search = _scripted_search(toy, {"big": 5.0, "head": 2.0, "small": 1.5, "add": -0.5}, cost, 0.0, 27.0)
    assert search.chosen == ["big", "head"]
    pts = points(search)
    sets = [frozenset(p.modules) for p in pts]
    assert len(sets) == len(set(sets))  # each measured set once
    assert pts[0].modules == () and pts[0].extra_cost == 0.0
    assert frozenset(["big", "head"]) in sets and frozenset(["big", "small"]) in sets
    best = front(pts)
    costs = [p.extra_cost for p in best]
    sqnr = [p.worst_sqnr_db for p in best]
    assert costs == sorted(costs) and sqnr == sorted(sqnr) and len(set(sqnr)) == len(sqnr)
    for p in pts:  # nothing off the front beats a front point on both
        assert not any(p.extra_cost <= b.extra_cost and p.worst_sqnr_db > b.worst_sqnr_db for b in best)
    s = summary(search)
    assert pts[s["chosen"]].modules == ("big", "head") and s["chosen"] in s["front"]
    md = markdown(search, "toy", {"metric": "mAP", "float": 0.9, "all int8": 0.5, "chosen": 0.8})
    assert "## Fidelity against cost" in md and "**chosen**" in md and "0.8000" in md


def test_front_drops_dominated_and_equal_points():
    a, b = Point((), 20.0, 0.0, "all int8"), Point(("x",), 25.0, 0.1, "lifted alone")
    worse, same = Point(("y",), 22.0, 0.2, "lifted alone"), Point(("z",), 25.0, 0.3, "lifted alone")
    assert front([worse, b, same, a]) == [a, b]


def test_a_module_made_redundant_by_later_ones_is_pruned(toy):
    """big helps most alone and is chosen first; head and small then meet the target together
    (their joint gain is more than the sum), without big. Pruning tries the most expensive first,
    drops big, and keeps the two that are still needed."""
    cost = measure_macs(toy, FEEDS, group_modules(list(quantizers(toy))))
    groups = group_modules(list(quantizers(toy)))
    owner = {q: m for m, names in groups.items() for q in names}
    gains = {"big": 3.0, "head": 1.0, "small": 0.9, "add": 0.1}

    def evaluate(configs, description, quiet=False):
        out = []
        for c in configs:
            lifted = {owner[q] for q in c.int16}
            out.append(20.0 + sum(gains.get(m, 0.0) for m in lifted) + 6.0 * ({"head", "small"} <= lifted))
        return out

    search = search_int16(toy, list(owner), [], [], target_db=27.0, budget=4, evaluate=evaluate, quiet=True, cost=cost)
    assert search.greedy == ["big", "head", "small"]
    assert search.chosen == ["head", "small"] and search.met
    assert search.final_sqnr_db == pytest.approx(27.9)
    assert [(p["module"], p["dropped"]) for p in search.pruning] == [("big", True), ("small", False), ("head", False)]
    assert cost.extra(search.chosen) < cost.extra(search.greedy)
    pts = points(search)
    assert summary(search)["chosen"] == [frozenset(p.modules) for p in pts].index(frozenset(["head", "small"]))
    assert "## Pruning" in markdown(search, "toy")
