"""The team's routing while tuned: `instruct.top_k` and `instruct.router_aux_loss_coef` applied to
a loaded team make it exactly the Mixtral that config would build; the tuned team is saved with
them, so it is scored and its compute counted at that top-k; a top-k beyond the team is refused.
These fields, `instruct.team_lr` and `instruct.trainable` act on the team alone, and retune
nothing else; `trainable` freezes exactly the parameters it names."""
import pytest
import torch
from transformers import AutoConfig, MixtralForCausalLM

from finteam import instruct, mix, pipeline, pretrain
from finteam import model as models
from finteam.checkpoint import save_model
from finteam.config import InstructConfig, RecipeError, load_recipe, settings_of
from finteam.tokenizer import load as load_tokenizer
from runs import new_run, prepared  # noqa: F401 (a fixture)

VOCAB = 50


def team(top_k: int, coef: float, like: MixtralForCausalLM | None = None) -> MixtralForCausalLM:
    base = models.llama_config("smoke", VOCAB, pad_id=0, eos_id=1)
    torch.manual_seed(0)
    model = MixtralForCausalLM(models.mixtral_config(base, num_experts=3, top_k=top_k, aux_loss_coef=coef))
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model.eval()


@pytest.mark.parametrize("top_k, coef", [(1, 0.0), (3, 0.5)])
def test_rerouted_team_is_the_team_built_with_that_routing(top_k, coef):
    rerouted = team(2, 0.02)
    built = team(top_k, coef, like=rerouted)
    models.set_team_routing(rerouted, top_k, coef)
    x = torch.randint(2, VOCAB, (3, 11), generator=torch.Generator().manual_seed(top_k))
    for model in (rerouted, built):
        model.config.output_router_logits = True
    got, want = rerouted(input_ids=x, labels=x), built(input_ids=x, labels=x)
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(got.aux_loss, want.aux_loss) and torch.equal(got.loss, want.loss)  # weighted by coef
    assert (rerouted.config.num_experts_per_tok, rerouted.config.router_aux_loss_coef) == (top_k, coef)


def test_top_k_zero_keeps_the_assembled_routing():
    model = team(2, 0.02)
    models.set_team_routing(model, 0, 0.1)
    assert model.config.num_experts_per_tok == 2 and model.config.router_aux_loss_coef == 0.1


def test_top_k_beyond_the_team_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.3 .*got 4"):
        models.set_team_routing(team(2, 0.02), 4, 0.0)
    with pytest.raises(RecipeError, match=r"instruct\.top_k must be in 0\.\.3 .*got 4"):
        load_recipe("smoke", [f"out_dir={tmp_path}", "instruct.top_k=4"])
    with pytest.raises(RecipeError, match=r"instruct\.router_aux_loss_coef must be >= 0"):
        load_recipe("smoke", [f"out_dir={tmp_path}", "instruct.router_aux_loss_coef=-1"])


def test_tuned_team_is_saved_and_counted_at_its_top_k(prepared, tmp_path):  # noqa: F811
    run = new_run(prepared, tmp_path / "run")
    recipe = load_recipe("smoke", [f"out_dir={run}", "instruct.train.steps=2", "instruct.top_k=1",
                                   "instruct.router_aux_loss_coef=0", "instruct.experts_implementation=eager"])
    p = pipeline.Paths(recipe.run_dir)
    tok = load_tokenizer(p.tokenizer)
    dense = pretrain.base_model(recipe, tok, seed=0)
    config = models.mixtral_config(dense.config, num_experts=3, top_k=2, aux_loss_coef=0.02)
    save_model(MixtralForCausalLM(config), p.model(0, "moe") / "model", {"stage": "test"}, tok)
    instruct.run(recipe, p.model(0, "moe") / "model", p.data, tok, p.tuned(0, "team"), 0, "instruct team",
                 torch.device("cpu"))
    saved = AutoConfig.from_pretrained(p.tuned(0, "team") / "model")
    assert (saved.num_experts_per_tok, saved.router_aux_loss_coef) == (1, 0.0)
    assert mix.active_params(saved) == models.num_params(MixtralForCausalLM(saved), 1)
    assert mix.active_params(saved) < mix.active_params(config)


def test_team_only_settings_retune_the_team_only(tmp_path):
    """instruct.team_lr, top_k and router_aux_loss_coef are in the team's tuning fingerprint and
    in no dense model's: changing one leaves the finished baselines valid."""
    before = load_recipe("smoke", [f"out_dir={tmp_path}"])
    after = load_recipe("smoke", [f"out_dir={tmp_path}", "instruct.team_lr=0.0005", "instruct.top_k=1",
                                  "instruct.trainable=all-but-router", "instruct.expert_lr_scale=1.22"])
    team_needs, dense_needs = InstructConfig.needs(team=True), InstructConfig.needs(team=False)
    assert settings_of(before, team_needs) != settings_of(after, team_needs)
    assert settings_of(before, dense_needs) == settings_of(after, dense_needs)
    assert "instruct.train.lr" in settings_of(before, dense_needs)  # the shared fields stay in
    with pytest.raises(RecipeError, match=r"instruct\.team_lr must be >= 0"):
        load_recipe("smoke", [f"out_dir={tmp_path}", "instruct.team_lr=-1"])
    with pytest.raises(RecipeError, match=r"instruct\.expert_lr_scale must be > 0"):
        load_recipe("smoke", [f"out_dir={tmp_path}", "instruct.expert_lr_scale=0"])


