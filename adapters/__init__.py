"""Swappable adapters that attach to the SAM core (LoRA, MSA, AutoSAM, 3D, DeSAM, RsPrompter)."""

if __name__ != "samadapt.adapters":
    raise ImportError("import samadapt.adapters (after `pip install -e .`), not the repo folder `adapters`")
