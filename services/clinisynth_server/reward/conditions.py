"""Which conditions and raters a judgement or review item may name (shared validation)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from clinisynth_server.catalog import Catalog
from clinisynth_server.errors import ValidationErrors
from clinisynth_server.reward.checklists import Criterion, checklist_for, known_cell_classes
from clinisynth_server.reward.scoring import Condition

MAX_PROMPT_CHARS = 1000
_RATER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")


class Rules:
    """Known classes (catalog + cell phantoms + configured extras) and registered raters."""

    def __init__(self, catalog: Catalog, *, raters: Iterable[str], classes: Iterable[str]) -> None:
        self.catalog = catalog
        self.raters = frozenset(r for r in raters if r)
        self.extra_classes = tuple(c for c in classes if c)

    def known_classes(self) -> set[str]:
        classes = set(self.extra_classes) | set(known_cell_classes())
        for record in self.catalog.list():
            classes.update(record.classes)
        return classes

    def check_condition(
        self, condition: Condition | None, errors: ValidationErrors, field_name: str
    ) -> None:
        if condition is None or not (condition.class_name or condition.prompt):
            errors.add(field_name, "required: a class_name or a prompt")
        elif condition.class_name and condition.class_name not in self.known_classes():
            errors.add(
                f"{field_name}.class_name",
                f"unknown class {condition.class_name!r}; known: {sorted(self.known_classes())}",
            )
        elif condition.prompt and len(condition.prompt) > MAX_PROMPT_CHARS:
            errors.add(f"{field_name}.prompt", f"at most {MAX_PROMPT_CHARS} characters")

    def checklist(self, condition: Condition | None) -> tuple[Criterion, ...]:
        errors = ValidationErrors()
        self.check_condition(condition, errors, "condition")
        errors.raise_if_any()
        assert condition is not None
        return checklist_for(condition)

    def check_rater(self, rater_id: str, errors: ValidationErrors, field_name: str) -> None:
        if not rater_id:
            errors.add(field_name, "required")
        elif not _RATER_RE.match(rater_id):
            errors.add(field_name, "letters, digits and _.@+- only, at most 128 characters")
        elif self.raters and rater_id not in self.raters:
            errors.add(field_name, f"unknown rater {rater_id!r}: not in the registered raters")
