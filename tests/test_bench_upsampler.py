"""bench/upsampler.py's extrapolation of the unfold form: a line that does not rise with C is refused."""
import pytest

from conftest import load_script


def _bench():
    return load_script("bench/upsampler.py")


def test_unfold_fit_extrapolates_a_rising_line_and_refuses_a_falling_one():
    bench = _bench()
    assert bench.extrapolate([16.0, 64.0], [2.0, 8.0], 512, "time") == pytest.approx(64.0)
    # noise at small C: C=16 measured faster than C=8 (bench/upsampler.py --naive-dims 8 16 printed -6 s)
    with pytest.raises(SystemExit, match="does not grow with C at --naive-dims \\[8, 16\\].*--naive-dims 16 64"):
        bench.extrapolate([8.0, 16.0], [6.6, 6.2], 512, "time")
