"""The job's one fraction and one ETA (workers/progress_plan.py), on a simulated clock."""

from __future__ import annotations

import pytest

from workers.progress_plan import Phase, ProgressPlan


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plan(weights: list[float], clock: Clock) -> ProgressPlan:
    return ProgressPlan(
        [Phase(f"p{i}", f"phase {i}", weight) for i, weight in enumerate(weights)], clock=clock
    )


def run(plan: ProgressPlan, clock: Clock, seconds_per_step: list[float], steps: int) -> list:
    """Every phase in order, `steps` steps each, phase i's step taking seconds_per_step[i]; the
    (fraction, eta, true seconds left) of every report."""
    total = steps * sum(seconds_per_step)
    elapsed, seen = 0.0, []
    for index, seconds in enumerate(seconds_per_step):
        plan.update(index, 0, steps)
        for step in range(1, steps + 1):
            clock.now += seconds
            elapsed += seconds
            estimate = plan.update(index, step, steps)
            seen.append((estimate.fraction, estimate.eta_s, total - elapsed))
    return seen


def test_the_eta_is_the_true_time_left_when_the_weights_match_the_work():
    clock = Clock()
    seen = run(plan([1, 4, 2], clock), clock, [1.0, 4.0, 2.0], steps=10)
    fractions = [fraction for fraction, _, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    for _, eta, left in seen:
        assert eta == pytest.approx(left, abs=0.1)


def test_the_eta_follows_a_phase_slower_than_its_weight_said():
    clock = Clock()
    progress = plan([1, 1, 1], clock)
    # Phase 0 takes 10 s; phase 1 turns out five times slower (50 s); phase 2 takes 10 s.
    seen = run(progress, clock, [1.0, 5.0, 1.0], steps=10)
    during_phase_1 = [(eta, left) for _, eta, left in seen[10:20]]
    # Half-way through the slow phase: its own pace says 25 s of it are left, its weight at the
    # job's pace (35 s over 1.5 weights) 11.7 s, trusted half each; the last phase is priced at
    # the job's pace too (23.3 s) -- not at the 10 s the weights said at first.
    eta, left = during_phase_1[4]
    assert left == 35.0
    assert eta == pytest.approx(0.5 * 25 + 0.5 * 0.5 * 35 / 1.5 + 35 / 1.5, abs=0.1)
    # Near its end its own pace dominates: of the estimate, what is not the last phase (priced
    # at 55 s over 1.9 weights) is about the 5 s truly left of it.
    eta, _ = during_phase_1[8]
    assert eta - 55 / 1.9 == pytest.approx(5, abs=0.3)
    # The estimate is recomputed at every step and ends right at 0.
    assert len({eta for eta, _ in during_phase_1}) == 10
    assert seen[-1][1] == 0


def test_the_fraction_never_moves_back():
    clock = Clock()
    progress = plan([1, 1, 2], clock)
    clock.now += 5
    assert progress.update(0, 1, 1).fraction == 0.25
    # A measurement inside a phase counts again from 0; a late report of an earlier phase
    # arrives after the next one began; the weights change once the work is known.
    assert progress.update(1, 1, 2).fraction == 0.375
    assert progress.update(1, 0, 5).fraction == 0.375
    assert progress.update(0, 1, 2).fraction == 0.375
    progress.reweigh([10, 1, 1])
    assert progress.update(1, 1, 2).fraction == pytest.approx(10.5 / 12)
    progress.reweigh([1, 1, 10])
    assert progress.update(1, 2, 2).fraction == pytest.approx(10.5 / 12)
    assert progress.update(2, 10, 10).fraction == 1.0


def test_no_eta_before_some_of_the_job_was_seen():
    clock = Clock()
    progress = plan([1, 999], clock)
    clock.now += 60
    assert progress.update(0, 1, 2).eta_s is None  # 0.05% of the work: a guess, not an ETA
    clock.now += 60
    assert progress.update(1, 10, 999).eta_s is not None


def test_labels_name_the_phase_and_how_far_it_is():
    progress = ProgressPlan(
        [
            Phase("baseline", "measuring the original", 1),
            Phase("gptq", "stage 1 of 2 · gptq", 1, recipe_stage=0),
            Phase("rtn", "stage 2 of 2 · rtn", 1, recipe_stage=1),
        ]
    )
    assert progress.label(0, "window 7/20") == "measuring the original · window 7/20"
    assert progress.label(1, "block 12/30") == "stage 1 of 2 · gptq · block 12/30"
    assert progress.recipe_stages == 2
    with pytest.raises(ValueError):
        progress.reweigh([1, 0, 1])
