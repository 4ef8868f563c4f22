"""The associative-recall probe (mixtrain/data/recall.py, mixtrain/eval/recall.py):
sequences are a function of (seed, split, index), answers sit where the task says, the
distance split is exact, validation never repeats training, the data order resumes
exactly, and a tiny run trains, logs recall by distance to result.json and is scored
by ``mixtrain eval --tasks recall``."""

from __future__ import annotations

import json

import pytest
import torch

from mixtrain.data.recall import (
    RecallDataModule,
    RecallError,
    RecallSpec,
    recall_counts,
    recall_metrics,
    spec_from_config,
)

SPEC = RecallSpec(seq_len=64, pairs=6, keys=16, values=16, filler=8, window=8, placement="mixed", seed=7)


def data_cfg(**kw):
    base = {"kind": "recall", "recall_pairs": 6, "recall_keys": 16, "recall_values": 16, "recall_filler": 8,
            "recall_window": 8, "recall_placement": "mixed", "recall_val_sequences": 16,
            "recall_train_sequences": 1000, "seed": 7}
    return {**base, **kw}


def test_sequences_depend_only_on_seed_split_and_index():
    a, b = SPEC.example(0, 5), SPEC.example(0, 5)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(SPEC.example(0, 5)["input_ids"], SPEC.example(0, 6)["input_ids"])
    assert not torch.equal(SPEC.example(0, 5)["input_ids"], SPEC.example(1, 5)["input_ids"])
    assert not torch.equal(SPEC.example(0, 5)["input_ids"], SPEC.with_(seed=8).example(0, 5)["input_ids"])


@pytest.mark.parametrize("placement", ["beyond", "within", "mixed"])
def test_labels_are_the_value_after_the_queried_key(placement):
    spec = SPEC.with_(placement=placement)
    dists = []
    for i in range(60):
        s = spec.sample(0, i)
        tok = s["tokens"]
        ex = spec.example(0, i)
        x, y, d = ex["input_ids"], ex["labels"], ex["recall_distance"]
        assert x.shape == y.shape == d.shape == (64,)
        assert torch.equal(x, torch.from_numpy(tok[:-1]))
        q = torch.nonzero(y != -100).flatten()
        assert q.tolist() == sorted(s["query_pos"].tolist()) and len(q) == spec.pairs
        assert torch.equal(d != 0, y != -100)  # a distance exactly where a loss is
        for pos in q.tolist():
            key = int(x[pos])
            assert spec.key0 <= key < spec.value0  # a key token
            where = torch.nonzero(torch.from_numpy(tok) == key).flatten().tolist()
            assert len(where) == 2 and where[1] == pos  # the pair, then its only query
            p = where[0]
            assert int(d[pos]) == pos - p
            assert int(y[pos]) == int(tok[p + 1])  # the value that followed the key in its pair
            assert spec.value0 <= int(y[pos]) < spec.vocab_size
            assert 1 <= int(tok[pos + 1]) < spec.key0  # filler after the query: the answer is never shown
            assert int((torch.from_numpy(tok) == y[pos]).sum()) == 1  # every value appears once, in its pair
            dists.append(pos - p)
        # Keys distinct and values distinct within a sequence (so knowing the bag of values gives 1/pairs).
        assert len(set(s["answer"].tolist())) == spec.pairs
    if placement == "beyond":
        assert min(dists) > spec.window
    elif placement == "within":
        assert max(dists) <= spec.window
    else:
        assert min(dists) <= spec.window < max(dists)
        assert 0.3 < sum(dd > spec.window for dd in dists) / len(dists) < 0.7
    if placement != "within":  # random positions: beyond distances vary widely
        far = [dd for dd in dists if dd > spec.window]
        assert len(set(far)) >= 10 and max(far) >= 40


