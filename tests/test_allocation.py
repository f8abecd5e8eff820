"""Paper IV bit allocation: water-filling, KKT conditions, budget-safe rounding, brute-force optimality."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lqlib.alloc.allocation import (
    Allocation,
    allocate,
    am_gm_ratio,
    predicted_distortion,
    round_to_grid,
    water_fill,
)

FAST = settings(max_examples=150, deadline=None)


def _mean(bits, sizes):
    return float((np.asarray(sizes) * bits).sum() / np.sum(sizes))


def _bisection_reference(w, budget, lo, hi, n):
    """θ by plain bisection on Σ n clip(θ + ½ log2 w, lo, hi) = budget·Σ n (independent of the library)."""
    c = 0.5 * np.log2(w)
    a, z = -200.0, 200.0
    for _ in range(200):
        m = 0.5 * (a + z)
        if (n * np.clip(m + c, lo, hi)).sum() < budget * n.sum():
            a = m
        else:
            z = m
    return np.clip(0.5 * (a + z) + c, lo, hi)


weights_st = st.lists(st.floats(-6.0, 6.0), min_size=1, max_size=12).map(lambda e: 4.0 ** np.array(e))


# ---------------------------------------------------------------- continuous water-filling


def test_unclamped_equals_closed_form():
    rng = np.random.default_rng(0)
    for shape in [(2,), (7,), (4, 2, 3)]:
        w = np.exp(rng.normal(0, 3, shape))
        n = rng.integers(1, 200, shape).astype(float)
        for sizes in (None, n):
            nn = np.ones(shape) if sizes is None else n
            gm = np.exp((nn * np.log(w)).sum() / nn.sum())
            b = water_fill(w, 5.0, b_min=-math.inf, sizes=sizes)
            assert b.shape == shape
            np.testing.assert_allclose(b, 5.0 + 0.5 * np.log2(w / gm), rtol=0, atol=1e-12)
            assert _mean(b, nn) == pytest.approx(5.0, abs=1e-12)


def test_known_two_slot_example():
    a = allocate([1.0, 16.0], 4.0)
    np.testing.assert_allclose(a.bits, [3.0, 5.0], atol=1e-12)
    assert a.am_gm == pytest.approx(8.5 / 4, rel=1e-14)
    assert a.predicted_ratio == pytest.approx(2.125, rel=1e-14)  # no clamps: ratio is AM/GM
    np.testing.assert_allclose(a.predicted_distortion, [4.0**-3, 16 * 4.0**-5])  # equalised
    assert allocate([1.0, 16.0], 4.0, grid=0.25).bits.tolist() == [3.0, 5.0]
    # weight ratio 16 = 4 bits of spread, so a cap of 4.5 re-spreads the excess: 3.5 / 4.5
    np.testing.assert_allclose(water_fill([1.0, 16.0], 4.0, b_max=4.5), [3.5, 4.5], atol=1e-12)


@pytest.mark.parametrize("sizes", [None, [3.0, 1.0, 8.0, 2.0]])
@pytest.mark.parametrize("grid", [None, 0.25, [1.0, 2.0, 3.0, 4.0, 8.0]])
def test_equal_weights_give_uniform_allocation(sizes, grid):
    w = np.full(4, 0.37)
    a = allocate(w, 3.0, grid=grid, b_min=1.0, b_max=8.0, sizes=sizes)
    assert a.bits.tolist() == [3.0] * 4
    assert a.am_gm == 1.0
    assert a.predicted_ratio == 1.0
    assert a.mean_bits == 3.0


@FAST
@given(weights_st, st.floats(0.0, 1.0), st.floats(0.5, 3.0), st.floats(0.0, 1.0), st.booleans())
def test_clamped_solution_meets_kkt(w, lo, width, where, sized):
    hi = lo + width
    budget = lo + where * width
    n = np.arange(1.0, w.size + 1) if sized else np.ones(w.size)
    b = water_fill(w, budget, b_min=lo, b_max=hi, sizes=n)
    c = 0.5 * np.log2(w)
    assert ((b >= lo) & (b <= hi)).all()
    assert _mean(b, n) == pytest.approx(budget, abs=1e-9)
    free = (b > lo + 1e-9) & (b < hi - 1e-9)
    if free.any():
        theta = b[free] - c[free]
        assert np.ptp(theta) < 1e-9  # free slots share one water level
        t = theta.mean()
        assert (t + c[b <= lo + 1e-9] <= lo + 1e-9).all()  # clamped low: wanted less
        assert (t + c[b >= hi - 1e-9] >= hi - 1e-9).all()  # clamped high: wanted more
    else:  # every slot at a bound: some θ must separate the low ones from the high ones
        assert (c[b <= lo + 1e-9].max(initial=-np.inf) - lo) <= (c[b >= hi - 1e-9].min(initial=np.inf) - hi) + 1e-9
    np.testing.assert_allclose(b, _bisection_reference(w, budget, lo, hi, n), atol=1e-9)
    # larger weight never gets fewer bits
    order = np.argsort(w, kind="stable")
    assert (np.diff(b[order]) >= -1e-12).all()


@FAST
@given(weights_st, st.floats(1.0, 3.0), st.floats(0.0, 2.0), st.booleans())
def test_predicted_ratio_of_continuous_optimum(w, budget, margin, clamp):
    n = np.arange(1.0, w.size + 1)
    b_min, b_max = (budget - margin, budget + margin) if clamp else (-math.inf, math.inf)
    a = allocate(w, budget, b_min=b_min, b_max=b_max, sizes=n)
    assert a.predicted_ratio >= 1 - 1e-12  # uniform is feasible, so the optimum is no worse
    assert a.predicted_ratio <= a.am_gm * (1 + 1e-9)  # clamps can only cost
    if not clamp:
        assert a.predicted_ratio == pytest.approx(a.am_gm, rel=1e-9)
    assert a.predicted_distortion.sum() == pytest.approx(predicted_distortion(a.bits, w, n).sum())


def test_am_gm_ratio():
    assert am_gm_ratio([2.0, 8.0]) == pytest.approx(5.0 / 4.0, rel=1e-14)
    # sizes weight the means: (1·1 + 3·16)/4 over 16^(3/4) = 12.25 / 8
    assert am_gm_ratio([1.0, 16.0], sizes=[1, 3]) == pytest.approx(12.25 / 8, rel=1e-14)
    assert am_gm_ratio(np.full((3, 5), 1e-300)) == 1.0
    assert am_gm_ratio([1e-300, 1e300]) == pytest.approx(0.5e300, rel=1e-9)  # no overflow


# ---------------------------------------------------------------- rounding onto the grid


@pytest.mark.parametrize("slots", [2, 3, 4])
def test_rounding_is_brute_force_optimal_equal_sizes(slots):
    """Equal sizes, 0.25-bit grid: the greedy equals the optimum over every grid combination."""
    levels = np.arange(1.0, 3.01, 0.25)
    combos = np.array(list(itertools.product(levels, repeat=slots)))
    rng = np.random.default_rng(slots)
    for _ in range(60):
        w = 4.0 ** rng.uniform(-2, 2, slots)
        budget = float(rng.choice([rng.uniform(1.0, 3.0), rng.choice(levels)]))
        a = allocate(w, budget, grid=0.25, b_min=1.0, b_max=3.0)
        d = (w * 4.0**-combos).sum(axis=1)
        feasible = combos.mean(axis=1) <= budget + 1e-12
        assert a.predicted_distortion.sum() == pytest.approx(d[feasible].min(), rel=1e-12)
        assert a.mean_bits <= budget + 1e-12


def test_rounding_unequal_sizes_is_feasible_and_maximal():
    """Unequal sizes (a knapsack): no guarantee of optimality, but no grid step that fits is left unspent."""
    levels = np.arange(1.0, 3.01, 0.25)
    rng = np.random.default_rng(7)
    for _ in range(100):
        w = 4.0 ** rng.uniform(-2, 2, 4)
        n = rng.integers(1, 9, 4).astype(float)
        budget = rng.uniform(1.0, 3.0)
        a = allocate(w, budget, grid=levels, b_min=1.0, b_max=3.0, sizes=n)
        spent = (n * a.bits).sum()
        assert spent <= budget * n.sum() * (1 + 1e-12)
        room = budget * n.sum() - spent
        can_raise = (a.bits < 3.0) & (n * 0.25 <= room + 1e-12)
        assert not can_raise.any()


@FAST
@given(weights_st, st.floats(1.0, 6.0))
def test_greedy_from_floors_equals_greedy_from_bottom(w, budget):
    """Equal sizes, uniform grid: the floors of water-filling are part of the optimum, so starting the
    greedy there gives what the plain greedy from the smallest rate gives (up to ties)."""
    a = allocate(w, budget, grid=0.25, b_min=1.0, b_max=6.0)
    bottom = round_to_grid(np.ones(w.size), w, budget, 0.25, b_max=6.0)
    assert predicted_distortion(bottom, w).sum() == pytest.approx(a.predicted_distortion.sum(), rel=1e-12)
    assert bottom.mean() <= budget + 1e-12


grid_st = st.one_of(
    st.sampled_from([0.25, 0.5, 1.0, 0.1]),
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=8, unique=True).map(sorted),
)


@FAST
@given(weights_st, st.data(), grid_st, st.floats(0.0, 10.0), st.floats(0.0, 10.0))
def test_rounding_never_exceeds_budget(w, data, grid, budget, b_max):
    """Σ n·b ≤ budget·Σ n for every grid, degenerate ones included (a zero budget, a tiny top rate)."""
    n = np.array(data.draw(st.lists(st.integers(1, 256), min_size=w.size, max_size=w.size)), dtype=float)
    b_max = max(b_max, budget)
    try:
        a = allocate(w, budget, grid=grid, b_min=0.0, b_max=b_max, sizes=n)
    except ValueError as e:  # only when the grid cannot serve this budget at all
        usable = np.arange(0, b_max + 1e-9, grid) if np.ndim(grid) == 0 else np.array(grid)
        usable = usable[usable <= b_max]
        assert usable.size == 0 or budget < usable[0] or budget > usable[-1]
        assert "grid" in str(e)
        return
    assert (n * a.bits).sum() <= budget * n.sum() * (1 + 1e-12) + 1e-12
    assert a.mean_bits <= budget * (1 + 1e-12) + 1e-12
    assert (a.bits <= b_max).all() and (a.bits >= 0).all()
    if np.ndim(grid) == 0:
        np.testing.assert_allclose(a.bits, np.round(a.bits / grid) * grid, atol=1e-9)
    else:
        assert np.isin(a.bits, grid).all()
    # rounding rates that overshoot the budget (the floors break it too) still stays within it
    bits = round_to_grid(a.continuous + 0.5, w, budget, grid if np.ndim(grid) == 0 else np.union1d(0.0, grid), n)
    assert (n * bits).sum() <= budget * n.sum() * (1 + 1e-12) + 1e-12


@pytest.mark.parametrize("sizes", [[1.0, 1.0], [1.0, 256.0], [3.0, 7.0, 11.0]])
def test_degenerate_grids_never_exceed_the_budget(sizes):
    """The case a random run once found: budget 0 and grid [0, 1.79e-11] must give all zeros exactly;
    a grid step of 0.1 meets a budget of 1.3 exactly (1.3 is a grid rate, not 13·0.1 = 1.3000000000000003)."""
    w = np.arange(1.0, len(sizes) + 1.0)
    a = allocate(w, 0.0, grid=[0.0, 1.79e-11], b_min=0.0, b_max=10.0, sizes=sizes)
    assert (a.bits == 0).all() and a.mean_bits == 0.0
    tiny = round_to_grid(np.full(len(sizes), 1e-11), w, 1e-11, [0.0, 1.79e-11], sizes)
    assert (np.asarray(sizes) * tiny).sum() <= 1e-11 * np.sum(sizes)
    a = allocate(w, 1.3, grid=0.1, b_min=0.0, b_max=6.0, sizes=sizes)
    assert a.mean_bits <= 1.3 and a.mean_bits == pytest.approx(1.3, abs=0.1)


def test_round_to_grid_floors_then_spends_on_largest_gain():
    # floors are 2 and 2 (budget 2.5 leaves 1 bit); the heavier slot gets the increment
    bits = round_to_grid([2.4, 2.6], [1.0, 3.0], 2.5, [1.0, 2.0, 3.0])
    assert bits.tolist() == [2.0, 3.0]
    # b_max removes the top rate: the increment cannot be spent
    assert round_to_grid([2.4, 2.6], [1.0, 3.0], 2.5, [1.0, 2.0, 3.0], b_max=2.5).tolist() == [2.0, 2.0]
    # a grid rate that would overshoot by one ulp-free quarter is not taken
    assert round_to_grid([1.3, 1.3], [1.0, 1.0], 1.3, 0.25).tolist() == [1.25, 1.25]


# ---------------------------------------------------------------- API and errors


def test_allocation_shape_and_immutability():
    w = np.arange(1.0, 13.0).reshape(2, 3, 2)
    a = allocate(w, 4.0, grid=0.5, b_min=2.0, b_max=6.0)
    assert isinstance(a, Allocation)
    for arr in (a.bits, a.continuous, a.predicted_distortion):
        assert arr.shape == w.shape
        assert not arr.flags.writeable
    with pytest.raises(AttributeError):
        a.budget = 5.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0, np.nan]}, "finite"),
        ({"weights": [1.0, np.inf]}, "finite"),
        ({"weights": [1.0, 0.0]}, "> 0"),
        ({"weights": [1.0, -2.0]}, "> 0"),
        ({"weights": []}, "empty"),
        ({"sizes": [1.0]}, "shape"),
        ({"sizes": [1.0, 0.0]}, "sizes"),
        ({"budget": 9.0, "b_max": 8.0}, "within"),
        ({"budget": -1.0}, "within"),
        ({"budget": math.nan}, "finite"),
        ({"grid": [3.0, 2.0]}, "sorted"),
        ({"grid": []}, "non-empty"),
        ({"grid": 0.0}, "step"),
        ({"grid": [5.0, 6.0]}, "smallest grid rate"),
        ({"grid": [1.0, 2.0]}, "largest usable grid rate"),
        ({"grid": 0.25, "b_min": -math.inf}, "finite b_min"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    args = {"weights": [1.0, 2.0], "budget": 4.0} | kwargs
    with pytest.raises(ValueError, match=message):
        allocate(**args)


def test_round_to_grid_errors():
    with pytest.raises(ValueError, match="smallest grid rate"):
        round_to_grid([3.0, 3.0], [1.0, 1.0], 3.0, [4.0, 5.0])
    with pytest.raises(ValueError, match="shape"):
        round_to_grid([3.0], [1.0, 1.0], 3.0, [1.0, 5.0])
    with pytest.raises(ValueError, match="b_max"):
        round_to_grid([3.0, 3.0], [1.0, 1.0], 3.0, [4.0, 5.0], b_max=2.0)
