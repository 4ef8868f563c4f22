"""The project's own docs/ stay true: every preset row of docs/layouts.md is what the
code builds (layers, cache counts, KV bytes), and nothing in the repository points
at specifications a user of the repository does not have."""

import functools
import re
import subprocess
from pathlib import Path

import pytest

from mixtrain import accounting
from mixtrain.config import compose
from mixtrain.layouts import make_preset, preset_names

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _preset_rows() -> dict[str, list[str]]:
    rows = {}
    for line in (DOCS / "layouts.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[a-z_0-9]+( \(every=\d+\))?", cells[0]) and cells[1].startswith("0:"):
            rows[cells[0].split()[0]] = cells
    return rows


@functools.cache
def _paper_moe():
    return compose(["model=paper_moe"]).model


def _layer_of(token: str) -> tuple[int, str, int]:
    """'7:s<6' -> (7, 'sliding', 6); '5:G' -> (5, 'global', 5)."""
    m = re.fullmatch(r"(\d+):([Gs])(?:<(\d+))?", token)
    assert m, token
    i = int(m.group(1))
    return i, "global" if m.group(2) == "G" else "sliding", int(m.group(3)) if m.group(3) else i


def test_every_preset_has_a_row():
    assert sorted(_preset_rows()) == sorted(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_preset_row_matches_the_code(name):
    cells = _preset_rows()[name]
    every = int(re.search(r"every=(\d+)", cells[0]).group(1)) if "every=" in cells[0] else None
    layout = make_preset(name, 24, 1024, every=every)
    written = [_layer_of(t) for t in cells[1].split()]
    assert [i for i, _, _ in written] == list(range(24))
    assert [(l.kind, l.kv_source) for l in layout.layers] == [(k, src) for _, k, src in written]
    assert (int(cells[2]), int(cells[3])) == (layout.n_global_caches, layout.n_kv_caches - layout.n_global_caches)
    # KV bytes per token at 32K for paper_moe, by hand: 1,536 bytes per stored token of a
    # producer (2 x 3 heads x 128 x 2 bytes); a global producer stores every token, a
    # sliding one 1024 of 32768.
    n_global, n_sliding = int(cells[2]), int(cells[3])
    by_hand = n_global * 1536 + n_sliding * 1536 * 1024 / 32768
    assert float(cells[4].replace(",", "")) == by_hand
    assert accounting.kv_bytes_per_token(_paper_moe(), layout, 32768) == by_hand
    assert cells[5] == f"{36864 / by_hand:.1f}x"


def test_no_file_points_at_outside_specifications():
    repo = DOCS.parent
    try:
        files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    needle = "/".join(["shared", "spec"])  # built so this file does not match itself
    offenders = []
    for f in files:
        p = repo / f
        if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".sh", ".sbatch", ".toml", ".txt", ""):
            text = p.read_text(errors="ignore")
            if needle in text or "../" + "shared" in text:
                offenders.append(f)
    assert offenders == []


def test_docs_are_linked_from_the_readme():
    readme = (DOCS.parent / "README.md").read_text()
    for page in ("docs/layouts.md", "docs/paper.md", "docs/architecture.md"):
        assert page in readme, page
        assert (DOCS.parent / page).is_file()
