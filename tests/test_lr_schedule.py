import math

import pytest
import torch

from model_exploration.lr_schedule import custom_lr, custom_lr_scheduler

CFG = dict(lr_max=2e-5, lr_min=5e-6, warmup_steps=100, total_steps=1100, cycle_steps=200, magnitude_fraction=0.1)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # warmup starts from 0
        (50, 1e-5),  # halfway through warmup
        (100, 2e-5 * 1.1),  # end of warmup: lr_max, ripple at its crest (cos 0 = 1)
        (200, (2e-5 - 1.5e-5 * 0.1) * (1 - 0.1)),  # half a ripple later: trough
        (300, (2e-5 - 1.5e-5 * 0.2) * 1.1),  # one full cycle: crest again
        (1100, 5e-6 * 1.1),  # end of decay: lr_min (cycle 1000 = 5 x 200, crest)
        (5000, 5e-6 * 0.9),  # past the end: lr_min, the ripple goes on (4900 mod 200 = 100: trough)
    ],
)
def test_custom_lr_values(step, expected):
    assert custom_lr(step, **CFG) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_ripple_never_goes_negative():
    cfg = dict(CFG, lr_min=0.0, magnitude_fraction=0.99)
    assert min(custom_lr(s, **cfg) for s in range(0, 1200)) >= 0.0


def test_scheduler_matches_pure_function_through_optimizer_steps():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=CFG["lr_max"])
    kwargs = {k: v for k, v in CFG.items() if k != "lr_max"}
    scheduler = custom_lr_scheduler(optimizer, lr_max=CFG["lr_max"], **kwargs)
    seen = []
    for _ in range(350):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(math.isclose(lr, custom_lr(s, **CFG), rel_tol=1e-9, abs_tol=1e-15) for s, lr in enumerate(seen))
    # the state round-trips (resume): a fresh scheduler loaded from it continues identically
    fresh = custom_lr_scheduler(torch.optim.SGD([param], lr=CFG["lr_max"]), lr_max=CFG["lr_max"], **kwargs)
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.get_last_lr()[0] == pytest.approx(custom_lr(350, **CFG))
