"""clinisynth's research kit, kept apart from the product.

Benchmarks (``clinisynth benchmark ...``), procedural phantom data sets with their oracles, tiny
model builders for tests and demos, and toy counterfactual models. Nothing here is served; the
product package ``clinisynth_server`` never imports it.
"""
