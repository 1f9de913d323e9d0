import pytest

from tvbase.coefficients import DEFAULT_GRID, choose_addition_alpha, choose_negation_alpha
from tvbase.errors import InvalidInputError


def test_default_grid_is_linspace_0_1_21():
    assert len(DEFAULT_GRID) == 21 and DEFAULT_GRID[0] == 0.0 and DEFAULT_GRID[-1] == 1.0
    assert DEFAULT_GRID[1] == pytest.approx(0.05)


def test_addition_picks_the_peak_of_a_concave_score():
    alpha, scores = choose_addition_alpha(lambda a: 1 - (a - 0.35) ** 2)
    assert alpha == pytest.approx(0.35)
    assert len(scores) == 21


def test_addition_ties_go_to_the_smaller_alpha():
    alpha, _ = choose_addition_alpha(lambda a: min(a, 0.5), grid=[0.0, 0.5, 0.75, 1.0])
    assert alpha == 0.5


def test_negation_respects_the_control_constraint():
    # the target drops with alpha; the control falls below 95% of 0.9 past alpha = 0.6
    target = lambda a: 0.9 - 0.8 * a
    control = lambda a: 0.9 if a <= 0.6 + 1e-9 else 0.5  # grid points carry rounding
    alpha, scores = choose_negation_alpha(target, control, control_zero_shot=0.9)
    assert alpha == pytest.approx(0.6)
    assert scores[alpha][1] >= 0.95 * 0.9


def test_negation_returns_zero_when_no_alpha_keeps_the_control():
    alpha, _ = choose_negation_alpha(lambda a: 0.1, lambda a: 0.0, control_zero_shot=0.9, grid=[0.5, 1.0])
    assert alpha == 0.0


@pytest.mark.parametrize("grid", [[], [float("nan")], [0.1, float("inf")]])
def test_bad_grids_are_refused(grid):
    with pytest.raises(InvalidInputError, match="grid"):
        choose_addition_alpha(lambda a: 0.0, grid=grid)


def test_bad_keep_is_refused():
    with pytest.raises(InvalidInputError, match="keep"):
        choose_negation_alpha(lambda a: 0, lambda a: 0, 1.0, keep=1.5)
