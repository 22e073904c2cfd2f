"""Pure-torch methods: samplers, reward model, classifiers, counterfactual guidance, losses.

Importable by Triton ``model.py`` files, finetune workers and benchmarks alike; no gRPC, MinIO or
Triton client imports here. Import the submodules directly (``methods.sampling`` …): nothing is
loaded at package import.
"""