def test_beyond_queries_carry_no_position_hint():
    """Beyond sequences: the pairs are one block at a random start, every query is more than
    data.recall_gap tokens after *every* pair, and which pair the k-th query asks is uniform:
    a model that does not match keys by content cannot beat 1 / pairs, and the positional
    shortcut (the most recent pair beyond W) scores exactly that."""
    from mixtrain.data.recall import shortcut_counts

    spec = RecallSpec(seq_len=96, pairs=4, keys=16, values=16, filler=8, window=8, gap=30, seed=3)
    cells = torch.zeros(4, 4)
    starts = set()
    for i in range(1200):
        s = spec.sample(0, i)
        kp = sorted(s["key_pos"].tolist())
        assert kp == list(range(kp[0], kp[0] + 8, 2))  # adjacent pairs
        starts.add(kp[0])
        assert min(s["query_pos"]) - kp[-1] > 30  # beyond the gap from every pair
        for rank, k in enumerate(s["key_pos"].tolist()):  # queries in position order
            cells[rank, kp.index(k)] += 1
    assert len(starts) > 10
    freq = cells / cells.sum(1, keepdim=True)
    assert (freq - 0.25).abs().max() < 0.05, freq
    assert shortcut_counts(spec, 1, range(300)).tolist() == [0.0, 0.0, 300.0, 1200.0]
    within = recall_metrics(shortcut_counts(spec.with_(placement="within"), 1, range(300)))["recall_within"]
    assert within > 0.8  # within the window recency is a strong shortcut: why the table shows it
    with pytest.raises(RecallError, match="recall_gap"):
        spec.with_(gap=200).check()
    first = spec.with_(block="first")
    assert {int(min(first.sample(0, i)["key_pos"])) for i in range(20)} == {0}
    with pytest.raises(RecallError, match="data.recall_block='middle'"):
        spec.with_(block="middle").check()
    # Several queries per key (data.recall_queries): every key asked equally often, every
    # query still beyond the gap, the k-th query's pair still uniform, labels its pair's value.
    dense = spec.with_(queries=12)
    cells = torch.zeros(12, 4)
    for i in range(1200):
        s, ex = dense.sample(0, i), dense.example(0, i)
        kp = sorted(set(s["key_pos"].tolist()))
        assert len(s["query_pos"]) == 12 and min(s["query_pos"]) - kp[-1] > 30
        assert sorted(s["key_pos"].tolist()) == sorted(kp * 3)
        ids = ex["input_ids"]
        for q, k, a in zip(s["query_pos"].tolist(), s["key_pos"].tolist(), s["answer"].tolist()):
            assert ids[q] == ids[k] and ids[k + 1] == a == ex["labels"][q]
        for rank, k in enumerate(s["key_pos"].tolist()):
            cells[rank, kp.index(k)] += 1
    assert ((cells / 1200) - 0.25).abs().max() < 0.06
    assert (ex["labels"] != -100).sum() == 12
    assert shortcut_counts(dense, 1, range(100)).tolist() == [0.0, 0.0, 300.0, 1200.0]
    assert dense.with_(queries=None).sample(0, 5)["tokens"].tolist() == spec.sample(0, 5)["tokens"].tolist()
    with pytest.raises(RecallError, match="data.recall_queries=3 must be at least data.recall_pairs=4"):
        spec.with_(queries=3).check()
    with pytest.raises(RecallError, match="40 queries"):
        spec.with_(queries=40).check()


def test_validation_and_eval_streams_never_repeat_training_sequences():
    dm = RecallDataModule(data_cfg(recall_val_sequences=64), seq_len=64, micro_batch_size=8, vocab_size=64)
    dm.setup("fit")
    train = {tuple(dm.train_set[i]["input_ids"].tolist()) for i in range(500)}
    val = {tuple(dm.val_set[i]["input_ids"].tolist()) for i in range(64)}
    ev = {tuple(SPEC.example(2, i)["input_ids"].tolist()) for i in range(64)}
    assert len(train) == 500 and len(val) == 64
    assert not train & val and not train & ev and not val & ev


def _batches(dm, n):
    it = iter(dm.train_dataloader())
    out = []
    for _ in range(n):
        b = next(it)
        dm.on_batch_consumed(b["input_ids"].size(0))
        out.append(b)
    return out


def test_data_order_resumes_exactly():
    full = RecallDataModule(data_cfg(), seq_len=64, micro_batch_size=4, vocab_size=64)
    full.setup("fit")
    ref = _batches(full, 7)
    first = RecallDataModule(data_cfg(), seq_len=64, micro_batch_size=4, vocab_size=64)
    first.setup("fit")
    _batches(first, 3)
    state = first.state_dict()
    resumed = RecallDataModule(data_cfg(), seq_len=64, micro_batch_size=4, vocab_size=64)
    resumed.load_state_dict(state)  # before setup, as Lightning does on resume
    resumed.setup("fit")
    rest = _batches(resumed, 4)
    for a, b in zip(ref[3:], rest):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # A different seed is a different data order: refused by the sampler.
    other = RecallDataModule(data_cfg(seed=8), seq_len=64, micro_batch_size=4, vocab_size=64)
    other.setup("fit")
    with pytest.raises(Exception, match="data.seed"):
        other.load_state_dict(state)


