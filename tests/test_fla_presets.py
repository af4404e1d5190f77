"""The flash-linear-attention presets in configs/models/ (docs/models.md, "fla presets"): plain
transformers config.json files that build the size their name says.

fla is never imported in the pytest process: importing it registers its model types with
transformers' Auto classes (replacing transformers' own mamba2, ...), which would change what other
tests in the same worker build. The build check runs in one child process for all presets."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parent.parent / "configs" / "models"
FAMILIES = ("gla", "delta_net", "gated_deltanet", "rwkv7", "mamba2", "hgrn2")
SIZES = {"340m": 340e6, "1.3b": 1.3e9}
PRESETS = [f"{family}-{size}" for family in FAMILIES for size in SIZES]
# parameters within +-15% of the size in the name (vocab 32000, embeddings and head included)
TOLERANCE = 0.15
# Presets whose published config is not the size its name says; each is checked against its real size.
NOT_NOMINAL = {
    # flame's configs/gated_deltanet_340M.json keeps the 1.3B model's 6 heads x head_dim 256 (keys 1536
    # and values 3072 wide) at hidden_size 1024, so its token mixer is wider than the model: ~0.51B.
    "gated_deltanet-340m": 512e6,
}

# Run in a child: build every preset on the meta device (no memory, no kernels) after `import fla`.
CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
import fla  # noqa: F401  (registers fla's model types with the Auto classes)
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
out = {}
for path in sys.argv[1:]:
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out[path] = {
        "model_type": cfg.model_type,
        "class": type(model).__name__,
        "vocab_size": cfg.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
print("PRESETS " + json.dumps(out))
"""


def _expected(preset: str) -> float:
    return NOT_NOMINAL.get(preset, SIZES[preset.rsplit("-", 1)[1]])


def test_presets_are_plain_configs():
    """The twelve files are there, parse as JSON, and say what flame needs (no fla import needed)."""
    found = sorted(p.stem for p in MODELS.glob("*.json"))
    assert set(PRESETS) <= set(found), f"missing presets: {sorted(set(PRESETS) - set(found))}"
    for preset in PRESETS:
        cfg = json.loads((MODELS / f"{preset}.json").read_text(encoding="utf-8"))
        family = preset.rsplit("-", 1)[0]
        assert cfg["model_type"] == family, f"{preset}: model_type {cfg['model_type']!r}, not {family!r}"
        assert cfg["vocab_size"] == 32000, f"{preset}: vocab_size {cfg['vocab_size']}"
        assert cfg["fuse_cross_entropy"] is False, f"{preset}: flame computes the loss itself"
        assert not any(k.startswith("_") for k in cfg), f"{preset}: private keys {sorted(cfg)}"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("fla") is None, reason="flash-linear-attention (fla) is not installed"
)
def test_presets_build_at_their_size():
    paths = [str(MODELS / f"{p}.json") for p in PRESETS]
    proc = subprocess.run([sys.executable, "-c", CHILD, *paths], capture_output=True, text=True, timeout=240)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PRESETS ")]
    assert proc.returncode == 0 and lines, (
        f"the build child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    built = json.loads(lines[-1].removeprefix("PRESETS "))
    problems = []
    for preset, path in zip(PRESETS, paths):
        got = built[path]
        family = preset.rsplit("-", 1)[0]
        n, want = got["parameters"], _expected(preset)
        if got["model_type"] != family:
            problems.append(f"{preset}: model_type {got['model_type']!r} ({got['class']}), not {family!r}")
        if got["vocab_size"] != 32000:
            problems.append(f"{preset}: vocab_size {got['vocab_size']}")
        if abs(n - want) > TOLERANCE * want:
            problems.append(
                f"{preset}: {n / 1e6:.1f}M parameters, not within {TOLERANCE:.0%} of {want / 1e6:.0f}M"
            )
    counts = {p: f"{built[path]['parameters'] / 1e6:.1f}M" for p, path in zip(PRESETS, paths)}
    assert not problems, "\n".join(problems) + f"\nall counts: {counts}"
