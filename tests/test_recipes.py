"""The GPU recipes (configs/recipes/): each parses as a fit config (no weights, no data), trains in bf16-mixed on
a hub model, and `ftlab estimate` (the architecture from a local copy of the hub model's config.json) says it fits
on the GPUs it states, with the figures its comment block gives."""

import re
from pathlib import Path

import pytest
import yaml

from ftlab.estimate.cli import estimate, parser

REPO = Path(__file__).resolve().parents[1]
ARCH = REPO / "tests" / "estimate" / "configs"
# recipe -> (the model's architecture, the GPU it states, devices per node, nodes, strategy)
RECIPES = {
    "lora-llama-3.2-1b": ("llama-3.2-1b-instruct", "L4", 1, 1, "ddp"),
    "lora-llama-3.1-8b": ("llama-3.1-8b-instruct", "H100", 1, 1, "ddp"),
    "qlora-llama-3.1-8b-24gb": ("llama-3.1-8b-instruct", "L4", 1, 1, "ddp"),
    "full-fsdp-llama-3.1-8b": ("llama-3.1-8b-instruct", "H100", 8, 1, "fsdp"),
    "full-fsdp-llama-3.1-70b": ("llama-3.1-70b-instruct", "H100", 8, 4, "fsdp"),
    "dpo-llama-3.1-8b": ("llama-3.1-8b-instruct", "H100", 1, 1, "ddp"),
}


def test_every_recipe_is_listed():
    assert sorted(p.stem for p in (REPO / "configs" / "recipes").glob("*.yaml")) == sorted(RECIPES)
    readme = (REPO / "README.md").read_text()
    for name in RECIPES:
        assert f"configs/recipes/{name}.yaml" in readme


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fits_where_it_says(name):
    arch, gpu, devices, nodes, strategy = RECIPES[name]
    path = REPO / "configs" / "recipes" / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert re.fullmatch(r"meta-llama/Llama-3\.[12]-\d+B-Instruct", config["model"]["name_or_path"])
    assert "/" in str(config["data"]["init_args"]["source"])  # a hub dataset
    assert (config["trainer"]["devices"], config["trainer"].get("num_nodes", 1)) == (devices, nodes)
    # parses and checks as `ftlab fit` would, then sizes the run: no weights, no data, no hub
    est = estimate(parser().parse_args(["--config", str(path), "--architecture", str(ARCH / arch), "--gpu", gpu]), [])
    assert est["strategy"] == strategy and est["devices"] == devices * nodes and est["precision"] == "bf16-mixed"
    assert est["fits"], (name, est["total_bytes"] / 2**30)
    # the comment block states today's estimate
    stated = re.search(r"total ([\d.]+) GiB: fits", path.read_text())
    assert stated and float(stated.group(1)) == pytest.approx(est["total_bytes"] / 2**30, abs=0.06), name
