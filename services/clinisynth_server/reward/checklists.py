"""The criteria an expert checks for a condition (class or prompt domain).

Cell types use the phantom oracle's checklist (:data:`clinisynth_server.phantoms.cells.CHECKLIST`),
so a rater and the oracle judge against the same criteria. Every other class and every prompt gets
the generic radiology / pathology checklist below.
"""

from __future__ import annotations

from dataclasses import dataclass

from clinisynth_server.reward.scoring import Condition


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


def checklist_for(condition: Condition) -> tuple[Criterion, ...]:
    if condition.class_name:
        try:
            from clinisynth_server.phantoms import cells
        except ImportError:  # pragma: no cover - phantoms ship with the server
            return DEFAULT_CHECKLIST
        crits = cells.CHECKLIST.get(condition.class_name)
        if crits:
            return tuple(Criterion(c.name, c.description) for c in crits)
    return DEFAULT_CHECKLIST


def known_cell_classes() -> tuple[str, ...]:
    try:
        from clinisynth_server.phantoms import cells
    except ImportError:  # pragma: no cover
        return ()
    return tuple(cells.CELL_TYPES)
