"""Procedural phantom data sets with known ground truth (numpy / scipy / PIL only).

No real clinical training data can be had offline, so every method is developed and tested on
phantoms whose truth is known by construction:

- :mod:`.cells` — class-conditional cytology cells + a checklist oracle (expert feedback).
- :mod:`.chest` — chest-X-ray phantoms with findings + radiology-style reports (SD / RoentGen).
- :mod:`.abdomen` — axial abdominal CT-like phantoms with captions (a different pretraining domain).
- :mod:`.fundus` — fundus photographs with patient-specific vessels, lesions and paired renders
  of the same eye with / without lesions (counterfactuals).
- :mod:`.ct` / :mod:`.ultrasound` — CT slices and ultrasound frames: foreign modalities the
  out-of-domain guard must refuse.
- :mod:`.datasets` — writers / readers of the ImageFolder and manifest layouts.
"""
