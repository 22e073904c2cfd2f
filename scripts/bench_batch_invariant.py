"""``clinisynth benchmark batch_invariant``, kept under its old name: see that module."""

from clinisynth_lab.benchmarks.batch_invariant import main

if __name__ == "__main__":
    raise SystemExit(main())
