"""Label scoring with the prompt run once (KV cache repeated per choice) gives the log-likelihoods
of one full prompt+choice sequence per pair, for a Llama and for the team's Mixtral."""
import pytest
import torch
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

from finteam import assemble, evaluate
from finteam import model as models


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}, "\n": 97}
    raw = Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")


PROMPTS = ["Headline: CPI 3.1%\nAnswer:", "Returns +1.0%, -0.5%.\nAnswer:", "x", "A longer prompt about a company. Text: shares rose\nAnswer:"]


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
@pytest.mark.parametrize("choices", [["Yes", "No"], ["positive", "negative", "neutral"], ["Rise"]])  # unequal lengths, one choice
@pytest.mark.parametrize("batch_size", [1, 3])  # a batch that splits the prompts unevenly
def test_cached_choice_scoring_matches_full_sequences(tokenizer, kind, choices, batch_size):
    config = models.llama_config("smoke", 98, 0, 1)
    model = models.build(config, 0)
    if kind == "mixtral":
        model = assemble.build_moe([models.build(config, s) for s in range(3)], top_k=2)
    model.eval()
    fast = evaluate.choice_logprobs(model, tokenizer, PROMPTS, choices, 192, batch_size)
    plain = evaluate.choice_logprobs_plain(model, tokenizer, PROMPTS, choices, 192, batch_size)
    assert fast.shape == (len(PROMPTS), len(choices))
    torch.testing.assert_close(fast, plain, rtol=0, atol=2e-5)


def test_throughput_takes_medians_of_interleaved_runs_after_a_warm_up(monkeypatch):
    clock, order = [0.0], []

    def workload(row, seconds):  # a workload that takes `seconds[i]` of fake time on its i-th call
        calls = iter(seconds)

        def run():
            order.append(row)
            clock[0] += next(calls)
        return run

    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])
    runs = {"a": {"train": (workload("a", [100.0, 1.0, 3.0, 2.0]), 60)},
            "b": {"train": (workload("b", [100.0, 4.0, 4.0, 9.0]), 60)}}
    rows = evaluate.interleaved_tokens_per_s(runs, repeats=3)
    assert rows == {"a": {"train_tok_s": 30}, "b": {"train_tok_s": 15}}  # 60 tokens / median 2 s and 4 s; warm-up left out
    assert sorted(order) == ["a"] * 4 + ["b"] * 4  # each row once a round, the order drawn afresh
    assert order != ["a", "b"] * 4 and order != ["b", "a"] * 4