def test_distance_split_counts():
    # 1 sequence, 4 queries: distances 3 (within W=4), 4 (within: the value at key+1 is the
    # oldest token the window holds), 5 and 9 (beyond); the first and the third are right.
    labels = torch.full((1, 10), -100)
    dist = torch.zeros(1, 10, dtype=torch.long)
    for pos, lab, dd in ((2, 7, 3), (4, 8, 4), (6, 9, 5), (8, 7, 9)):
        labels[0, pos], dist[0, pos] = lab, dd
    logits = torch.zeros(1, 10, 12)
    logits[0, 2, 7] = logits[0, 4, 3] = logits[0, 6, 9] = logits[0, 8, 1] = 1.0
    logits[0, 0, 5] = 1.0  # an unsupervised position never counts
    counts = recall_counts(logits, labels, dist, window=4)
    assert counts.tolist() == [1.0, 2.0, 1.0, 2.0]
    m = recall_metrics(counts)
    assert (m["recall_within"], m["recall_beyond"], m["recall"]) == (0.5, 0.5, 0.5)
    assert recall_metrics([0, 0, 3, 4])["recall_within"] is None


def test_settings_errors_name_the_key():
    with pytest.raises(RecallError, match="model.vocab_size=32"):
        spec_from_config(data_cfg(), seq_len=64, model_vocab_size=32)
    with pytest.raises(RecallError, match="data.recall_placement='far'"):
        spec_from_config(data_cfg(recall_placement="far"), seq_len=64)
    with pytest.raises(RecallError, match="data.recall_pairs=20"):
        spec_from_config(data_cfg(recall_pairs=20), seq_len=256)
    with pytest.raises(RecallError, match="raise train.seq_len"):
        spec_from_config(data_cfg(recall_pairs=12), seq_len=40)
    with pytest.raises(RecallError, match="data.recall_window is not set"):
        spec_from_config(data_cfg(recall_window=None), seq_len=64)


def test_tiny_recall_run_logs_recall_by_distance_and_eval_scores_it(tmp_path, capsys):
    from mixtrain.config import compose
    from mixtrain.eval.cli import main
    from mixtrain.eval.recall import evaluate
    from mixtrain.train.export import load_model
    from mixtrain.train.run import train

    cfg = compose([
        "experiment=recall", "model.n_layers=2", "layout=standard", "trainer.progress_bar=false",
        "train.seq_len=32", "train.micro_batch_size=8", "train.global_batch_tokens=256", "train.max_tokens=1536",
        "train.val_every_steps=3", "train.val_batches=2", "train.save_every_steps=3", "data.recall_pairs=4", "data.recall_gap=8",
        "data.recall_queries=8",
        "data.recall_val_sequences=16", f"run.root={tmp_path}", "run.name=r",
    ])
    out = train(cfg)
    assert out["steps"] == 6
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    m = result["metrics"]
    for key in ("val/recall_within", "val/recall_beyond", "val/recall"):
        assert 0.0 <= m[key] <= 1.0, key
    # 16 validation sequences (mixed: 8 queries when beyond, 4 when within), all scored: the
    # overall accuracy is a multiple of 1 / (their number of queries).
    from mixtrain.data.recall import spec_from_config

    val_spec = spec_from_config(cfg.data, 32).with_(placement="mixed")
    n = sum(len(val_spec.sample(1, i)["query_pos"]) for i in range(16))
    assert 64 < n < 128
    assert abs(m["val/recall"] * n - round(m["val/recall"] * n)) < 1e-4
    assert main(["--model", str(tmp_path / "r"), "--tasks", "recall", "--lengths", "32,64", "--samples", "8",
                 "--batch-size", "4"]) == 0
    saved = json.loads((tmp_path / "r" / "eval" / "recall.json").read_text())  # beside the run
    assert saved["by_length"].keys() == {"32", "64"}
    assert saved["settings"]["pairs"] == 4 and saved["settings"]["window"] == 8 and saved["settings"]["queries"] == 8
    r64 = saved["by_length"]["64"]
    n64 = sum(len(spec_from_config(cfg.data, 64).with_(placement="mixed").sample(2, i)["query_pos"]) for i in range(8))
    assert r64["queries_within"] + r64["queries_beyond"] == n64 and r64["queries_within"] % 4 == 0
    assert r64["queries_beyond"] % 8 == 0 and sum(b["queries"] for b in r64["buckets"]) == n64
    assert 0.0 <= r64["shortcut_within"] <= 1.0  # answering by position, on the same sequences
    assert r64["shortcut_beyond"] == 0.25  # beyond sequences: exactly 1 / pairs
    # The same numbers as scoring the loaded model directly (and the run's own seed stream 2).
    model, mcfg = load_model(tmp_path / "r")
    res = evaluate(model, mcfg, tmp_path / "again", lengths=[32, 64], samples=8, batch_size=4)
    assert res["by_length"] == saved["by_length"] and saved["settings"]["eval_stream"] == 2
    printed = capsys.readouterr().out
    assert "beyond (d>W)" in printed and "where the heads look" in printed
    assert saved["attention"]["length"] == 32 and [l["layer"] for l in saved["attention"]["layers"]] == [0, 1]
    # compare: a column pair and a bar chart per layout.
    from mixtrain.report.recall import plot_recall, run_recall

    rec = run_recall(tmp_path / "r")
    assert rec["recall_source"] == "eval" and rec["recall_beyond"] == saved["by_length"]["32"]["recall_beyond"]
    assert rec["recall_chance"] == 0.25
    assert plot_recall([{"run": "r", "layout": "standard", **rec}], tmp_path / "recall.png").stat().st_size > 1000
    from mixtrain.report import compare

    res = compare([tmp_path / "r"], out=tmp_path / "cmp")
    header, _, row = res["table"].splitlines()[:3]
    assert "recall d<=W" in header and "recall d>W" in header and "retrieves at" in header
    layers = sorted({l for l, _ in saved["attention"]["retrieving_heads"]})
    assert rec["recall_retrieving_layers"] == (" ".join(f"L{l}" for l in layers) or "none")
    assert f"{saved['by_length']['32']['recall_beyond']:.4f}" in row
    assert res["files"]["recall"].is_file()


