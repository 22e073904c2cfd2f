"""Benchmarks: each module's ``main(argv)`` measures clinisynth against a baseline side by side
in one run and prints ratios (medians; the machine is shared and noisy)."""
