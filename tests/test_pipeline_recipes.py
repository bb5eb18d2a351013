"""The named recipes that vary another: tiny-long is the tiny recipe with more steps, and
nothing else that changes what a stage computes, so the comparison in docs/pipeline.md ("Eight
times the pretraining") stays one of training length alone."""
from finteam.config import load_recipe, settings_of

STEPS = {  # setting: (tiny, tiny-long)
    "pretrain.base.steps": (150, 1200),
    "pretrain.expert.steps": (80, 400),
    "mix.train.steps": (100, 600),
    "instruct.train.steps": (300, 600),
}


def test_tiny_long_is_tiny_with_more_steps():
    # settings_of: the flattened settings that make up the stages' fingerprints (checkpoint and
    # log intervals, names and paths are not among them)
    tiny, long = settings_of(load_recipe("tiny")), settings_of(load_recipe("tiny-long"))
    assert set(tiny) == set(long)
    assert {k: (tiny[k], long[k]) for k in tiny if tiny[k] != long[k]} == STEPS
