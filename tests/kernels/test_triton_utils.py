"""The launch helpers in kernels/_triton_utils.py: broadcast_shapes and the Tuned launch path."""
import copy
import random

import pytest
import torch

from fastfold_plugin.kernels._triton_utils import Tuned, broadcast_shapes, weight_grad_fp32


def test_broadcast_shapes_matches_torch():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 4)
        base = [rng.choice([1, 2, 3, 5]) for _ in range(rng.randint(0, 5))]
        shapes = []
        for _ in range(n):
            s = [d if rng.random() < 0.7 else rng.choice([1, 4]) for d in base]
            shapes.append(tuple(s[rng.randint(0, len(s)):]))
        try:
            want = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            with pytest.raises(ValueError, match="do not broadcast"):
                broadcast_shapes(*shapes)
        else:
            assert broadcast_shapes(*shapes) == want, shapes


class _Config:
    pre_hook = None

    def __init__(self, block):
        self.block = block

    def all_kwargs(self):
        return {"BLOCK": self.block, "num_warps": 4}


class _FakeAutotuner:
    """What Tuned uses of triton's Autotuner: arg_names, best_config, fn[grid], self[grid]."""

    def __init__(self):
        self.arg_names = ["X", "N", "FLAG", "BLOCK"]
        self.calls, self.launches = [], []
        self.best_config = None
        self.cache = {}
        outer = self

        class _Fn:
            def __getitem__(self, grid):
                return lambda *a, **kw: outer.launches.append((grid, a, kw))

        self.fn = _Fn()

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((args, kwargs))
            self.best_config = _Config(16 * len(self.calls))
        return run


def test_tuned_asks_the_autotuner_once_per_key_then_launches_its_choice():
    fake = _FakeAutotuner()
    tuned = Tuned(fake, key=["N", "FLAG"])
    x32, x16 = torch.zeros(3), torch.zeros(3, dtype=torch.float16)
    tuned["g"](x32, 8, FLAG=True)
    assert len(fake.calls) == 1 and fake.launches == []
    tuned["g"](x32, 8, FLAG=True)  # same key: the chosen config, launched directly
    assert len(fake.calls) == 1
    assert fake.launches == [("g", (x32, 8), {"FLAG": True, "BLOCK": 16, "num_warps": 4})]
    for args, kw in [((x32, 9), {"FLAG": True}), ((x32, 8), {"FLAG": False}),
                     ((x16, 8), {"FLAG": True})]:  # a key value or a tensor dtype changes
        tuned["g"](*args, **kw)
    assert len(fake.calls) == 4 and len(fake.launches) == 1
    tuned["g"](x16, 8, FLAG=True)
    assert fake.launches[-1][2]["BLOCK"] == 16 * 4  # the config chosen for that key
    tuned.reset()
    tuned["g"](x32, 8, FLAG=True)
    assert len(fake.calls) == 5
    assert tuned.arg_names == fake.arg_names  # other attributes are the autotuner's
    assert copy.copy(tuned).tuner is fake


def test_tuned_launch_with_a_kept_key():
    """A key kept from ``Tuned.key`` launches what ``tuned[grid](...)`` launches: the autotuner
    once, then its choice; after ``reset`` the same key tunes again."""
    fake = _FakeAutotuner()
    tuned = Tuned(fake, key=["N", "FLAG"])
    x = torch.zeros(3)
    key = tuned.key((x, 8), {"FLAG": True})
    assert key == (8, True, "torch.float32")
    for _ in range(2):
        tuned.launch(key, "g", (x, 8), {"FLAG": True})
    assert len(fake.calls) == 1
    assert fake.launches == [("g", (x, 8), {"FLAG": True, "BLOCK": 16, "num_warps": 4})]
    tuned.reset()
    tuned.launch(key, "g", (x, 8), {"FLAG": True})
    assert len(fake.calls) == 2 and len(fake.launches) == 1

@pytest.mark.parametrize("m", [1, 3000, 9000])
def test_weight_grad_fp32_matches_matmul(m):
    g = torch.Generator().manual_seed(m)
    dy, x = torch.randn(m, 40, generator=g), torch.randn(m, 24, generator=g)
    torch.testing.assert_close(weight_grad_fp32(dy, x), dy.t() @ x, rtol=1e-5, atol=1e-4)
