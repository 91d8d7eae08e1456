"""The one retry delay (jobs and webhook deliveries): exponential, capped, jittered downwards."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from comfyq.backoff import backoff


@given(
    attempt=st.integers(min_value=-5, max_value=200),
    base=st.floats(min_value=0.001, max_value=100.0),
    cap=st.floats(min_value=0.001, max_value=10_000.0),
)
def test_delay_is_the_capped_doubling_times_50_to_100_percent(
    attempt: int, base: float, cap: float
) -> None:
    full = min(cap, base * 2.0 ** max(0, attempt - 1))
    assert 0.5 * full <= backoff(attempt, base, cap) <= full


@given(
    attempt=st.integers(min_value=-5, max_value=200),
    base=st.floats(min_value=0.001, max_value=100.0),
    cap=st.floats(min_value=0.001, max_value=10_000.0),
)
def test_without_jitter_the_delay_is_the_capped_doubling(
    attempt: int, base: float, cap: float
) -> None:
    assert backoff(attempt, base, cap, jitter=False) == min(cap, base * 2.0 ** max(0, attempt - 1))
