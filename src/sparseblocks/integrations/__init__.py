"""Whole models: sparsify/densify and the architecture tables, checkpoints, Hugging Face folders."""
