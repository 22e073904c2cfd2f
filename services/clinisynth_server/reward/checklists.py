"""The criteria an expert checks for a condition (class or prompt domain).

Cell types use the hematology checklist in ``cell_checklists.json`` — the same criteria the
phantom oracle of ``clinisynth_lab`` applies (a lab test keeps the two equal), so a rater and the
oracle judge against the same list. Every other class and every prompt gets
the generic radiology / pathology checklist below.
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass

from clinisynth_server.reward.scoring import Condition

CELL_CHECKLISTS_FILE = "cell_checklists.json"


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str


DEFAULT_CHECKLIST: tuple[Criterion, ...] = (
    Criterion("anatomy_plausible", "Anatomy / morphology is plausible for the condition."),
    Criterion("finding_matches", "The finding (class or prompt) is visible and matches."),
    Criterion("no_artifacts", "No generation artifacts (seams, repeated patterns, noise)."),
    Criterion("realistic_texture", "Texture and intensity look like a real acquisition."),
    Criterion("fully_in_view", "The structure of interest lies fully inside the image."),
)


@functools.cache
def _cell_checklists() -> dict[str, tuple[Criterion, ...]]:
    raw = json.loads((pathlib.Path(__file__).with_name(CELL_CHECKLISTS_FILE)).read_text())
    return {
        name: tuple(Criterion(c["name"], c["description"]) for c in crits)
        for name, crits in raw["checklists"].items()
    }


def checklist_for(condition: Condition) -> tuple[Criterion, ...]:
    if condition.class_name:
        crits = _cell_checklists().get(condition.class_name)
        if crits:
            return crits
    return DEFAULT_CHECKLIST


def known_cell_classes() -> tuple[str, ...]:
    return tuple(_cell_checklists())
