"""The named recipes that vary another: tiny-long is the tiny recipe with more steps, and
nothing else, so the comparison in docs/pipeline.md ("Eight times the pretraining") stays one of
training length alone."""
from finteam.config import load_recipe

CHANGED = {  # field: (tiny, tiny-long)
    "name": ("tiny", "tiny-long"),
    "pretrain.base.steps": (150, 1200),
    "pretrain.base.save_every": (50, 200),
    "pretrain.expert.steps": (80, 400),
    "pretrain.expert.save_every": (40, 200),
    "mix.train.steps": (100, 600),
    "mix.train.save_every": (50, 100),
    "instruct.train.steps": (300, 600),
    "instruct.train.save_every": (100, 200),
}


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_tiny_long_is_tiny_with_more_steps():
    tiny, long = flat(load_recipe("tiny").to_dict()), flat(load_recipe("tiny-long").to_dict())
    assert set(tiny) == set(long)
    differ = {k: (tiny[k], long[k]) for k in tiny if tiny[k] != long[k]}
    assert differ == CHANGED
