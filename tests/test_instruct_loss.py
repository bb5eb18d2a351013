"""The instruction-tuning loss: per-example averaging against a hand computation, equal to
transformers' token mean where every answer has the same length, and the team's router loss
added as transformers adds it."""
import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralForCausalLM

from finteam import model as models
from finteam.batches import IGNORE, pad_batch
from finteam.instruct import example_loss

VOCAB = 50


def llama():
    return models.build(models.llama_config("smoke", VOCAB, pad_id=0, eos_id=1), seed=0).eval()


def batch_of(answer_lengths: list[int], prompt_len: int = 5) -> dict:
    g = torch.Generator().manual_seed(len(answer_lengths))
    pairs = [(torch.randint(2, VOCAB, (prompt_len,), generator=g).tolist(),
              torch.randint(2, VOCAB, (n,), generator=g).tolist()) for n in answer_lengths]
    return pad_batch(pairs, pad_id=0)


def test_each_example_weighs_the_same():
    model, batch = llama(), batch_of([1, 6, 3])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = []
    for i in range(3):
        tokens = [F.cross_entropy(logits[i, j - 1], batch["labels"][i, j])
                  for j in range(batch["labels"].shape[1]) if batch["labels"][i, j] != IGNORE]
        by_hand.append(torch.stack(tokens).mean())
    torch.testing.assert_close(example_loss(model, batch), torch.stack(by_hand).mean())
    # and it is not the token mean, which this batch's unequal answers would tell apart
    assert not torch.isclose(example_loss(model, batch), model(**batch).loss)


def test_equal_answer_lengths_give_the_token_mean():
    model, batch = llama(), batch_of([4, 4, 4, 4])
    torch.testing.assert_close(example_loss(model, batch), model(**batch).loss)


def test_examples_without_answer_tokens_do_not_dilute_the_mean():
    model, batch = llama(), batch_of([3, 2])
    empty = pad_batch([([5, 6, 7], [])], pad_id=0)
    width = batch["input_ids"].shape[1]
    padded = {k: torch.cat([v, F.pad(empty[k], (0, width - empty[k].shape[1]), value=IGNORE if k == "labels" else 0)])
              for k, v in batch.items()}
    torch.testing.assert_close(example_loss(model, padded), example_loss(model, batch))


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_team_adds_its_router_loss_as_transformers_does(coef):
    base = models.llama_config("smoke", VOCAB, pad_id=0, eos_id=1)
    config = models.mixtral_config(base, num_experts=3, top_k=2, aux_loss_coef=coef)
    config.output_router_logits = True
    torch.manual_seed(0)
    team, batch = MixtralForCausalLM(config).eval(), batch_of([2, 2, 2])
    # equal lengths: the token mean and the example mean agree, so transformers' loss (its
    # cross-entropy plus coef x its load-balancing loss) is the reference
    torch.testing.assert_close(example_loss(team, batch), team(**batch).loss)
