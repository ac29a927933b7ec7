"""Files: structure files (:mod:`.structure_io`), compact models and export (:mod:`.export`).  Plain PyTorch."""
