"""Generated from protos/clinisynth/v1 by scripts/gen_protos.py."""
