"""Per-unit precision under a predicted-loss budget: a multiple-choice knapsack, solved exactly.

Each unit i takes one option j with a cost c_ij (stored bits, integers) and a predicted loss s_ij
(its measured sensitivity; the search assumes losses add, and checks the pick for real). We want
the cheapest choice with sum s_ij <= budget. Dynamic programming over units keeps, for every
reachable total cost, the smallest total loss that reaches it, and drops every state another state
beats on both (the Pareto front of partial choices): nothing is rounded, so the answer is exact,
and with units of equal shape (every block of a model) the front stays a few thousand states.
"""

from __future__ import annotations

import math


def solve(costs: list[list[int]], losses: list[list[float]], budget: float) -> list[int] | None:
    """Index of the chosen option per unit minimising total cost with total loss <= budget, or
    None when even the lowest-loss choice exceeds it. Ties go to the lower loss."""
    # front: list of (cost, loss, choice tuple), sorted by cost, loss strictly decreasing.
    front: list[tuple[int, float, tuple[int, ...]]] = [(0, 0.0, ())]
    for unit_costs, unit_losses in zip(costs, losses, strict=True):
        states = [
            (cost + c, loss + s, choice + (j,))
            for cost, loss, choice in front
            for j, (c, s) in enumerate(zip(unit_costs, unit_losses, strict=True))
            if loss + s <= budget + 1e-12
        ]
        states.sort(key=lambda state: (state[0], state[1]))
        front = []
        best_loss = math.inf
        for state in states:
            if state[1] < best_loss:
                front.append(state)
                best_loss = state[1]
        if not front:
            return None
    return list(front[0][2])
