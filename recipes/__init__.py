"""LightningCLI YAML recipes, shipped as package data (one folder per adapter)."""

if __name__ != "samadapt.recipes":
    raise ImportError("import samadapt.recipes (after `pip install -e .`), not the repo folder `recipes`")
