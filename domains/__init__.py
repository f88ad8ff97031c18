"""All file IO and domain transforms: plain 2D images, medical volumes, remote-sensing rasters."""

if __name__ != "samadapt.domains":
    raise ImportError("import samadapt.domains (after `pip install -e .`), not the repo folder `domains`")
