"""The core: what a certificate needs and nothing more (torch, numpy, scipy; nothing of models,
data, runs, serve or the command line)."""