def test_attention_map_reads_where_heads_look(capsys):
    """With every query projection zeroed, each layer attends evenly to the tokens it sees,
    so the map's figures follow from the positions alone: a global query at position q puts
    1/(q+1) on its answer and (pairs-1)/(q+1) on the other values, a sliding one beyond the
    window puts nothing there, and each value's weight on its key is 1/(tokens visible)."""
    from mixtrain.config import compose
    from mixtrain.eval.recall import attention_map, format_attention, retrieving_heads
    from mixtrain.layouts import build_layout
    from mixtrain.model import build_model

    cfg = compose(["experiment=recall", "model.n_layers=4", "layout.preset=null", "layout.layers=['G','s','G<0','G^0']"])
    layout = build_layout(cfg.layout, 4, cfg.model.sliding_window)
    model = build_model(cfg.model, layout, device="cpu", seed=0).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 64))
    before = model(ids).logits
    probs = model.attention_probabilities(ids)
    assert len(probs) == 4 and torch.equal(probs[3], probs[0])  # layer 3 shares layer 0's probabilities
    assert torch.allclose(probs[1].sum(-1), torch.ones(2, 4, 64)) and probs[1][0, :, 40, :32].abs().max() == 0
    assert torch.equal(model(ids).logits, before)  # the model's own forward is left as it was
    handed = {}
    assert model.attention_probabilities(ids, each=handed.__setitem__) is None  # one layer at a time
    assert all(torch.equal(handed[i], probs[i]) for i in range(4))
    for block in model.layers:
        if hasattr(block.attn, "wq"):
            torch.nn.init.zeros_(block.attn.wq.weight)
    spec = spec_from_config(cfg.data, 64)
    amap = attention_map(model, spec, samples=6, batch_size=4)
    seqs = [spec.with_(placement="beyond").sample(2, i) for i in range(6)]  # eval stream of seed 0
    q = torch.cat([torch.from_numpy(s["query_pos"]) for s in seqs]).double()
    v = torch.cat([torch.from_numpy(s["pair_pos"]) for s in seqs]).double() + 1
    for i in (0, 2, 3):  # global: spread over the q + 1 visible tokens
        layer = amap["layers"][i]
        assert layer["answer"] == pytest.approx([float((1 / (q + 1)).mean())] * 4, abs=1e-4)
        assert layer["other_values"] == pytest.approx([float((3 / (q + 1)).mean())] * 4, abs=1e-4)
        assert layer["previous_token"] == pytest.approx([float((1 / (v + 1)).mean())] * 4, abs=1e-4)
    sliding = amap["layers"][1]
    assert sliding["answer"] == [0.0] * 4 and sliding["other_values"] == [0.0] * 4
    assert sliding["previous_token"] == pytest.approx([float((1 / (v + 1).clamp(max=8)).mean())] * 4, abs=1e-4)
    assert sliding["previous_token_uniform"] == pytest.approx(float((1 / (v + 1).clamp(max=8)).mean()), abs=1e-4)
    assert [l["attention"] for l in amap["layers"]] == ["global", "sliding 8", "global, K/V of L0",
                                                         "global, probabilities of L0"]
    assert retrieving_heads(amap) == [] and amap["retrieving_heads"] == []
    # The verdict: a head with most of its attention on the answer retrieves; one that
    # spreads evenly over the values is the bag of values.
    amap["layers"][2]["answer"][1], amap["layers"][2]["other_values"][1] = 0.9, 0.05
    amap["layers"][0]["answer"][0], amap["layers"][0]["other_values"][0] = 0.2, 0.6
    assert retrieving_heads(amap) == [(2, 1)]
    text = format_attention(amap)
    assert "retrieves by content: L2 (heads 1)" in text and "(the bag of values, no key matching): L0" in text
    assert text.splitlines()[1].split()[-2:] == ["if", "even"]  # the uniform level has its column
