"""PACS out: synthetic series delivered to DICOMweb (STOW-RS) or DIMSE (C-STORE) destinations.

The series is written to the store's outbox before the request is answered; a background worker
delivers it with retries, so a PACS outage delays delivery but loses nothing (:mod:`.outbox`).
"""
