"""The dynamic tile scheduler's counter protocol (primitives/scheduler.claim_next), on a host
model of the kernel's CTAs: whatever order their claims reach the atomic, every tile is run
exactly once, and the counter is back at 0 when the run ends (so the next launch on the stream
starts clean).  The model mirrors the device code line for line; the GPU tests run the real one."""
import random

from hypothesis import given, settings, strategies as st

from numba_fa3.primitives.scheduler import persistent_grid


class Counter:
    def __init__(self):
        self.value = 0

    def claim(self, tiles):
        """claim_next: atomic add; the claim numbered tiles - 1 is the run's last and resets."""
        old = self.value
        self.value += 1
        if old == tiles - 1:
            self.value = 0
        return old


def run(tiles, sms, seed, counter=None):
    grid = persistent_grid(tiles, sms)
    counter, rng = counter or Counter(), random.Random(seed)
    current = {cta: cta for cta in range(grid)}          # initial_work: blockIdx.x
    done = []
    while current:
        cta = rng.choice(sorted(current))                 # any CTA may claim next
        tile = current.pop(cta)
        if tile >= tiles:
            continue                                      # the stop sentinel: no more claims
        done.append(tile)
        current[cta] = counter.claim(tiles) + grid
    return sorted(done), counter.value


@settings(max_examples=200, deadline=None)
@given(tiles=st.integers(1, 3000), sms=st.sampled_from([1, 2, 7, 132]), seed=st.integers(0, 2 ** 31))
def test_every_tile_once_and_counter_reset(tiles, sms, seed):
    done, left = run(tiles, sms, seed)
    assert done == list(range(tiles))
    assert left == 0


def test_consecutive_launches_share_a_counter():
    shared = Counter()  # one counter per stream serves every launch on it
    for tiles in (5, 300, 1, 132, 133, 2048):
        done, left = run(tiles, 132, tiles, shared)
        assert done == list(range(tiles)) and left == 0
