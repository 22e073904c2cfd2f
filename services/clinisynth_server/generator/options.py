"""The generator's request in domain terms, and its validation (before any model work)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from clinisynth_server.catalog import Catalog, ModelRecord
from clinisynth_server.errors import InvalidArgument, ValidationErrors
from clinisynth_server.imaging.encode import (
    DICOM_MODALITIES,
    SYNTHETIC_PATIENT_ID_RE,
    is_synthetic_patient_id,
)
from clinisynth_server.methods.schedulers import SAMPLERS
from clinisynth_server.similarity.gate import check_policy
from clinisynth_server.store.base import outside_service_namespaces

GENERATIVE_KINDS = ("text_to_image", "class_conditional", "unconditional")
FORMATS = ("png", "png16", "dicom", "raw")
MAX_PROMPT_CHARS = 1000
MAX_STEPS = 1000
MAX_SIDE_FACTOR = 4
MAX_BEST_OF_N = 16


@dataclass(frozen=True)
class RewardFilter:
    reward_model: str = ""
    reward_version: str = ""
    min_reward: float = 0.0
    best_of_n: int = 0
    max_candidates: int = 0

    @property
    def active(self) -> bool:
        return self.min_reward > 0 or self.best_of_n > 1 or bool(self.reward_model)


@dataclass(frozen=True)
class GenerateOptions:
    model: str
    version: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    class_name: str = ""
    num_images: int = 0
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    sampler: str = ""
    seed: int | None = None
    eta: float = 0.0
    format: str = "png"
    modality: str = ""
    patient_id: str = ""
    series_description: str = ""
    store_outputs: bool = False
    output_prefix: str = ""
    preview_every: int = 0
    reward: RewardFilter = RewardFilter()
    request_id: str = ""
    # A [pacs.NAME] destination the images also go to, as one DICOM series ("" = none).
    to_pacs: str = ""
    # Memorization gate policy: off | flag | regenerate | refuse ("" = the default, regenerate).
    memorization: str = ""


def validate(options: GenerateOptions, catalog: Catalog) -> tuple[ModelRecord, GenerateOptions]:
    """Resolve defaults against the model; every bad field is reported at once."""
    record = catalog.get(options.model, options.version)
    if record.kind not in GENERATIVE_KINDS:
        raise InvalidArgument.for_field(
            "model.name", f"{record.name} is a {record.kind} model, not a generator"
        )
    errors = ValidationErrors()
    prompt = options.prompt.strip()
    if record.kind == "text_to_image":
        if not prompt:
            errors.add("prompt", f"{record.name} is a text-to-image model: a prompt is required")
        elif len(options.prompt) > MAX_PROMPT_CHARS:
            errors.add("prompt", f"at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}")
        if options.class_name:
            errors.add("class_name", f"{record.name} takes a prompt, not a class")
    else:
        if prompt or options.negative_prompt:
            errors.add("prompt", f"{record.name} is {record.kind}: it takes no prompt")
        if record.kind == "class_conditional":
            if not options.class_name:
                errors.add("class_name", f"required; one of {record.classes}")
            elif options.class_name not in record.classes:
                errors.add(
                    "class_name", f"unknown class {options.class_name!r}; one of {record.classes}"
                )
        elif options.class_name:
            errors.add("class_name", f"{record.name} is unconditional: it takes no class")

    num_images = options.num_images or 1
    if not 1 <= num_images <= record.max_images:
        errors.add("num_images", f"must be 1..{record.max_images}, got {options.num_images}")

    multiple = int(record.extra.get("size_multiple", 8)) or 1
    width, height = options.width or record.width, options.height or record.height
    for name, value, native in (("width", width, record.width), ("height", height, record.height)):
        if value < multiple or value > MAX_SIDE_FACTOR * native or value % multiple:
            errors.add(
                name,
                f"{value} not possible: a multiple of {multiple} in "
                f"{multiple}..{MAX_SIDE_FACTOR * native} (native {native})",
            )

    steps = options.steps or record.default_steps
    train_steps = int(record.scheduler.get("num_train_timesteps", 1000))
    if not 1 <= steps <= min(MAX_STEPS, train_steps):
        errors.add("steps", f"must be 1..{min(MAX_STEPS, train_steps)}, got {options.steps}")

    guidance = (
        record.default_guidance_scale if options.guidance_scale is None else options.guidance_scale
    )
    if record.kind == "text_to_image":
        if not 1.0 <= guidance <= 30.0:
            errors.add("guidance_scale", f"must be in [1, 30], got {guidance}")
    elif guidance != 1.0:
        errors.add("guidance_scale", f"{record.name} has no unconditional branch: only 1 works")

    sampler = (options.sampler or record.default_sampler).strip().lower()
    if sampler not in record.samplers or sampler not in SAMPLERS:
        errors.add("sampler", f"unknown sampler {sampler!r}; one of {record.samplers}")
    if not 0.0 <= options.eta <= 1.0:
        errors.add("eta", f"must be in [0, 1], got {options.eta}")
    if options.format not in FORMATS:
        errors.add("format", f"must be one of {FORMATS}")
    if options.modality and options.modality not in DICOM_MODALITIES:
        errors.add("dicom.modality", f"one of {sorted(DICOM_MODALITIES)}")
    if options.patient_id and not is_synthetic_patient_id(options.patient_id):
        # A synthetic image must never carry a real patient's identifier: only the service's
        # own synthetic form is accepted (e.g. the PatientID of an earlier synthetic image).
        errors.add(
            "dicom.patient_id",
            f"must be a synthetic patient id matching {SYNTHETIC_PATIENT_ID_RE.pattern} "
            "(as issued in earlier synthetic images), or empty for one derived from the request",
        )
    if options.preview_every < 0:
        errors.add("preview_every", "must be >= 0")
    if options.seed is not None and options.seed < 0:
        errors.add("seed", f"must be >= 0, got {options.seed}")
    if options.output_prefix:
        try:
            outside_service_namespaces(options.output_prefix, "output_prefix")
        except InvalidArgument as exc:
            errors.violations.extend(exc.violations)
    rf = options.reward
    if not 0.0 <= rf.min_reward <= 1.0:
        errors.add("reward_filter.min_reward", f"must be in [0, 1], got {rf.min_reward}")
    if not 0 <= rf.best_of_n <= MAX_BEST_OF_N:
        errors.add("reward_filter.best_of_n", f"must be 0..{MAX_BEST_OF_N}, got {rf.best_of_n}")
    if rf.max_candidates < 0:
        errors.add("reward_filter.max_candidates", "must be >= 0")
    memorization = ""
    try:
        memorization = check_policy(options.memorization)
    except ValueError as exc:
        errors.add("memorization", str(exc))
    errors.raise_if_any()

    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    return record, replace(
        options,
        prompt=prompt,
        num_images=num_images,
        width=width,
        height=height,
        steps=steps,
        guidance_scale=guidance,
        sampler=sampler,
        seed=seed,
        version=str(record.version),
        memorization=memorization,
    )
