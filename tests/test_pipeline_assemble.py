"""Branch-Train-MiX assembly: the Mixtral built from three Llama experts really contains them.

The decisive check: with the router forced to expert j and every non-FFN weight taken from
expert j, the Mixtral must give expert j's logits (any mix-up of gate/up rows, of the stacked
layout or of which expert lands where shows up as a logit difference). The experts run through
our kernels (experts_implementation="finteam")."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from finteam import assemble
from finteam import model as models

EXPERTS_IMPL = "finteam"


def experts(n=3):
    config = models.llama_config("smoke", 97, 0, 1, intermediate_size=48)  # odd vocab, I != H
    return [models.build(config, seed=s).eval() for s in range(n)]


def force_router(moe, expert: int):
    """Every token of every layer goes to `expert` with weight 1 (the second choice gets 0)."""
    for layer in moe.model.layers:
        gate = layer.mlp.gate

        def forward(hidden, gate=gate):
            h = hidden.reshape(-1, gate.hidden_dim)
            logits = torch.full((h.shape[0], gate.num_experts), -1e4, dtype=torch.float32)
            logits[:, expert] = 0.0
            ids = torch.stack([torch.full((h.shape[0],), expert), torch.full((h.shape[0],), (expert + 1) % gate.num_experts)], 1)
            weights = torch.tensor([1.0, 0.0]).expand(h.shape[0], 2).contiguous()
            return logits, weights, ids

        gate.forward = forward


@pytest.mark.parametrize("expert", [0, 1, 2])  # each slot: catches experts stacked in the wrong order
def test_forced_router_gives_that_experts_logits(expert):
    team = experts()
    moe = assemble.build_moe(team, shared=expert, top_k=2).eval()
    models.use_experts(moe, EXPERTS_IMPL)
    force_router(moe, expert)
    ids = torch.randint(0, 97, (2, 11))  # odd length
    with torch.no_grad():
        want = team[expert](input_ids=ids).logits
        got = moe(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the others' logits differ, so the check can fail
    assert not torch.allclose(got, team[(expert + 1) % 3](input_ids=ids).logits, atol=1e-3)


def test_stacked_layout_and_shared_average():
    team = experts()
    moe = assemble.build_moe(team, top_k=2)
    sd = moe.state_dict()
    gate_up_E2IH = sd["model.layers.1.mlp.experts.gate_up_proj"]
    down_EHI = sd["model.layers.1.mlp.experts.down_proj"]
    assert gate_up_E2IH.shape == (3, 96, 64) and down_EHI.shape == (3, 64, 48)
    mlp = team[2].model.layers[1].mlp
    torch.testing.assert_close(gate_up_E2IH[2, :48], mlp.gate_proj.weight)  # gate rows first
    torch.testing.assert_close(gate_up_E2IH[2, 48:], mlp.up_proj.weight)
    torch.testing.assert_close(down_EHI[2], mlp.down_proj.weight)
    mean = torch.stack([m.model.layers[0].self_attn.q_proj.weight for m in team]).mean(0)
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_proj.weight"], mean)


def test_expert_spread_zero_starts_the_team_as_the_uniform_merge():
    team = experts()
    merged = experts(1)[0].eval()
    with torch.no_grad():
        for name, t in merged.state_dict().items():
            t.copy_(torch.stack([m.state_dict()[name] for m in team]).mean(0))
    moe = assemble.build_moe(team, top_k=2, spread=0.0).eval()
    models.use_experts(moe, EXPERTS_IMPL)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():  # the router still picks among its experts, but they are all the merge's FFN
        torch.testing.assert_close(moe(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(assemble.build_moe(team, top_k=2).eval()(input_ids=ids).logits,
                                  merged(input_ids=ids).logits, atol=1e-3)


def test_expert_spread_scales_each_experts_distance_from_the_mean():
    team = experts()
    base = experts(4)[3]
    full = assemble.build_moe(team, top_k=2).state_dict()
    half = assemble.build_moe(team, base=base, base_expert=True, top_k=2, spread=0.5).state_dict()
    for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        mean = full[name].mean(0)
        torch.testing.assert_close(half[name][:3], mean + 0.5 * (full[name] - mean))
        # the base's FFN, a fourth expert, is nobody's specialist and is left as it is
        torch.testing.assert_close(half[name][3], assemble.build_moe(team, base=base, base_expert=True).state_dict()[name][3])


def test_base_expert_and_saved_checkpoint_loads_with_automodel(tmp_path):
    team, base = experts(), experts(4)[3]
    moe = assemble.build_moe(team, base=base, base_expert=True, shared="base", top_k=2).eval()
    assert moe.config.num_local_experts == 4
    torch.testing.assert_close(moe.model.layers[0].mlp.experts.down_proj[3], base.model.layers[0].mlp.down_proj.weight)
    torch.testing.assert_close(moe.model.embed_tokens.weight, base.model.embed_tokens.weight)
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=EXPERTS_IMPL).eval()
    assert type(loaded).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, moe(input_ids=ids).logits)


def test_hidden_router_init_prefers_each_roles_own_text():
    """Rows built from role texts through the base score each role's text highest for its expert."""
    base = experts(1)[0].eval()

    class Tok:  # three 'roles' whose texts use disjoint token ranges
        pad_token_id = 0

        def __call__(self, texts, **kw):
            ids = torch.tensor([[int(w) for w in t.split()] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    texts = {r: [" ".join(str(2 + 30 * r + (i * 7 + j) % 30) for j in range(12)) for i in range(8)] for r in range(3)}
    means_RLH = torch.stack([assemble.ffn_inputs(base, Tok(), texts[r], 32) for r in range(3)])
    rows_RLH = assemble.rows_from_means(means_RLH, scale=4.0)
    assert torch.allclose(rows_RLH.norm(dim=-1), torch.tensor(4.0))
    for layer in range(rows_RLH.shape[1]):
        scores_RR = means_RLH[:, layer] @ rows_RLH[:, layer].T  # text of role r against row of role s
        assert torch.equal(scores_RR.argmax(1), torch.arange(3))
