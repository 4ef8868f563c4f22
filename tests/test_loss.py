"""The step loss (mixtrain/train/loss.py): the step's summed cross-entropy over its global
count of supervised tokens, whatever the micro-batches and ranks; untouched (bit for
bit the plain mean) when every token is supervised."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mixtrain.config import ModelConfig
from mixtrain.layouts import make_preset
from mixtrain.model import build_model
from mixtrain.train.loss import StepLoss

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=8, ffn_hidden=48,
                  max_seq_len=32, sliding_window=4, attn_impl="sdpa", init_std=0.1)


def batch(seed: int, supervised: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 12), generator=g)
    labels = torch.randint(0, 97, (2, 12), generator=g)
    labels.view(-1)[supervised:] = -100
    return ids, labels


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def test_two_ranks_of_two_micro_batches_equal_autograd_of_the_token_mean():
    """What DDP and Lightning do (each micro-batch's loss / A, gradients averaged over
    W ranks), then normalise(): the gradient of sum(CE) / N over all 4 micro-batches,
    which supervise 3, 20, 7 and 24 tokens."""
    model = build_model(CFG, make_preset("ma_offset", 6, 4), device="cpu", seed=0)
    micro = {0: [batch(1, 3), batch(2, 20)], 1: [batch(3, 7), batch(4, 24)]}  # rank -> micro-batches
    A, W = 2, 2
    losses = {r: StepLoss() for r in micro}
    rank_grads = {}
    for r, mbs in micro.items():
        model.zero_grad()
        for ids, labels in mbs:
            (losses[r].add(model(ids), labels) / A).backward()
        rank_grads[r] = grads(model)
    tokens = sum(losses[r].sums["tokens"] for r in micro)
    assert int(tokens) == 54
    for p, g0, g1 in zip(model.parameters(), rank_grads[0], rank_grads[1]):
        p.grad = (g0 + g1) / W  # the data-parallel all-reduce (mean)
    factor = losses[0].normalise(list(model.parameters()), lambda t: t.new_tensor(float(tokens)), A, W)
    assert factor == 24 * A * W / 54  # R: label positions of a micro-batch (2 x 12)
    ours = grads(model)

    model.zero_grad()
    ids = torch.cat([b[0] for mbs in micro.values() for b in mbs])
    labels = torch.cat([b[1] for mbs in micro.values() for b in mbs])
    F.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    for (name, _), got, ref in zip(model.named_parameters(), ours, grads(model)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-7, msg=name)
    m = losses[0].metrics()  # this rank's token-weighted loss over its 23 tokens
    with torch.no_grad():
        ref0 = F.cross_entropy(model(torch.cat([micro[0][0][0], micro[0][1][0]])).logits.flatten(0, 1),
                               torch.cat([micro[0][0][1], micro[0][1][1]]).flatten(), ignore_index=-100)
    torch.testing.assert_close(m["loss"], ref0, rtol=1e-5, atol=0)
    assert losses[0].micro_batches == 0 and losses[0].sums == {}  # metrics() starts the next step


def test_every_token_supervised_is_bit_for_bit_the_plain_mean():
    model = build_model(CFG, make_preset("ma_offset", 6, 4), device="cpu", seed=0)
    mbs = [batch(5, 24), batch(6, 24)]
    step = StepLoss()
    for ids, labels in mbs:
        (step.add(model(ids), labels) / 2).backward()
    assert step.normalise(list(model.parameters()), lambda t: t, 2, 1) == 1.0
    ours = grads(model)
    model.zero_grad()
    for ids, labels in mbs:
        (F.cross_entropy(model(ids).logits.float().flatten(0, 1), labels.flatten()) / 2).backward()
    assert all(torch.equal(a, b) for a, b in zip(ours, grads(model)))
