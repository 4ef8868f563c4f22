"""Every recipe composes through Hydra exactly as `mixtrain train` composes it, and
gets a smoke step: each layout trains a step on a tiny model of its depth, each
model preset builds (on the meta device when large) with the parameter count the
accounting predicts, and the `mixtrain` command answers from any directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtrain import accounting
from mixtrain.config import compose
from mixtrain.errors import UserError
from mixtrain.layouts import build_layout
from mixtrain.model import Transformer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))


# Depth at which each layout recipe is written (depth-generic ones use 6).
LAYOUT_DEPTH = {"custom_example": 6, "foundry_example": 13, "blocks_example": 24, "shared_attention_example": 24}
LAYOUT_DEPTH.update({n: 24 for n in names("layout") if n.startswith(("ma_successive", "ma_noshare"))})


@pytest.mark.parametrize("name", names("layout"))
def test_every_layout_recipe_trains_a_step(name):
    depth = LAYOUT_DEPTH.get(name, 6)
    cfg = compose(["model=tiny", f"layout={name}", f"model.n_layers={depth}", "model.sliding_window=8"])
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    assert layout.n_layers == depth
    torch.manual_seed(0)
    model = Transformer(cfg.model, layout)
    model.init_weights(seed=0)
    x = torch.randint(0, cfg.model.vocab_size, (2, 24))
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == accounting.param_counts(cfg.model, layout).total


# from_hf / from_hf_moe derive the model from a Hugging Face folder (tests/test_hf_import.py).
@pytest.mark.parametrize("name", [n for n in names("model") if not n.startswith("from_hf")])
def test_every_model_recipe_builds_and_matches_the_accounting(name):
    cfg = compose([f"model={name}", "layout=standard"])
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    small = accounting.param_counts(cfg.model, layout).total < 5e6
    with torch.device("cpu" if small else "meta"):
        model = Transformer(cfg.model, layout)
    if small:
        model.init_weights(seed=0)
    else:
        model.to(torch.bfloat16)  # a shape-only forward on the meta device, as on a GPU
    assert sum(p.numel() for p in model.parameters()) == accounting.param_counts(cfg.model, layout).total
    x = torch.zeros(1, 16, dtype=torch.long, device="cpu" if small else "meta")
    assert model(x).logits.shape == (1, 16, cfg.model.vocab_size)


def test_paper_moe_recipe_is_the_paper_model():
    cfg = compose(["model=paper_moe", "layout=standard"])
    counts = accounting.param_counts(cfg.model, build_layout(cfg.layout, 24, 1024))
    assert f"{counts.active / 1e9:.3g}" == "1.64" and f"{counts.total / 1e9:.3g}" == "5.21"
    assert cfg.model.sliding_window == 1024


@pytest.mark.parametrize("group", ["data", "trainer", "logger", "optim", "experiment"])
def test_every_other_recipe_composes(group, tmp_path):
    from omegaconf import OmegaConf

    from mixtrain.train.run import check_config, plan_steps

    needs = {"longqa_jsonl": ["data.qa_path=qa.jsonl"]}  # recipes that ask the user for a value
    for name in names(group):
        cfg = compose([f"{group}={name}", f"run.root={tmp_path}", *needs.get(name, [])])
        OmegaConf.resolve(cfg)  # every interpolation resolves
        check_config(cfg)  # every choice is one the code knows
        plan_steps(cfg, 1)  # the token budgets split into whole steps
    if group == "data":
        with pytest.raises(UserError, match="data.qa_path"):
            check_config(compose(["data=longqa_jsonl"]))


def test_quickstart_recipe_is_a_tiny_ma_offset_run():
    cfg = compose(["experiment=quickstart"])
    assert cfg.model.name == "tiny" and cfg.layout.preset == "ma_offset" and cfg.data.source == "embedded"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixtrain", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_layout_command_json_from_any_directory(tmp_path):
    proc = run_cli("layout", "--json", "--context", "32768", "model=paper_moe", "layout=ma_offset", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout)
    assert facts["n_layers"] == 24 and facts["kv_caches"] == 9
    assert facts["kv_bytes_per_token"] == (32768 + 8 * 1024) * 2 * 3 * 128 * 2 / 32768  # 1920.0
    assert facts["layers"][11] == {**facts["layers"][11], "index": 11, "kind": "global", "window": None, "kv_source": 5}
    assert facts["layers"][1]["kind"] == "sliding" and facts["layers"][1]["window"] == 1024
    assert facts["params_total"] < 5.21e9 and f"{facts['params_active'] / 1e9:.3g}" == "1.62"

    text = run_cli("layout", "model=paper_moe", "layout=ma_offset", cwd=tmp_path)
    assert "19.2x smaller" in text.stdout and "KV <- 5" in text.stdout


def test_commands_explain_bad_input(tmp_path):
    proc = run_cli("layout", "model=tiny", "layout=ma_successive_1", cwd=tmp_path)
    assert proc.returncode == 2 and "24 layers" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("layout", "model.d_modle=3", cwd=tmp_path)
    assert proc.returncode == 2 and "d_modle" in proc.stderr
    proc = run_cli("layout", "layout=nope", cwd=tmp_path)
    assert proc.returncode == 2 and "ma_offset" in proc.stderr  # lists what exists
    proc = run_cli("train", "model.d_modle=3", cwd=tmp_path)
    assert proc.returncode != 0 and "d_modle" in proc.stderr


def test_layout_command_refuses_a_bad_context_and_an_unbuildable_model(capsys):
    """`mixtrain layout` checks --context and the model as `mixtrain train` does, before any report."""
    from mixtrain.cli import main

    for bad in ("0", "-5"):
        with pytest.raises(SystemExit) as e:
            main(["layout", "--context", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f"mixtrain layout: error: argument --context: {bad} is not positive (give 1 or more)\n")
    assert main(["layout", "model.n_kv_heads=3"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "mixtrain layout: error: model.n_heads=4 must be a multiple of model.n_kv_heads=3 (GQA groups)\n"
    assert main(["layout", "model.vocab_size=0"]) == 2
    assert capsys.readouterr().err == "mixtrain layout: error: model.vocab_size=0 must be at least 1\n"
    assert main(["layout", "--json", "--context", "1000"]) == 0
    assert 1000 in [r["context"] for r in json.loads(capsys.readouterr().out)["contexts"]]


def test_users_add_their_own_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout" / "my_pairs.yaml").write_text("layers: [G, s, s<-1, s, s<-1, G<0]\n")
    monkeypatch.setenv("MIXTRAIN_RECIPES", str(tmp_path))
    cfg = compose(["model=tiny", "layout=my_pairs"])
    layout = build_layout(cfg.layout, cfg.model.n_layers, cfg.model.sliding_window)
    assert [l.kv_source for l in layout.layers] == [0, 1, 1, 3, 3, 0]


def test_whole_numbers_in_scientific_notation_fill_integer_settings():
    from mixtrain.config import whole_numbers_in_overrides

    cfg = compose(["train.max_tokens=2e9", "model.rope_theta=5e5", "optim.lr=3e-4"])
    assert (cfg.train.max_tokens, cfg.model.rope_theta, cfg.optim.lr) == (2_000_000_000, 500000.0, 3e-4)
    assert whole_numbers_in_overrides(["train.max_tokens=1e6,2.5e6", "a=1.5e0", "-m", "hydra.x=1e3"]) == [
        "train.max_tokens=1000000,2500000", "a=1.5e0", "-m", "hydra.x=1e3"]
