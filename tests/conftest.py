import os
import sys
from pathlib import Path

import pytest

# Never talk to the network from tests; W&B writes offline runs.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One data cache (embedded corpus, tokenizers, packed sequences) for the whole session."""
    return tmp_path_factory.mktemp("mixtrain-cache")


# Tests kept out of the fast subset (`pytest -m "not slow"`) besides those marked
# @pytest.mark.slow in their modules: node ids (fnmatch patterns) of tests that take
# more than a few seconds each on a 2-core machine, or many seconds together, while a
# cheaper sibling covers the same code in the fast subset (e.g. the 6- and 12-layer
# cached-decode cases stay, the 24-layer ones are slow). CI runs everything.
SLOW = (
    "*test_hf_export.py::test_hf_logits_and_generate_equal_mixtrain[[]moe]",  # ~10-20 s each; other MoE cases stay
    "*test_hf_export.py::test_hf_logits_and_generate_equal_mixtrain[[]moe_ma_offset]",
    "*test_bench_train.py::test_bench_train_times_steps_against_a_different_baseline",  # two benches
    "*test_ux.py::test_a_sweep_keeps_its_record_of_refused_points",  # a Hydra sweep
    "*test_recipes.py::test_layout_command_json_from_any_directory",  # subprocesses
    "*test_recipes.py::test_commands_explain_bad_input",  # subprocesses
    "*test_recipes.py::test_every_layout_recipe_trains_a_step[ma_*]",  # 24-layer presets; standard, cla, ... stay
    "*test_infer.py::test_cached_decode_matches_full_forward[24L-*",
    "*test_infer.py::test_ragged_batch_matches_rows_alone[cfg2-*",
    "*test_infer.py::test_bench_infer_cpu",
    "*test_stages.py::test_tiny_chain_end_to_end",
    "*test_stages.py::test_paper_recipe_composes_for_every_stage[ma_*]",  # standard and swa stay
    "*test_model.py::test_sdpa_equals_flex_cpu",
)


def pytest_collection_modifyitems(config, items):
    import fnmatch

    import torch

    slow = pytest.mark.slow
    for item in items:
        if any(fnmatch.fnmatchcase(item.nodeid, pattern) for pattern in SLOW):
            item.add_marker(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def python_exe() -> str:
    return sys.executable