def fit_arguments(prepared, tmp_path, monkeypatch, setting: str, moe: bool):  # noqa: F811
    """Tune a fresh team (or, `moe` False, a dense model) one step with `setting`: the recipe, and
    the positional arguments instruct.run gave fit, per call."""
    run = new_run(prepared, tmp_path / "run")
    recipe = load_recipe("smoke", [f"out_dir={run}", "instruct.train.steps=1", setting,
                                   "instruct.experts_implementation=eager"])
    p = pipeline.Paths(recipe.run_dir)
    tok = load_tokenizer(p.tokenizer)
    dense = pretrain.base_model(recipe, tok, seed=0)
    model = MixtralForCausalLM(models.mixtral_config(dense.config, num_experts=3, top_k=2, aux_loss_coef=0.02)) \
        if moe else dense
    save_model(model, p.model(0, "moe") / "model", {"stage": "test"}, tok)
    calls = []
    real_fit = instruct.fit
    monkeypatch.setattr(instruct, "fit", lambda *a: calls.append(a) or real_fit(*a))
    instruct.run(recipe, p.model(0, "moe") / "model", p.data, tok, p.tuned(0, "team"), 0, "instruct team",
                 torch.device("cpu"))
    return recipe, calls


@pytest.mark.parametrize("team_lr, moe, want", [(0.0005, True, 0.0005), (0.0, True, None), (0.0005, False, None)])
def test_team_lr_sets_the_rate_of_the_team_alone(prepared, tmp_path, monkeypatch, team_lr, moe, want):  # noqa: F811
    recipe, (call,) = fit_arguments(prepared, tmp_path, monkeypatch, f"instruct.team_lr={team_lr}", moe)
    assert call[2].lr == (want if want is not None else recipe.instruct.train.lr)


@pytest.mark.parametrize("trainable", ["all", "router", "router+attention", "all-but-router"])
def test_trainable_freezes_what_it_leaves_out(trainable):
    model = team(2, 0.02)
    n = instruct.select_trainable(model, trainable)
    learning = {name for name, p in model.named_parameters() if p.requires_grad}
    routers = {name for name, _ in model.named_parameters() if name.endswith(".mlp.gate.weight")}
    attention = {name for name, _ in model.named_parameters() if ".self_attn." in name}
    everything = {name for name, _ in model.named_parameters()}
    assert len(routers) == model.config.num_hidden_layers and attention
    want = {"all": everything, "router": routers, "router+attention": routers | attention,
            "all-but-router": everything - routers}[trainable]
    assert learning == want
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_expert_lr_scale_sets_the_rate_of_the_experts_weights_alone():
    """optimizer(lr_scale): the experts' weights start at scale x lr, every other parameter at lr,
    the schedule moves both alike; without a scale the groups are the two of old (decay, none)."""
    from finteam.config import TrainConfig
    from finteam.expert_parallel import is_expert
    from finteam.train import cosine, optimizer

    model = team(2, 0.02)
    cfg = TrainConfig(steps=10, lr=0.001, warmup=2)
    plain = optimizer(model, cfg)
    assert [g["weight_decay"] for g in plain.param_groups] == [cfg.weight_decay, 0.0]
    assert all(g["lr"] == cfg.lr for g in plain.param_groups)
    opt = optimizer(model, cfg, lambda name: 1.5 if is_expert(name) else 1.0)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    experts = {name for name in named if is_expert(name)}
    assert len(experts) == 2 * model.config.num_hidden_layers  # gate_up_proj and down_proj per layer
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    for name, p in named.items():
        assert rate[id(p)] == pytest.approx(cfg.lr * (1.5 if name in experts else 1.0)), name
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(cfg))
    for _ in range(5):
        opt.step()
        sched.step()
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    expert, other = named[next(iter(experts))], named["model.layers.0.mlp.gate.weight"]
    assert lrs[id(expert)] / lrs[id(other)] == pytest.approx(1.5)


@pytest.mark.parametrize("moe", [True, False])
def test_expert_lr_scale_reaches_the_team_alone(prepared, tmp_path, monkeypatch, moe):  # noqa: F811
    _, (call,) = fit_arguments(prepared, tmp_path, monkeypatch, "instruct.expert_lr_scale=1.22", moe)
    lr_scale = call[-1]
    if not moe:
        assert lr_scale is None
    else:
        assert lr_scale("model.layers.0.mlp.experts.gate_up_proj") == 1.22
        assert lr_scale("model.layers.0.mlp.gate.weight") == lr_scale("model.embed_tokens.weight") == 1.0
